"""What several benchmarks share: /proc memory readings. (The txt2img graph they run through the nodes is
`demo_model.evaluate.txt2img_graph`, graphs/txt2img.json's layout.)

Imported by the bench scripts as `bench.common` (each script puts the repository root on sys.path).
"""

from __future__ import annotations


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
