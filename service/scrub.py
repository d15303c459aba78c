"""Messages for clients without the server's file system layout: paths inside the model, input, output and temp
roots become relative to the base folder (`models/checkpoints/x.safetensors`), any other absolute path is reduced
to its file name. Tracebacks stay in the server's log."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

# An absolute POSIX path: a "/" not preceded by a word character, ":" or "/" (so URLs and ratios stay), then
# path characters; quotes, spaces, commas and brackets end it.
_ABSOLUTE = re.compile(r"(?<![\w:/.~-])/[^\s'\"<>(),;:\[\]{}]*")


class PathScrubber:
    """`scrub(text)`: `roots` maps a display prefix (e.g. "models") to the absolute folder it stands for."""

    def __init__(self, roots: Mapping[str, Path]):
        pairs: list[tuple[str, str]] = []
        for shown, root in roots.items():
            for form in _forms(root):
                pairs.append((form.rstrip("/") + "/", shown.rstrip("/") + "/"))
                pairs.append((form.rstrip("/"), shown.rstrip("/")))
        self._pairs = sorted(set(pairs), key=lambda pair: -len(pair[0]))  # the most specific root first

    def __call__(self, text: str) -> str:
        return _ABSOLUTE.sub(self._replace, text)

    def _replace(self, found: re.Match) -> str:
        path = found.group(0)
        for prefix, shown in self._pairs:
            if path == prefix or path.startswith(prefix) and prefix.endswith("/"):
                return shown + path[len(prefix):]
        return path.rstrip("/").rsplit("/", 1)[-1] or path

    @classmethod
    def for_folders(cls, folders) -> PathScrubber:
        """The roots of a `nodes.folders.Folders`: models/, input/, output/, temp/."""
        return cls({"models": folders.base / "models", "input": folders.input, "output": folders.output,
                    "temp": folders.temp})


def _forms(root: Path) -> Iterable[str]:
    """The absolute path as given and with symlinks resolved (/tmp may be /private/tmp, etc.)."""
    yield os.path.abspath(root)
    yield os.path.realpath(root)


def short_traceback(exception_type: str, message: str) -> list[str]:
    """What clients get in `traceback` (ComfyUI's clients expect a list of lines): the exception alone."""
    return [f"{exception_type}: {message}\n" if exception_type else f"{message}\n",
            "(the full traceback is in the server's log)\n"]
