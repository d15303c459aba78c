import hashlib
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from diffusion.checkpoint import load_checkpoint
from diffusion.make_checkpoint import checkpoint_layout, main, make_checkpoint, random_state_dict

SD15_KEYS = Path(__file__).resolve().parents[1] / "fixtures" / "sd15_keys.tsv"

SAFETENSORS_NAMES = {"F16": torch.float16, "F32": torch.float32, "I64": torch.int64}


def read_fixture_layout(path=SD15_KEYS):
    layout = {}
    for line in open(path):
        key, dtype, shape = line.rstrip("\n").split("\t")[:3]
        layout[key] = (SAFETENSORS_NAMES[dtype], tuple(int(s) for s in shape.strip("[]").split(",") if s.strip()))
    return layout


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_sd15_layout_equals_the_public_file_exactly():
    assert checkpoint_layout("sd15") == read_fixture_layout()


@pytest.mark.parametrize("preset, fixture", [("sd21v", "sd21_768v_keys.tsv"), ("sdxl", "sdxl_base_keys.tsv")])
def test_sd21v_and_sdxl_layouts_equal_the_published_files_exactly(preset, fixture):
    """Issue #13: key for key, shape for shape and dtype for dtype the published SD2.1-768-v and SDXL base 1.0
    layouts (key lists derived from ComfyUI's model classes), text encoders included."""
    assert checkpoint_layout(preset) == read_fixture_layout(SD15_KEYS.parent / fixture)


TINY_FAMILY_PRESETS = ("sd21-tiny", "sd21v-tiny", "sdxl-tiny", "sdxl-refiner-tiny", "sd15-inpaint-tiny")


@pytest.mark.parametrize("preset", TINY_FAMILY_PRESETS)
def test_tiny_family_presets_are_tiny_and_written_whole(tmp_path, preset):
    """Issue #13: a few MB each, text encoders in the family's published prefixes."""
    path = make_checkpoint(tmp_path / "m.safetensors", preset=preset)
    assert path.stat().st_size < 25_000_000
    prefixes = {"sd21-tiny": ("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight",),
                "sd21v-tiny": ("cond_stage_model.model.positional_embedding",),
                "sdxl-tiny": ("conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
                              "conditioner.embedders.1.model.text_projection"),
                "sdxl-refiner-tiny": ("conditioner.embedders.0.model.ln_final.weight",),
                "sd15-inpaint-tiny": ("cond_stage_model.transformer.text_model.final_layer_norm.weight",)}[preset]
    with safe_open(path, framework="pt") as f:
        keys = set(f.keys())
        assert set(prefixes) <= keys and "model.diffusion_model.input_blocks.0.0.weight" in keys
        if preset.startswith("sdxl"):  # pooled projection 1280 wide, so the label vector has SDXL's width
            name = next(k for k in keys if k.endswith("model.text_projection"))
            assert f.get_slice(name).get_shape()[1] == 1280


def test_sd2_presets_set_comfyuis_v_probe():
    from diffusion.make_checkpoint import V_PROBE

    def std(preset):
        return float(random_state_dict(preset)[V_PROBE].float().std(unbiased=False))

    assert std("sd21v-tiny") > 0.09 > std("sd21-tiny")


def test_tiny_layout_has_real_vocabulary_and_positions():
    layout = checkpoint_layout("tiny")
    prefix = "cond_stage_model.transformer.text_model.embeddings."
    assert layout[prefix + "token_embedding.weight"][1][0] == 49408
    assert layout[prefix + "position_embedding.weight"][1][0] == 77
    assert layout[prefix + "position_ids"] == (torch.int64, (1, 77))
    assert set(checkpoint_layout("sd15")) != set(layout)


def test_unknown_preset_is_refused_with_the_choices(tmp_path):
    with pytest.raises(ValueError, match="sd15, .*tiny"):
        make_checkpoint(tmp_path / "x.safetensors", preset="sd3")
    with pytest.raises(ValueError, match="non-negative"):
        make_checkpoint(tmp_path / "x.safetensors", seed=-1)


def test_tiny_is_small_deterministic_and_seeded(tmp_path):
    a = make_checkpoint(tmp_path / "a.safetensors", preset="tiny", seed=0)
    b = make_checkpoint(tmp_path / "b.safetensors", preset="tiny", seed=0)
    c = make_checkpoint(tmp_path / "c.safetensors", preset="tiny", seed=1)
    assert a.stat().st_size < 10_000_000
    assert sha256(a) == sha256(b) != sha256(c)
    assert not list(tmp_path.glob("*.partial"))
    with safe_open(a, framework="pt") as f:
        assert {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()} == {
            k: ({torch.float16: "F16", torch.int64: "I64"}[d], s) for k, (d, s) in checkpoint_layout("tiny").items()
        }


def test_header_metadata_is_written_in_sorted_order(tmp_path):
    """safetensors writes metadata in hash-map order; sorted, the bytes do not depend on the process."""
    path = make_checkpoint(tmp_path / "a.safetensors", preset="tiny", seed=4)
    raw = path.read_bytes()
    header = raw[8 : 8 + int.from_bytes(raw[:8], "little")]
    assert b'"__metadata__":{"format":"pt","note":"random weights, seed 4"}' in header


def test_initialisation_scheme():
    sd = random_state_dict("tiny", seed=0)
    norm = sd["model.diffusion_model.out.0.weight"].float()
    assert abs(norm.mean() - 1) < 0.05 and 0.05 < norm.std() < 0.15
    conv = sd["model.diffusion_model.input_blocks.1.0.in_layers.2.weight"].float()  # fan-in 32*3*3
    assert conv.abs().max() <= 1 / math.sqrt(32 * 9) + 1e-3 and conv.std() > 0.5 / math.sqrt(3 * 32 * 9)
    assert sd["model.diffusion_model.out.2.weight"].float().abs().max() <= 0.5 / math.sqrt(32 * 9) + 1e-3
    embedding = sd["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"].float()
    assert abs(embedding.std() - 1) < 0.05
    ids = sd["cond_stage_model.transformer.text_model.embeddings.position_ids"]
    assert torch.equal(ids, torch.arange(77)[None])


def test_tiny_is_small_and_runs_a_64px_step_with_lively_outputs(tmp_path):
    """The tiny preset stays tiny (a few million parameters, so tests stay fast; counted, not timed: a timed
    unit test fails on a loaded machine) and its outputs are neither dead nor exploding."""
    path = make_checkpoint(tmp_path / "tiny.safetensors", preset="tiny", seed=0)
    ckpt = load_checkpoint(path)
    for part in (ckpt.unet, ckpt.vae, ckpt.text_encoder):
        assert sum(p.numel() for p in part.parameters()) < 2_000_000
    g = torch.Generator().manual_seed(0)
    latent, context = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        eps = ckpt.unet(latent, torch.tensor([999.0]), context)
        pixels = ckpt.vae.decode(latent)
        hidden = ckpt.text_encoder(torch.tensor([[49406, 320, 49407] + [49407] * 74])).last_hidden_state
    assert pixels.shape == (1, 3, 64, 64)
    for name, out, low, high in (("eps", eps, 0.05, 2.0), ("pixels", pixels, 0.05, 1.0), ("text", hidden, 0.3, 3)):
        assert low < out.std() < high, f"{name} std {out.std():.3f} outside ({low}, {high})"
    assert (pixels.abs() > 1).float().mean() < 0.2  # mostly inside the displayable range


def test_cli_writes_the_file(tmp_path, capsys):
    out = tmp_path / "sub" / "model.safetensors"
    assert main([str(out), "--preset", "tiny", "--seed", "3"]) == 0
    assert sha256(out) == sha256(make_checkpoint(tmp_path / "again.safetensors", "tiny", 3))
    assert str(out) in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["x.safetensors", "--preset", "sd3"], ["x.safetensors", "--seed", "-2"], []])
def test_cli_refuses_bad_arguments(argv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert not list(tmp_path.iterdir())


def test_addons_are_made_for_every_family_but_a_controlnet_for_an_inpainting_unet(tmp_path, capsys):
    """LoRAs for SD2/SDXL presets (SDXL's with lora_te1_/lora_te2_ keys), ControlNets in either layout; a
    ControlNet for a 9-channel inpainting UNet is refused by name instead of crashing."""
    from safetensors import safe_open

    assert main([str(tmp_path / "l.safetensors"), "--preset", "sdxl-tiny", "--kind", "lora"]) == 0
    with safe_open(tmp_path / "l.safetensors", "pt") as f:
        assert {k.split("_text_model")[0] for k in f.keys() if "_text_model" in k} == {"lora_te1", "lora_te2"}
    assert main([str(tmp_path / "c.safetensors"), "--preset", "sdxl-tiny", "--kind", "controlnet", "--diffusers"]) == 0
    with safe_open(tmp_path / "c.safetensors", "pt") as f:
        assert "add_embedding.linear_1.weight" in f.keys()
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "i.safetensors"), "--preset", "sd15-inpaint-tiny", "--kind", "controlnet"])
    assert exit_info.value.code == 2 and "4-channel UNet" in capsys.readouterr().err
    assert not (tmp_path / "i.safetensors").exists()
