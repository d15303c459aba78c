"""SHA-256 of model files, computed once per file version and remembered across processes.

A checkpoint is gigabytes: hashing it for every saved image would cost seconds. `FileHashes` keeps each file's
digest in a small JSON file (`BASE/user/model_hashes.json`), keyed by the file's real path and valid while its
size and modification time (nanoseconds) are unchanged; a touched or replaced file is hashed again. The JSON
file is rewritten atomically (read, merge, replace), so several processes can share it: at worst one hashes a
file another has just hashed. An unreadable or corrupt JSON file counts as empty.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from engine.files import atomic_write

HASHES_FILE = "model_hashes.json"
_BLOCK = 1 << 20


def sha256_of(path: str | os.PathLike) -> str:
    """The hex SHA-256 of a file's bytes, read in 1 MB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


class FileHashes:
    """File digests remembered in `store` (a JSON file) by real path, size and modification time."""

    def __init__(self, store: str | os.PathLike):
        self.store = Path(store)

    def sha256(self, path: str | os.PathLike) -> str:
        """The file's SHA-256: from the store when the file's size and mtime match the remembered ones, else
        computed and remembered."""
        real = os.path.realpath(path)
        stat = os.stat(real)
        stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        known = self._read().get(real)
        if isinstance(known, dict) and {k: known.get(k) for k in stamp} == stamp and _is_hex(known.get("sha256")):
            return known["sha256"]
        digest = sha256_of(real)
        entries = self._read()  # again: another process may have added entries meanwhile
        entries[real] = {**stamp, "sha256": digest}
        try:
            atomic_write(self.store, json.dumps(entries, indent=1, sort_keys=True).encode())
        except OSError:  # a read-only base folder: the digest is still right, only not remembered
            pass
        return digest

    def _read(self) -> dict:
        try:
            entries = json.loads(self.store.read_text())
        except (OSError, ValueError):
            return {}
        return entries if isinstance(entries, dict) else {}


def _is_hex(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)
