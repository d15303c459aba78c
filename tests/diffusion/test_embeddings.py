"""Textual-inversion files: layouts, safety, width checks and name lookup."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from diffusion.embeddings import EmbeddingError, find_embedding_file, load_embedding

WIDTH = 32


class NotATensor:
    """A pickled object that ``weights_only=True`` must refuse."""


def vectors(n: int, width: int = WIDTH, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def test_safetensors_emb_params(tmp_path):
    expected = vectors(3)
    save_file({"emb_params": expected}, tmp_path / "style.safetensors")
    assert torch.equal(load_embedding(tmp_path / "style.safetensors", width=WIDTH), expected)


def test_clip_l_is_chosen_for_sd1(tmp_path):
    clip_l, clip_g = vectors(2), vectors(2, width=48, seed=1)
    save_file({"clip_g": clip_g, "clip_l": clip_l}, tmp_path / "xl.safetensors")
    assert torch.equal(load_embedding(tmp_path / "xl.safetensors", width=WIDTH), clip_l)


def test_string_to_param_pt_needs_the_unsafe_flag(tmp_path):
    expected = vectors(4)
    path = tmp_path / "a1111.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": expected}, "name": "a1111", "step": 7}, path)
    with pytest.raises(EmbeddingError, match="a1111.pt.*allow_pickle"):
        load_embedding(path, width=WIDTH)
    assert torch.equal(load_embedding(path, width=WIDTH, allow_pickle=True), expected)


def test_single_tensor_layouts(tmp_path):
    one = vectors(1)[0]
    torch.save({"<my-token>": one}, tmp_path / "learned_embeds.bin")
    torch.save(vectors(2), tmp_path / "bare.pt")
    save_file({"whatever": vectors(5)}, tmp_path / "single.safetensors")
    loaded = load_embedding(tmp_path / "learned_embeds.bin", width=WIDTH, allow_pickle=True)
    assert loaded.shape == (1, WIDTH) and torch.equal(loaded[0], one)
    assert torch.equal(load_embedding(tmp_path / "bare.pt", width=WIDTH, allow_pickle=True), vectors(2))
    assert load_embedding(tmp_path / "single.safetensors", width=WIDTH).shape == (5, WIDTH)


def test_half_precision_is_returned_as_float32(tmp_path):
    save_file({"emb_params": vectors(2).half()}, tmp_path / "half.safetensors")
    loaded = load_embedding(tmp_path / "half.safetensors", width=WIDTH)
    assert loaded.dtype == torch.float32 and torch.equal(loaded, vectors(2).half().float())


def test_width_mismatch_names_the_file(tmp_path):
    save_file({"emb_params": vectors(2, width=1024)}, tmp_path / "sd2.safetensors")
    with pytest.raises(EmbeddingError, match=r"sd2\.safetensors.*1024.*32"):
        load_embedding(tmp_path / "sd2.safetensors", width=WIDTH)


def test_ambiguous_file_lists_its_keys(tmp_path):
    save_file({"first": vectors(1), "second": vectors(1)}, tmp_path / "two.safetensors")
    with pytest.raises(EmbeddingError, match=r"two\.safetensors.*\['first', 'second'\]"):
        load_embedding(tmp_path / "two.safetensors", width=WIDTH)


def test_weights_only_refuses_arbitrary_objects(tmp_path):
    torch.save({"emb_params": vectors(1), "extra": NotATensor()}, tmp_path / "evil.pt")
    with pytest.raises(EmbeddingError, match=r"evil\.pt.*weights_only"):
        load_embedding(tmp_path / "evil.pt", width=WIDTH, allow_pickle=True)


def test_corrupt_safetensors_names_the_file(tmp_path):
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(EmbeddingError, match=r"broken\.safetensors"):
        load_embedding(tmp_path / "broken.safetensors", width=WIDTH)


def test_find_prefers_exact_name_then_extensions_in_order(tmp_path):
    save_file({"emb_params": vectors(1)}, tmp_path / "cat.safetensors")
    torch.save(vectors(1), tmp_path / "cat.pt")
    assert find_embedding_file("cat", tmp_path) == tmp_path / "cat.safetensors"
    assert find_embedding_file("cat.pt", tmp_path) == tmp_path / "cat.pt"
    assert find_embedding_file("dog", tmp_path) is None


def test_find_searches_subfolders_and_sub_paths(tmp_path):
    (tmp_path / "styles" / "deep").mkdir(parents=True)
    save_file({"emb_params": vectors(1)}, tmp_path / "styles" / "deep" / "ink.safetensors")
    assert find_embedding_file("ink", tmp_path) == tmp_path / "styles" / "deep" / "ink.safetensors"
    assert find_embedding_file("deep/ink", tmp_path / "styles") == tmp_path / "styles" / "deep" / "ink.safetensors"


def test_find_refuses_names_outside_the_folder(tmp_path):
    (tmp_path / "embeddings").mkdir()
    save_file({"emb_params": vectors(1)}, tmp_path / "secret.safetensors")
    assert find_embedding_file("../secret", tmp_path / "embeddings") is None
    assert find_embedding_file(str(tmp_path / "secret"), tmp_path / "embeddings") is None


def test_missing_folder_finds_nothing(tmp_path):
    assert find_embedding_file("cat", tmp_path / "does-not-exist") is None
