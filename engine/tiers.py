"""The output cache as the executor sees it: memory first, then disk (`diskcache.py`), and the key history kept
beside the disk entries so a new process can still say what changed.

`TieredCache` answers `key in cache` (the plan: a node on disk is cached and its upstream is skipped), `get`
(memory, else a checked disk entry decoded by its types' codecs and kept in memory) and `put` (memory always;
disk when the node is cacheable, not an output node, every output has a codec and the result took long enough
to be worth it, `StorePolicy`). A disk entry that cannot be read is a miss: the runner computes the node.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from .cache import About, CachedOutput, KeyParts, OutputCache, Written, estimate_nbytes
from .codecs import Codec, CodecError
from .diskcache import DiskCache, Entry
from .files import atomic_write
from .plan import KeyHistory
from .registry import NodeRegistry

log = logging.getLogger(__name__)

HISTORY_MAX_SAVED = 5000  # node ids kept in history.json (the most recently run)


class TieredCache:
    def __init__(self, memory: OutputCache, disk: DiskCache | None, registry: NodeRegistry):
        self.memory, self.disk, self.registry = memory, disk, registry

    def __contains__(self, key: object) -> bool:
        return key in self.memory or (self.disk is not None and key in self.disk)

    def get(self, key: str) -> CachedOutput | None:
        """The result from memory, else from disk (with `written` set, and kept in memory); None on a miss."""
        hit = self.memory.get(key)
        if hit is not None or self.disk is None:
            return hit
        entry = self.disk.read(key)
        loaded = None if entry is None else decode(entry, self.registry)
        if loaded is None:
            return None
        self.memory.put(key, loaded)
        return CachedOutput(loaded.outputs, loaded.ui, loaded.nbytes,
                            Written(str(entry.header.get("run_id")), float(entry.header.get("written", 0))))

    def put(self, key: str, entry: CachedOutput, about: About | None = None) -> None:
        self.memory.put(key, entry)
        if self.disk is None or about is None or about.output_node:
            return  # an output node's result is a file the user expects every run to write
        # A result made from a value that cannot be stored (a model handle) is always worth it: recomputing it in
        # another process would first load that model, whatever this call took with the model already loaded.
        from_model = any(self.registry.codec(name) is None for name in about.input_types)
        if not from_model and not self.disk.policy.worth_storing(about.seconds, entry.nbytes):
            return
        blobs = encode(entry, about.output_types, self.registry)
        if blobs is None:
            return
        try:
            self.disk.write(key, entry_header(key, entry, about), blobs)
        except OSError as exc:  # a full or read-only disk costs the cache, never the run
            log.warning("could not write cache entry %s in %s: %s", key, self.disk.root, exc)


def entry_header(key: str, entry: CachedOutput, about: About) -> dict[str, Any]:
    parts = about.parts
    return {"key": key, "node_type": parts.node_type, "version": parts.version, "constants": dict(parts.constants),
            "inputs": dict(parts.inputs), "fingerprint": parts.fingerprint, "run_id": about.run_id,
            "written": time.time(), "seconds": round(about.seconds, 6), "types": list(about.output_types),
            "ui": entry.ui}


def encode(entry: CachedOutput, types: tuple[str, ...], registry: NodeRegistry) -> list[list[bytes]] | None:
    """Each output value through its type's codec; None when one has no codec or cannot be written (or the UI
    payload is not JSON)."""
    codecs = [registry.codec(name) for name in types]
    if None in codecs or len(codecs) != len(entry.outputs):
        return None
    try:
        json.dumps(entry.ui)
        return [[codec.dump(value) for value in values] for codec, values in zip(codecs, entry.outputs, strict=True)]
    except (CodecError, TypeError, ValueError) as exc:
        log.debug("not stored: %s", exc)
        return None


def decode(entry: Entry, registry: NodeRegistry) -> CachedOutput | None:
    """The result an entry holds; None when a type has no codec here or its codec refuses the bytes."""
    codecs: list[Codec | None] = [registry.codec(name) for name in entry.header.get("types", ())]
    if None in codecs or len(codecs) != len(entry.blobs):
        return None
    try:
        outputs = tuple([codec.load(blob) for blob in blobs] for codec, blobs in zip(codecs, entry.blobs, strict=True))
    except Exception as exc:  # noqa: BLE001 - whatever the codec raises, the node is computed instead
        log.warning("cache entry %s could not be decoded (%s); computing the node", entry.header.get("key"), exc)
        return None
    ui = entry.header.get("ui")
    nbytes = sum(estimate_nbytes(v) for values in outputs for v in values) + (estimate_nbytes(ui) if ui else 0)
    return CachedOutput(outputs, ui, nbytes)


class StoredKeyHistory(KeyHistory):
    """A KeyHistory read from and saved to a JSON file beside the disk cache, so `--explain` in a new process can
    say "input 'seed' changed (1 -> 2)". Saving merges with what other processes saved meanwhile (this
    process's records win) and keeps the `max_saved` most recent node ids."""

    def __init__(self, path: str | os.PathLike, max_saved: int = HISTORY_MAX_SAVED):
        super().__init__()
        self.path, self.max_saved = Path(path), max_saved
        self._mine: dict[str, KeyParts] = {}
        for node_id, parts in read_history(self.path).items():
            super().record(node_id, parts)

    def record(self, node_id: str, parts: KeyParts) -> None:
        super().record(node_id, parts)
        self._mine[node_id] = parts

    def save(self) -> None:
        if not self._mine:
            return
        merged = read_history(self.path)
        for node_id, parts in self._mine.items():
            merged.pop(node_id, None)
            merged[node_id] = parts
        kept = list(merged.items())[-self.max_saved:]
        text = json.dumps({nid: [p.node_type, p.version, dict(p.constants), dict(p.inputs), p.fingerprint]
                           for nid, p in kept})
        atomic_write(self.path, text.encode())
        self._mine.clear()


def read_history(path: Path) -> OrderedDict[str, KeyParts]:
    """The saved history; empty when the file is missing or unreadable (it only serves explanations)."""
    try:
        saved = json.loads(path.read_bytes())
        return OrderedDict((str(nid), KeyParts(str(t), str(v), dict(c), dict(i), str(f)))
                           for nid, (t, v, c, i, f) in saved.items())
    except (OSError, ValueError, TypeError, AttributeError):
        return OrderedDict()
