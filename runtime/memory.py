"""Device memory as the model manager sees it: how much is free, moving weights, giving freed memory back, and
sizes in bytes. `DeviceMemory` is the manager's port to the hardware (tests substitute a fake);
`TorchMemory` is the real one. torch is imported only inside its methods, so `import runtime` stays torch-free.
"""

from __future__ import annotations

import ctypes
import gc
import itertools
import os
import re
from typing import Any, Protocol

MiB = 1 << 20
GiB = 1 << 30


class DeviceMemory(Protocol):
    """The manager's view of the hardware; tests substitute a fake that only keeps accounts."""

    def free(self, device: str) -> int:
        """Bytes that could be allocated on `device` now."""

    def move(self, module: Any, device: str, *, recurse: bool = True) -> None:
        """Move a module's weights (only its own, not its children's, when recurse is False) to `device`."""

    def release(self, device: str) -> None:
        """Give memory freed by dropped weights back (garbage collection, allocator caches)."""

    def settle(self, device: str) -> None:
        """Cheaply return what a finished computation freed (called after each call with working memory)."""


class TorchMemory:
    """Real devices: CUDA from `torch.cuda.mem_get_info` (plus what torch's allocator holds unused), the CPU
    from /proc/meminfo's MemAvailable."""

    def free(self, device: str) -> int:
        if device.startswith("cuda"):
            import torch

            dev = torch.device(device)
            free, _total = torch.cuda.mem_get_info(dev)
            return int(free + torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev))
        if device == "cpu":
            return available_ram()
        return 1 << 62  # other accelerators: no free-memory query; budgets (if given) still apply

    def move(self, module: Any, device: str, *, recurse: bool = True) -> None:
        if recurse:
            module.to(device)
        else:
            # torch has no public call for "this module's own tensors only"; `_apply` is what `Module.to` uses
            module._apply(lambda t: t.to(device), recurse=False)

    def release(self, device: str) -> None:
        gc.collect()
        if device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()
        elif device == "cpu":
            trim_heap()

    def settle(self, device: str) -> None:
        if device == "cpu":  # freed activations would otherwise stay in glibc's heap and in the RSS
            trim_heap()


def available_ram() -> int:
    """MemAvailable (what can be allocated without swapping), or free physical pages where /proc is missing."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def trim_heap() -> None:
    """Return freed heap pages to the OS (glibc keeps freed blocks below 32 MB for reuse otherwise); a no-op
    where the C library has no malloc_trim."""
    try:
        trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # the process's own symbols: glibc's, if linked
    except OSError:
        return
    if trim is not None:
        trim(0)


def module_bytes(module: Any) -> int:
    """Bytes of a module's parameters and buffers (0 for objects that are not torch modules)."""
    tensors = itertools.chain(getattr(module, "parameters", list)(), getattr(module, "buffers", list)())
    return sum(t.numel() * t.element_size() for t in tensors)


def direct_bytes(module: Any) -> int:
    tensors = itertools.chain(module.parameters(recurse=False), module.buffers(recurse=False))
    return sum(t.numel() * t.element_size() for t in tensors)


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's OutOfMemoryError (CUDA), its CPU allocator's failures, and MemoryError."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        phrase in text for phrase in ("out of memory", "not enough memory", "can't allocate memory"))


def format_bytes(n: float) -> str:
    return f"{n / GiB:.2f} GB" if abs(n) >= GiB else f"{n / MiB:.0f} MB"


def parse_bytes(text: str) -> int:
    """'6G', '6GB', '512M', '1.5g', '1000000' -> bytes (binary units)."""
    match = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]?)i?b?\s*", text.lower())
    if not match:
        raise ValueError(f"not a size: {text!r}; write e.g. 6G, 512M or a number of bytes")
    number, unit = match.groups()
    return int(float(number) * {"": 1, "k": 1 << 10, "m": MiB, "g": GiB, "t": 1 << 40}[unit])
