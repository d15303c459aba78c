"""The pack environment: ComfyUI's module names, answered by sdgraph's shims while packs load and run.

Which names, and how:
- `folder_paths`, `node_helpers`, `latent_preview`, `comfy` with `comfy.utils`, `comfy.model_management`,
  `comfy.samplers` (only `KSampler.SAMPLERS/SCHEDULERS`), `comfy.comfy_types.node_typing`, `comfy.cli_args`,
  `comfy_api`, `comfy_api.latest` (V3: `io`, `ui`, `ComfyExtension`): shims in `comfy_compat.shims`, answered
  by a finder at the END of `sys.meta_path`, so only when no real module of that name is importable.
- `comfy_extras.nodes_mask` (`composite`).
- `torchvision`, `torchvision.transforms[.functional]`, `torchvision.transforms.v2[.functional]`: sdgraph's
  subset of torchvision (`comfy_compat.tv`) for packs loaded where torchvision is not installed; any other
  `torchvision.*` module is a placeholder module (nodes using it are refused with that reason).
- any other `comfy.*`, `comfy_extras.*`, `comfy_execution.*`, `comfy_api.*` module: an `UnavailableModule`
  (ComfyUI's model internals are not faked; see `unavailable.py`).
- `server` (`PromptServer.instance`): sdgraph has its own top-level `server` module, so the shim takes its place
  in `sys.modules` only while the environment is active, and ours comes back after.
- `nodes` (MAX_RESOLUTION, built-in classes under ComfyUI's names): sdgraph's own `nodes` package answers those
  names itself (`nodes.__getattr__` -> `comfy_compat.shims.comfy_nodes`), so nothing is swapped.

The environment is active (`with env.active():`) while packs load and while a pack node runs
(`with env.running(ctx):`, which also makes the node's RunContext current for `ProgressBar`,
`throw_exception_if_processing_interrupted` and `send_sync`). Outside, none of these names is in `sys.modules`.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from .unavailable import ComfyInternalsMissing, UnavailableModule, internals_used, is_torchvision_name

# The RunContext of the pack node running in this thread (or task): what ProgressBar, interruption checks and the
# built-in node classes of `comfy_nodes` act on. Set only by `PackEnvironment.running`.
CURRENT_RUN: ContextVar[Any] = ContextVar("sdgraph_pack_run", default=None)

# module name -> the shim module that builds it (`build(env) -> ModuleType`)
SHIMS = {
    "folder_paths": "comfy_compat.shims.folder_paths",
    "node_helpers": "comfy_compat.shims.node_helpers",
    "latent_preview": "comfy_compat.shims.latent_preview",
    "comfy": "comfy_compat.shims.comfy_package",
    "comfy.utils": "comfy_compat.shims.comfy_utils",
    "comfy.model_management": "comfy_compat.shims.model_management",
    "comfy.samplers": "comfy_compat.shims.samplers",
    "comfy.cli_args": "comfy_compat.shims.comfy_package",
    "comfy.comfy_types": "comfy_compat.shims.comfy_package",
    "comfy.comfy_types.node_typing": "comfy_compat.shims.comfy_package",
    "comfy_api": "comfy_compat.shims.v3_modules",
    "comfy_api.latest": "comfy_compat.shims.v3_modules",
    "comfy_api.latest.io": "comfy_compat.shims.v3_modules",
    "comfy_api.latest.ui": "comfy_compat.shims.v3_modules",
    "comfy_extras.nodes_mask": "comfy_compat.shims.comfy_extras",
    "server": "comfy_compat.shims.prompt_server",
    "torchvision": "comfy_compat.shims.torchvision",
    "torchvision.transforms": "comfy_compat.shims.torchvision",
    "torchvision.transforms.functional": "comfy_compat.shims.torchvision",
    "torchvision.transforms.v2": "comfy_compat.shims.torchvision",
    "torchvision.transforms.v2.functional": "comfy_compat.shims.torchvision",
}
SWAPPED = ("server",)  # names sdgraph itself uses: put in sys.modules only while active
INTERNAL_ROOTS = ("comfy", "comfy_extras", "comfy_execution", "comfy_api", "torchvision")


@dataclass(frozen=True)
class PackRoute:
    """An HTTP route a pack declared (`PromptServer.instance.routes`), to be mounted by the server."""

    pack: str
    method: str
    path: str
    handler: Callable[..., Any]
    options: tuple[tuple[str, Any], ...] = ()


class PackEnvironment:
    """One per registry: the shim modules, the routes packs declared, the folders they added, and (through
    CURRENT_RUN) the node running now."""

    def __init__(self, folders: Any = None) -> None:
        self.folders = folders  # nodes.folders.Folders for module-level folder_paths calls (else the run's)
        self.routes: list[PackRoute] = []
        self.message_listeners: list[Callable[[str, Any, str | None], None]] = []
        self.current_pack = ""
        self.pack_folders: dict[str, Path] = {}  # pack -> its folder (where `add_model_folder_path` may point)
        self.extra_folders: dict[str, list[Path]] = {}  # a pack's own kind -> folders (`add_model_folder_path`)
        self._modules: dict[str, ModuleType] = {}
        self._lock = threading.RLock()
        self._depth = 0
        self._saved: dict[str, ModuleType | None] = {}
        self._finder = _ShimFinder(self)
        self._preparer = _TorchvisionPreparer()

    # -- what runs now -----------------------------------------------------------------------------
    @property
    def context(self) -> Any:
        """The RunContext of the pack node running in this thread, or None (loading, or no node running)."""
        return CURRENT_RUN.get()

    def run_folders(self) -> Any:
        """The Folders a node's file access goes through: the running application's, else the loading one's."""
        ctx = self.context
        folders = getattr(getattr(ctx, "resources", None), "folders", None)
        if folders is None:
            folders = self.folders
        if folders is None:
            from nodes.folders import Folders
            folders = self.folders = Folders.at()
        return folders

    def send(self, event: str, data: Any, sid: str | None = None) -> None:
        for listener in list(self.message_listeners):
            listener(event, data, sid)

    @staticmethod
    def comfy_value(type_name: str, value: Any) -> Any:
        """An input as ComfyUI's code expects it: sdgraph's CONDITIONING becomes ComfyUI's list of
        `[tensor, {options}]` (LATENT, IMAGE and MASK already are ComfyUI's forms)."""
        to_comfy = getattr(value, "to_comfy", None)
        return to_comfy() if type_name == "CONDITIONING" and callable(to_comfy) else value

    def refusal(self, cls: type, definition: Any) -> str | None:
        """Why a pack's node class cannot run under sdgraph (None: it can): its code uses ComfyUI's model
        internals. (A node taking MODEL, CLIP or VAE registers: it gets sdgraph's model values, and a method of
        ComfyUI's ModelPatcher it calls fails at run time with that explanation, see `running`.)"""
        with self.active():  # a node's own `import torchvision.x` is resolved as it will be when it runs
            used = internals_used(cls)
        subset = [name for name in used if is_torchvision_name(name)]
        if subset:
            return (f"uses {', '.join(subset)}, which sdgraph's compatibility layer does not provide (torchvision "
                    "is not installed; sdgraph offers the part of it listed in docs/custom-nodes.md); the rest of "
                    "the pack loads")
        if used:
            return (f"uses ComfyUI's model internals ({', '.join(used)}), which sdgraph does not provide; the rest "
                    "of the pack loads")
        return None

    # -- activation --------------------------------------------------------------------------------
    @contextmanager
    def active(self) -> Iterator[PackEnvironment]:
        with self._lock:
            if self._depth == 0:
                self._install()
            self._depth += 1
        try:
            yield self
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0:
                    self._uninstall()

    @contextmanager
    def running(self, ctx: Any) -> Iterator[PackEnvironment]:
        token = CURRENT_RUN.set(ctx)
        try:
            with self.active():
                yield self
        except AttributeError as exc:
            explained = _model_object_error(exc)
            if explained is None:
                raise
            raise explained from exc
        finally:
            CURRENT_RUN.reset(token)

    @contextmanager
    def loading(self, pack: str, folder: Path | None = None) -> Iterator[PackEnvironment]:
        if folder is not None:
            self.pack_folders[pack] = folder
        previous, self.current_pack = self.current_pack, pack
        try:
            with self.active():
                yield self
        finally:
            self.current_pack = previous

    def _install(self) -> None:
        sys.meta_path.insert(0, self._preparer)
        sys.meta_path.append(self._finder)
        for name in SWAPPED:
            self._saved[name] = sys.modules.get(name)
            sys.modules[name] = self.module(name)
        for name, module in self._modules.items():
            sys.modules.setdefault(name, module)

    def _uninstall(self) -> None:
        for hook in (self._preparer, self._finder):
            if hook in sys.meta_path:
                sys.meta_path.remove(hook)
        for name, module in self._modules.items():
            if sys.modules.get(name) is module:
                del sys.modules[name]
        for name, saved in self._saved.items():
            if saved is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = saved
        self._saved.clear()

    # -- modules -----------------------------------------------------------------------------------
    def provides(self, name: str) -> bool:
        return name in SHIMS or name.split(".")[0] in INTERNAL_ROOTS

    def module(self, name: str) -> ModuleType:
        """The module this environment answers for `name` (made once, kept for the next activation)."""
        module = self._modules.get(name)
        if module is None:
            if name in SHIMS:
                module = importlib.import_module(SHIMS[name]).build(self, name)
            else:
                module = UnavailableModule(name)
            self._modules[name] = module
            parent, _, child = name.rpartition(".")
            if parent and parent in self._modules:
                setattr(self._modules[parent], child, module)
        return module


def _model_object_error(exc: AttributeError) -> ComfyInternalsMissing | None:
    """A pack node calling a ComfyUI ModelPatcher/CLIP/VAE method on one of sdgraph's model values: say so."""
    value = getattr(exc, "obj", None)
    home = type(value).__module__ or ""
    if value is None or not home.startswith(("diffusion", "runtime", "nodes")):
        return None
    return ComfyInternalsMissing(
        f"the node called {exc.name!r} on sdgraph's {type(value).__name__}: it expects ComfyUI's model object "
        "(ModelPatcher, CLIP, VAE), which sdgraph does not provide; use sdgraph's own nodes for this step")


class _ShimFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers for the environment's names, after every other finder has had its turn."""

    def __init__(self, env: PackEnvironment):
        self.env = env

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if not self.env.provides(fullname):
            return None
        module = self.env.module(fullname)
        return importlib.machinery.ModuleSpec(fullname, self, is_package=hasattr(module, "__path__"))

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return self.env.module(spec.name)

    def exec_module(self, module: ModuleType) -> None:
        return None


class _TorchvisionPreparer(importlib.abc.MetaPathFinder):
    """ComfyUI ships torchvision and packs import it at their top. A torchvision wheel built for another torch
    variant (CUDA wheel, CPU torch) has no compiled ops, and its import then stops at registering fake kernels
    for `torchvision::nms`/`qnms`: declaring those two schemas first lets its pure-Python parts (transforms)
    import; its compiled operators (nms, roi_align) still fail when called."""

    def __init__(self) -> None:
        self.done = False

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        if fullname == "torchvision" and not self.done and "torchvision" not in sys.modules:
            self.done = True
            declare_missing_torchvision_ops()
        return None


def declare_missing_torchvision_ops() -> None:
    spec = importlib.machinery.PathFinder.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    import torch
    compiled = list(Path(spec.submodule_search_locations[0]).glob("_C*.so"))
    try:
        if compiled:
            torch.ops.load_library(str(compiled[0]))  # what torchvision itself does first
            return
    except OSError:
        pass
    library = torch.library.Library("torchvision", "FRAGMENT")
    for op in ("nms", "qnms"):
        try:
            library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        except RuntimeError:
            pass
    _KEEP_ALIVE.append(library)


_KEEP_ALIVE: list[Any] = []  # the Library must outlive this call or its definitions are dropped
