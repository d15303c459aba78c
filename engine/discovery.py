"""Loading node packs: modules of native NodeDefs and ComfyUI V1 packs, from folders and entry points.

A pack that fails to import, or a definition that fails the registry's checks, is recorded in
`registry.load_errors` (pack, file, reason); the other packs load regardless.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
import traceback
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import ModuleType

from .comfy_v1 import adapt_class
from .registry import LoadError, NodeRegistry
from .spec import NodeDef, NodeDefinitionError

ENTRY_POINT_GROUP = "sdgraph.nodes"


def definitions_in(module: ModuleType, *, errors: list[LoadError], pack: str) -> Iterator[tuple[NodeDef, bool]]:
    """The node definitions a module offers, each with whether its types are declared implicitly (V1).

    Native: a `NODES` sequence, or else every NodeDef at module level. V1: NODE_CLASS_MAPPINGS (with
    NODE_DISPLAY_NAME_MAPPINGS)."""
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
    for name, cls in mappings.items():
        try:
            yield adapt_class(str(name), cls, display_name=str(display.get(name, "") or ""), source=file), True
        except NodeDefinitionError as error:
            errors.append(LoadError(pack, file, str(error)))
        except Exception as error:  # e.g. a mapping value that is not a class
            errors.append(LoadError(pack, file, f"node {name!r}: cannot adapt {cls!r}: {type(error).__name__}: "
                                    f"{error}"))


def register_module(registry: NodeRegistry, module: ModuleType, *, pack: str) -> int:
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
    for definition, implicit_types in definitions_in(module, errors=errors, pack=pack):
        added += registry.register_all([definition], pack=pack, file=file, declare_types=implicit_types)
    registry.load_errors.extend(errors)
    return added


def load_pack_dir(registry: NodeRegistry, root: Path) -> list[str]:
    """Load every pack in `root` (a package folder with __init__.py, or a single .py file). Returns the names
    of packs that loaded."""
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
        module = _import_file(registry, pack, file, package=entry.is_dir())
        if module is not None:
            register_module(registry, module, pack=pack)
            loaded.append(pack)
    return loaded


def load_entry_points(registry: NodeRegistry, group: str = ENTRY_POINT_GROUP) -> list[str]:
    loaded = []
    for ep in importlib.metadata.entry_points(group=group):
        try:
            module = ep.load()
        except Exception as exc:
            registry.load_errors.append(LoadError(ep.name, ep.value, _reason(exc)))
            continue
        if isinstance(module, ModuleType):
            register_module(registry, module, pack=ep.name)
            loaded.append(ep.name)
        else:
            registry.load_errors.append(LoadError(ep.name, ep.value, "the entry point must name a module"))
    return loaded


def load_packs(registry: NodeRegistry, dirs: Iterable[Path], *, entry_points: bool = True) -> list[str]:
    loaded = []
    for root in dirs:
        loaded += load_pack_dir(registry, Path(root))
    if entry_points:
        loaded += load_entry_points(registry)
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
