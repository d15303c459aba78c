"""How values of a data type are written to the disk cache and read back: a `Codec` per type, declared with the
type (`NodeRegistry.register_type(..., codec=...)`). Bytes in, bytes out, never pickle: the engine ships JSON
codecs for the primitive types; an application registers its own for its types (sdgraph's tensors go through
safetensors, `nodes/codecs.py`). A type without a codec (model handles) is never stored on disk.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class CodecError(ValueError):
    """A value its type's codec cannot write (or bytes it cannot read)."""


@dataclass(frozen=True)
class Codec:
    """`dump(value) -> bytes` and `load(bytes) -> value`, with `load(dump(v))` equal to `v`. Either may raise: a
    value that cannot be dumped is not stored; bytes that cannot be loaded are recomputed."""

    dump: Callable[[Any], bytes]
    load: Callable[[bytes], Any]


def json_codec(*kinds: type) -> Codec:
    """A JSON codec for values of exactly these Python types (a subclass or a container would not come back as
    itself, so it is refused)."""

    def dump(value: Any) -> bytes:
        if type(value) not in kinds:
            raise CodecError(f"expected {' or '.join(k.__name__ for k in kinds)}, got {type(value).__name__}")
        return json.dumps(value).encode()

    def load(data: bytes) -> Any:
        value = json.loads(data)
        if type(value) not in kinds:
            raise CodecError(f"expected {' or '.join(k.__name__ for k in kinds)}, read {type(value).__name__}")
        return value

    return Codec(dump, load)


PRIMITIVE_CODECS: dict[str, Codec] = {
    "INT": json_codec(int), "FLOAT": json_codec(float, int), "STRING": json_codec(str),
    "BOOLEAN": json_codec(bool), "COMBO": json_codec(str),
}
