"""The folders ComfyUI users know (models/checkpoints, models/vae, input/, output/, ...), with safe path joins.

`Folders.inside(kind, name)` is the one resolver: every path a node, an upload or /view reads or writes is
resolved by it when it is used (at run time, after any validation hook a plugin supplies, which may have let
anything through). Every path a user or client supplies must stay inside its root: no absolute paths, no `..`,
no NUL. For input/, output/ and temp/, symlinks are followed and must not lead out either, unless the folders
are `trusted` (the CLI, run by the machine's own user, trusts them: ComfyUI users link inputs in from
elsewhere). Model folders always admit symlinked files (linking model files in is common practice; the name is
still checked and must be one the folder lists).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from engine.files import remove_stale_temp_files

log = logging.getLogger(__name__)

MODEL_KINDS = ("checkpoints", "vae", "loras", "embeddings", "upscale_models", "controlnet",
               "diffusion_models", "unet", "text_encoders", "clip")  # unet, clip: ComfyUI's legacy folder names
MODEL_EXTENSIONS = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class UnsafePathError(ValueError):
    """A supplied name would leave its folder (../, an absolute path, a NUL, a symlink pointing out) or cannot
    name a file at all (a part longer than NAME_MAX)."""


NAME_MAX = 255  # bytes in one file or folder name (Linux, macOS, Windows)


def resolve_inside(root: Path, name: str, *, what: str = "file name", follow_links: bool = True) -> Path:
    """`root/name`, refusing names that leave `root`. With `follow_links` (the default) symlinks are resolved and
    must stay inside too; without, the name is checked as written and a symlinked file is admitted."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise UnsafePathError(f"{what} {name!r} is empty or contains a NUL byte")
    if os.path.isabs(name) or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise UnsafePathError(f"{what} {name!r} must be a name relative to the {root.name}/ folder, not an "
                              "absolute path")
    relative = os.path.normpath(name.replace("\\", "/"))
    if any(len(part.encode("utf-8", "surrogateescape")) > NAME_MAX for part in relative.split("/")):
        raise UnsafePathError(f"{what} {name[:40]!r}... has a part longer than {NAME_MAX} bytes, which no file "
                              "system here can hold; use a shorter name")
    if relative == ".." or relative.startswith("../"):
        raise UnsafePathError(f"{what} {name!r} points outside the {root.name}/ folder; use a name inside it")
    if not follow_links:
        return root.absolute() / relative
    base = root.resolve()
    candidate = (base / relative).resolve()
    if candidate != base and base not in candidate.parents:
        raise UnsafePathError(f"{what} {name!r} leads outside the {root.name}/ folder (through a symlink); use "
                              "a name inside it")
    return candidate


@dataclass(frozen=True)
class Folders:
    """Where models, inputs and outputs live. `base` defaults to the working directory."""

    base: Path
    output_override: Path | None = None
    trusted: bool = False  # admit symlinks in input/output/temp that lead elsewhere (local CLI use)

    @classmethod
    def at(cls, base: str | os.PathLike | None = None, *, output: str | os.PathLike | None = None,
           trusted: bool = False) -> Folders:
        return cls(Path(base or os.getcwd()).absolute(), Path(output).absolute() if output else None, trusted)

    def models(self, kind: str) -> Path:
        return self.base / "models" / kind

    @property
    def input(self) -> Path:
        return self.base / "input"

    @property
    def output(self) -> Path:
        return self.output_override or self.base / "output"

    @property
    def temp(self) -> Path:
        return self.base / "temp"

    def root(self, kind: str) -> Path:
        """The folder for a ComfyUI `type` (output, input, temp)."""
        roots = {"output": self.output, "input": self.input, "temp": self.temp}
        if kind not in roots:
            raise UnsafePathError(f"unknown folder type {kind!r}; use output, input or temp")
        return roots[kind]

    @property
    def written(self) -> tuple[Path, ...]:
        """The folders files are written into (uploads, outputs, previews, the queue's database, trained models)."""
        return self.input, self.output, self.temp, self.base / "user", self.base / "models"

    def remove_stale_temp_files(self) -> list[Path]:
        """Delete the temporary files of writes a crash interrupted (see engine.files); call it at start-up."""
        removed = remove_stale_temp_files(self.written)
        if removed:
            log.warning("removed %d temporary file(s) left by an interrupted write, e.g. %s", len(removed),
                        removed[0])
        return removed

    def list_models(self, kind: str) -> list[str]:
        return _list_files(self.models(kind), MODEL_EXTENSIONS, confine=False)

    def list_inputs(self) -> list[str]:
        return _list_files(self.input, IMAGE_EXTENSIONS, confine=not self.trusted)

    def inside(self, kind: str, name: str, *, what: str = "file name") -> Path:
        """The one resolver: `name` in the output, input or temp folder or a model folder (`MODEL_KINDS`),
        refused (UnsafePathError) when it leaves it. Call it where the file is opened: the real path (symlinks
        resolved) is checked against the folder's real path then, unless the folders are `trusted`; model
        folders admit symlinked files. `what` names the value in the error ("LoadImage input 'image'")."""
        if kind in MODEL_KINDS:
            return resolve_inside(self.models(kind), name, what=what, follow_links=False)
        return resolve_inside(self.root(kind), name, what=what, follow_links=not self.trusted)

    def model_path(self, kind: str, name: str, *, what: str = "") -> Path:
        path = self.inside(kind, name, what=what or f"{kind} model")
        if not path.is_file():
            raise FileNotFoundError(f"model file {name!r} not found in {self.models(kind)}; put it there "
                                    f"(available: {', '.join(self.list_models(kind)) or 'none'})")
        return path

    def input_path(self, name: str, *, what: str = "input image") -> Path:
        path = self.inside("input", name, what=what)
        if not path.is_file():
            raise FileNotFoundError(f"input file {name!r} not found in {self.input}; copy it there or upload it")
        return path


def _list_files(root: Path, extensions: tuple[str, ...], *, confine: bool) -> list[str]:
    """Files under `root` with one of `extensions`, following symlinked folders once each (a link loop ends the
    descent). With `confine`, anything that resolves outside `root` is left out, as it could not be opened."""
    if not root.is_dir():
        return []
    base = root.resolve()
    found = []
    visited: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in visited or (confine and not _within(base, real)):
            dirnames[:] = []
            continue
        visited.add(real)
        for filename in filenames:
            path = os.path.join(dirpath, filename)
            if filename.lower().endswith(extensions) and (not confine or _within(base, os.path.realpath(path))):
                found.append(os.path.relpath(path, root).replace(os.sep, "/"))
    return sorted(found)


def _within(base: Path, real: str) -> bool:
    return real == str(base) or real.startswith(str(base) + os.sep)
