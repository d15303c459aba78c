"""`comfy` (the package), `comfy.cli_args` and `comfy.comfy_types.node_typing`."""

from __future__ import annotations

from typing import Any

from . import ShimModule


class _Args:
    """ComfyUI's parsed command line: every flag reads as unset (None)."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return None


class _IOMeta(type):
    def __getattr__(cls, name: str) -> str:
        if name.startswith("__"):
            raise AttributeError(name)
        return "*" if name in ("ANY", "ANY_TYPE") else name


class IO(str, metaclass=_IOMeta):
    """`IO.IMAGE == "IMAGE"`, `IO.ANY == "*"`: ComfyUI's type names as attributes."""


class ComfyNodeABC:
    """The base ComfyUI's typed V1 nodes declare (no behaviour)."""


def build(env: Any, name: str) -> ShimModule:
    if name == "comfy":
        return ShimModule(name, {}, package=True, fallback=lambda child: env.module(f"comfy.{child}"))
    if name == "comfy.cli_args":
        return ShimModule(name, {"args": _Args()})
    if name == "comfy.comfy_types":
        return ShimModule(name, {}, package=True, fallback=lambda child: env.module(f"comfy.comfy_types.{child}"))
    return ShimModule(name, {"IO": IO, "ComfyNodeABC": ComfyNodeABC, "InputTypeDict": dict,
                             "InputTypeOptions": dict, "CheckLazyMixin": object, "FileLocator": dict})
