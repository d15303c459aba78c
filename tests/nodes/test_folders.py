"""Folder listing and path confinement."""

from __future__ import annotations

import os

import pytest

from nodes.folders import Folders, UnsafePathError, resolve_inside


def test_listing_survives_symlink_loops_and_hides_outside_files(tmp_path):
    base = tmp_path / "base"
    (base / "input" / "sub").mkdir(parents=True)
    (base / "input" / "sub" / "a.png").write_bytes(b"x")
    os.symlink(base / "input", base / "input" / "sub" / "loop")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(b"x")
    os.symlink(outside / "secret.png", base / "input" / "linked.png")
    served = Folders.at(base)
    assert served.list_inputs() == ["sub/a.png"]
    assert "linked.png" in Folders.at(base, trusted=True).list_inputs()
    with pytest.raises(UnsafePathError):
        served.input_path("linked.png")
    assert Folders.at(base, trusted=True).input_path("linked.png").name == "linked.png"


@pytest.mark.parametrize("name", ["../x.png", "/etc/passwd", "a/../../x", "..\\x.png", "x\0.png", "C:evil", ""])
def test_names_that_leave_their_folder_are_refused(tmp_path, name):
    with pytest.raises(UnsafePathError):
        resolve_inside(tmp_path, name)
    with pytest.raises(UnsafePathError):
        resolve_inside(tmp_path, name, follow_links=False)


def test_model_files_may_be_symlinks(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    (store / "m.safetensors").write_bytes(b"x")
    folders = Folders.at(tmp_path / "base")
    folders.models("checkpoints").mkdir(parents=True)
    os.symlink(store / "m.safetensors", folders.models("checkpoints") / "m.safetensors")
    assert folders.list_models("checkpoints") == ["m.safetensors"]
    assert folders.model_path("checkpoints", "m.safetensors").is_file()


def test_the_cli_removes_leftover_temporary_files_when_it_starts(tmp_path):
    """Issue #11, leftovers: `.part` files of writes a crash interrupted survived restarts."""
    import time

    import cli

    leftovers = [tmp_path / "output" / "sub" / ".img.png.abcd1234.part", tmp_path / "user" / ".x.json.q_1234zz.part"]
    for path in leftovers:
        path.parent.mkdir(parents=True)
        path.write_bytes(b"partial")
        os.utime(path, (time.time() - 10, time.time() - 10))
    assert cli.main(["nodes", "--base-dir", str(tmp_path)]) == 0
    assert not any(path.exists() for path in leftovers)
    assert Folders.at(tmp_path).written[-2:] == (tmp_path / "user", tmp_path / "models")


def test_a_name_part_longer_than_the_file_system_allows_is_refused_not_an_os_error(tmp_path):
    """A 5,000-character userdata name reached stat() and came back as ENAMETOOLONG, a 500 from the server."""
    with pytest.raises(UnsafePathError, match="longer than 255 bytes"):
        resolve_inside(tmp_path, "a" * 5000)
    with pytest.raises(UnsafePathError, match="longer than 255 bytes"):
        resolve_inside(tmp_path, "ok/" + "é" * 128 + ".json")  # 256 bytes in UTF-8
    assert resolve_inside(tmp_path, "b" * 255) == tmp_path.resolve() / ("b" * 255)
