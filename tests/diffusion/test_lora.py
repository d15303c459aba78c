"""LoRA key mapping and patch maths (issue #12, LoRA): each format's delta against a direct computation on tiny
tensors, stacking / negative / zero strengths, unmatched keys, family mismatches, exact removal."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from diffusion.lora import LoraError, load_lora
from diffusion.lora_patch import patched_weight, remove_patches, set_patches
from diffusion.make_checkpoint import PRESETS, random_state_dict
from diffusion.make_lora import random_lora

UNET, TEXT = PRESETS["tiny"].unet, PRESETS["tiny"].text
ATTN_Q = "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"  # [32, 32]
CONV1 = "input_blocks.1.0.in_layers.2.weight"  # [32, 32, 3, 3]
PROJ_IN = "input_blocks.1.1.proj_in.weight"  # [32, 32, 1, 1]
FC1 = "encoder.layers.0.mlp.fc1.weight"  # [128, 32]


def _g(seed: int):
    return torch.Generator().manual_seed(seed)


def _rand(*shape, seed=0):
    return torch.randn(shape, generator=_g(seed))


def _map(tmp_path, state, name="l.safetensors"):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    return load_lora(path, UNET, TEXT)


def _delta_of(lora, part, name, weight, strength=1.0):
    adapters = getattr(lora, part).adapters
    return patched_weight(weight, [(adapters[name], strength)]) - weight


def test_kohya_linear_and_conv_names_give_up_at_down_times_alpha_over_rank(tmp_path):
    up, down = _rand(32, 4, seed=1), _rand(4, 32, seed=2)
    cup, cdown = _rand(32, 4, 1, 1, seed=3), _rand(4, 32, 1, 1, seed=4)
    lora = _map(tmp_path, {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": up,
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": down,
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha": torch.tensor(2.0),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": cup,
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": cdown,
    })
    weight = _rand(32, 32, seed=5)
    torch.testing.assert_close(_delta_of(lora, "unet", ATTN_Q, weight), 0.5 * up @ down, rtol=1e-5, atol=1e-5)
    conv = _rand(32, 32, 1, 1, seed=6)
    expected = (cup.flatten(1) @ cdown.flatten(1)).reshape(conv.shape)  # no alpha: scale 1
    torch.testing.assert_close(_delta_of(lora, "unet", PROJ_IN, conv), expected, rtol=1e-5, atol=1e-5)
    assert lora.unmatched == ()


def test_peft_and_diffusers_spellings_map_to_the_same_weights(tmp_path):
    a, b = _rand(4, 32, seed=1), _rand(32, 4, seed=2)
    ta, tb = _rand(4, 32, seed=3), _rand(128, 4, seed=4)
    lora = _map(tmp_path, {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": a,
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": b,
        "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora.down.weight": ta,
        "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora.up.weight": tb,
    })
    weight = _rand(32, 32, seed=5)
    torch.testing.assert_close(_delta_of(lora, "unet", ATTN_Q, weight), b @ a, rtol=1e-5, atol=1e-5)
    text = _rand(128, 32, seed=6)
    torch.testing.assert_close(_delta_of(lora, "text_encoder", FC1, text), tb @ ta, rtol=1e-5, atol=1e-5)


def test_locon_3x3_convolution_of_a_resnet(tmp_path):
    up, down = _rand(32, 4, 1, 1, seed=1), _rand(4, 32, 3, 3, seed=2)
    lora = _map(tmp_path, {"lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": up,
                           "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": down,
                           "lora_unet_down_blocks_0_resnets_0_conv1.alpha": torch.tensor(1.0)})
    weight = _rand(32, 32, 3, 3, seed=3)
    expected = 0.25 * (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
    torch.testing.assert_close(_delta_of(lora, "unet", CONV1, weight), expected, rtol=1e-5, atol=1e-5)


def test_loha_is_the_hadamard_product_of_two_low_rank_products(tmp_path):
    w1a, w1b, w2a, w2b = _rand(32, 2, seed=1), _rand(2, 32, seed=2), _rand(32, 2, seed=3), _rand(2, 32, seed=4)
    prefix = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    lora = _map(tmp_path, {f"{prefix}.hada_w1_a": w1a, f"{prefix}.hada_w1_b": w1b, f"{prefix}.hada_w2_a": w2a,
                           f"{prefix}.hada_w2_b": w2b, f"{prefix}.alpha": torch.tensor(1.0)})
    weight = _rand(32, 32, seed=5)
    expected = 0.5 * ((w1a @ w1b) * (w2a @ w2b))
    torch.testing.assert_close(_delta_of(lora, "unet", ATTN_Q, weight), expected, rtol=1e-5, atol=1e-5)


def test_lokr_is_a_kronecker_product(tmp_path):
    w1, w2a, w2b = _rand(4, 4, seed=1), _rand(8, 2, seed=2), _rand(2, 8, seed=3)
    prefix = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    lora = _map(tmp_path, {f"{prefix}.lokr_w1": w1, f"{prefix}.lokr_w2_a": w2a, f"{prefix}.lokr_w2_b": w2b,
                           f"{prefix}.alpha": torch.tensor(4.0)})
    weight = _rand(32, 32, seed=4)
    expected = 2.0 * torch.kron(w1, w2a @ w2b)
    torch.testing.assert_close(_delta_of(lora, "unet", ATTN_Q, weight), expected, rtol=1e-5, atol=1e-5)


def test_dora_rescales_each_input_column_to_the_stored_magnitude(tmp_path):
    up, down, scale = _rand(32, 4, seed=1), _rand(4, 32, seed=2), _rand(1, 32, seed=3).abs() + 0.5
    prefix = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    lora = _map(tmp_path, {f"{prefix}.lora_up.weight": up, f"{prefix}.lora_down.weight": down,
                           f"{prefix}.dora_scale": scale})
    weight = _rand(32, 32, seed=4)
    patched = weight + up @ down
    full = patched * (scale / patched.norm(dim=0, keepdim=True))
    torch.testing.assert_close(_delta_of(lora, "unet", ATTN_Q, weight) + weight, full, rtol=1e-5, atol=1e-5)
    half = weight + 0.5 * (full - weight)
    torch.testing.assert_close(_delta_of(lora, "unet", ATTN_Q, weight, 0.5) + weight, half, rtol=1e-5, atol=1e-5)


def test_stacking_negative_and_zero_strengths(tmp_path):
    prefix = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    a = _map(tmp_path, {f"{prefix}.lora_up.weight": _rand(32, 4, seed=1),
                        f"{prefix}.lora_down.weight": _rand(4, 32, seed=2)}, "a.safetensors")
    b = _map(tmp_path, {f"{prefix}.lora_up.weight": _rand(32, 4, seed=3),
                        f"{prefix}.lora_down.weight": _rand(4, 32, seed=4)}, "b.safetensors")
    weight = _rand(32, 32, seed=5)
    da, db = _delta_of(a, "unet", ATTN_Q, weight), _delta_of(b, "unet", ATTN_Q, weight)
    both = patched_weight(weight, [(a.unet.adapters[ATTN_Q], 1.0), (b.unet.adapters[ATTN_Q], -0.5)])
    torch.testing.assert_close(both, weight + da - 0.5 * db, rtol=1e-5, atol=1e-5)
    assert torch.equal(patched_weight(weight, [(a.unet.adapters[ATTN_Q], 0.0)]), weight)


def test_text_encoder_results_are_rounded_to_fp16(tmp_path):
    lora = _map(tmp_path, {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": _rand(128, 4, seed=1),
                           "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": _rand(4, 32, seed=2)})
    weight = _rand(128, 32, seed=3)
    adapters = [(lora.text_encoder.adapters[FC1], 1.0)]
    rounded = patched_weight(weight, adapters, torch.float16)
    assert rounded.dtype == torch.float32
    assert torch.equal(rounded, patched_weight(weight, adapters).half().float())
    assert not torch.equal(rounded, patched_weight(weight, adapters))


def test_unmatched_keys_are_reported_by_name(tmp_path):
    state = random_lora("tiny", seed=0)
    state["lora_unet_no_such_layer.lora_up.weight"] = torch.zeros(4, 2)
    state["lora_unet_no_such_layer.lora_down.weight"] = torch.zeros(2, 4)
    state["something_else"] = torch.zeros(1)
    lora = _map(tmp_path, state)
    assert set(lora.unmatched) == {"lora_unet_no_such_layer.lora_up.weight", "lora_unet_no_such_layer.lora_down.weight",
                                  "something_else"}


def test_an_sdxl_lora_is_refused_naming_the_file(tmp_path):
    prefix = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"  # SDXL: 2048-wide context
    state = {f"{prefix}.lora_up.weight": torch.zeros(32, 4), f"{prefix}.lora_down.weight": torch.zeros(4, 2048),
             "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(5120, 4),
             "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 1280)}
    with pytest.raises(LoraError, match=r"xl_style\.safetensors.*do not fit.*SDXL"):
        _map(tmp_path, state, "xl_style.safetensors")
    del state[f"{prefix}.lora_up.weight"], state[f"{prefix}.lora_down.weight"]
    with pytest.raises(LoraError, match=r"none of its 2 tensors.*SDXL"):
        _map(tmp_path, state, "xl_te.safetensors")


def test_every_layer_of_the_generated_lora_matches_the_tiny_model(tmp_path):
    lora = _map(tmp_path, random_lora("tiny", seed=1))
    assert lora.unmatched == ()
    assert len(lora.unet.adapters) == 2 * 3 * 12 + 12 and len(lora.text_encoder.adapters) == 2 * 6


def test_patches_compute_on_the_fly_and_removal_restores_the_very_same_tensors(tmp_path):
    """Switching LoRAs keeps the loaded weights: patching never writes them, removing gives back the originals."""
    from diffusion.checkpoint import UNET_PREFIX
    from diffusion.unet import build_unet

    state = random_state_dict("tiny", seed=0)
    unet = build_unet({k[len(UNET_PREFIX):]: v.float() for k, v in state.items() if k.startswith(UNET_PREFIX)})
    before = {k: (v, v.clone()) for k, v in unet.state_dict(keep_vars=True).items()}
    lora = _map(tmp_path, random_lora("tiny", seed=2))
    x, t, ctx = _rand(1, 4, 8, 8, seed=1), torch.tensor([500.0]), _rand(1, 77, 32, seed=2)
    prefix = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"
    loha = _map(tmp_path, {f"{prefix}.hada_w1_a": _rand(32, 2, seed=1), f"{prefix}.hada_w1_b": _rand(2, 32, seed=2),
                           f"{prefix}.hada_w2_a": _rand(32, 2, seed=3), f"{prefix}.hada_w2_b": _rand(2, 32, seed=4)},
                "loha.safetensors")
    attn_k = ATTN_Q.replace("to_q", "to_k")
    with torch.inference_mode():
        plain = unet(x, t, ctx)
        set_patches(unet, ((lora.unet, 1.0), (loha.unet, 0.5)), part="unet")
        # a plain LoRA is added beside the layer: the merged weight's output up to rounding
        module, h = unet.get_submodule(ATTN_Q.removesuffix(".weight")), _rand(1, 5, 32, seed=3)
        merged = patched_weight(before[ATTN_Q][1], [(lora.unet.adapters[ATTN_Q], 1.0)])
        torch.testing.assert_close(module(h), torch.nn.functional.linear(h, merged), rtol=1e-5, atol=1e-6)
        # other kinds compute ComfyUI's merged weight from the untouched one
        chain = [(lora.unet.adapters[attn_k], 1.0), (loha.unet.adapters[attn_k], 0.5)]  # both, in order
        expected = patched_weight(before[attn_k][1], chain)
        assert torch.equal(unet.get_submodule(attn_k.removesuffix(".weight")).weight, expected)
        patched = unet(x, t, ctx)
        set_patches(unet, ((lora.unet, -1.0),), part="unet")
        remove_patches(unet)
        again = unet(x, t, ctx)
    assert not torch.allclose(plain, patched)
    assert torch.equal(plain, again)
    after = unet.state_dict(keep_vars=True)
    assert after.keys() == before.keys()
    for key, (tensor, copy) in before.items():
        assert after[key] is tensor and torch.equal(after[key], copy), key


def test_make_checkpoint_kind_lora_writes_a_lora_for_the_tiny_checkpoint(tmp_path, capsys):
    from diffusion.make_checkpoint import main

    assert main([str(tmp_path / "tiny-lora.safetensors"), "--kind", "lora", "--preset", "tiny", "--seed", "3"]) == 0
    assert "lora for preset tiny" in capsys.readouterr().out
    lora = load_lora(tmp_path / "tiny-lora.safetensors", UNET, TEXT)
    assert lora.unmatched == () and lora.unet.adapters and lora.text_encoder.adapters


def test_a_patched_unet_computes_what_merged_weights_compute(tmp_path):
    """Every patched layer takes part, including the feed-forward's GEGLU projection, whose weight its parent
    reads directly (a hook on the projection's forward would never run)."""
    from diffusion.checkpoint import UNET_PREFIX
    from diffusion.unet import build_unet

    state = {k[len(UNET_PREFIX):]: v.float() for k, v in random_state_dict("tiny", seed=0).items()
             if k.startswith(UNET_PREFIX)}
    lora = _map(tmp_path, random_lora("tiny", seed=4, rel=2.0))
    merged = {k: patched_weight(v, [(lora.unet.adapters[k], 1.0)]) if k in lora.unet.adapters else v
              for k, v in state.items()}
    x, t, ctx = _rand(1, 4, 8, 8, seed=1), torch.tensor([500.0]), _rand(1, 77, 32, seed=2)
    unet = build_unet(state)
    with torch.inference_mode():
        set_patches(unet, ((lora.unet, 1.0),), part="unet")
        torch.testing.assert_close(unet(x, t, ctx), build_unet(merged)(x, t, ctx), rtol=1e-4, atol=1e-5)


def test_sdxl_text_keys_name_clip_l_and_big_g_as_comfyui_maps_them():
    """te1 (and te / text_encoder.) is CLIP-L, te2 (text_encoder_2.) is bigG; the projection is outside text_model."""
    from diffusion.lora_keys import lora_targets
    from diffusion.make_lora import text_configs

    configs = dict(zip(("clip_l", "open_clip_g"), text_configs(PRESETS["sdxl-tiny"]).values(), strict=True))
    targets = lora_targets(None, configs)
    layer = "text_model_encoder_layers_1_mlp_fc1"
    for key in (f"lora_te_{layer}", f"lora_te1_{layer}", "text_encoder.text_model.encoder.layers.1.mlp.fc1"):
        assert targets[key][:2] == ("text_encoder", "clip_l.encoder.layers.1.mlp.fc1.weight")
    for key in (f"lora_te2_{layer}", "text_encoder_2.text_model.encoder.layers.1.mlp.fc1"):
        assert targets[key][:2] == ("text_encoder", "open_clip_g.encoder.layers.1.mlp.fc1.weight")
    assert targets["lora_te2_text_projection"][1] == "open_clip_g.text_projection.weight"
    assert "text_model.encoder.layers.1.mlp.fc1" not in targets  # a bare name cannot say which encoder


def test_text_weights_are_found_in_every_loaded_text_model_shape():
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from diffusion.lora_patch import text_parameter
    from diffusion.make_lora import text_configs

    clip_l, big_g = (c for c in text_configs(PRESETS["sdxl-tiny"]).values())
    with torch.device("meta"):
        pair = torch.nn.ModuleDict({"clip_l": CLIPTextModel(clip_l), "open_clip_g": CLIPTextModelWithProjection(big_g)})
    for name in (f"clip_l.{FC1}", f"open_clip_g.{FC1}", "open_clip_g.text_projection.weight"):
        assert pair.get_parameter(text_parameter(pair, name)).shape is not None
    assert text_parameter(pair["open_clip_g"], FC1) == f"text_model.{FC1}"
    assert text_parameter(pair["open_clip_g"], "text_projection.weight") == "text_projection.weight"
