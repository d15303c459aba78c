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
