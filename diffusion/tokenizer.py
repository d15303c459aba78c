"""CLIP's byte-level BPE tokenizer: transformers' ``CLIPTokenizerFast`` (the ``tokenizers`` library), built offline.

The vocabulary is derived at run time from ``data/bpe_simple_vocab_16e6.txt.gz`` (the merges list OpenAI
published with CLIP, see ``docs/tokenizer.md``): 256 byte symbols, the same 256 with ``</w>`` (end of word), one
token per merge, then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407): 49,408 tokens. That vocabulary
and the merges go straight into ``CLIPTokenizerFast(vocab=..., merges=...)``, the class ComfyUI's ``SDTokenizer``
loads, so its text cleaning (NFC, whitespace runs, per-character lower case), CLIP's splitting regex, the
special-token strings and BPE itself are the library's, not ours. Nothing is downloaded.
"""

from __future__ import annotations

import functools
import gzip
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

DEFAULT_VOCABULARY_PATH = Path(__file__).parent / "data" / "bpe_simple_vocab_16e6.txt.gz"

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
VOCABULARY_SIZE = 49408
# CLIP uses the first 49152 - 256 - 2 merges of the file: 256 bytes x 2 forms + merges + 2 specials = 49408.
MERGE_COUNT = 49152 - 256 - 2


def byte_symbols() -> tuple[str, ...]:
    """The printable character standing for each byte value 0..255 (GPT-2/CLIP's byte-to-unicode table).

    Printable Latin-1 bytes stand for themselves; the other 68 bytes take code points 256, 257, ... in byte order.
    """
    symbols: dict[int, str] = {b: chr(b) for b in _printable_bytes()}
    next_code = 256
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(next_code)
            next_code += 1
    return tuple(symbols[b] for b in range(256))


def _printable_bytes() -> list[int]:
    return [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]


def vocabulary_order_bytes() -> list[int]:
    """Byte values in the order their symbols enter the vocabulary (printable ones first, as CLIP lists them)."""
    printable = _printable_bytes()
    return printable + [b for b in range(256) if b not in set(printable)]


@dataclass(frozen=True)
class Vocabulary:
    """CLIP's tokens in id order and its merges in rank order (both immutable)."""

    tokens: tuple[str, ...]
    merges: tuple[tuple[str, str], ...]


@functools.lru_cache(maxsize=4)
def load_vocabulary(path: str | Path = DEFAULT_VOCABULARY_PATH) -> Vocabulary:
    """Read the gzipped merges file and derive the 49,408-token vocabulary.

    Cached with ``lru_cache``: a pure function of the file, and the result is immutable.
    """
    lines = gzip.decompress(Path(path).read_bytes()).decode("utf-8").split("\n")
    merges = tuple(_split_merge(line) for line in lines[1 : MERGE_COUNT + 1])
    symbols = byte_symbols()
    base = [symbols[b] for b in vocabulary_order_bytes()]
    tokens = (*base, *(s + END_OF_WORD for s in base), *(a + b for a, b in merges), BOS_TOKEN, EOS_TOKEN)
    if len(tokens) != VOCABULARY_SIZE or len(set(tokens)) != VOCABULARY_SIZE:
        raise ValueError(f"{path}: expected {VOCABULARY_SIZE} distinct tokens, derived {len(set(tokens))}")
    return Vocabulary(tokens=tokens, merges=merges)


def _split_merge(line: str) -> tuple[str, str]:
    first, second = line.split()
    return first, second


def export_hf_files(directory: str | Path, path: str | Path = DEFAULT_VOCABULARY_PATH) -> tuple[Path, Path]:
    """Write ``vocab.json`` and ``merges.txt`` (the Hugging Face layout) derived from the gz into ``directory``."""
    vocabulary = load_vocabulary(path)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab_path, merges_path = directory / "vocab.json", directory / "merges.txt"
    vocab_path.write_text(json.dumps({t: i for i, t in enumerate(vocabulary.tokens)}, ensure_ascii=False), "utf-8")
    merge_lines = "".join(f"{a} {b}\n" for a, b in vocabulary.merges)
    merges_path.write_text("#version: 0.2\n" + merge_lines, "utf-8")
    return vocab_path, merges_path


def clip_backend(vocabulary: Vocabulary) -> Tokenizer:
    """The ``tokenizers.Tokenizer`` that transformers' ``CLIPTokenizerFast`` builds from this vocabulary."""
    from transformers import CLIPTokenizerFast

    vocab = {token: i for i, token in enumerate(vocabulary.tokens)}
    return CLIPTokenizerFast(vocab=vocab, merges=list(vocabulary.merges)).backend_tokenizer


class ClipTokenizer:
    """CLIP's tokenizer for SD1 text encoders: the vocabulary and the ``tokenizers`` backend that encodes with it.

    ``encode`` returns ids without the start/end tokens; prompt chunking (``diffusion.prompt``) adds those.
    """

    def __init__(self, vocabulary_path: str | Path = DEFAULT_VOCABULARY_PATH) -> None:
        vocabulary = load_vocabulary(vocabulary_path)
        self.tokens: tuple[str, ...] = vocabulary.tokens
        self.token_ids: dict[str, int] = {token: i for i, token in enumerate(vocabulary.tokens)}
        self.bos_id: int = self.token_ids[BOS_TOKEN]
        self.eos_id: int = self.token_ids[EOS_TOKEN]
        self.backend: Tokenizer = clip_backend(vocabulary)

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, text: str) -> list[int]:
        """Token ids for ``text`` (no start/end token added; the strings ``<|startoftext|>`` and ``<|endoftext|>``
        written in the text become their ids)."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text for ``ids``: word ends become spaces; the start/end tokens are kept as their strings."""
        text = self.backend.decode(list(ids), skip_special_tokens=False)
        return text.replace(END_OF_WORD, " ").strip()
