"""Loading node packs: modules of native NodeDefs and ComfyUI packs (V1 classes, V3 `ComfyNode`s), from folders
and entry points.

A pack that fails to import, or a definition that fails the registry's checks, is recorded in
`registry.load_errors` (pack, file, reason); the other packs load regardless. ComfyUI packs import ComfyUI's
modules: given a `ModuleEnvironment` (sdgraph's is `comfy_compat.PackEnvironment`), packs load inside it, their
nodes run inside it, and a node class it refuses (one using ComfyUI's model internals) is a per-node load error.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
import traceback
from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

from .comfy_v1 import adapt_class
from .comfy_v3 import adapt_v3, extension_nodes, is_v3_class
from .registry import LoadError, NodeRegistry
from .spec import NodeDef, NodeDefinitionError

ENTRY_POINT_GROUP = "sdgraph.nodes"


class ModuleEnvironment(Protocol):
    """What packs load and run in: `loading(pack)` while a pack's modules import, `running(ctx)` while one of its
    nodes runs, and `refusal(cls, definition)`: why a node class cannot run here (None: it can). It may also
    offer `comfy_value(type, value)`: an input in the form ComfyUI's code expects."""

    def loading(self, pack: str, folder: Path | None = None) -> AbstractContextManager[Any]: ...

    def running(self, ctx: Any) -> AbstractContextManager[Any]: ...

    def refusal(self, cls: type, definition: NodeDef) -> str | None: ...


def definitions_in(module: ModuleType, *, errors: list[LoadError], pack: str,
                   environment: ModuleEnvironment | None = None) -> Iterator[tuple[NodeDef, bool]]:
    """The node definitions a module offers, each with whether its types are declared implicitly (ComfyUI).

    Native: a `NODES` sequence, or else every NodeDef at module level. ComfyUI: NODE_CLASS_MAPPINGS (V1 classes
    and V3 ComfyNodes, with NODE_DISPLAY_NAME_MAPPINGS) and `comfy_entrypoint()` (V3)."""
    file = getattr(module, "__file__", "") or module.__name__
    listed = getattr(module, "NODES", None)
    if listed is None:
        native = [v for v in vars(module).values() if isinstance(v, NodeDef)]
    elif isinstance(listed, list | tuple):
        native = list(listed)
    else:
        native = []
        errors.append(LoadError(pack, file, f"NODES must be a list of node definitions, got {type(listed).__name__}"))
    for definition in native:
        yield definition, False
    mappings = getattr(module, "NODE_CLASS_MAPPINGS", None) or {}
    display = getattr(module, "NODE_DISPLAY_NAME_MAPPINGS", None) or {}
    if not isinstance(mappings, Mapping) or not isinstance(display, Mapping):
        errors.append(LoadError(pack, file, "NODE_CLASS_MAPPINGS and NODE_DISPLAY_NAME_MAPPINGS must be dicts"))
        return
    classes = [(str(name), cls, str(display.get(name, "") or "")) for name, cls in mappings.items()]
    entrypoint = getattr(module, "comfy_entrypoint", None)
    if callable(entrypoint):
        try:
            with environment.loading(pack) if environment else nullcontext():
                classes += [(_schema_id(cls), cls, "") for cls in extension_nodes(entrypoint)]
        except Exception as error:
            errors.append(LoadError(pack, file, f"comfy_entrypoint() failed: {_reason(error)}"))
    for name, cls, display_name in classes:
        definition = _adapt(name, cls, display_name, file, pack, errors, environment)
        if definition is not None:
            yield definition, True


def _adapt(name: str, cls: Any, display_name: str, file: str, pack: str, errors: list[LoadError],
           environment: ModuleEnvironment | None) -> NodeDef | None:
    around = environment.running if environment is not None else None
    try:
        adapt = adapt_v3 if is_v3_class(cls) else adapt_class
        with environment.loading(pack) if environment else nullcontext():
            definition = adapt(name, cls, display_name=display_name, source=file, around=around,
                               convert=getattr(environment, "comfy_value", None))
    except Exception as error:  # a bad declaration, or e.g. a mapping value that is not a class
        refusal = environment.refusal(cls, None) if environment is not None and isinstance(cls, type) else None
        if refusal:  # INPUT_TYPES failing on a missing ComfyUI base class: say which
            errors.append(LoadError(pack, file, f"node {name!r} ({cls.__name__}): {refusal}"))
        elif isinstance(error, NodeDefinitionError):
            errors.append(LoadError(pack, file, str(error)))
        else:
            errors.append(LoadError(pack, file, f"node {name!r}: cannot adapt {cls!r}: {type(error).__name__}: "
                                    f"{error}"))
        return None
    refusal = environment.refusal(cls, definition) if environment is not None else None
    if refusal:
        errors.append(LoadError(pack, file, f"node {name!r} ({cls.__name__}): {refusal}"))
        return None
    return definition


def _schema_id(cls: Any) -> str:
    try:
        return str(cls.define_schema().node_id)
    except Exception:
        return getattr(cls, "__name__", repr(cls))


def register_module(registry: NodeRegistry, module: ModuleType, *, pack: str,
                    environment: ModuleEnvironment | None = None) -> int:
    """Register a module's data types (`TYPES`: {name: description}) and node definitions; returns how many
    nodes were added. Problems are recorded in `registry.load_errors`."""
    errors: list[LoadError] = []
    added = 0
    file = getattr(module, "__file__", "") or module.__name__
    types = getattr(module, "TYPES", None) or {}
    if isinstance(types, Mapping) and all(isinstance(k, str) and isinstance(v, str) for k, v in types.items()):
        for type_name, description in types.items():
            registry.register_type(type_name, description=description, source=file)
    else:
        errors.append(LoadError(pack, file, 'TYPES must map type names to descriptions: {"MY_TYPE": "what it is"}'))
    for definition, implicit_types in definitions_in(module, errors=errors, pack=pack, environment=environment):
        added += registry.register_all([definition], pack=pack, file=file, declare_types=implicit_types)
    registry.load_errors.extend(errors)
    return added


def load_pack_dir(registry: NodeRegistry, root: Path, *, environment: ModuleEnvironment | None = None) -> list[str]:
    """Load every pack in `root` (a package folder with __init__.py, or a single .py file). Returns the names
    of packs that loaded. A pack's WEB_DIRECTORY (inside its folder) goes to `registry.web_directories`."""
    loaded: list[str] = []
    if not root.is_dir():
        return loaded
    for entry in sorted(root.iterdir()):
        if entry.name.startswith((".", "_")) or entry.name.endswith(".disabled"):
            continue
        if entry.is_dir() and (entry / "__init__.py").is_file():
            file = entry / "__init__.py"
        elif entry.is_file() and entry.suffix == ".py":
            file = entry
        else:
            continue
        pack = entry.stem if entry.is_file() else entry.name
        with environment.loading(pack, entry) if environment else nullcontext():
            module = _import_file(registry, pack, file, package=entry.is_dir())
        if module is not None:
            register_module(registry, module, pack=pack, environment=environment)
            _record_web_directory(registry, pack, entry, module)
            loaded.append(pack)
    return loaded


def _record_web_directory(registry: NodeRegistry, pack: str, folder: Path, module: ModuleType) -> None:
    web = getattr(module, "WEB_DIRECTORY", None)
    if not isinstance(web, str) or not folder.is_dir():
        return
    base = folder.resolve()
    path = (base / web).resolve()
    if path != base and base not in path.parents:
        registry.load_errors.append(LoadError(pack, str(folder), f"WEB_DIRECTORY {web!r} leaves the pack's folder; "
                                              "it is not served"))
    elif path.is_dir():
        registry.web_directories[pack] = path


def load_entry_points(registry: NodeRegistry, group: str = ENTRY_POINT_GROUP, *,
                      environment: ModuleEnvironment | None = None) -> list[str]:
    loaded = []
    for ep in importlib.metadata.entry_points(group=group):
        try:
            with environment.loading(ep.name) if environment else nullcontext():
                module = ep.load()
        except Exception as exc:
            registry.load_errors.append(LoadError(ep.name, ep.value, _reason(exc)))
            continue
        if isinstance(module, ModuleType):
            register_module(registry, module, pack=ep.name, environment=environment)
            loaded.append(ep.name)
        else:
            registry.load_errors.append(LoadError(ep.name, ep.value, "the entry point must name a module"))
    return loaded


def load_packs(registry: NodeRegistry, dirs: Iterable[Path], *, entry_points: bool = True,
               environment: ModuleEnvironment | None = None) -> list[str]:
    """Load the packs of `dirs` and the entry points; ComfyUI packs in `environment` (recorded as
    `registry.pack_environment`)."""
    if environment is not None:
        registry.pack_environment = environment
    loaded = []
    for root in dirs:
        loaded += load_pack_dir(registry, Path(root), environment=environment)
    if entry_points:
        loaded += load_entry_points(registry, environment=environment)
    return loaded


def _import_file(registry: NodeRegistry, pack: str, file: Path, *, package: bool) -> ModuleType | None:
    name = f"sdgraph_packs.{_identifier(pack)}"
    try:
        locations = [str(file.parent)] if package else None
        spec = importlib.util.spec_from_file_location(name, file, submodule_search_locations=locations)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot import {file}")
        module = importlib.util.module_from_spec(spec)
        sys.modules.setdefault("sdgraph_packs", ModuleType("sdgraph_packs"))
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module
    except BaseException as exc:  # a pack may even call sys.exit(); it must not take the others down
        if isinstance(exc, KeyboardInterrupt):
            raise
        sys.modules.pop(name, None)
        registry.load_errors.append(LoadError(pack, str(file), _reason(exc)))
        return None


def _identifier(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text)


def _reason(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


def load_report(registry: NodeRegistry) -> list[str]:
    """`sdgraph nodes --errors`: per pack with a problem, how many nodes registered, then each problem (the node
    and why), e.g. "ComfyUI-KJNodes: 207 nodes registered, 42 problems" / "  node 'X' (Cls): uses ...". """
    from .schema import python_module

    registered: dict[str, int] = {}
    for definition in registry:
        module = python_module(definition)
        if module.startswith("custom_nodes."):
            pack = module.split(".")[1]
            registered[pack] = registered.get(pack, 0) + 1
    by_pack: dict[str, list[LoadError]] = {}
    for error in registry.load_errors:
        by_pack.setdefault(error.pack, []).append(error)
    lines = []
    for pack, errors in by_pack.items():
        lines.append(f"{pack}: {registered.get(pack, 0)} nodes registered, {len(errors)} "
                     f"problem{'s' if len(errors) != 1 else ''}")
        lines += [f"  {Path(error.file).name}: {error.reason}" for error in errors]
    return lines
