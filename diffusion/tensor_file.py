"""A checkpoint file's tensors: the format told from its bytes, shapes up front, data read a chunk at a time.

safetensors headers are read and checked first (`diffusion.safetensors_header`); torch pickles are refused unless
the caller opts in with allow_pickle (then read with weights_only=True). `TensorFile.read` maps a safetensors file
one chunk of at most CHUNK_BYTES at a time, so mapped pages never pile up.
"""

import os
import pickle
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import torch
from safetensors import safe_open

from diffusion.safetensors_header import CheckpointError, read_safetensors_header

CHUNK_BYTES = 64 << 20  # how much of a safetensors file is mapped at once while reading
SAFETENSORS_DTYPES = MappingProxyType({
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
})  # fmt: skip

@dataclass(frozen=True)
class FileIdentity:
    path: Path
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: str | os.PathLike) -> "FileIdentity":
        path = _require_file(path).resolve()
        stat = path.stat()
        return cls(path, stat.st_size, stat.st_mtime_ns)


def _require_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(
            f"{path} is a folder (a diffusers-format model?); only single-file checkpoints (.safetensors) load here"
        )
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    return path


def detect_format(path: str | os.PathLike) -> str:
    """'safetensors', 'torch-zip' or 'pickle', from the first bytes of the file."""
    with open(_require_file(path), "rb") as f:
        head = f.read(9)
    size = os.path.getsize(path)
    if len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"
    if head.startswith(b"PK\x03\x04"):
        return "torch-zip"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    raise CheckpointError(
        f"{path}: not a checkpoint format this loader knows (first bytes {head!r}). Expected a safetensors file "
        "(8-byte header length, then JSON) or a torch.save pickle (.ckpt/.pt); the file may be truncated, or an "
        "HTML error page saved by a failed download."
    )


def _pickle_refusal(path) -> str:
    return (
        f"{path} is a pickle-based PyTorch checkpoint (.ckpt/.pt format, whatever its name). Unpickling can run "
        "code hidden in the file, so it is not loaded by default. Prefer a .safetensors release of the model, or "
        "convert this file once on a machine you trust: state = read_state_dict(path, allow_pickle=True), then "
        "safetensors.torch.save_file(state, 'model.safetensors'). To load it anyway pass allow_pickle=True; it is "
        "then read with torch.load(weights_only=True), which accepts only tensors and plain containers."
    )


class TensorFile:
    """The tensors of one checkpoint file: shapes and dtypes up front (`meta`), data read on demand."""

    def __init__(self, path: str | os.PathLike, *, allow_pickle: bool = False):
        self.path = Path(path)
        self.format = detect_format(path)
        self._pickled: dict[str, torch.Tensor] = {}
        self._offsets: dict[str, tuple[int, int]] = {}
        if self.format == "safetensors":
            self.meta = self._read_safetensors_header()
        elif not allow_pickle:
            raise CheckpointError(_pickle_refusal(path))
        else:
            self._pickled = self._unpickle()
            self.meta = {k: torch.empty_like(v, device="meta") for k, v in self._pickled.items()}

    def _read_safetensors_header(self) -> dict[str, torch.Tensor]:
        entries = read_safetensors_header(self.path)
        self._offsets = {key: (entry.begin, entry.end) for key, entry in entries.items()}
        return {key: torch.empty(entry.shape, dtype=SAFETENSORS_DTYPES[entry.dtype], device="meta")
                for key, entry in entries.items()}

    def _unpickle(self) -> dict[str, torch.Tensor]:
        try:
            obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=self.format == "torch-zip")
        except (pickle.UnpicklingError, RuntimeError, zipfile.BadZipFile, EOFError) as e:
            raise CheckpointError(
                f"{self.path}: could not read it as a weights-only torch checkpoint ({str(e).splitlines()[0]}). "
                "It may hold Python objects besides tensors (e.g. training state); convert it to safetensors with "
                "a tool you trust, or get a .safetensors release."
            ) from e
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise CheckpointError(f"{self.path}: holds a {type(obj).__name__}, not a dict of tensors")
        return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}

    def read(self, keys: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (key, tensor) for `keys`; each tensor may share memory with the file: copy what you keep."""
        keys = list(keys)
        if self.format != "safetensors":
            yield from ((k, self._pickled[k]) for k in keys)
            return
        for chunk in self._chunks(keys):
            # a fresh mapping per chunk: closing it drops the file pages it touched from our resident memory
            with safe_open(self.path, framework="pt", device="cpu") as f:
                for key in chunk:
                    yield key, f.get_tensor(key)

    def _chunks(self, keys: list[str]) -> list[list[str]]:
        """Keys in file order, grouped into runs of at most CHUNK_BYTES (a bigger tensor gets a run of its own)."""
        chunks, size = [[]], 0
        for key in sorted(keys, key=lambda k: self._offsets[k][0]):
            begin, end = self._offsets[key]
            if chunks[-1] and size + end - begin > CHUNK_BYTES:
                chunks.append([])
                size = 0
            chunks[-1].append(key)
            size += end - begin
        return [chunk for chunk in chunks if chunk]


def read_state_dict(path: str | os.PathLike, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor in a checkpoint file, on the CPU in the file's dtypes (a top-level 'state_dict' unwrapped)."""
    source = TensorFile(path, allow_pickle=allow_pickle)
    return {k: t.clone() for k, t in source.read(source.meta)}
