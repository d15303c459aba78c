"""The persistent tier of the output cache: one file per entry under its content key, shared by processes.

Layout: `<dir>/entries/<key[:2]>/<key>.entry`, written with `engine.files.atomic_write` (a temporary file renamed
into place: readers never see half an entry, and two writers of one key both write whole files, the last one
wins). A file is

    MAGIC | header length (8 bytes, big-endian) | sha256 of the header (32 bytes) | header (JSON) | blobs

The header names the node type and version, the key's parts, the run that wrote it and when, the UI payload,
and for each output value its data type, length and sha256. Reading checks all of it: a truncated or corrupted
file is deleted and reported as a miss (the node is recomputed), never returned.

No lock: reads need none (files only ever appear whole), and eviction tolerates files vanishing under it.
Eviction is least recently used by modification time, which a hit refreshes (`os.utime`), until the entries
fit in `max_bytes`; it runs after each write (a write happens only for results worth it, see `StorePolicy`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from .files import atomic_write, is_temp_name

MAGIC = b"SDGRAPH-CACHE-1\n"
ENTRY_SUFFIX = ".entry"
DEFAULT_MAX_BYTES = 10 << 30
_PREFIX = len(MAGIC) + 8 + 32
STALE_TEMP_SECONDS = 3600  # a temporary file this old in the cache was left by a process that died


@dataclass(frozen=True)
class StorePolicy:
    """Store a result when computing it took longer than writing and reading it back would:
    `seconds >= fixed_seconds + nbytes / bytes_per_second`.

    fixed_seconds: a file created, fsynced, renamed, later opened and checked (a few ms on a local disk).
    bytes_per_second: encoding, hashing, writing, reading, hashing again and decoding, all told (~100 MB/s on
    one CPU core). So a 512x512 image (3 MB) is stored when it took over ~36 ms; a node that returns a number at
    once is not. A result computed from a value that has no codec (a model: MODEL, CLIP, VAE) is always stored
    (`TieredCache.put`): recomputing it in a new process would first load the model, which this call's time
    does not show when the model was already loaded (the second of two prompt encodings)."""

    fixed_seconds: float = 0.005
    bytes_per_second: float = 100e6

    def worth_storing(self, seconds: float, nbytes: int) -> bool:
        return seconds >= self.fixed_seconds + nbytes / self.bytes_per_second


STORE_EVERYTHING = StorePolicy(0.0, float("inf"))  # for tests and for callers that always want the disk


class Entry(NamedTuple):
    """A checked entry: its header (a dict) and its blobs, one list of bytes per output."""

    header: dict[str, Any]
    blobs: list[list[bytes]]


class DiskCache:
    """Entries by key in `root`, within `max_bytes`. `code` names the code that computed them (`source_digest`):
    a key's entry is filed under the key and the code together, so results of other code (an upgrade, an edited
    node or sampler whose version was not bumped) are never returned; they age out by eviction."""

    def __init__(self, root: str | os.PathLike, *, max_bytes: int = DEFAULT_MAX_BYTES,
                 policy: StorePolicy = StorePolicy(), code: str = ""):
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.policy = policy
        self.code = code

    @property
    def history_path(self) -> Path:
        return self.root / "history.json"

    def path(self, key: str) -> Path:
        if not key.isalnum():
            raise ValueError(f"cache keys are hexadecimal digests, got {key!r}")
        name = hashlib.blake2b(f"{self.code}:{key}".encode(), digest_size=16).hexdigest() if self.code else key
        return self.root / "entries" / name[:2] / f"{name}{ENTRY_SUFFIX}"

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key.isalnum() and self.path(key).is_file()

    def read(self, key: str) -> Entry | None:
        """The entry, checked, with its use time refreshed; None when absent. A damaged file is deleted."""
        path = self.path(key)
        try:
            data = path.read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            return None
        entry = parse_entry(data, key)
        if entry is None:
            _unlink(path)
            return None
        try:
            os.utime(path)  # the least-recently-used clock
        except OSError:
            pass
        return entry

    def write(self, key: str, header: dict[str, Any], blobs: Sequence[Sequence[bytes]]) -> Path | None:
        """Write an entry atomically, then evict down to `max_bytes`. Returns its path (None if too big)."""
        data = format_entry(header, blobs)
        if len(data) > self.max_bytes:
            return None
        path = atomic_write(self.path(key), data)
        self.evict()
        return path

    def entries(self) -> list[tuple[float, int, Path]]:
        """(last use, size, path) of every entry file; files vanishing meanwhile are left out, and temporary files
        of writes that died long ago are deleted."""
        found = []
        try:
            shards = list(os.scandir(self.root / "entries"))
        except FileNotFoundError:
            return found
        for shard in shards:
            try:
                files = list(os.scandir(shard.path))
            except (FileNotFoundError, NotADirectoryError):
                continue
            for item in files:
                try:
                    stat = item.stat()
                except FileNotFoundError:
                    continue
                if item.name.endswith(ENTRY_SUFFIX):
                    found.append((stat.st_mtime, stat.st_size, Path(item.path)))
                elif is_temp_name(item.name) and stat.st_mtime < time.time() - STALE_TEMP_SECONDS:
                    _unlink(Path(item.path))  # left by a writer that died mid-write (a write takes milliseconds)
        return found

    def evict(self) -> list[Path]:
        """Delete the least recently used entries until the rest fit in `max_bytes`. Returns what went."""
        found = sorted(self.entries())
        total = sum(size for _, size, _ in found)
        removed = []
        for _, size, path in found:
            if total <= self.max_bytes:
                break
            _unlink(path)
            total -= size
            removed.append(path)
        return removed

    @property
    def nbytes(self) -> int:
        return sum(size for _, size, _ in self.entries())


def format_entry(header: dict[str, Any], blobs: Sequence[Sequence[bytes]]) -> bytes:
    """An entry's bytes; the header gets each blob's length and sha256 under "blobs"."""
    full = {**header, "blobs": [[{"length": len(b), "sha256": hashlib.sha256(b).hexdigest()} for b in values]
                                for values in blobs]}
    text = json.dumps(full, sort_keys=True, default=str).encode()
    return b"".join([MAGIC, len(text).to_bytes(8, "big"), hashlib.sha256(text).digest(), text,
                     *(b for values in blobs for b in values)])


def parse_entry(data: bytes, key: str) -> Entry | None:
    """The entry in `data` if every checksum holds and it is `key`'s; None otherwise."""
    if len(data) < _PREFIX or not data.startswith(MAGIC):
        return None
    length = int.from_bytes(data[len(MAGIC):len(MAGIC) + 8], "big")
    text = data[_PREFIX:_PREFIX + length]
    if len(text) != length or hashlib.sha256(text).digest() != data[len(MAGIC) + 8:_PREFIX]:
        return None
    try:
        header = json.loads(text)
        layout = [[(int(b["length"]), str(b["sha256"])) for b in values] for values in header["blobs"]]
    except (ValueError, KeyError, TypeError):
        return None
    if header.get("key") != key or len(data) != _PREFIX + length + sum(n for v in layout for n, _ in v):
        return None
    blobs, at = [], _PREFIX + length
    for values in layout:
        blobs.append([])
        for n, digest in values:
            blob = data[at:at + n]
            if hashlib.sha256(blob).hexdigest() != digest:
                return None
            blobs[-1].append(blob)
            at += n
    return Entry(header, blobs)


def describe_written(run_id: str, when: float) -> str:
    return f"entry written by run {run_id} at {time.strftime('%Y-%m-%d %H:%M:%SZ', time.gmtime(when))}"


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:  # another process evicted or dropped it first
        pass


def add_cache_arguments(parser: Any, size_type: Any) -> None:
    """The disk cache's flags, the same for `sdgraph run` and `sdgraph serve` (`size_type` parses "10G")."""
    parser.add_argument("--cache-dir", default=None, metavar="DIR", help="keep node outputs here across runs and "
                        "processes, shared with other sdgraph processes (default: BASE/user/cache)")
    parser.add_argument("--no-disk-cache", action="store_true", help="keep node outputs in memory only")
    parser.add_argument("--cache-size", default=DEFAULT_MAX_BYTES, type=size_type, metavar="SIZE",
                        help="largest size of the cache directory; the least recently used entries go first "
                        "(default 10G)")


def disk_cache_from(args: Any, base: str | os.PathLike, *, code: str = "") -> DiskCache | None:
    """The DiskCache the flags ask for (None with --no-disk-cache); `code` as for DiskCache."""
    if args.no_disk_cache:
        return None
    root = Path(args.cache_dir) if args.cache_dir else Path(base) / "user" / "cache"
    return DiskCache(root.absolute(), max_bytes=args.cache_size, code=code)


def source_digest(folders: Iterable[str | os.PathLike]) -> str:
    """A digest of the Python sources under `folders` (paths and contents; missing folders count as empty): what
    the application passes as a DiskCache's `code`. About 5 ms for sdgraph's own packages."""
    digest = hashlib.blake2b(digest_size=16)
    for folder in folders:
        root = Path(folder)
        for path in sorted(root.rglob("*.py")) if root.is_dir() else ():
            if "__pycache__" in path.parts:
                continue
            try:
                content = path.read_bytes()
            except OSError:
                continue
            digest.update(f"{path.relative_to(root)}\0{len(content)}\0".encode())
            digest.update(content)
    return digest.hexdigest()
