"""`folder_paths`: ComfyUI's folder functions on sdgraph's roots (`nodes.folders.Folders`), with the same path
checks as sdgraph's own nodes: a name a pack passes in must stay inside its folder (`Folders.inside`), or the
call raises `UnsafePathError` naming it. Which roots: the running application's (`ctx.resources.folders`)
while a node runs, the loading application's otherwise.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from nodes.folders import MODEL_EXTENSIONS, MODEL_KINDS, UnsafePathError, resolve_inside

from . import ShimModule

ANNOTATION = re.compile(r"^(?P<name>.*?)\s*\[(?P<kind>input|output|temp)\]$")


def build(env: Any, name: str) -> ShimModule:
    def folders() -> Any:
        return env.run_folders()

    def model_root(kind: str) -> Path:
        return folders().models(kind)

    def roots(kind: str) -> list[Path]:
        """models/<kind>, then the folders packs added for a kind of their own (`add_model_folder_path`)."""
        return [model_root(kind)] + ([] if kind in MODEL_KINDS else list(env.extra_folders.get(kind, ())))

    def get_folder_paths(kind: str) -> list[str]:
        return [str(root) for root in roots(kind)]

    def get_filename_list(kind: str) -> list[str]:
        """Model files of sdgraph's model kinds; every file for a pack's own kind (ComfyUI: no extension set)."""
        if kind in MODEL_KINDS:
            return folders().list_models(kind)
        return sorted({p.relative_to(root).as_posix() for root in roots(kind) if root.is_dir()
                       for p in root.rglob("*") if p.is_file()})

    def get_full_path(kind: str, filename: str) -> str | None:
        """The file's path, or None when it does not exist; a name leaving the folder raises."""
        if kind in MODEL_KINDS:
            path = folders().inside(kind, filename, what=f"folder_paths {kind} name")
            return str(path) if path.is_file() else None
        for root in roots(kind):
            path = resolve_inside(root, filename, what=f"folder_paths {kind} name", follow_links=False)
            if path.is_file():
                return str(path)
        return None

    def get_full_path_or_raise(kind: str, filename: str) -> str:
        path = get_full_path(kind, filename)
        if path is None:
            raise FileNotFoundError(f"model {filename!r} not found in {model_root(kind)}; put it there "
                                    f"(available: {', '.join(get_filename_list(kind)) or 'none'})")
        return path

    def get_directory_by_type(kind: str) -> str | None:
        try:
            return str(folders().root(kind))
        except UnsafePathError:
            return None

    def annotated(name: str, default_dir: str | None = None) -> tuple[str, str]:
        found = ANNOTATION.match(name)
        if found:
            return found["name"], found["kind"]
        if default_dir is not None:
            for kind in ("input", "output", "temp"):
                if os.path.abspath(default_dir) == str(folders().root(kind)):
                    return name, kind
        return name, "input"

    def get_annotated_filepath(name: str, default_dir: str | None = None) -> str:
        plain, kind = annotated(name, default_dir)
        return str(folders().inside(kind, plain, what=f"folder_paths {kind} file"))

    def exists_annotated_filepath(name: str) -> bool:
        try:
            return os.path.exists(get_annotated_filepath(name))
        except UnsafePathError:
            return False

    def get_save_image_path(filename_prefix: str, output_dir: str, image_width: int = 0,
                            image_height: int = 0) -> tuple[str, str, int, str, str]:
        """ComfyUI's answer: (folder, file name stem, next counter, subfolder, prefix); %width%/%height% are
        replaced; the folder must stay inside `output_dir`."""
        prefix = filename_prefix.replace("%width%", str(image_width)).replace("%height%", str(image_height))
        subfolder, filename = os.path.split(os.path.normpath(prefix))
        root = Path(output_dir)
        full_folder = resolve_inside(root, os.path.join(subfolder, filename) if subfolder else filename,
                                     what="filename_prefix", follow_links=False).parent
        counter = _next_counter(full_folder, filename)
        return str(full_folder), filename, counter, subfolder, prefix

    def get_input_directory() -> str:
        """The input folder, made if missing (ComfyUI makes it at start-up; packs list it in INPUT_TYPES)."""
        return _made(folders().input)

    def add_model_folder_path(kind: str, path: str, is_default: bool = False) -> None:
        """A pack adds a folder for a kind of its own (e.g. its bundled LUTs). Admitted only inside the pack's
        own folder or models/; sdgraph's model kinds keep their one folder under models/."""
        if kind in MODEL_KINDS:
            return
        folder = Path(path).resolve()
        allowed = [folders().base.resolve() / "models"] + [p.resolve() for p in env.pack_folders.values()]
        if any(folder == root or root in folder.parents for root in allowed):
            env.extra_folders.setdefault(kind, [])
            if folder not in env.extra_folders[kind]:
                env.extra_folders[kind].append(folder)

    def folder_names_and_paths() -> dict[str, tuple[list[str], set[str]]]:
        return {kind: ([str(model_root(kind))], set(MODEL_EXTENSIONS)) for kind in MODEL_KINDS}

    initial = env.run_folders()
    functions = {fn.__name__: fn for fn in (
        get_folder_paths, get_filename_list, get_full_path, get_full_path_or_raise, get_directory_by_type,
        get_annotated_filepath, exists_annotated_filepath, get_save_image_path, add_model_folder_path)}
    return ShimModule(name, {
        **functions,
        "get_input_directory": get_input_directory,
        "get_output_directory": lambda: _made(folders().output),
        "get_temp_directory": lambda: _made(folders().temp),
        "get_user_directory": lambda: str(folders().base / "user"),
        "base_path": str(initial.base),
        "models_dir": str(initial.base / "models"),
        "output_directory": str(initial.output),
        "input_directory": str(initial.input),
        "temp_directory": str(initial.temp),
        "supported_pt_extensions": set(MODEL_EXTENSIONS),
        "folder_names_and_paths": folder_names_and_paths(),
        "filter_files_extensions": lambda files, extensions: sorted(
            f for f in files if not extensions or os.path.splitext(f)[1].lower() in extensions),
    })


def _made(folder: Path) -> str:
    """ComfyUI makes input/, output/ and temp/ at start-up; packs write into them without checking."""
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder)


def _next_counter(folder: Path, filename: str) -> int:
    """One more than the highest `<filename>_<counter>_` already in the folder (1 in a new one)."""
    pattern = re.compile(re.escape(filename) + r"_(\d+)_?")
    highest = 0
    if folder.is_dir():
        for entry in folder.iterdir():
            found = pattern.match(entry.name)
            if found:
                highest = max(highest, int(found[1]))
    return highest + 1
