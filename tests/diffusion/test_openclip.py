"""Issue #13, the text side: OpenCLIP ViT-H (SD2) and bigG (SDXL) text towers, pinned against transformers and a
hand-written OpenCLIP forward, and prompt encoding per family as ComfyUI does it (pad token, layer, concat, pool)."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from diffusion.checkpoint import FileIdentity, TensorFile
from diffusion.clip_values import clip_value
from diffusion.families import FAMILIES
from diffusion.make_checkpoint import random_weights
from diffusion.openclip import openclip_layout
from diffusion.prompt import tokenize_prompt
from diffusion.safetensors_header import CheckpointError
from diffusion.text_encoder import clip_text_config, expected_text_weights, text_encoder_on_meta
from diffusion.text_parts import open_text_encoder, text_parts
from diffusion.tokenizer import ClipTokenizer

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "tokenizer_sd1.json"
BOS, EOS = 49406, 49407
# The published configs (laion/CLIP-ViT-bigG-14-laion2B-39B-b160k and laion/CLIP-ViT-H-14-laion2B-s32B-b79K text
# towers); the tiny models below keep everything but the sizes.
BIGG = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
        "projection_dim": 1280, "hidden_act": "gelu", "layer_norm_eps": 1e-5, "vocab_size": 49408,
        "max_position_embeddings": 77, "bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": 1}
VIT_H = dict(BIGG, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
             projection_dim=1024)
WL, WG, WH = 128, 192, 128  # tiny widths: CLIP-L, bigG, ViT-H (heads of 64)


def tiny(published: dict, width: int, layers: int, projection: int) -> CLIPTextConfig:
    return CLIPTextConfig(**dict(published, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                                 num_attention_heads=width // 64, projection_dim=projection))


def openclip_weights(width: int, layers: int, projection: int, seed: int = 0) -> dict[str, torch.Tensor]:
    return random_weights(openclip_layout(width=width, layers=layers, projection=projection), seed)


def clip_l_weights(width: int = WL, layers: int = 2, seed: int = 1) -> dict[str, torch.Tensor]:
    meta = expected_text_weights(text_encoder_on_meta(clip_text_config(width=width, layers=layers,
                                                                       intermediate_size=4 * width)))
    return random_weights({"text_model." + k: (torch.float32, tuple(t.shape)) for k, t in meta.items()
                           if k != "embeddings.position_ids"}, seed)


def to_transformers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The test's own OpenCLIP -> transformers renaming (written out independently of diffusion/openclip.py)."""
    out = {"text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
           "text_model.embeddings.position_embedding.weight": sd["positional_embedding"],
           "text_model.final_layer_norm.weight": sd["ln_final.weight"],
           "text_model.final_layer_norm.bias": sd["ln_final.bias"],
           "text_projection.weight": sd["text_projection"].T.contiguous()}
    layers = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
    for n in range(layers):
        o, t = f"transformer.resblocks.{n}.", f"text_model.encoder.layers.{n}."
        width = sd[o + "ln_1.weight"].shape[0]
        for i, name in enumerate("qkv"):
            out[t + f"self_attn.{name}_proj.weight"] = sd[o + "attn.in_proj_weight"][i * width:(i + 1) * width]
            out[t + f"self_attn.{name}_proj.bias"] = sd[o + "attn.in_proj_bias"][i * width:(i + 1) * width]
        for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                     ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
            out[t + b + ".weight"], out[t + b + ".bias"] = sd[o + a + ".weight"], sd[o + a + ".bias"]
    return {k: v.contiguous() for k, v in out.items()}


def transformers_model(config: CLIPTextConfig, sd: dict[str, torch.Tensor], projected: bool = True):
    model = (CLIPTextModelWithProjection if projected else CLIPTextModel)(config).eval()
    if not hasattr(model, "text_model"):  # transformers 5's CLIPTextModel holds the tower's parts itself
        sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    model.load_state_dict(sd, strict=False)
    return model


def openclip_reference(sd: dict[str, torch.Tensor], ids: torch.Tensor, heads: int):
    """OpenCLIP's text forward written out with torch's own multi-head attention on the fused in-projection:
    (every layer's output, final-normed last layer, projected pooled state at the end token)."""
    width = sd["ln_final.weight"].shape[0]
    x = (sd["token_embedding.weight"][ids] + sd["positional_embedding"]).transpose(0, 1)  # [T, B, W]
    mask = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)
    states = []
    for n in range(len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})):
        p = {k.removeprefix(f"transformer.resblocks.{n}."): v for k, v in sd.items()
             if k.startswith(f"transformer.resblocks.{n}.")}
        h = F.layer_norm(x, (width,), p["ln_1.weight"], p["ln_1.bias"], 1e-5)
        attended, _ = F.multi_head_attention_forward(
            h, h, h, width, heads, p["attn.in_proj_weight"], p["attn.in_proj_bias"], None, None, False, 0.0,
            p["attn.out_proj.weight"], p["attn.out_proj.bias"], training=False, need_weights=False, attn_mask=mask)
        x = x + attended
        h = F.layer_norm(x, (width,), p["ln_2.weight"], p["ln_2.bias"], 1e-5)
        x = x + F.linear(F.gelu(F.linear(h, p["mlp.c_fc.weight"], p["mlp.c_fc.bias"])), p["mlp.c_proj.weight"],
                         p["mlp.c_proj.bias"])
        states.append(x.transpose(0, 1))
    final = F.layer_norm(states[-1], (width,), sd["ln_final.weight"], sd["ln_final.bias"], 1e-5)
    pooled = final[torch.arange(ids.shape[0]), ids.argmax(-1)] @ sd["text_projection"]
    return states, final, pooled


def write(path: Path, parts: dict[str, dict[str, torch.Tensor]]) -> Path:
    save_file({prefix + k: v.contiguous() for prefix, sd in parts.items() for k, v in sd.items()}, path)
    return path


def layouts(path: Path, family: str):
    source = TensorFile(path)
    return text_parts(source, FileIdentity.of(path), source.meta, FAMILIES[family])


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-4) -> bool:
    return (a - b).abs().max().item() <= rtol * b.abs().max().item()


@pytest.fixture(scope="module")
def tokenizer():
    return ClipTokenizer()


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """A tiny SDXL base file's two text encoders: CLIP-L (2 layers) and bigG (4 layers), and their weights."""
    l_sd, g_sd = clip_l_weights(), openclip_weights(WG, 4, 96)
    path = write(tmp_path_factory.mktemp("sdxl") / "sdxl.safetensors",
                 {"conditioner.embedders.0.transformer.": l_sd, "conditioner.embedders.1.model.": g_sd})
    return path, l_sd, g_sd


def ids_row(tokenizer, text: str, pad: int) -> torch.Tensor:
    body = tokenizer.encode(text)
    return torch.tensor([[BOS, *body, EOS] + [pad] * (75 - len(body))])


# ---- the conversion, pinned ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("published", "prefix", "family", "width", "layers"), [
    (BIGG, "conditioner.embedders.0.model.", "sdxl_refiner", WG, 3),
    (VIT_H, "cond_stage_model.model.", "sd2", WH, 3),
])
def test_openclip_layout_matches_transformers_and_openclip(tmp_path, tokenizer, published, prefix, family, width,
                                                           layers):
    """A bigG- / ViT-H-shaped OpenCLIP state dict read by our part layout = transformers' CLIPTextModelWithProjection
    of the published config with the same weights = OpenCLIP's forward (hidden states of every layer, pooled)."""
    sd = openclip_weights(width, layers, 96)
    (layout,) = layouts(write(tmp_path / "m.safetensors", {prefix: sd}), family)
    ours = layout.load(dtype=torch.float32)
    theirs = transformers_model(tiny(published, width, layers, 96), to_transformers(sd))
    ids = ids_row(tokenizer, "a photograph of an astronaut riding a horse", pad=0)
    with torch.no_grad():
        got, want = ours(ids, output_hidden_states=True), theirs(ids, output_hidden_states=True)
    states, final, pooled = openclip_reference(sd, ids, heads=width // 64)
    assert (layout.config.hidden_act, layout.config.num_attention_heads) == ("gelu", width // 64)
    for index in (-2, -1):
        assert close(got.hidden_states[index], want.hidden_states[index])
        assert close(got.hidden_states[index], states[index])
    assert close(got.last_hidden_state, final)
    assert close(got.text_embeds, want.text_embeds) and close(got.text_embeds, pooled)


@pytest.mark.parametrize(("dims", "published"), [((1280, 32, 1280), BIGG), ((1024, 24, 1024), VIT_H)])
def test_full_size_config_is_read_from_shapes(tmp_path, dims, published):
    """The published bigG and ViT-H architectures are inferred from shapes alone (meta tensors, nothing built)."""
    width, layers, projection = dims
    shapes = openclip_layout(width=width, layers=layers, projection=projection)
    meta = {k: torch.empty(shape, device="meta") for k, (_, shape) in shapes.items()}
    from diffusion.openclip import openclip_sources, shaped_meta
    from diffusion.text_encoder import text_config_from_state_dict

    config = text_config_from_state_dict(shaped_meta(openclip_sources({k: k for k in meta}), meta), hidden_act="gelu")
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "projection_dim",
                "hidden_act", "max_position_embeddings", "vocab_size"):
        assert getattr(config, key) == published[key], key


# ---- prompt encoding per family ----------------------------------------------------------------------------------


def test_sd2_uses_the_penultimate_layer_normed_and_pads_with_zero(tmp_path, tokenizer):
    """ComfyUI's SD2: layer -2 WITH the final layer norm, tokens padded with 0 (not the end token)."""
    sd = openclip_weights(WH, 3, 96)
    (layout,) = layouts(write(tmp_path / "sd2.safetensors", {"cond_stage_model.model.": sd}), "sd2")
    clip = clip_value((layout,), "sd2", device=torch.device("cpu"), dtype=torch.float32, tokenizer=tokenizer)
    text = "a photograph of an astronaut riding a horse"
    cond = clip.encode(text, clip.handle.load("cpu")).entries[0]
    theirs = transformers_model(tiny(VIT_H, WH, 3, 96), to_transformers(sd))
    with torch.no_grad():
        out = theirs(ids_row(tokenizer, text, pad=0), output_hidden_states=True)
        eos_padded = theirs(ids_row(tokenizer, text, pad=EOS), output_hidden_states=True)
    normed = theirs.text_model.final_layer_norm
    assert cond.context.shape == (1, 77, WH)
    assert close(cond.context, normed(out.hidden_states[-2]))
    assert not close(cond.context, normed(eos_padded.hidden_states[-2]), rtol=1e-2)
    assert close(cond.pooled, out.text_embeds)


@pytest.mark.parametrize("text", list(json.loads(FIXTURE.read_text())))
def test_openclip_tokens_are_comfyuis_with_zero_padding(tokenizer, text):
    """ComfyUI's SD2/SDXL-bigG tokenizer is SD1's with pad_with_end=False: the fixture's ids up to the first end
    token, then 0."""
    expected = [token for token, _ in json.loads(FIXTURE.read_text())[text][0]]
    chunk = [token for token, _ in tokenize_prompt(tokenizer, text, pad_id=0).chunks[0]]
    end = expected.index(EOS)
    assert chunk[: end + 1] == expected[: end + 1] and chunk[end + 1:] == [0] * (76 - end)


def test_sdxl_context_is_both_penultimate_layers_unnormed_and_pooled_is_bigg(sdxl, tokenizer):
    """SDXL: CLIP-L's and bigG's penultimate layers without the final norm, side by side [1, 77, 768+1280 here
    tiny]; CLIP-L pads with the end token, bigG with 0; pooled = bigG's projected pooled state."""
    path, l_sd, g_sd = sdxl
    clip = clip_value(layouts(path, "sdxl"), "sdxl", device=torch.device("cpu"), dtype=torch.float32,
                      tokenizer=tokenizer)
    text = "a cat wearing a hat"
    cond = clip.encode(text, clip.handle.load("cpu")).entries[0]
    clip_l = transformers_model(clip_text_config(width=WL, layers=2, intermediate_size=4 * WL), l_sd, False)
    big_g = transformers_model(tiny(BIGG, WG, 4, 96), to_transformers(g_sd))
    with torch.no_grad():
        l_out = clip_l(ids_row(tokenizer, text, pad=EOS), output_hidden_states=True)
        g_out = big_g(ids_row(tokenizer, text, pad=0), output_hidden_states=True)
    assert cond.context.shape == (1, 77, WL + WG) and cond.pooled.shape == (1, 96)
    assert close(cond.context[..., :WL], l_out.hidden_states[-2])
    assert close(cond.context[..., WL:], g_out.hidden_states[-2])
    assert close(cond.pooled, g_out.text_embeds)


def test_sdxl_clip_set_last_layer_applies_to_both_as_comfyui(sdxl, tokenizer):
    """CLIPSetLastLayer(-1) on SDXL: both last layers, still without the norm; deeper than CLIP-L's 2 layers
    (-3): CLIP-L falls back to its normed last layer, bigG gives layer -3."""
    path, l_sd, g_sd = sdxl
    clip = clip_value(layouts(path, "sdxl"), "sdxl", device=torch.device("cpu"), dtype=torch.float32,
                      tokenizer=tokenizer)
    network = clip.handle.load("cpu")
    clip_l = transformers_model(clip_text_config(width=WL, layers=2, intermediate_size=4 * WL), l_sd, False)
    big_g = transformers_model(tiny(BIGG, WG, 4, 96), to_transformers(g_sd))
    with torch.no_grad():
        l_out = clip_l(ids_row(tokenizer, "a cat", pad=EOS), output_hidden_states=True)
        g_out = big_g(ids_row(tokenizer, "a cat", pad=0), output_hidden_states=True)
    last = clip.with_layer(-1).encode("a cat", network).entries[0].context
    assert close(last[..., :WL], l_out.hidden_states[-1]) and close(last[..., WL:], g_out.hidden_states[-1])
    deep = clip.with_layer(-3).encode("a cat", network).entries[0].context
    assert close(deep[..., :WL], l_out.last_hidden_state) and close(deep[..., WL:], g_out.hidden_states[-3])
    assert clip.layers == 4


def test_sdxl_long_prompt_and_encode_sdxl_pads_the_shorter_side_with_empty_chunks(sdxl, tokenizer):
    """77-token chunks on both encoders; pooled from the first chunk only; CLIPTextEncodeSDXL with a 2-chunk
    text_g and a 1-chunk text_l pads CLIP-L with a whole chunk of the empty prompt."""
    path, _, _ = sdxl
    clip = clip_value(layouts(path, "sdxl"), "sdxl", device=torch.device("cpu"), dtype=torch.float32,
                      tokenizer=tokenizer)
    network = clip.handle.load("cpu")
    long_text = "a " * 100
    both = clip.encode(long_text, network).entries[0]
    first = clip.encode("a " * 75, network).entries[0]
    assert both.context.shape == (1, 154, WL + WG)
    assert close(both.pooled, first.pooled, rtol=1e-5)  # batched with the second chunk: the same up to rounding
    mixed = clip.encode_sdxl(long_text, "a cat", network).entries[0]
    empty = clip.encode("", network).entries[0]
    short = clip.encode("a cat", network).entries[0]
    assert mixed.context.shape == (1, 154, WL + WG)
    assert close(mixed.context[:, 77:, :WL], empty.context[..., :WL], rtol=1e-6)
    assert close(mixed.context[:, :77, :WL], short.context[..., :WL], rtol=1e-6)
    assert close(mixed.context[..., WL:], both.context[..., WL:], rtol=1e-6)


def test_weights_interpolate_from_an_empty_chunk_padded_like_the_encoder(sdxl, tokenizer):
    """(word:w) on bigG: z_empty + (z - z_empty) * w where the empty chunk is start, end, then 0s."""
    path, _, g_sd = sdxl
    (layout,) = layouts(write(path.parent / "refiner.safetensors", {"conditioner.embedders.0.model.": g_sd}),
                        "sdxl_refiner")
    clip = clip_value((layout,), "sdxl", device=torch.device("cpu"), dtype=torch.float32, tokenizer=tokenizer)
    network = clip.handle.load("cpu")
    weighted = clip.encode("(cat:1.5)", network).entries[0].context
    plain = clip.encode("cat", network).entries[0].context
    big_g = transformers_model(tiny(BIGG, WG, 4, 96), to_transformers(g_sd))
    with torch.no_grad():
        z_empty = big_g(torch.tensor([[BOS, EOS] + [0] * 75]), output_hidden_states=True).hidden_states[-2]
    want = plain.clone()
    want[:, 1] = z_empty[:, 1] + (plain[:, 1] - z_empty[:, 1]) * 1.5
    assert weighted.shape == (1, 77, WG) and close(weighted, want)


def test_sdxl_embedding_file_gives_each_encoder_its_own_vectors(sdxl, tokenizer, tmp_path):
    """An SDXL textual inversion holds clip_l and clip_g tensors; each encoder takes its own."""
    path, _, _ = sdxl
    vectors = {"clip_l": torch.randn(2, WL), "clip_g": torch.randn(2, WG)}
    save_file(vectors, tmp_path / "style.safetensors")
    clip = clip_value(layouts(path, "sdxl"), "sdxl", device=torch.device("cpu"), dtype=torch.float32,
                      tokenizer=tokenizer, embeddings_dir=tmp_path)
    for encoder, key in (("clip_l", "clip_l"), ("open_clip_g", "clip_g")):
        chunk = clip.tokenize_for(encoder, "embedding:style cat")[0]
        assert torch.equal(chunk[1][0], vectors[key][0]) and torch.equal(chunk[2][0], vectors[key][1])
    assert clip.encode("embedding:style cat", clip.handle.load("cpu")).entries[0].context.shape == (1, 77, WL + WG)


def test_encode_sdxl_refuses_a_clip_without_both_encoders(tmp_path, tokenizer):
    sd = openclip_weights(WH, 3, 96)
    (layout,) = layouts(write(tmp_path / "sd2.safetensors", {"cond_stage_model.model.": sd}), "sd2")
    clip = clip_value((layout,), "sd2", device=torch.device("cpu"), dtype=torch.float32, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="CLIPTextEncodeSDXL needs SDXL base"):
        clip.encode_sdxl("a", "b", None)


# ---- separate files -------------------------------------------------------------------------------------------------


def test_separate_files_are_told_apart_by_layer_count_and_naming(tmp_path):
    """clip_g.safetensors (transformers' names + text_projection.weight) and an OpenCLIP-named bigG file (with an
    image tower, skipped) load the same model; 24 layers is ViT-H; 2 is CLIP-L (its projection, if any, dropped)."""
    g_sd = openclip_weights(64, 32, 64)
    whole_model = {"": g_sd, "visual.": {"transformer.resblocks.0.ln_1.weight": torch.ones(8)}}  # image tower skipped
    openclip_file = open_text_encoder(write(tmp_path / "g_openclip.safetensors", whole_model))
    hf_file = open_text_encoder(write(tmp_path / "clip_g.safetensors", {"": to_transformers(g_sd)}))
    assert openclip_file.encoder == hf_file.encoder == "open_clip_g"
    ids = torch.tensor([[BOS, 320, 2368, EOS] + [0] * 73])
    with torch.no_grad():
        a, b = openclip_file.load()(ids), hf_file.load()(ids)
    assert torch.equal(a.last_hidden_state, b.last_hidden_state) and torch.equal(a.text_embeds, b.text_embeds)
    assert open_text_encoder(write(tmp_path / "h.safetensors", {"": openclip_weights(64, 24, 64)})).encoder \
        == "open_clip_h"
    clip_l = dict(clip_l_weights(), **{"text_projection.weight": torch.zeros(WL, WL)})
    layout = open_text_encoder(write(tmp_path / "clip_l.safetensors", {"": clip_l}))
    assert layout.encoder == "clip_l" and layout.config.hidden_act == "quick_gelu"
    assert "text_projection.weight" not in layout.sources


def test_loading_reads_each_tensor_once_and_counts_bytes(tmp_path):
    """weight_bytes comes from the header; the fused in-projection is read once and cut in three."""
    sd = openclip_weights(WH, 3, 96)
    (layout,) = layouts(write(tmp_path / "sd2.safetensors", {"cond_stage_model.model.": sd}), "sd2")
    floats = sum(t.numel() for k, t in sd.items())
    assert layout.weight_bytes(torch.float16) == 2 * floats
    model = layout.load(dtype=torch.float16)
    assert sum(p.numel() for p in model.parameters()) == floats
    assert all(p.dtype == torch.float16 and p.is_contiguous() for p in model.parameters())


def test_bad_files_are_clear_errors(tmp_path):
    vae = write(tmp_path / "vae.safetensors", {"": {"encoder.conv_in.weight": torch.zeros(4, 3, 3, 3)}})
    with pytest.raises(CheckpointError, match=r"vae.safetensors: not a CLIP text-encoder file.*encoder"):
        open_text_encoder(vae)
    sd = openclip_weights(WH, 3, 96)
    sd["transformer.resblocks.1.mlp.c_fc.weight"] = torch.zeros(4 * WH, WH + 1)
    del sd["transformer.resblocks.2.ln_2.bias"]
    with pytest.raises(CheckpointError, match=r"resblocks\.1\.mlp\.c_fc\.weight.*\n?.*") as error:
        layouts(write(tmp_path / "sd2.safetensors", {"cond_stage_model.model.": sd}), "sd2")
    assert "sd2.safetensors" in str(error.value) and "missing" in str(error.value)
    with pytest.raises(CheckpointError, match=r"no OpenCLIP ViT-bigG/14 text-encoder weights.*embedders\.1\.model"):
        layouts(write(tmp_path / "half.safetensors", {"conditioner.embedders.0.transformer.": clip_l_weights()}),
                "sdxl")


# ---- the published layouts ------------------------------------------------------------------------------------------

DTYPES = {"F16": torch.float16, "F32": torch.float32, "I64": torch.int64}


def published_meta(name: str) -> dict[str, torch.Tensor]:
    """Meta tensors of the text-encoder keys of SD2.1-768-v and SDXL base 1.0 (names, dtypes and shapes copied
    from the public files into tests/fixtures)."""
    rows = [line.rstrip("\n").split("\t") for line in open(FIXTURE.parent / name)]
    return {key: torch.empty([int(s) for s in shape.strip("[]").split(",") if s.strip()], dtype=DTYPES[dtype],
                             device="meta") for key, dtype, shape in rows}


@pytest.mark.parametrize(("fixture", "family", "expected"), [
    ("sd21_text_keys.tsv", "sd2", [("open_clip_h", 1024, 24, 16, "gelu", 1024)]),
    ("sdxl_text_keys.tsv", "sdxl", [("clip_l", 768, 12, 12, "quick_gelu", None),
                                    ("open_clip_g", 1280, 32, 20, "gelu", 1280)]),
])
def test_published_checkpoint_layouts(fixture, family, expected):
    """SD2.1's and SDXL base's real text-encoder keys check and give the published architectures; every tensor but
    logit_scale and position_ids is used, so the byte count is the file's."""
    from types import SimpleNamespace

    meta = published_meta(fixture)
    parts = text_parts(SimpleNamespace(format="safetensors"), FileIdentity(Path("x.safetensors"), 0, 0), meta,
                       FAMILIES[family])
    got = [(p.encoder, p.config.hidden_size, p.config.num_hidden_layers, p.config.num_attention_heads,
            p.config.hidden_act, p.config.projection_dim if "text_projection.weight" in p.sources else None)
           for p in parts]
    assert got == expected
    used = {s.file_key for p in parts for s in p.sources.values()}
    assert set(meta) - used == {k for k in meta if k.endswith(("logit_scale", "position_ids"))}
    assert sum(p.weight_bytes(torch.float16) for p in parts) == sum(meta[k].numel() * 2 for k in used)
