import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import CLIPTextModel

from diffusion.make_checkpoint import random_weights
from diffusion.text_encoder import (
    build_text_encoder,
    clip_text_config,
    expected_text_weights,
    text_config_from_state_dict,
    text_encoder_on_meta,
)

SD15_KEYS = Path(__file__).resolve().parents[1] / "fixtures" / "sd15_keys.tsv"

# 128 wide so that the 64-wide-head rule gives 2 heads
CONFIG = clip_text_config(width=128, layers=2, intermediate_size=512)
IDS = torch.tensor([[49406, 320, 1125, 539, 49407] + [49407] * 72, [49406] + [5, 6, 7, 8, 9] * 15 + [49407]])


def random_text_weights(config=CONFIG, seed=0) -> dict[str, torch.Tensor]:
    """Keys as in an SD1 file under `cond_stage_model.transformer.` (with `text_model.`), position ids included."""
    meta = expected_text_weights(text_encoder_on_meta(config))
    meta.pop("embeddings.position_ids", None)
    layout = {"text_model." + k: (torch.float32, tuple(t.shape)) for k, t in meta.items()}
    layout["text_model.embeddings.position_ids"] = (torch.int64, (1, config.max_position_embeddings))
    return random_weights(layout, seed)


def reference_clip(sd: dict[str, torch.Tensor], ids: torch.Tensor, heads: int) -> list[torch.Tensor]:
    """OpenAI CLIP's text transformer written out: pre-LN blocks, causal attention, quick_gelu MLP.
    Returns the embeddings, the output of every layer, and the final-layer-normed output."""
    p = {k.removeprefix("text_model."): v for k, v in sd.items()}
    x = p["embeddings.token_embedding.weight"][ids] + p["embeddings.position_embedding.weight"][: ids.shape[1]]
    states = [x]
    n = ids.shape[1]
    mask = torch.full((n, n), float("-inf")).triu(1)
    for i in range(len({k.split(".")[2] for k in p if k.startswith("encoder.layers.")})):
        lp = {k.removeprefix(f"encoder.layers.{i}."): v for k, v in p.items() if k.startswith(f"encoder.layers.{i}.")}
        h = F.layer_norm(x, x.shape[-1:], lp["layer_norm1.weight"], lp["layer_norm1.bias"], 1e-5)
        q, k, v = (F.linear(h, lp[f"self_attn.{n}_proj.weight"], lp[f"self_attn.{n}_proj.bias"]) for n in "qkv")
        q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + mask
        attended = (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)
        x = x + F.linear(attended, lp["self_attn.out_proj.weight"], lp["self_attn.out_proj.bias"])
        h = F.layer_norm(x, x.shape[-1:], lp["layer_norm2.weight"], lp["layer_norm2.bias"], 1e-5)
        h = F.linear(h, lp["mlp.fc1.weight"], lp["mlp.fc1.bias"])
        h = h * torch.sigmoid(1.702 * h)
        x = x + F.linear(h, lp["mlp.fc2.weight"], lp["mlp.fc2.bias"])
        states.append(x)
    final = F.layer_norm(x, x.shape[-1:], p["final_layer_norm.weight"], p["final_layer_norm.bias"], 1e-5)
    return states + [final]


def test_sd15_config_from_the_public_file_shapes():
    rows = [line.rstrip("\n").split("\t") for line in open(SD15_KEYS)]
    prefix = "cond_stage_model.transformer."
    sd = {
        k.removeprefix(prefix): torch.empty([int(s) for s in shape.strip("[]").split(",")], device="meta")
        for k, _, shape in rows
        if k.startswith(prefix)
    }
    c = text_config_from_state_dict(sd)
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads) == (49408, 768, 12, 12)
    assert (c.intermediate_size, c.max_position_embeddings, c.hidden_act) == (3072, 77, "quick_gelu")
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (49406, 49407, 49407)
    expected = expected_text_weights(text_encoder_on_meta(c))
    assert {k: list(v.shape) for k, v in expected.items()} == {
        k.removeprefix("text_model."): list(v.shape) for k, v in sd.items() if not k.endswith("position_ids")
    }  # position_ids is a fixed buffer, rebuilt rather than loaded


def test_matches_the_hand_written_clip():
    sd = random_text_weights()
    model = build_text_encoder(sd)
    with torch.no_grad():
        out = model(IDS, output_hidden_states=True)
    want = reference_clip(sd, IDS, heads=2)
    assert len(out.hidden_states) == len(want) - 1
    for got, expected in zip([*out.hidden_states, out.last_hidden_state], want, strict=True):
        assert (got - expected).abs().max().item() < 1e-4


def test_matches_transformers_from_pretrained(tmp_path):
    sd = random_text_weights()
    config = {
        "model_type": "clip_text_model", "architectures": ["CLIPTextModel"], "vocab_size": 49408,
        "hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 2,
        "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
        "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1, "projection_dim": 128,
    }  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "model.safetensors")
    theirs = CLIPTextModel.from_pretrained(tmp_path, local_files_only=True).eval()
    ours = build_text_encoder(sd)
    with torch.no_grad():
        want = theirs(IDS, output_hidden_states=True)
        got = ours(IDS, output_hidden_states=True)
    assert (got.last_hidden_state - want.last_hidden_state).abs().max().item() < 1e-4
    assert (got.hidden_states[-2] - want.hidden_states[-2]).abs().max().item() < 1e-4


def test_old_layout_and_position_ids_variants_give_the_same_model():
    sd = random_text_weights()
    without_text_model = {k.removeprefix("text_model."): v for k, v in sd.items()}
    without_position_ids = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
    corrupted = dict(sd, **{"text_model.embeddings.position_ids": torch.arange(77.0)[None] - 0.0001})
    with torch.no_grad():
        want = build_text_encoder(sd)(IDS).last_hidden_state
        for variant in (without_text_model, without_position_ids, corrupted):
            torch.testing.assert_close(build_text_encoder(variant)(IDS).last_hidden_state, want, rtol=0, atol=0)


def test_tiny_width_still_gets_one_head():
    assert clip_text_config(width=32, layers=2, intermediate_size=128).num_attention_heads == 1


def test_missing_key_is_named():
    sd = random_text_weights()
    del sd["text_model.encoder.layers.0.mlp.fc1.weight"]
    with pytest.raises(ValueError, match=r"encoder\.layers\.0\.mlp\.fc1\.weight"):
        text_config_from_state_dict(sd)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    sd = random_text_weights()
    want = build_text_encoder(sd)(IDS).last_hidden_state
    half = build_text_encoder({k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()})
    with torch.no_grad():
        got = half(IDS).last_hidden_state
    assert got.dtype == dtype
    assert (got.float() - want).abs().max() < 0.1 * want.abs().max()


def test_sd1_text_part_encodes_as_the_checkpoint_text_encoder(tmp_path):
    """Issue #13: `text_parts` for SD1 (what open_checkpoint will call) and the CLIP value built on it encode exactly
    as the SD1 path of today: same weights read, same conditioning (last layer and CLIPSetLastLayer(-2))."""
    from diffusion.checkpoint import FileIdentity, TensorFile, open_checkpoint
    from diffusion.clip_values import clip_value
    from diffusion.components import checkpoint_values
    from diffusion.device import Precision
    from diffusion.families import FAMILIES
    from diffusion.make_checkpoint import make_checkpoint
    from diffusion.text_parts import text_parts
    from diffusion.tokenizer import ClipTokenizer

    path = make_checkpoint(tmp_path / "tiny.safetensors", preset="tiny", seed=0)
    source, tokenizer, cpu = TensorFile(path), ClipTokenizer(), torch.device("cpu")
    (layout,) = text_parts(source, FileIdentity.of(path), source.meta, FAMILIES["sd1"])
    old_layout = open_checkpoint(path).text_encoder
    assert layout.encoder == "clip_l" and dict(layout.keys) == dict(old_layout.keys)
    assert layout.weight_bytes(torch.float32) == old_layout.weight_bytes(torch.float32)
    new = clip_value((layout,), "sd1", device=cpu, dtype=torch.float32, tokenizer=tokenizer)
    _, old, _ = checkpoint_values(open_checkpoint(path), device=cpu, tokenizer=tokenizer,
                                  precision=Precision(torch.float32, torch.float32, torch.float32))
    new_net, old_net = new.handle.load("cpu"), old.handle.load("cpu")
    for clip_new, clip_old in ((new, old), (new.with_layer(-2), old.with_layer(-2))):
        a = clip_new.encode("a (red:1.2) cat", new_net).entries[0]
        b = clip_old.encode("a (red:1.2) cat", old_net).entries[0]
        assert torch.equal(a.context, b.context) and torch.equal(a.pooled, b.pooled)
