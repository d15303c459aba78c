"""Reading a safetensors header ourselves, with limits, before any library maps the file.

A safetensors file is an 8-byte little-endian header length, a JSON object {name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {...}}, then the tensor bytes. A crafted header can claim
300,000 tensors, shapes that do not match their bytes, or offsets past the end; the libraries then allocate
hundreds of MB (or map garbage) before anything complains. Here the header is checked first, cheaply:

1. its length is at most MAX_HEADER_BYTES and fits in the file;
2. it is parsed with a hook that counts tensor entries as they are read, stopping at MAX_TENSORS, and keeps each
   entry as a small tuple (not a dict);
3. every entry has a known dtype, a shape of at most MAX_DIMS non-negative integers, integer offsets with
   begin <= end inside the data, a byte span equal to elements x dtype size, and no two spans overlap.

Limits: the largest real single-file layouts are far below them (SD1 with EMA weights ~1,800 tensors, SDXL
~2,500, SD3.5/Flux ~1,100, kohya LoRA/LyCORIS files a few thousand; headers a few hundred KB, up to a few MB
with training metadata). Torch-free.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple

MAX_HEADER_BYTES = 16 << 20  # safetensors itself allows 100 MB
MAX_TENSORS = 32_768
MAX_DIMS = 8
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


class CheckpointError(ValueError):
    """A file that cannot be loaded as asked; the message names the file, what is wrong and how to fix it."""


class TensorEntry(NamedTuple):
    dtype: str
    shape: tuple[int, ...]
    begin: int  # offsets into the data that follows the header
    end: int


class _RawEntry(NamedTuple):  # an entry as parsed, before its fields are checked
    dtype: Any
    shape: Any
    offsets: Any


def read_safetensors_header(path: str | os.PathLike) -> dict[str, TensorEntry]:
    """{tensor name: entry} of a safetensors file, every entry checked; raises CheckpointError naming the file,
    the tensor and the problem. `__metadata__` is left out."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if length > MAX_HEADER_BYTES:
            raise CheckpointError(f"{path}: the safetensors header claims {length} bytes, more than the "
                                  f"{MAX_HEADER_BYTES >> 20} MB limit (real checkpoints use well under 1 MB); the "
                                  "file is damaged or crafted, fetch it again from a trusted source")
        if 8 + length > size:
            raise CheckpointError(f"{path}: truncated: the safetensors header claims {length} bytes but the file "
                                  f"has {size}; fetch the file again")
        raw = f.read(length)
    entries = _parse(path, raw)
    del raw
    return _checked(path, entries, size - 8 - length)


def _parse(path: Path, raw: bytes) -> dict[str, Any]:
    count = 0

    def object_hook(pairs: list[tuple[str, Any]]) -> Any:
        nonlocal count
        names = [name for name, _ in pairs]
        if len(set(names)) != len(names):
            twice = sorted({name for name in names if names.count(name) > 1})[:3]
            raise CheckpointError(f"{path}: corrupt safetensors header: {', '.join(map(repr, twice))} appear more "
                                  "than once in one object; re-download the file")
        if "data_offsets" not in names:
            return dict(pairs)
        count += 1
        if count > MAX_TENSORS:
            raise CheckpointError(f"{path}: the safetensors header lists more than {MAX_TENSORS} tensors (real "
                                  "checkpoints have a few thousand); the file is damaged or crafted")
        info = dict(pairs)
        return _RawEntry(info.get("dtype"), info.get("shape"), info.get("data_offsets"))

    try:
        header = json.loads(raw, object_pairs_hook=object_hook)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({str(e)[:200]}); re-download the file") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object); re-download the file")
    header.pop("__metadata__", None)
    return header


def _checked(path: Path, header: dict[str, Any], data_bytes: int) -> dict[str, TensorEntry]:
    entries = {key: _entry(path, key, raw, data_bytes) for key, raw in header.items()}
    previous_key, previous_end = "", 0
    for key, entry in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)):
        if entry.begin < previous_end:
            raise CheckpointError(f"{path}: corrupt safetensors header: the bytes of tensor '{key}' "
                                  f"[{entry.begin}, {entry.end}) overlap those of '{previous_key}'; re-download "
                                  "the file")
        if entry.end > entry.begin:
            previous_key, previous_end = key, entry.end
    return entries


def _entry(path: Path, key: str, raw: Any, data_bytes: int) -> TensorEntry:
    def bad(problem: str) -> CheckpointError:
        return CheckpointError(f"{path}: tensor '{key[:200]}' in the safetensors header {problem}; the file is "
                               "damaged or crafted, fetch it again")

    if not isinstance(raw, _RawEntry):
        raise CheckpointError(f"{path}: corrupt safetensors header entry for '{key[:200]}' (not an object with "
                              "dtype, shape and data_offsets); re-download the file")
    if raw.dtype not in DTYPE_BYTES:
        raise bad(f"has dtype {str(raw.dtype)[:40]!r}, which is not supported (known: {', '.join(DTYPE_BYTES)})")
    if not isinstance(raw.shape, list) or len(raw.shape) > MAX_DIMS or not all(map(_natural, raw.shape)):
        raise bad(f"has shape {str(raw.shape)[:80]}, not a list of at most {MAX_DIMS} non-negative integers")
    offsets = raw.offsets
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_natural, offsets)) \
            or offsets[0] > offsets[1]:
        raise bad(f"has data_offsets {str(offsets)[:80]}, not [begin, end] with 0 <= begin <= end")
    begin, end = offsets
    if end > data_bytes:
        raise bad(f"ends at byte {end} of the data but the file holds {data_bytes} bytes of data (truncated: the "
                  "download or copy was probably cut short)")
    elements = 1
    for dim in raw.shape:
        elements *= dim
    if elements * DTYPE_BYTES[raw.dtype] != end - begin:
        raise bad(f"has shape {raw.shape} of {raw.dtype} ({elements * DTYPE_BYTES[raw.dtype]} bytes) but spans "
                  f"{end - begin} bytes")
    return TensorEntry(raw.dtype, tuple(raw.shape), begin, end)


def _natural(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
