"""Issue #15: model files' sha256 are computed once and remembered by size and mtime in a JSON file, across
processes (a new FileHashes on the same file stands for a new process); a touched or changed file is rehashed."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from runtime import hashes
from runtime.hashes import FileHashes


@pytest.fixture
def counted(monkeypatch):
    """The paths sha256_of really reads, in order."""
    reads = []
    real = hashes.sha256_of

    def counting(path):
        reads.append(path)
        return real(path)

    monkeypatch.setattr(hashes, "sha256_of", counting)
    return reads


def test_hash_is_computed_once_then_read_from_the_store(tmp_path, counted):
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"x" * 3000)
    store = tmp_path / "user" / "model_hashes.json"
    assert FileHashes(store).sha256(model) == hashlib.sha256(b"x" * 3000).hexdigest()
    assert FileHashes(store).sha256(model) == hashlib.sha256(b"x" * 3000).hexdigest()  # another process
    assert len(counted) == 1
    entry = json.loads(store.read_text())[os.path.realpath(model)]
    assert entry["size"] == 3000 and entry["mtime_ns"] == os.stat(model).st_mtime_ns


def test_touched_or_rewritten_file_is_rehashed(tmp_path, counted):
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"a" * 100)
    cache = FileHashes(tmp_path / "hashes.json")
    cache.sha256(model)
    stat = os.stat(model)
    os.utime(model, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # touched: same bytes
    assert cache.sha256(model) == hashlib.sha256(b"a" * 100).hexdigest()
    model.write_bytes(b"b" * 100)  # same size, new content
    os.utime(model, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000))
    assert cache.sha256(model) == hashlib.sha256(b"b" * 100).hexdigest()
    assert len(counted) == 3


def test_corrupt_store_counts_as_empty(tmp_path, counted):
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"weights")
    store = tmp_path / "hashes.json"
    store.write_text("{not json")
    assert FileHashes(store).sha256(model) == hashlib.sha256(b"weights").hexdigest()
    store.write_text(json.dumps({os.path.realpath(model): {"size": 7, "mtime_ns": os.stat(model).st_mtime_ns,
                                                           "sha256": "forged"}}))
    assert FileHashes(store).sha256(model) == hashlib.sha256(b"weights").hexdigest()
    assert len(counted) == 2
