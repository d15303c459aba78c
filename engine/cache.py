"""Content-addressed output cache.

A node's key is a digest of its type, version, constants, fingerprint and the keys of its inputs, so an
unchanged graph computes nothing, a changed widget re-runs exactly what depends on it, and identical
sub-chains share one result. The cache keeps results in least-recently-used order within a byte budget.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

DEFAULT_BUDGET_BYTES = 8 << 30
DEFAULT_MAX_ENTRIES = 50_000  # bounds a long-running server whose entries are small


class KeyParts(NamedTuple):
    """What a key was made of, kept to explain why a node re-ran. (A named tuple: immutable, and cheap to make
    for every node of a 100,000-node plan.)"""

    node_type: str
    version: str
    constants: Mapping[str, str]
    inputs: Mapping[str, str]
    fingerprint: str


def make_key(parts: KeyParts) -> str:
    text = repr((parts.node_type, parts.version, sorted(parts.constants.items()), sorted(parts.inputs.items()),
                 parts.fingerprint))
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def describe_change(before: KeyParts, after: KeyParts) -> str:
    """Say which part of a node's key changed between two runs."""
    if before.node_type != after.node_type or before.version != after.version:
        return f"node type/version changed ({before.node_type} v{before.version} -> {after.node_type} " \
               f"v{after.version})"
    for name in sorted(set(before.constants) | set(after.constants)):
        old, new = before.constants.get(name), after.constants.get(name)
        if old != new:
            return f"input {name!r} changed ({_clip(old)} -> {_clip(new)})"
    for name in sorted(set(before.inputs) | set(after.inputs)):
        if before.inputs.get(name) != after.inputs.get(name):
            return f"input {name!r} changed upstream"
    if before.fingerprint != after.fingerprint:
        return "its fingerprint changed (the file or resource it reads is different)"
    return "its cached result was evicted"


def _clip(text: str | None) -> str:
    if text is None:
        return "unset"
    return text if len(text) <= 40 else text[:37] + "..."


def estimate_nbytes(value: Any, _depth: int = 0) -> int:
    """Bytes a value holds: `nbytes` where an object reports it (arrays, tensors), else a structural estimate."""
    nbytes = getattr(value, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes
    if _depth > 6:
        return sys.getsizeof(value)
    if isinstance(value, str | bytes | bytearray):
        return len(value) + 49
    if isinstance(value, list | tuple | set | frozenset):
        return 56 + 8 * len(value) + sum(estimate_nbytes(v, _depth + 1) for v in value)
    if isinstance(value, dict):
        return 64 + sum(estimate_nbytes(v, _depth + 1) + 50 for v in value.values())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return 56 + sum(estimate_nbytes(getattr(value, f.name), _depth + 1) for f in dataclasses.fields(value))
    return sys.getsizeof(value)


class Written(NamedTuple):
    """Where a result read from the disk cache came from: the run that wrote it and when (time.time())."""

    run_id: str
    time: float


class About(NamedTuple):
    """What the runner tells the cache about a result it stores: what made it, its output types, the run and
    how long it took (the disk tier decides by cost whether it is worth writing)."""

    parts: KeyParts
    output_types: tuple[str, ...]
    run_id: str
    seconds: float
    output_node: bool = False
    input_types: tuple[str, ...] = ()  # the types of its linked inputs


@dataclass(frozen=True)
class CachedOutput:
    outputs: tuple[list, ...]
    ui: Mapping[str, Any] | None
    nbytes: int
    written: Written | None = None  # set when the result was read from the disk cache


class OutputCache:
    """Results by key, least recently used first out, within `max_bytes` and `max_entries`."""

    def __init__(self, max_bytes: int = DEFAULT_BUDGET_BYTES, max_entries: int = DEFAULT_MAX_ENTRIES):
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self._entries: OrderedDict[str, CachedOutput] = OrderedDict()
        self.nbytes = 0

    def get(self, key: str) -> CachedOutput | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def items(self) -> list[tuple[str, CachedOutput]]:
        """(key, result) pairs, least recently used first; looking does not count as a use."""
        return list(self._entries.items())

    def put(self, key: str, entry: CachedOutput, about: About | None = None) -> None:
        """Keep `entry` under `key` (`about` is for the disk tier, `engine.tiers.TieredCache`)."""
        if entry.nbytes > self.max_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self.nbytes -= old.nbytes
        self._entries[key] = entry
        self.nbytes += entry.nbytes
        while self.nbytes > self.max_bytes or len(self._entries) > self.max_entries:
            _, evicted = self._entries.popitem(last=False)
            self.nbytes -= evicted.nbytes

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0
