"""Prompt weighting, chunking, embeddings in prompts, and encoding against transformers' own forward."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from diffusion.embeddings import EmbeddingError
from diffusion.prompt import (
    PromptWarning,
    encode_chunks,
    encode_prompt,
    pack_chunks,
    parse_weights,
    protect_escapes,
    split_embedding_references,
    tokenize_prompt,
    weighted_pieces,
)
from diffusion.tokenizer import ClipTokenizer

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "tokenizer_sd1.json"
BOS, EOS = 49406, 49407
WIDTH = 32


@pytest.fixture(scope="module")
def tokenizer() -> ClipTokenizer:
    return ClipTokenizer()


@pytest.fixture(scope="module")
def text_model() -> CLIPTextModel:
    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=WIDTH,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=EOS,
    )
    return CLIPTextModel(config).eval()


def ids_of(chunk) -> list[int]:
    return [token for token, _ in chunk]


def reference(text_model, chunk_ids: list[int]):
    """transformers' forward on one chunk: (last_hidden_state [77, W], hidden_states, pooler_output [W])."""
    with torch.no_grad():
        out = text_model(input_ids=torch.tensor([chunk_ids]), output_hidden_states=True)
    return out.last_hidden_state[0], out.hidden_states, out.pooler_output[0]


def save_embedding(folder: Path, name: str, tensor: torch.Tensor) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"emb_params": tensor.detach().clone().contiguous()}, folder / f"{name}.safetensors")


# ---- tokenization ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", list(json.loads(FIXTURE.read_text())))
def test_reproduces_comfyui_fixture(tokenizer, text):
    expected = json.loads(FIXTURE.read_text())[text]
    chunks = tokenize_prompt(tokenizer, text).chunks
    assert len(chunks) == len(expected)
    for chunk, expected_chunk in zip(chunks, expected, strict=True):
        assert len(chunk) == 77
        assert ids_of(chunk)[:24] == [token for token, _ in expected_chunk]
        # ComfyUI multiplies 1.1 * 1.1 = 1.2100000000000002; the fixture stores it rounded to 1.21.
        assert [w for _, w in chunk[:24]] == pytest.approx([w for _, w in expected_chunk], abs=1e-12)
        assert ids_of(chunk)[24:] == [EOS] * 53


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a (b) c", [("a ", 1.0), ("b", 1.1), (" c", 1.0)]),
        ("((a:1.5) b)", [("a", 1.5), (" b", 1.1)]),
        ("(a (b) c)", [("a ", 1.1), ("b", 1.1 * 1.1), (" c", 1.1)]),
        ("(a:1.5:2)", [("a:1.5", 2.0)]),
        ("(a:x)", [("a:x", 1.1)]),
        ("(:2)", [(":2", 1.1)]),
        ("((x:0.5))", [("x", 0.5)]),
        ("a) (b)", [("a) (b)", 1.0)]),
        ("(a", [("(a", 1.0)]),
        ("(a)) b", [("a", 1.1), (") b", 1.0)]),
        ("()", []),
        ("x (y:1e1)", [("x ", 1.0), ("y", 10.0)]),
    ],
)
def test_parse_weights(text, expected):
    parsed = parse_weights(protect_escapes(text))
    assert [segment for segment, _ in parsed] == [segment for segment, _ in expected]
    assert [weight for _, weight in parsed] == pytest.approx([weight for _, weight in expected], abs=1e-12)


def test_pieces_are_whole_segments_with_escapes_restored():
    assert weighted_pieces("a\nb  c \\(d\\) (e f)") == [("a\nb  c (d) ", 1.0), ("e f", 1.1)]


def test_segments_are_cut_before_embedding_references():
    assert split_embedding_references("a embedding:x b\nembedding:y,c") == ["a", "embedding:x b", "embedding:y,c"]
    assert split_embedding_references("embedding:x a,embedding:y") == ["embedding:x a,embedding:y"]
    assert split_embedding_references(" embedding: embedding:x") == ["embedding:", "embedding:x"]


def test_empty_prompt_is_one_padded_chunk(tokenizer):
    assert [ids_of(c) for c in tokenize_prompt(tokenizer, "").chunks] == [[BOS] + [EOS] * 76]
    assert [ids_of(c) for c in tokenize_prompt(tokenizer, " \n ").chunks] == [[BOS] + [EOS] * 76]


@pytest.mark.parametrize(
    ("text", "bodies"),
    [
        ("a " * 75, [75]),
        ("a " * 76, [75, 1]),
        ("a " * 200, [75, 75, 50]),
        ("a " * 73 + "supercalifragilistic", [75, 3]),  # one segment is one group: cut at 75 tokens
        ("a " * 70 + "(1234567)", [70, 7]),  # a 7-token group moves whole to the next chunk
        ("a " * 70 + "(1234567890)", [75, 5]),  # an 8+ token group is split
        ("a " * 75 + "(1234567890)", [75, 10]),
        ("(a) " * 80, [75, 5]),
    ],
)
def test_chunk_boundaries(tokenizer, text, bodies):
    chunks = tokenize_prompt(tokenizer, text).chunks
    assert all(len(chunk) == 77 and chunk[0] == (BOS, 1.0) for chunk in chunks)
    assert [ids_of(chunk).index(EOS) - 1 for chunk in chunks] == bodies


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(min_value=1, max_value=20), max_size=40))
def test_packing_keeps_order_and_small_words_whole(sizes):
    groups, group_of, next_token = [], {}, 0
    for index, size in enumerate(sizes):
        groups.append([(next_token + k, 1.0) for k in range(size)])
        group_of.update({next_token + k: index for k in range(size)})
        next_token += size
    chunks = pack_chunks(groups, bos_id=-1, eos_id=-2)
    bodies = []
    for chunk in chunks:
        tokens = ids_of(chunk)
        assert len(tokens) == 77 and tokens[0] == -1
        end = tokens.index(-2)
        assert set(tokens[end:]) == {-2}
        bodies.append(tokens[1:end])
    assert [t for body in bodies for t in body] == list(range(next_token))
    for body, following in zip(bodies, bodies[1:], strict=False):
        if len(body) < 75:  # closed early: the next word was small and did not fit
            next_group = group_of[following[0]]
            assert sizes[next_group] < 8 and len(body) + sizes[next_group] > 75
    for index, size in enumerate(sizes):
        if size < 8:
            assert sum(any(group_of[t] == index for t in body) for body in bodies) == 1


# ---- embeddings in prompts -------------------------------------------------------------------------------------


def test_embedding_vectors_take_token_positions(tokenizer, tmp_path):
    vectors = torch.randn(2, WIDTH)
    save_embedding(tmp_path, "cat", vectors)
    prompt = tokenize_prompt(tokenizer, "a embedding:cat, (dog:1.2)", embeddings_dir=tmp_path, embedding_width=WIDTH)
    chunk = prompt.chunks[0]
    assert prompt.warnings == ()
    assert ids_of(chunk)[:2] == [BOS, 320] and ids_of(chunk)[4:7] == [267, 1929, EOS]
    assert torch.equal(chunk[2][0], vectors[0]) and torch.equal(chunk[3][0], vectors[1])
    assert [w for _, w in chunk[:6]] == [1.0, 1.0, 1.0, 1.0, 1.0, 1.2]


def test_weighted_embedding_and_explicit_extension(tokenizer, tmp_path):
    save_embedding(tmp_path, "cat", torch.randn(1, WIDTH))
    chunk = tokenize_prompt(
        tokenizer, "(embedding:cat.safetensors:1.3)", embeddings_dir=tmp_path, embedding_width=WIDTH
    ).chunks[0]
    assert isinstance(chunk[1][0], torch.Tensor) and chunk[1][1] == 1.3 and chunk[2] == (EOS, 1.0)


@pytest.mark.parametrize(
    ("text", "ids"),
    [
        ("embedding:missing a dog", [BOS, 320, 1929, EOS]),
        ("embedding:missing, a dog", [BOS, 267, 320, 1929, EOS]),  # the trailing comma survives
        ("a (embedding:missing:1.2) dog", [BOS, 320, 1929, EOS]),
    ],
)
def test_missing_embedding_is_left_out_with_a_warning(tokenizer, tmp_path, text, ids):
    prompt = tokenize_prompt(tokenizer, text, embeddings_dir=tmp_path, embedding_width=WIDTH)
    assert ids_of(prompt.chunks[0])[: len(ids)] == ids
    assert len(prompt.warnings) == 1 and "'missing'" in prompt.warnings[0]


def test_without_embeddings_folder_the_word_is_text(tokenizer):
    prompt = tokenize_prompt(tokenizer, "embedding:missing a dog")
    assert ids_of(prompt.chunks[0])[:8] == [BOS, 19703, 796, 281, 3423, 320, 1929, EOS]
    assert len(prompt.warnings) == 1 and "plain text" in prompt.warnings[0]


def test_embedding_of_the_wrong_width_is_an_error(tokenizer, tmp_path):
    save_embedding(tmp_path, "big", torch.randn(1, 768))
    with pytest.raises(EmbeddingError, match=r"big\.safetensors"):
        tokenize_prompt(tokenizer, "embedding:big", embeddings_dir=tmp_path, embedding_width=WIDTH)


# ---- encoding --------------------------------------------------------------------------------------------------


def test_unweighted_prompt_matches_transformers(text_model, tokenizer):
    chunk = tokenize_prompt(tokenizer, "a photograph of an astronaut riding a horse").chunks[0]
    context, pooled = encode_prompt(text_model, tokenizer, "a photograph of an astronaut riding a horse")
    last, _, pooler = reference(text_model, ids_of(chunk))
    assert context.shape == (1, 77, WIDTH) and pooled.shape == (1, WIDTH)
    torch.testing.assert_close(context[0], last, atol=1e-5, rtol=0)
    torch.testing.assert_close(pooled[0], pooler, atol=1e-5, rtol=0)
    assert torch.equal(pooled[0], context[0, ids_of(chunk).index(EOS)])  # first end token


@pytest.mark.parametrize(("layer", "hidden_index"), [(-1, 3), (-2, 2), (-3, 1), (0, 1), (1, 2)])
def test_layer_selection_applies_the_final_layer_norm(text_model, tokenizer, layer, hidden_index):
    chunk = tokenize_prompt(tokenizer, "a cat on a mat").chunks[0]
    context, pooled = encode_prompt(text_model, tokenizer, "a cat on a mat", layer=layer)
    _, hidden_states, pooler = reference(text_model, ids_of(chunk))
    with torch.no_grad():
        expected = text_model.final_layer_norm(hidden_states[hidden_index][0])
    torch.testing.assert_close(context[0], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(pooled[0], pooler, atol=1e-5, rtol=0)  # pooled always from the last layer


@pytest.mark.parametrize("layer", [3, -4])
def test_layer_out_of_range_is_an_error(text_model, tokenizer, layer):
    with pytest.raises(ValueError, match="layer must be in"):
        encode_prompt(text_model, tokenizer, "a cat", layer=layer)


@pytest.mark.parametrize("layer", [-1, -2])
def test_weights_interpolate_from_the_empty_chunk(text_model, tokenizer, layer):
    text = "(red:1.5) cat, ((sitting)) on a (mat:0.5)"
    chunk = tokenize_prompt(tokenizer, text).chunks[0]
    assert {w for _, w in chunk} == {1.0, 1.5, 1.1 * 1.1, 0.5}
    weights = torch.tensor([w for _, w in chunk])
    index = 3 + layer + 1  # hidden_states index of the chosen layer
    with torch.no_grad():
        z = text_model.final_layer_norm(reference(text_model, ids_of(chunk))[1][index][0])
        z_empty = text_model.final_layer_norm(reference(text_model, [BOS] + [EOS] * 76)[1][index][0])
    context, pooled = encode_prompt(text_model, tokenizer, text, layer=layer)
    expected = z_empty + (z - z_empty) * weights[:, None]
    torch.testing.assert_close(context[0], expected, atol=1e-5, rtol=0)
    unweighted = weights == 1.0
    torch.testing.assert_close(context[0][unweighted], z[unweighted], atol=1e-5, rtol=0)
    assert not torch.allclose(context[0][~unweighted], z[~unweighted], atol=1e-3)
    torch.testing.assert_close(pooled[0], reference(text_model, ids_of(chunk))[2], atol=1e-5, rtol=0)


def test_long_prompt_encodes_chunks_separately(text_model, tokenizer):
    text = "a photo of a cat sitting on a mat " * 12
    chunks = tokenize_prompt(tokenizer, text).chunks
    assert len(chunks) == 2
    context, pooled = encode_prompt(text_model, tokenizer, text)
    assert context.shape == (1, 154, WIDTH)
    first, _, first_pooled = reference(text_model, ids_of(chunks[0]))
    second, _, _ = reference(text_model, ids_of(chunks[1]))
    torch.testing.assert_close(context[0, :77], first, atol=1e-5, rtol=0)
    torch.testing.assert_close(context[0, 77:], second, atol=1e-5, rtol=0)
    torch.testing.assert_close(pooled[0], first_pooled, atol=1e-5, rtol=0)


def test_empty_prompt_encoding(text_model, tokenizer):
    context, pooled = encode_prompt(text_model, tokenizer, "")
    last, _, pooler = reference(text_model, [BOS] + [EOS] * 76)
    torch.testing.assert_close(context[0], last, atol=1e-5, rtol=0)
    torch.testing.assert_close(pooled[0], pooler, atol=1e-5, rtol=0)


def test_embedding_vectors_are_spliced_into_token_embeddings(text_model, tokenizer, tmp_path):
    table = text_model.embeddings.token_embedding.weight
    red, dog = tokenizer.encode("red")[0], tokenizer.encode("dog")[0]
    save_embedding(tmp_path, "reddog", table[[red, dog]])
    spliced = encode_prompt(text_model, tokenizer, "a (embedding:reddog:1.3), x", embeddings_dir=str(tmp_path))
    plain = encode_prompt(text_model, tokenizer, "a (red dog:1.3), x")
    torch.testing.assert_close(spliced[0], plain[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(spliced[1], plain[1], atol=1e-6, rtol=0)
    save_embedding(tmp_path, "other", torch.randn(2, WIDTH))
    other = encode_prompt(text_model, tokenizer, "a (embedding:other:1.3), x", embeddings_dir=str(tmp_path))
    assert not torch.allclose(other[0][0, 2:4], plain[0][0, 2:4], atol=1e-3)
    torch.testing.assert_close(other[0][0, :2], plain[0][0, :2], atol=1e-6, rtol=0)  # causal: earlier tokens same


def test_missing_embedding_warns(text_model, tokenizer, tmp_path):
    with pytest.warns(PromptWarning, match="nothing"):
        context, _ = encode_prompt(text_model, tokenizer, "embedding:nothing here", embeddings_dir=str(tmp_path))
    torch.testing.assert_close(context, encode_prompt(text_model, tokenizer, "here")[0], atol=0, rtol=0)


def test_dtype_follows_the_model(text_model, tokenizer):
    double = copy.deepcopy(text_model).double()
    context, pooled = encode_prompt(double, tokenizer, "(a red:1.2) fox")
    assert context.dtype == pooled.dtype == torch.float64
    chunks = tokenize_prompt(tokenizer, "(a red:1.2) fox").chunks
    single = encode_chunks(text_model, chunks)[0]
    torch.testing.assert_close(context.float(), single, atol=1e-5, rtol=0)
