"""The resources every node receives through its run context: folders, device and dtype choices, models.

One Runtime per process (the CLI's or the server's); nothing here is module-level state. It owns the process's
`ModelManager`, and its `around_node` (the engine's node hook, `engine.context.Resources`, which the executor
picks up) gives the manager the plan's look-ahead and retries a node once after an out-of-memory error.
Creating a Runtime does not import torch.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engine import NodeDef, RunContext
from engine.cache import CachedOutput
from runtime.hashes import HASHES_FILE, FileHashes
from runtime.memory import DeviceMemory
from runtime.models import ModelManager

from .folders import Folders


@dataclass
class Runtime:
    folders: Folders
    device: str | None = None  # "cpu", "cuda", "cuda:1"; None picks the best available
    dtype: str | None = None  # "fp32", "fp16", "bf16"; None follows the device's policy (diffusion/device.py)
    precision: Any = None  # a diffusion.device.Precision to use instead of `dtype` (per-part dtypes, benchmarks)
    allow_pickle: bool = False  # load .ckpt/.pt files (weights_only) only when the user asks
    ram_budget: int | None = None  # bytes models and working memory may take in RAM; None: what is available
    vram_budget: int | None = None  # the same on CUDA devices; None: mem_get_info minus a reserve
    unload_after_use: bool = False  # drop each model once no later node of the run needs it (run --unload)
    single_prompt: bool = False  # the process runs one prompt and exits: no model is kept for a next one
    memory: DeviceMemory | None = None  # the device accounting (a fake in tests); None: the real devices
    models: ModelManager = field(init=False, repr=False)
    hashes: FileHashes = field(init=False, repr=False)  # model files' sha256, remembered in user/ (the manifest)

    def __post_init__(self) -> None:
        self.models = ModelManager(self.memory, budgets={"cpu": self.ram_budget, "cuda": self.vram_budget},
                                   next_prompt=not self.single_prompt)
        self.hashes = FileHashes(self.folders.base / "user" / HASHES_FILE)
        self._placement: tuple[Any, Any] | None = None
        self._tokenizer: Any = None

    def placement(self) -> tuple[Any, Any]:
        """(torch.device, Precision) for every model this runtime loads (imports torch)."""
        if self._placement is None:
            from diffusion.device import pick_device, pick_precision

            device = pick_device(self.device)
            self._placement = (device, self.precision or pick_precision(device, self.dtype))
        return self._placement

    def tokenizer(self) -> Any:
        """The CLIP tokenizer, built once and shared by every CLIP value (it caches pieces it has seen)."""
        if self._tokenizer is None:
            from diffusion.tokenizer import ClipTokenizer

            self._tokenizer = ClipTokenizer()
        return self._tokenizer

    def around_node(self, *, definition: NodeDef, call: Callable[[], CachedOutput], ctx: RunContext) -> CachedOutput:
        """Wraps every node the executor runs: inference mode (as ComfyUI runs nodes), look-ahead for the manager,
        one retry after running out of memory, and with `unload_after_use` unloading what no later node needs.

        Inference mode only once torch is loaded: a graph of nodes that never use it does not import it."""
        torch = sys.modules.get("torch")
        mode = torch.inference_mode() if torch is not None else contextlib.nullcontext()
        with mode:
            return self.models.run_node(call, ctx=ctx, unload_after=self.unload_after_use)

    def free_memory(self, unload_models: bool = False, free_memory: bool = True) -> None:
        """POST /free: unload every model not in use, and/or give freed memory back to the system."""
        if unload_models:
            self.models.unload_all()
        if free_memory or unload_models:
            self.models.release()
