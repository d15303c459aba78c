"""Prompt weighting, chunking and text encoding with one CLIP text model, reproducing ComfyUI's ``CLIPTextEncode``.

Weighting syntax (ComfyUI's): ``(text)`` multiplies the weight by 1.1 per nesting level, ``(text:1.3)`` sets it to
1.3 (inner groups start from it), ``\\(`` and ``\\)`` are literal parentheses. Text between weight changes is one
segment; in ``(blue hat), x`` the comma belongs to the unweighted segment ``", x"``. A segment is cut before each
``embedding:`` that follows a space or newline; each resulting piece is tokenized as a whole and becomes one
group of tokens (as ComfyUI has done since it stopped tokenizing word by word).

Chunks hold 77 tokens: start, up to 75 tokens, end, then padding: end tokens for OpenAI's CLIP-L (SD1, SDXL's
first encoder), token 0 for OpenCLIP's encoders (SD2's ViT-H, SDXL's bigG), as their tokenizers pad. A group that
does not fit moves whole to the next chunk, unless it has 8 or more tokens, in which case it fills the chunk and
continues in the next one. So a long unweighted prompt is cut at exactly 75 tokens, while a short
``(weighted words)`` group is kept together. ``embedding:name`` puts a textual inversion's vectors in its
place (``diffusion.embeddings``; from a file with one tensor per encoder, SDXL's ``clip_l``/``clip_g``, the one
named by ``embedding_key``).

Encoding runs the ``transformers.CLIPTextModel`` submodules directly: token embeddings with the textual-inversion
vectors spliced in, plus position embeddings, the causal mask, the encoder layers, and the final layer norm on the
chosen layer (``layer=-2`` is ComfyUI's ``CLIPSetLastLayer(-2)``; ``layer_norm_hidden=False``, SDXL's encoders,
leaves a chosen hidden layer un-normed; ``layer=None`` is the last layer, normed). Weights interpolate every token
from the encoding of an empty chunk (start, end, padding): ``z_empty + (z - z_empty) * w``; nothing changes when
all weights are 1. The pooled state is the last layer's normed state at the first end token, through the text
projection when the model has one (OpenCLIP's: SDXL's pooled vector).
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass

import torch

from diffusion.embeddings import find_embedding_file, load_embedding
from diffusion.tokenizer import BOS_TOKEN, EOS_TOKEN, ClipTokenizer

PromptToken = tuple[int | torch.Tensor, float]
Chunk = list[PromptToken]

CHUNK_LENGTH = 77
SPLITTABLE_GROUP_TOKENS = 8  # a group with at least this many tokens may be split across two chunks
NESTING_FACTOR = 1.1
EMBEDDING_PREFIX = "embedding:"
EMBEDDING_BOUNDARY = re.compile(r"[ \n](?=embedding:)")
SD1_WIDTH = 768
SD1_BOS_ID, SD1_EOS_ID = 49406, 49407
# Unicode noncharacters stand in for escaped parentheses while the weights are parsed.
ESCAPED_OPEN, ESCAPED_CLOSE = "\ufdd0", "\ufdd1"


class PromptWarning(UserWarning):
    """Something in a prompt was ignored or read differently than it may have been meant (e.g. a missing embedding)."""


@dataclass(frozen=True)
class TokenizedPrompt:
    """Chunks of 77 ``(token id or embedding vector, weight)`` pairs, and warnings for the caller to show."""

    chunks: list[Chunk]
    warnings: tuple[str, ...] = ()


# ---- weights -------------------------------------------------------------------------------------------------


def protect_escapes(text: str) -> str:
    return text.replace("\\)", ESCAPED_CLOSE).replace("\\(", ESCAPED_OPEN)


def restore_escapes(text: str) -> str:
    return text.replace(ESCAPED_CLOSE, ")").replace(ESCAPED_OPEN, "(")


def split_top_level(text: str) -> list[str]:
    """Cut text into plain runs and outermost ``(...)`` groups.

    A ``)`` without a matching ``(`` drives the depth negative, so what follows stays plain text (ComfyUI does
    the same); an unclosed ``(`` leaves the rest as one plain segment starting with ``(``.
    """
    segments: list[str] = []
    start = depth = 0
    for i, char in enumerate(text):
        if char == "(":
            if depth == 0:
                if i > start:
                    segments.append(text[start:i])
                start = i
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                segments.append(text[start : i + 1])
                start = i + 1
    if start < len(text):
        segments.append(text[start:])
    return segments


def explicit_weight(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def parse_weights(text: str, weight: float = 1.0) -> list[tuple[str, float]]:
    """``(segment, weight)`` pairs for text whose escaped parentheses were protected (``protect_escapes``)."""
    pairs: list[tuple[str, float]] = []
    for segment in split_top_level(text):
        if len(segment) < 2 or segment[0] != "(" or segment[-1] != ")":
            pairs.append((segment, weight))
            continue
        inner, inner_weight = segment[1:-1], weight * NESTING_FACTOR
        colon = inner.rfind(":")
        value = explicit_weight(inner[colon + 1 :]) if colon > 0 else None
        if value is not None:
            inner, inner_weight = inner[:colon], value
        pairs.extend(parse_weights(inner, inner_weight))
    return pairs


def split_embedding_references(segment: str) -> list[str]:
    """Cut a segment before every ``embedding:`` that follows a space or newline (that character is dropped)."""
    return [piece for piece in EMBEDDING_BOUNDARY.split(segment) if piece]


def weighted_pieces(text: str) -> list[tuple[str, float]]:
    """The units ComfyUI tokenizes one at a time: weighted segments, cut before embedding references."""
    return [
        (piece, weight)
        for segment, weight in parse_weights(protect_escapes(text))
        for piece in split_embedding_references(restore_escapes(segment))
    ]


# ---- pieces to tokens ----------------------------------------------------------------------------------------


def embedding_reference(piece: str) -> tuple[str, str]:
    """``("name", "rest of the text")`` from ``"embedding:name rest of the text"`` (whitespace collapsed)."""
    words = piece[len(EMBEDDING_PREFIX) :].split()
    return (words[0] if words else ""), " ".join(words[1:])


def resolve_embedding(
    name: str, rest: str, embeddings_dir: str | os.PathLike, *, width: int, allow_pickle: bool,
    key: str | None = None,
) -> tuple[torch.Tensor | None, str]:
    """An embedding's vectors (None when missing) and the text left to tokenize after it.

    A name with trailing commas that matches no file is retried without them; the commas then stay in the text.
    """
    path, leftover = (find_embedding_file(name, embeddings_dir) if name else None), rest
    stripped = name.rstrip(",")
    if path is None and stripped != name:
        path = find_embedding_file(stripped, embeddings_dir) if stripped else None
        leftover = f"{name[len(stripped) :]} {rest}"
    if path is None:
        return None, leftover
    return load_embedding(path, width=width, allow_pickle=allow_pickle, key=key), leftover


def prompt_groups(
    tokenizer: ClipTokenizer,
    text: str,
    *,
    embeddings_dir: str | os.PathLike | None,
    embedding_width: int,
    allow_pickle: bool,
    embedding_key: str | None = None,
) -> tuple[list[Chunk], list[str]]:
    """One group of weighted tokens per piece of text and per embedding, and warnings."""
    groups: list[Chunk] = []
    notes: list[str] = []
    for piece, weight in weighted_pieces(text):
        if piece.startswith(EMBEDDING_PREFIX) and embeddings_dir is None:
            notes.append(f"'{piece.split()[0]}' was read as plain text: no embeddings folder was given")
        elif piece.startswith(EMBEDDING_PREFIX):
            name, rest = embedding_reference(piece)
            vectors, piece = resolve_embedding(
                name, rest, embeddings_dir, width=embedding_width, allow_pickle=allow_pickle, key=embedding_key
            )
            if vectors is None:
                missing = name.rstrip(",") or name
                notes.append(f"embedding '{missing}' was not found in {os.fspath(embeddings_dir)}; it was left out")
            else:
                groups.append([(vector, weight) for vector in vectors])
        ids = tokenizer.encode(piece)
        if ids:
            groups.append([(token, weight) for token in ids])
    return groups, notes


def close_chunk(
    body: Chunk, *, bos_id: int, eos_id: int, length: int = CHUNK_LENGTH, pad_id: int | None = None
) -> Chunk:
    """Start token, body, end token, then ``pad_id`` (the end token when None) as padding up to ``length``."""
    pad = eos_id if pad_id is None else pad_id
    return [(bos_id, 1.0), *body, (eos_id, 1.0), *[(pad, 1.0)] * (length - len(body) - 2)]


def pack_chunks(
    groups: list[Chunk], *, bos_id: int, eos_id: int, length: int = CHUNK_LENGTH, pad_id: int | None = None
) -> list[Chunk]:
    """Fill chunks of ``length`` with token groups, keeping groups of fewer than 8 tokens whole."""
    capacity = length - 2
    chunks: list[Chunk] = []
    body: Chunk = []
    for group in groups:
        splittable = len(group) >= SPLITTABLE_GROUP_TOKENS
        while group:
            if len(body) + len(group) <= capacity:
                body = body + group
                break
            if splittable:
                room = capacity - len(body)
                body, group = body + group[:room], group[room:]
            chunks.append(close_chunk(body, bos_id=bos_id, eos_id=eos_id, length=length, pad_id=pad_id))
            body = []
    chunks.append(close_chunk(body, bos_id=bos_id, eos_id=eos_id, length=length, pad_id=pad_id))
    return chunks


def tokenize_prompt(
    tokenizer: ClipTokenizer,
    text: str,
    *,
    embeddings_dir: str | os.PathLike | None = None,
    embedding_width: int = SD1_WIDTH,
    allow_pickle: bool = False,
    pad_id: int | None = None,
    embedding_key: str | None = None,
) -> TokenizedPrompt:
    """ComfyUI's weighted tokenization of ``text`` into 77-token chunks (at least one), padded with ``pad_id``
    (the end token when None)."""
    groups, notes = prompt_groups(
        tokenizer, text, embeddings_dir=embeddings_dir, embedding_width=embedding_width, allow_pickle=allow_pickle,
        embedding_key=embedding_key,
    )
    bos_id, eos_id = tokenizer.token_ids[BOS_TOKEN], tokenizer.token_ids[EOS_TOKEN]
    return TokenizedPrompt(pack_chunks(groups, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id), tuple(notes))


# ---- encoding ------------------------------------------------------------------------------------------------


def transformer_parts(text_model: torch.nn.Module) -> torch.nn.Module:
    """The module holding ``embeddings``, ``encoder`` and ``final_layer_norm``; a ``.text_model`` wrapper is
    unwrapped. Layers are called as transformers 5 defines them: ``layer(hidden_states, attention_mask)``."""
    return text_model if hasattr(text_model, "encoder") else text_model.text_model


def layer_index(layer: int, layer_count: int) -> int:
    """0-based index of the encoder layer whose output is used; negative counts from the end (-1 = last)."""
    if not -layer_count <= layer < layer_count:
        raise ValueError(f"layer must be in [-{layer_count}, {layer_count - 1}] for this text encoder, got {layer}")
    return layer % layer_count


def causal_mask(length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive ``[1, 1, length, length]`` mask hiding later tokens."""
    blocked = torch.ones(length, length, dtype=torch.bool, device=device).triu(1)
    mask = torch.zeros(length, length, dtype=dtype, device=device).masked_fill(blocked, torch.finfo(dtype).min)
    return mask[None, None]


def chunk_inputs(chunks: list[Chunk], device: torch.device) -> tuple[torch.Tensor, list[tuple[int, int, torch.Tensor]]]:
    """Token ids ``[n, 77]`` (0 where a vector goes) and the ``(row, column, vector)`` textual inversions."""
    ids = [[token if isinstance(token, int) else 0 for token, _ in chunk] for chunk in chunks]
    vectors = [
        (row, column, token)
        for row, chunk in enumerate(chunks)
        for column, (token, _) in enumerate(chunk)
        if isinstance(token, torch.Tensor)
    ]
    return torch.tensor(ids, dtype=torch.long, device=device), vectors


def run_text_model(
    text_model: torch.nn.Module,
    ids: torch.Tensor,
    vectors: list[tuple[int, int, torch.Tensor]],
    *,
    layer: int | None,
    eos_id: int,
    layer_norm_hidden: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states of ``layer`` ``[n, T, W]`` and the pooled state ``[n, W]`` (or ``[n, P]`` projected).

    ``layer=None`` is the last layer with the final layer norm; another layer gets the norm when
    ``layer_norm_hidden`` (ComfyUI's SD1 and SD2), not otherwise (SDXL). The pooled state is the final layer's
    normed state at each row's first end token, whatever ``layer`` is, through ``text_projection`` if the model
    has one.
    """
    parts = transformer_parts(text_model)
    blocks = parts.encoder.layers
    chosen = len(blocks) - 1 if layer is None else layer_index(layer, len(blocks))
    states = parts.embeddings.token_embedding(ids)
    if vectors:
        rows = torch.tensor([row for row, _, _ in vectors], device=ids.device)
        columns = torch.tensor([column for _, column, _ in vectors], device=ids.device)
        states[rows, columns] = torch.stack([v for _, _, v in vectors]).to(states.dtype).to(states.device)
    hidden = states + parts.embeddings.position_embedding.weight[: ids.shape[1]]
    mask = causal_mask(ids.shape[1], hidden.dtype, hidden.device)
    selected = hidden
    for index, block in enumerate(blocks):
        hidden = block(hidden, mask)
        if index == chosen:
            selected = hidden
    final = parts.final_layer_norm(hidden)
    if layer is None or (layer_norm_hidden and chosen == len(blocks) - 1):
        context = final
    else:
        context = parts.final_layer_norm(selected) if layer_norm_hidden else selected
    first_eos = (ids == eos_id).int().argmax(dim=-1)
    pooled = final[torch.arange(ids.shape[0], device=ids.device), first_eos]
    projection = getattr(text_model, "text_projection", None)
    return context, (pooled if projection is None else projection(pooled))


def apply_weights(z: torch.Tensor, z_empty: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``z_empty + (z - z_empty) * w`` per token (computed in float32), tokens of weight 1 left untouched."""
    w = weights.to(torch.float32)[..., None]
    moved = (z.float() - z_empty.float()) * w + z_empty.float()
    return torch.where(w != 1.0, moved, z.float()).to(z.dtype)


@torch.no_grad()
def encode_chunks(
    text_model: torch.nn.Module,
    chunks: list[Chunk],
    *,
    layer: int | None = -1,
    bos_id: int = SD1_BOS_ID,
    eos_id: int = SD1_EOS_ID,
    pad_id: int | None = None,
    layer_norm_hidden: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode tokenized chunks: context ``[1, 77·k, width]`` and the first chunk's pooled state ``[1, width]``.

    Weighted tokens interpolate from an empty chunk padded with ``pad_id`` (the end token when None)."""
    device = transformer_parts(text_model).final_layer_norm.weight.device
    weights = torch.tensor([[weight for _, weight in chunk] for chunk in chunks], device=device)
    weighted = bool((weights != 1.0).any())
    empty = close_chunk([], bos_id=bos_id, eos_id=eos_id, length=len(chunks[0]), pad_id=pad_id)
    rows = [*chunks, empty] if weighted else chunks
    ids, vectors = chunk_inputs(rows, device)
    hidden, pooled = run_text_model(text_model, ids, vectors, layer=layer, eos_id=eos_id,
                                    layer_norm_hidden=layer_norm_hidden)
    if weighted:
        hidden = apply_weights(hidden[:-1], hidden[-1], weights)
    return hidden.reshape(1, -1, hidden.shape[-1]), pooled[:1]


def encode_prompt(
    text_model: torch.nn.Module,
    tokenizer: ClipTokenizer,
    text: str,
    *,
    layer: int = -1,
    embeddings_dir: str | None = None,
    allow_pickle: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI's ``CLIPTextEncode`` for SD1: ``(context [1, 77·k, width], pooled [1, width])``; other encoders go
    through ``diffusion.clip_values.TextEncoder``, which tokenizes and encodes per encoder.

    Warnings about the prompt (e.g. a missing embedding) are issued as ``PromptWarning``; ``tokenize_prompt``
    returns them as data instead.
    """
    tokenized = tokenize_prompt(
        tokenizer,
        text,
        embeddings_dir=embeddings_dir,
        embedding_width=text_model.config.hidden_size,
        allow_pickle=allow_pickle,
    )
    for note in tokenized.warnings:
        warnings.warn(note, PromptWarning, stacklevel=2)
    return encode_chunks(text_model, tokenized.chunks, layer=layer, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)
