"""Shim modules: each has `build(env, name) -> ModuleType`, the module a pack gets for ComfyUI's `name`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

from ..unavailable import placeholder


class ShimModule(ModuleType):
    """A module made of the given attributes; a name it lacks is `fallback(name)` (by default a placeholder of
    ComfyUI's internals, so `from comfy.utils import something_we_lack` imports and fails only when used)."""

    def __init__(self, name: str, attributes: Mapping[str, Any], *, package: bool = False,
                 fallback: Callable[[str], Any] | None = None, doc: str = ""):
        super().__init__(name, doc or f"sdgraph's stand-in for ComfyUI's {name}")
        self.__dict__.update(attributes)
        if package:
            self.__path__: list[str] = []
        self.__dict__["_fallback"] = fallback

    def __getattr__(self, attribute: str) -> Any:
        if attribute.startswith("__"):
            raise AttributeError(attribute)
        fallback = self.__dict__.get("_fallback")
        value = fallback(attribute) if fallback is not None else placeholder(f"{self.__name__}.{attribute}")
        setattr(self, attribute, value)
        return value
