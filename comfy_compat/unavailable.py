"""ComfyUI's model internals, which sdgraph does not fake: importable placeholders that fail when used, and the
scan that finds which node classes use them (those nodes are refused with a per-node reason).

`from comfy.ldm.flux.math import apply_rope` at the top of a pack's module must not stop the module: the names
it imports are `Unavailable` placeholders. A placeholder is a class (so a pack may even subclass it), calling it,
instantiating a subclass or reading an attribute of it at run time raises `ComfyInternalsMissing` naming what
was missing. `internals_used(cls)` lists the placeholders a node class's code reaches.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Iterator
from typing import Any


class ComfyInternalsMissing(ImportError):
    """A pack used one of ComfyUI's model internals (ModelPatcher, comfy.sd, comfy.ldm.*), which sdgraph does
    not provide."""


def _missing(what: str) -> ComfyInternalsMissing:
    if is_torchvision_name(what):
        return ComfyInternalsMissing(f"{what} is not part of sdgraph's torchvision subset (torchvision is not "
                                     "installed); nodes that use it cannot run under sdgraph")
    return ComfyInternalsMissing(f"{what} is one of ComfyUI's model internals, which sdgraph does not provide; "
                                 "nodes that use it cannot run under sdgraph")


def is_torchvision_name(qualified: str) -> bool:
    return qualified.split(".")[0] == "torchvision"


class _UnavailableMeta(type):
    """Placeholders are classes: subclassing one works, creating an instance fails."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        raise _missing(cls.__comfy_name__)

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return placeholder(f"{cls.__comfy_name__}.{name}")

    def __iter__(cls) -> Iterator[Any]:  # `(*Base.RETURN_TYPES, ...)` in a class body must not stop the module
        return iter(())

    def __bool__(cls) -> bool:
        return False


def placeholder(qualified: str) -> type:
    """A stand-in for `qualified` (e.g. "comfy.sd.VAE")."""
    name = qualified.rsplit(".", 1)[-1] or "Unavailable"
    return _UnavailableMeta(name, (), {"__comfy_name__": qualified, "__module__": qualified.rsplit(".", 1)[0]})


def is_placeholder(value: Any) -> bool:
    if isinstance(value, _UnavailableMeta):
        return True
    return isinstance(value, type) and any(isinstance(base, _UnavailableMeta) for base in value.__mro__[1:])


def placeholder_name(value: Any) -> str:
    if isinstance(value, _UnavailableMeta):
        return value.__comfy_name__
    if isinstance(value, UnavailableModule):
        return value.__name__
    for base in value.__mro__[1:]:
        if isinstance(base, _UnavailableMeta):
            return base.__comfy_name__
    return repr(value)


class UnavailableModule(types.ModuleType):
    """A module of ComfyUI's model internals: every attribute is a placeholder, every submodule another."""

    def __init__(self, name: str):
        super().__init__(name, f"placeholder for ComfyUI's {name} (not provided by sdgraph)")
        self.__path__: list[str] = []
        self.__sdgraph_subset__ = is_torchvision_name(name)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        value = placeholder(f"{self.__name__}.{name}")
        setattr(self, name, value)
        return value


def internals_used(cls: type, *, limit: int = 3) -> list[str]:
    """The model internals a node class reaches: its bases, and the globals (and attributes of provided comfy
    modules) read by its methods, their nested functions and the module-level functions they call, transitively
    within the pack. At most `limit` names, sorted."""
    found: set[str] = set()
    for base in cls.__mro__[1:]:
        if isinstance(base, _UnavailableMeta):
            found.add(base.__comfy_name__)
    seen: set[int] = set()
    pending = [fn for fn in _functions_of(cls)]
    while pending and len(seen) < 2000:
        fn = pending.pop()
        if id(fn.__code__) in seen:
            continue
        seen.add(id(fn.__code__))
        namespace = getattr(fn, "__globals__", {})
        found.update(subset_names_missing(fn.__code__, namespace))
        for code in _codes(fn.__code__):
            names = code.co_names
            for name in names:
                value = namespace.get(name)
                if value is None:
                    continue
                if is_placeholder(value) or isinstance(value, UnavailableModule):
                    found.add(placeholder_name(value))
                elif isinstance(value, types.ModuleType):
                    found.update(_unavailable_attributes(value, names))
                elif _same_pack(value, cls):
                    pending.extend(_functions_of(value) if isinstance(value, type) else [value])
    return sorted(found)[:limit]


def _unavailable_attributes(module: types.ModuleType, names: tuple[str, ...]) -> Iterator[str]:
    """`comfy.sd.load_checkpoint(...)` reads global `comfy` then attributes: find the unavailable ones."""
    if not module.__name__.startswith(("comfy", "comfy_extras", "comfy_execution")):
        return
    for name in names:
        value = module.__dict__.get(name)
        if isinstance(value, UnavailableModule) or is_placeholder(value):
            yield placeholder_name(value)


def _same_pack(value: Any, cls: type) -> bool:
    """A function or class defined in the node's own pack (followed), not a library's."""
    if not (inspect.isfunction(value) or isinstance(value, type)):
        return False
    module, home = getattr(value, "__module__", "") or "", cls.__module__ or ""
    return bool(module) and module.split(".")[:2] == home.split(".")[:2]


def _functions_of(cls: type) -> Iterator[types.FunctionType]:
    for klass in cls.__mro__:
        if klass is object or isinstance(klass, _UnavailableMeta) or klass.__module__ == "builtins":
            continue
        for member in vars(klass).values():
            if isinstance(member, staticmethod | classmethod):
                member = member.__func__
            if isinstance(member, property):
                member = member.fget
            if inspect.isfunction(member):
                yield member


def _codes(code: types.CodeType) -> Iterator[types.CodeType]:
    yield code
    for constant in code.co_consts:
        if isinstance(constant, types.CodeType):
            yield from _codes(constant)


def _subset_module(value: Any) -> bool:
    """A module sdgraph offers only part of (its torchvision subset)."""
    return isinstance(value, types.ModuleType) and value.__dict__.get("__sdgraph_subset__", False)


def subset_names_missing(code: types.CodeType, namespace: dict[str, Any]) -> set[str]:
    """The names a function reads from a partly provided module that the module lacks: attribute chains from a
    global or local bound to one (`T.functional.adjust_gamma`, `transforms.ToTensor`) and names imported from one
    inside the function (`from torchvision.ops import nms`), followed through the bytecode."""
    import dis
    import importlib
    found: set[str] = set()
    for inner in _codes(code):
        current: Any = None
        imported: Any = None
        local_modules: dict[str, Any] = {}
        fromlist: Any = None
        for instruction in dis.get_instructions(inner):
            op, name = instruction.opname, instruction.argval
            if op == "LOAD_CONST":
                fromlist = name
            if op in ("LOAD_ATTR", "LOAD_METHOD", "IMPORT_FROM") and isinstance(name, str):
                source = imported if op == "IMPORT_FROM" else current
                value = _subset_attribute(source, name, found)
                current = value if _subset_module(value) else None
                continue
            if op == "IMPORT_NAME" and isinstance(name, str) and is_torchvision_name(name):
                try:  # `import a.b` gives the package a, `from a.b import c` the module a.b
                    imported = current = importlib.import_module(name if fromlist else name.split(".")[0])
                except ImportError:
                    imported = current = None
                continue
            if op == "STORE_FAST" and _subset_module(current):
                local_modules[name] = current
            if op == "LOAD_GLOBAL":
                current = namespace.get(name)
            elif op in ("LOAD_FAST", "LOAD_DEREF"):
                current = local_modules.get(name)
            else:
                current = None
    return found


def _subset_attribute(module: Any, name: str, found: set[str]) -> Any:
    """`module.name` when module is a partly provided one (a lacking name is added to `found`), else None."""
    if not _subset_module(module):
        return None
    value = module.__dict__.get(name)
    if value is None or is_placeholder(value) or (isinstance(value, UnavailableModule)):
        found.add(f"{module.__name__}.{name}" if value is None else placeholder_name(value))
        return None
    return value
