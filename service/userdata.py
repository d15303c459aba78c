"""Per-user storage for the web frontend, as ComfyUI's user manager answers it: `user/<user>/` holds the
settings (`comfy.settings.json`) and whatever the frontend saves (workflows, templates, keybindings).

Single-user mode only (ComfyUI's default): every request is the user `default`. Paths a client gives are
relative to the user's folder; `..`, absolute paths, NUL and symlinks that lead out are refused. Writes are
atomic (a temporary file renamed into place), so a crash never leaves half a workflow.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.files import atomic_write
from nodes.folders import UnsafePathError, resolve_inside

DEFAULT_USER = "default"
SETTINGS_FILE = "comfy.settings.json"
# What a new user's settings start from: the frontend opens the graph it would restore (our default workflow,
# service/templates.py) instead of an empty canvas under the template browser.
# ComfyUI's release notes are not sdgraph's: the frontend does not ask api.comfy.org for them.
DEFAULT_SETTINGS: dict[str, Any] = {"Comfy.TutorialCompleted": True, "Comfy.Notification.ShowVersionUpdates": False}
# What a new user's folder starts with: the folders and files the frontend reads on its first page (it would
# get a 404, logged as a console error, for each one missing).
STARTER_FOLDERS = ("workflows", "subgraphs")
STARTER_FILES = {"comfy.templates.json": b"[]", "user.css": b""}


class UserDataError(Exception):
    """A request the store refuses: `status` is the HTTP status (400 bad path, 404 missing, 409 exists)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class UserStore:
    """The folder `user/` under the server's base dir."""

    root: Path

    def user_dir(self, user: str = DEFAULT_USER) -> Path:
        return self.root / user

    def prepare(self, user: str = DEFAULT_USER) -> None:
        """Create what a new user's first page reads (existing files are left alone)."""
        folder = self.user_dir(user)
        for name in STARTER_FOLDERS:
            (folder / name).mkdir(parents=True, exist_ok=True)
        for name, data in STARTER_FILES.items():
            if not (folder / name).exists():
                atomic_write(folder / name, data)

    def path(self, name: str, user: str = DEFAULT_USER, *, what: str = "userdata file") -> Path:
        """The file `name` inside the user's folder; UserDataError(400) when it would leave it."""
        folder = self.user_dir(user)
        folder.mkdir(parents=True, exist_ok=True)
        try:
            path = resolve_inside(folder, name, what=what)
        except UnsafePathError as exc:
            raise UserDataError(400, str(exc)) from None
        if path == folder.resolve():
            raise UserDataError(400, f"{what} {name!r} names the user folder itself; give a file inside it")
        return path

    # -- files --------------------------------------------------------------------------------------------
    def listing(self, directory: str, *, recurse: bool, full_info: bool, split: bool,
                user: str = DEFAULT_USER) -> list[Any]:
        """GET /userdata?dir=: the files under `directory` (relative to it, '/'-separated, sorted)."""
        folder = self.path(directory, user, what="dir")
        if not folder.is_dir():
            raise UserDataError(404, f"there is no folder {directory!r} in user {user}'s data")
        base = folder
        found = []
        for current, dirs, files in os.walk(folder):
            dirs.sort()
            here = Path(current)
            for name in sorted(files):
                if name.startswith(".sdgraph-tmp"):
                    continue
                file = here / name
                relative = file.relative_to(base).as_posix()
                if full_info:
                    found.append(self.info(file, relative))
                elif split:
                    found.append([relative, *relative.split("/")])
                else:
                    found.append(relative)
            if not recurse:
                break
        return found

    @staticmethod
    def info(path: Path, relative: str) -> dict[str, Any]:
        stat = path.stat()
        return {"path": relative, "size": stat.st_size, "modified": stat.st_mtime}

    def read(self, name: str, user: str = DEFAULT_USER) -> Path:
        path = self.path(name, user)
        if not path.is_file():
            raise UserDataError(404, f"there is no file {name!r} in user {user}'s data")
        return path

    def write(self, name: str, data: bytes, *, overwrite: bool, user: str = DEFAULT_USER) -> Path:
        path = self.path(name, user)
        if path.is_dir():
            raise UserDataError(400, f"{name!r} is a folder in user {user}'s data; give a file name")
        try:
            return atomic_write(path, data, exclusive=not overwrite)
        except FileExistsError:
            raise UserDataError(409, f"{name!r} exists already; send ?overwrite=true to replace it") from None

    def delete(self, name: str, user: str = DEFAULT_USER) -> None:
        self.read(name, user).unlink()

    def move(self, source: str, dest: str, *, overwrite: bool, user: str = DEFAULT_USER) -> Path:
        old, new = self.read(source, user), self.path(dest, user)
        if new.exists() and not overwrite:
            raise UserDataError(409, f"{dest!r} exists already; send ?overwrite=true to replace it")
        new.parent.mkdir(parents=True, exist_ok=True)
        os.replace(old, new)
        return new

    def relative(self, path: Path, user: str = DEFAULT_USER) -> str:
        return path.relative_to(self.user_dir(user).resolve()).as_posix()

    # -- settings -----------------------------------------------------------------------------------------
    def settings(self, user: str = DEFAULT_USER) -> dict[str, Any]:
        path = self.user_dir(user) / SETTINGS_FILE
        if not path.is_file():
            return dict(DEFAULT_SETTINGS)
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            return dict(DEFAULT_SETTINGS)  # unreadable (edited by hand): start over rather than fail every page
        return value if isinstance(value, dict) else dict(DEFAULT_SETTINGS)

    def update_settings(self, changes: dict[str, Any], user: str = DEFAULT_USER) -> dict[str, Any]:
        settings = {**self.settings(user), **changes}
        atomic_write(self.path(SETTINGS_FILE, user), json.dumps(settings, indent=2).encode())
        return settings
