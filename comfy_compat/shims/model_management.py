"""`comfy.model_management`: device queries on sdgraph's placement, interruption through the running node's
cancel token, memory queries answered by sdgraph's model manager. Loading models onto a device
(`load_models_gpu`) is ComfyUI's ModelPatcher business and is not provided."""

from __future__ import annotations

from typing import Any

from . import ShimModule


class InterruptProcessingException(Exception):
    """ComfyUI's name for an interrupted run (sdgraph raises its own `Interrupted`)."""


def build(env: Any, name: str) -> ShimModule:
    def runtime() -> Any:
        ctx = env.context
        return getattr(ctx, "resources", None)

    def get_torch_device() -> Any:
        import torch
        placement = getattr(runtime(), "placement", None)
        if placement is not None:
            return placement()[0]
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def intermediate_device() -> Any:
        import torch
        return torch.device("cpu")

    def throw_exception_if_processing_interrupted() -> None:
        ctx = env.context
        if ctx is not None:
            ctx.check_cancelled()

    def processing_interrupted() -> bool:
        ctx = env.context
        return bool(ctx is not None and ctx.cancel.cancelled)

    def soft_empty_cache(force: bool = False) -> None:
        models = getattr(runtime(), "models", None)
        if models is not None:
            models.release()

    def get_free_memory(dev: Any = None, torch_free_too: bool = False) -> int | tuple[int, int]:
        models = getattr(runtime(), "models", None)
        device = str(dev or get_torch_device())
        device = "cuda" if device.startswith("cuda") else "cpu"
        free = models.room(device) if models is not None else _system_free()
        return (free, free) if torch_free_too else free

    def total_memory(dev: Any = None) -> int:
        return _system_total()

    def float32(*_: Any, **__: Any) -> Any:
        import torch
        return torch.float32

    def cast_to(weight: Any, dtype: Any = None, device: Any = None, non_blocking: bool = False,
                copy: bool = False, stream: Any = None) -> Any:
        return weight.to(device=device, dtype=dtype, non_blocking=non_blocking, copy=copy)

    return ShimModule(name, {
        "get_torch_device": get_torch_device,
        "intermediate_device": intermediate_device,
        "unet_offload_device": intermediate_device,
        "text_encoder_offload_device": intermediate_device,
        "vae_offload_device": intermediate_device,
        "vae_device": get_torch_device,
        "text_encoder_device": get_torch_device,
        "intermediate_dtype": float32,
        "unet_dtype": float32,
        "vae_dtype": float32,
        "throw_exception_if_processing_interrupted": throw_exception_if_processing_interrupted,
        "processing_interrupted": processing_interrupted,
        "InterruptProcessingException": InterruptProcessingException,
        "soft_empty_cache": soft_empty_cache,
        "get_free_memory": get_free_memory,
        "get_total_memory": total_memory,
        "cast_to": cast_to,
        "cast_to_device": lambda tensor, device, dtype, copy=False: tensor.to(device=device, dtype=dtype, copy=copy),
        "is_device_mps": lambda device=None: str(device).startswith("mps"),
        "is_intel_xpu": lambda: False,
        "is_directml_enabled": lambda: False,
        "get_autocast_device": lambda device: getattr(device, "type", "cuda"),
        "in_training": False,
        "raise_non_oom": lambda exc: None,
        "OOM_EXCEPTION": MemoryError,
        "XFORMERS_IS_AVAILABLE": False,
    })


def _system_free() -> int:
    import os
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0


def _system_total() -> int:
    import os
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0
