"""CLIP's byte-level BPE tokenizer, without network access or the ``tokenizers`` library.

The vocabulary is rebuilt at run time from ``data/bpe_simple_vocab_16e6.txt.gz`` (the merges list OpenAI
published with CLIP, see ``docs/tokenizer.md``): 256 byte symbols, the same 256 with ``</w>`` (end of word), one
token per merge, then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407): 49,408 tokens.

The text pipeline reproduces ``transformers.CLIPTokenizer``, which ComfyUI's ``SDTokenizer`` calls on each prompt piece:

1. the literal strings ``<|startoftext|>`` / ``<|endoftext|>`` are cut out of the raw text first and become their
   ids (so ``<|STARTOFTEXT|>`` is ordinary text);
2. each remaining segment is NFC-normalised, every run of whitespace becomes one space, and each character is
   lower-cased on its own (so a final capital sigma becomes ``σ``, never ``ς``);
3. CLIP's regex splits it into pieces (contractions, letter runs, single digits, runs of other non-space
   characters; whitespace is dropped), and the byte-level regex of GPT-2 splits those once more (which only
   matters for a lower-cased special-token string);
4. each piece's UTF-8 bytes map to printable symbols, the last one gets ``</w>``, and merges are applied in rank
   order. Results are cached per piece on the tokenizer object.
"""

from __future__ import annotations

import functools
import gzip
import json
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import regex

DEFAULT_VOCABULARY_PATH = Path(__file__).parent / "data" / "bpe_simple_vocab_16e6.txt.gz"

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
VOCABULARY_SIZE = 49408
# CLIP uses the first 49152 - 256 - 2 merges of the file: 256 bytes x 2 forms + merges + 2 specials = 49408.
MERGE_COUNT = 49152 - 256 - 2
PIECE_CACHE_LIMIT = 100_000  # pieces remembered per tokenizer before the cache starts over

SPECIAL_TOKEN_SPLIT = regex.compile(r"(<\|startoftext\|>|<\|endoftext\|>)")
WHITESPACE_RUN = regex.compile(r"\s+")
CLIP_PIECE = regex.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+")
BYTE_LEVEL_PIECE = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")


def byte_symbols() -> tuple[str, ...]:
    """The printable character standing for each byte value 0..255 (GPT-2/CLIP's byte-to-unicode table).

    Printable Latin-1 bytes stand for themselves; the other 68 bytes take code points 256, 257, ... in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols: dict[int, str] = {b: chr(b) for b in printable}
    next_code = 256
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(next_code)
            next_code += 1
    return tuple(symbols[b] for b in range(256))


def vocabulary_order_bytes() -> list[int]:
    """Byte values in the order their symbols enter the vocabulary (printable ones first, as CLIP lists them)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
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


def normalize(text: str) -> str:
    """NFC, one space per whitespace run, then lower-case each character independently."""
    text = WHITESPACE_RUN.sub(" ", unicodedata.normalize("NFC", text))
    if text.isascii():
        return text.lower()
    return "".join(c.lower() for c in text)


def pre_tokenize(normalized: str) -> list[str]:
    """Split normalised text into the pieces BPE works on (whitespace disappears here)."""
    return [part for piece in CLIP_PIECE.findall(normalized) for part in BYTE_LEVEL_PIECE.findall(piece)]


def apply_merges(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding: repeatedly merge the lowest-ranked adjacent pair (every occurrence, left to right)."""
    while len(symbols) > 1:
        rank, first, second = min(
            (ranks.get(pair, len(ranks)), *pair) for pair in zip(symbols, symbols[1:], strict=False)
        )
        if rank == len(ranks):
            break
        merged: list[str] = []
        i = 0
        while i < len(symbols):
            if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
                merged.append(first + second)
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


class ClipTokenizer:
    """CLIP's tokenizer for SD1 text encoders. Owns its vocabulary and a per-piece BPE cache.

    ``encode`` returns ids without the start/end tokens; prompt chunking (``diffusion.prompt``) adds those.
    """

    def __init__(self, vocabulary_path: str | Path = DEFAULT_VOCABULARY_PATH) -> None:
        vocabulary = load_vocabulary(vocabulary_path)
        self.tokens: tuple[str, ...] = vocabulary.tokens
        self.token_ids: dict[str, int] = {token: i for i, token in enumerate(vocabulary.tokens)}
        self.bos_id: int = self.token_ids[BOS_TOKEN]
        self.eos_id: int = self.token_ids[EOS_TOKEN]
        self._merge_ranks = {pair: rank for rank, pair in enumerate(vocabulary.merges)}
        self._byte_symbols = byte_symbols()
        self._unicode_bytes = {s: b for b, s in enumerate(self._byte_symbols)}
        self._piece_cache: dict[str, tuple[int, ...]] = {}

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, text: str) -> list[int]:
        """Token ids for ``text`` (no start/end token added)."""
        ids: list[int] = []
        for segment in SPECIAL_TOKEN_SPLIT.split(text):
            if segment in (BOS_TOKEN, EOS_TOKEN):
                ids.append(self.token_ids[segment])
            elif segment:
                for piece in pre_tokenize(normalize(segment)):
                    ids.extend(self.piece_ids(piece))
        return ids

    def piece_ids(self, piece: str) -> tuple[int, ...]:
        """BPE ids of one pre-tokenised piece, cached on this tokenizer."""
        cached = self._piece_cache.get(piece)
        if cached is None:
            symbols = [self._byte_symbols[b] for b in piece.encode("utf-8")]
            symbols[-1] += END_OF_WORD
            cached = tuple(self.token_ids[s] for s in apply_merges(symbols, self._merge_ranks))
            if len(self._piece_cache) >= PIECE_CACHE_LIMIT:
                self._piece_cache.clear()
            self._piece_cache[piece] = cached
        return cached

    def decode(self, ids: Iterable[int]) -> str:
        """Text for ``ids``: word ends become spaces; the start/end tokens are kept as their strings."""
        symbols = "".join(self.tokens[i] for i in ids)
        words = symbols.replace(END_OF_WORD, " ")
        text = bytearray()
        for part in SPECIAL_TOKEN_SPLIT.split(words):
            text += part.encode("utf-8") if part in (BOS_TOKEN, EOS_TOKEN) else bytes(self._to_bytes(part))
        return text.decode("utf-8", errors="replace").strip()

    def _to_bytes(self, symbols: Sequence[str]) -> list[int]:
        return [self._unicode_bytes[s] if s in self._unicode_bytes else ord(s) for s in symbols]
