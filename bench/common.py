"""What several benchmarks share: the txt2img graph they run through the nodes, and /proc memory readings.

Imported by the bench scripts as `bench.common` (each script puts the repository root on sys.path).
"""

from __future__ import annotations


def txt2img_api(checkpoint: str, prompt: str, negative: str, *, size: int, steps: int, seed: int,
                cfg: float = 7.0) -> dict:
    """API-format txt2img (euler/normal) whose VAEDecode is node "6" and KSampler node "5"."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": "euler", "scheduler": "normal",
            "denoise": 1.0, "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
            "latent_image": ["4", 0]}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
    }


def proc_status(field: str) -> int:
    """A byte count from /proc/self/status (Linux), e.g. "VmRSS:" or "VmHWM:" (the peak RSS)."""
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(field)).split()[1]) * 1024


class PeakMeter:
    """Peak RSS per phase (VmHWM, which `reset` sets back to the current RSS) and over the whole process, which
    the resets would otherwise hide."""

    def __init__(self) -> None:
        self.earlier = 0  # the highest peak seen before the last reset

    def reset(self, forget: bool = False) -> None:
        """Start a new phase; with `forget`, the process's peak restarts from here too."""
        self.earlier = 0 if forget else max(self.earlier, self.phase())
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def phase(self) -> int:
        """The peak since the last reset."""
        return proc_status("VmHWM:")

    def process(self) -> int:
        return max(self.earlier, self.phase())
