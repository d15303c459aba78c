"""Atomic file writes: a file under its final name is always complete.

A write goes to a temporary file beside its target, `.<name>.<8 random characters>.part`, which is renamed into
place. A process killed mid-write leaves that file behind; `remove_stale_temp_files` (called when the server and
the CLI start) deletes such leftovers. The file gets the permissions `open()` would give a new file (0666 less
the process's umask), not the temporary file's private 0600: an output PNG is as readable as one ComfyUI writes.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

TEMP_PREFIX, TEMP_SUFFIX = ".", ".part"
NEW_FILE_MODE = 0o666  # what open() asks for a new file; the umask takes its share
_TEMP_NAME = re.compile(r"\..+\.[a-z0-9_]{8}\.part")  # what tempfile.mkstemp makes of the prefix and suffix


def atomic_write(path: str | os.PathLike, data: bytes, *, exclusive: bool = False) -> Path:
    """Write `data` to a temporary file beside `path`, fsync it, then rename it into place (and fsync the
    folder). With `exclusive`, refuse to replace an existing file (FileExistsError)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{target.name}.", suffix=TEMP_SUFFIX, dir=target.parent)
    try:
        os.fchmod(fd, NEW_FILE_MODE & ~current_umask())
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        if exclusive:
            os.link(tmp_name, target)  # fails with FileExistsError instead of replacing
            os.unlink(tmp_name)
        else:
            os.replace(tmp_name, target)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
    _fsync_dir(target.parent)
    return target


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (/proc/self/status); elsewhere set and
    restored at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def is_temp_name(name: str) -> bool:
    """Whether `name` is the name of one of `atomic_write`'s temporary files."""
    return _TEMP_NAME.fullmatch(name) is not None


def remove_stale_temp_files(roots: Iterable[str | os.PathLike], *, before: float | None = None) -> list[Path]:
    """Delete `atomic_write`'s temporary files left under `roots` by a process that died mid-write: regular files
    with its naming pattern, last modified before `before` (a time.time(); default now) and held open by no
    process. Symlinks are neither followed nor removed. Returns what was removed."""
    before = time.time() if before is None else before
    candidates = [path for root in roots for path in _temp_files(Path(root))
                  if path.lstat().st_mtime < before]
    if not candidates:
        return []
    in_use = _open_files()
    removed = []
    for path in candidates:
        if str(path) in in_use or os.path.realpath(path) in in_use:
            continue
        try:
            path.unlink()
        except FileNotFoundError:  # its writer finished (renamed it) or another cleaner was faster
            continue
        removed.append(path)
    return removed


def _temp_files(root: Path) -> Iterable[Path]:
    for dirpath, _dirnames, filenames in os.walk(root):  # followlinks=False: never leaves `root`
        for name in filenames:
            path = Path(dirpath, name)
            if is_temp_name(name) and path.is_file() and not path.is_symlink():
                yield path


def _open_files() -> set[str]:
    """Paths of the files any process we can see holds open (Linux's /proc; empty elsewhere)."""
    found = set()
    try:
        pids = [entry for entry in os.listdir("/proc") if entry.isdigit()]
    except OSError:
        return found
    for pid in pids:
        try:
            descriptors = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in descriptors:
            try:
                found.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
            except OSError:
                continue
    return found
