"""Atomic writes: a file under its final name is always complete, and exclusive writes never replace."""

from __future__ import annotations

import os

import pytest

from engine import files
from engine.files import atomic_write


def test_writes_creating_folders(tmp_path):
    target = tmp_path / "a" / "b" / "out.txt"
    assert atomic_write(target, b"hello") == target
    assert target.read_bytes() == b"hello"
    assert os.listdir(target.parent) == ["out.txt"]  # no temporary file left


def test_replaces_unless_exclusive(tmp_path):
    target = tmp_path / "out.txt"
    atomic_write(target, b"one")
    atomic_write(target, b"two")
    assert target.read_bytes() == b"two"
    with pytest.raises(FileExistsError):
        atomic_write(target, b"three", exclusive=True)
    assert target.read_bytes() == b"two"
    assert os.listdir(tmp_path) == ["out.txt"]
    atomic_write(tmp_path / "new.txt", b"x", exclusive=True)
    assert (tmp_path / "new.txt").read_bytes() == b"x"


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_get_the_permissions_open_would_give(tmp_path, umask):
    """Not the temporary file's private 0600: an output is as readable as a file any program writes."""
    previous = os.umask(umask)
    try:
        assert files.current_umask() == umask
        atomic_write(tmp_path / "out.png", b"x")
        atomic_write(tmp_path / "new.png", b"x", exclusive=True)
        (tmp_path / "plain.png").write_bytes(b"x")
    finally:
        os.umask(previous)
    modes = {name: (tmp_path / name).stat().st_mode & 0o777 for name in ("out.png", "new.png", "plain.png")}
    assert modes == dict.fromkeys(modes, 0o666 & ~umask)


def test_an_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(files.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "out.txt", b"data" * 1000)
    assert os.listdir(tmp_path) == []


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "out.txt"
    atomic_write(target, b"old")

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        atomic_write(target, b"new")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.txt"]


# --- issue #11, leftovers: temporary files of interrupted writes are removed at start-up ---------------------

def _leftover(folder, name="out.png", age=3600.0):
    """A temporary file as atomic_write names it, as a crash would leave it, `age` seconds old."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f".{name}.ab12_z9x.part"
    path.write_bytes(b"half a file")
    os.utime(path, (path.stat().st_atime - age, path.stat().st_mtime - age))
    return path


def test_the_pattern_is_what_atomic_write_makes(tmp_path, monkeypatch):
    made = []
    real_replace = os.replace
    monkeypatch.setattr(files.os, "replace", lambda src, dst: (made.append(os.path.basename(src)),
                                                                real_replace(src, dst)))
    atomic_write(tmp_path / "portrait 1.png", b"x")
    assert len(made) == 1 and files.is_temp_name(made[0])
    for name in ("x.part", ".x.part", "portrait.png", ".x.ABCDEFGH.part", ".x.abcdefgh.part.png"):
        assert not files.is_temp_name(name), name


def test_stale_temporary_files_are_removed_and_nothing_else(tmp_path):
    stale = [_leftover(tmp_path / "output"), _leftover(tmp_path / "input" / "sub" / "deep", "a.png")]
    recent = _leftover(tmp_path / "output", "recent.png", age=-60)  # modified after the cut-off
    held = _leftover(tmp_path / "temp", "held.png")
    kept = [tmp_path / "output" / "x.part", tmp_path / "output" / ".notes.part", tmp_path / "output" / "img.png"]
    for path in kept:
        path.write_bytes(b"keep")
    outside = _leftover(tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", tmp_path / "output" / "linked")
    os.symlink(outside, tmp_path / "output" / ".y.png.ab12_z9x.part")
    with open(held, "rb"):
        removed = files.remove_stale_temp_files([tmp_path / "output", tmp_path / "input", tmp_path / "temp",
                                                 tmp_path / "absent"])
    assert sorted(removed) == sorted(stale)
    assert not any(path.exists() for path in stale)
    assert recent.exists() and held.exists() and outside.exists() and all(path.exists() for path in kept)
    assert os.path.islink(tmp_path / "output" / ".y.png.ab12_z9x.part")
