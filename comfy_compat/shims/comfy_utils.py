"""`comfy.utils`: ProgressBar (sdgraph's progress events and interruption), common_upscale, and file loading
through safetensors or `torch.load(weights_only=True)`, never pickle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import ShimModule

PICKLE_FREE = (".safetensors", ".sft")


def build(env: Any, name: str) -> ShimModule:
    class ProgressBar:
        """ComfyUI's progress bar: each update is a progress event of the running node, and a cancelled run
        stops at the next update (`Interrupted`)."""

        def __init__(self, total: int, node_id: str | None = None):
            self.total, self.current, self.node_id = total, 0, node_id

        def update_absolute(self, value: float, total: float | None = None, preview: Any = None) -> None:
            if total is not None:
                self.total = total
            self.current = min(value, self.total) if self.total else value
            ctx = env.context
            if ctx is not None:
                ctx.progress(self.current, self.total, preview)

        def update(self, value: float) -> None:
            self.update_absolute(self.current + value)

    return ShimModule(name, {
        "ProgressBar": ProgressBar,
        "PROGRESS_BAR_ENABLED": True,
        "common_upscale": common_upscale,
        "lanczos": lanczos,
        "load_torch_file": load_torch_file,
        "save_torch_file": save_torch_file,
        "state_dict_prefix_replace": state_dict_prefix_replace,
        "MAX_RESOLUTION": 16384,
    })


def common_upscale(samples: Any, width: int, height: int, upscale_method: str, crop: str) -> Any:
    """Resize [B,C,H,W] samples to height x width (ComfyUI's methods: nearest-exact, bilinear, area, bicubic,
    lanczos, bislerp; crop "center" or "disabled")."""
    from nodes.imaging import upscale
    return upscale(samples, int(width), int(height), upscale_method, crop)


def lanczos(samples: Any, width: int, height: int) -> Any:
    from nodes.imaging import lanczos as pillow_lanczos
    return pillow_lanczos(samples, int(width), int(height))


def load_torch_file(ckpt: str, safe_load: bool = True, device: Any = None, return_metadata: bool = False) -> Any:
    """A state dict from safetensors, or from a torch file with `weights_only=True` (tensors and plain
    containers only: a file needing pickle is refused, whatever `safe_load` says)."""
    import torch
    path = Path(ckpt)
    device = torch.device("cpu") if device is None else device
    if path.suffix.lower() in PICKLE_FREE:
        from safetensors import safe_open
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
            metadata = handle.metadata()
        return (tensors, metadata) if return_metadata else tensors
    try:
        loaded = torch.load(str(path), map_location=device, weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path.name} could not be read with torch.load(weights_only=True) ({exc}); sdgraph "
                         "never unpickles files for custom nodes: convert it to .safetensors") from exc
    if isinstance(loaded, dict) and "state_dict" in loaded and isinstance(loaded["state_dict"], dict):
        loaded = loaded["state_dict"]
    return (loaded, None) if return_metadata else loaded


def save_torch_file(sd: dict, ckpt: str, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file
    save_file(sd, ckpt, metadata=metadata)


def state_dict_prefix_replace(state_dict: dict, replace_prefix: dict, filter_keys: bool = False) -> dict:
    out = {} if filter_keys else state_dict
    for old, new in replace_prefix.items():
        for key in [k for k in state_dict if k.startswith(old)]:
            out[new + key[len(old):]] = state_dict.pop(key)
    return out
