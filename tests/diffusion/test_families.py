"""Issue #13: model families told from keys and shapes (never the file name), and files of other families refused
naming what they look like."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from diffusion.checkpoint import CheckpointError, TensorFile, open_checkpoint, open_unet
from diffusion.families import FAMILIES, UnsupportedModelError, detect_family
from diffusion.make_checkpoint import PRESETS, V_PROBE, make_checkpoint, random_state_dict

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
DTYPES = {"F16": torch.float16, "I64": torch.int64}


def fixture_meta(name: str) -> dict[str, torch.Tensor]:
    """Meta tensors of a published layout (key lists derived from ComfyUI's own model classes)."""
    meta = {}
    for line in open(FIXTURES / name):
        key, dtype, shape = line.rstrip("\n").split("\t")[:3]
        dims = [int(s) for s in shape.strip("[]").split(",") if s.strip()]
        meta[key] = torch.empty(dims, dtype=DTYPES[dtype], device="meta")
    return meta


def reader(std: float):
    """read(key): a probe bias with the given population std."""
    def read(key):
        values = torch.randn(320, generator=torch.Generator().manual_seed(0))
        return (values - values.mean()) / values.std(unbiased=False) * std
    return read


def file_meta(path) -> tuple[dict[str, torch.Tensor], object]:
    source = TensorFile(path)
    return source.meta, lambda key: next(iter(source.read([key])))[1].clone()


@pytest.mark.parametrize("preset, family, prediction", [
    ("tiny", "sd1", "eps"), ("sd15-inpaint-tiny", "sd1_inpaint", "eps"), ("sd21-tiny", "sd2", "eps"),
    ("sd21v-tiny", "sd2", "v_prediction"), ("sdxl-tiny", "sdxl", "eps"), ("sdxl-refiner-tiny", "sdxl_refiner", "eps"),
])  # fmt: skip
def test_tiny_presets_are_detected_from_their_files(tmp_path, preset, family, prediction):
    path = make_checkpoint(tmp_path / "model.bin", preset=preset)  # the name says nothing
    detected = detect_family(*file_meta(path))
    assert (detected.name, detected.sampling.prediction) == (family, prediction)


def test_published_sdxl_base_layout_is_sdxl_base():
    family = detect_family(fixture_meta("sdxl_base_keys.tsv"))
    assert family == FAMILIES["sdxl"] and family.text_encoders == ("clip_l", "open_clip_g")


def test_published_sd21_768v_layout_is_v_or_eps_by_comfyuis_std_rule():
    meta = fixture_meta("sd21_768v_keys.tsv")
    assert detect_family(meta, reader(0.2)).sampling.prediction == "v_prediction"
    assert detect_family(meta, reader(0.05)) == FAMILIES["sd2"]
    assert detect_family({**meta, "v_pred": torch.empty(0, device="meta")}, reader(0.05)).sampling.prediction \
        == "v_prediction"  # a v_pred key means v whatever the bias


def test_v_pred_key_rule_on_a_written_eps_file(tmp_path):
    state = random_state_dict("sd21-tiny")
    assert float(state[V_PROBE].float().std(unbiased=False)) < 0.09
    save_file({**state, "v_pred": torch.zeros(0)}, tmp_path / "v.safetensors")
    assert detect_family(*file_meta(tmp_path / "v.safetensors")).sampling.prediction == "v_prediction"


def test_sd2_inpainting_is_eps_whatever_the_probe():
    meta = fixture_meta("sd21_768v_keys.tsv")
    meta["model.diffusion_model.input_blocks.0.0.weight"] = torch.empty(320, 9, 3, 3, device="meta")
    assert detect_family(meta, reader(0.2)) == FAMILIES["sd2_inpaint"]


def test_refiner_by_label_width_and_ztsnr_key():
    meta = fixture_meta("sdxl_base_keys.tsv")
    meta["model.diffusion_model.label_emb.0.0.weight"] = torch.empty(1280, 2560, device="meta")
    assert detect_family(meta).name == "sdxl_refiner"
    zsnr = detect_family({**meta, "ztsnr": torch.empty(0, device="meta")})
    assert zsnr.sampling.zsnr and zsnr.name == "sdxl_refiner"


@pytest.mark.parametrize("key, looks_like", [
    ("model.diffusion_model.joint_blocks.0.context_block.attn.qkv.weight", "Stable Diffusion 3"),
    ("double_blocks.0.img_attn.norm.key_norm.scale", "Flux"),
    ("model.diffusion_model.double_layers.0.attn.w1q.weight", "AuraFlow"),
    ("clip_txt_mapper.weight", "Stable Cascade"),
    ("model.diffusion_model.input_blocks.1.0.time_stack.0.in_layers.0.weight", "Stable Video Diffusion"),
    ("model.diffusion_model.t_block.1.weight", "PixArt"),
    ("model.diffusion_model.mlp_t5.0.weight", "HunyuanDiT"),
    ("model.diffusion_model.encoder_hid_proj.weight", "Kolors"),
    ("edm_mean", "Playground"),
])  # fmt: skip
def test_other_families_are_refused_naming_them(tmp_path, key, looks_like):
    sd = {key: torch.zeros(2), "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3)}
    save_file(sd, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match=rf"looks like {looks_like}.*supported families: SD1.x.*SDXL refiner"):
        open_checkpoint(tmp_path / "other.safetensors")


def test_unknown_label_width_and_channels_are_refused():
    meta = fixture_meta("sdxl_base_keys.tsv")
    meta["model.diffusion_model.label_emb.0.0.weight"] = torch.empty(1280, 2048, device="meta")
    with pytest.raises(UnsupportedModelError, match="unCLIP"):
        detect_family(meta)
    meta = fixture_meta("sdxl_base_keys.tsv")
    meta["model.diffusion_model.input_blocks.0.0.weight"] = torch.empty(320, 8, 3, 3, device="meta")
    with pytest.raises(UnsupportedModelError, match="InstructPix2Pix"):
        detect_family(meta)


def test_unrecognised_layout_lists_what_was_expected():
    with pytest.raises(UnsupportedModelError, match=r"expected a UNet in the LDM layout.*keys start with foo"):
        detect_family({"foo.weight": torch.empty(3, device="meta")})


def test_sd2_without_a_reader_is_a_clear_error():
    with pytest.raises(ValueError, match="pass read="):
        detect_family(fixture_meta("sd21_768v_keys.tsv"))


@pytest.mark.parametrize("preset", ["sd21v-tiny", "sdxl-tiny", "sdxl-refiner-tiny", "sd15-inpaint-tiny"])
def test_open_checkpoint_lays_out_unet_and_vae_of_every_family(tmp_path, preset):
    path = make_checkpoint(tmp_path / "m.safetensors", preset=preset)
    layout = open_checkpoint(path)
    assert layout.family.name == PRESETS[preset].family
    assert layout.unet.config == PRESETS[preset].unet and layout.vae.config == PRESETS[preset].vae
    unet = layout.unet.load()
    assert type(unet).__name__ == "UNetModel" and unet.config == PRESETS[preset].unet


@pytest.mark.parametrize("prefixed", [True, False])
def test_bare_unet_files_with_or_without_the_prefix(tmp_path, prefixed):
    prefix = "model.diffusion_model."
    state = {k if prefixed else k.removeprefix(prefix): v
             for k, v in random_state_dict("sdxl-tiny").items() if k.startswith(prefix)}
    save_file(state, tmp_path / "unet.safetensors")
    family, layout = open_unet(tmp_path / "unet.safetensors")
    assert family.name == "sdxl" and layout.config == PRESETS["sdxl-tiny"].unet
    with pytest.raises(CheckpointError, match="UNETLoader"):
        open_checkpoint(tmp_path / "unet.safetensors")


def test_malformed_shapes_detection_reads_are_named():
    meta = fixture_meta("sdxl_base_keys.tsv")
    meta["model.diffusion_model.label_emb.0.0.weight"] = torch.empty(2816, device="meta")
    with pytest.raises(UnsupportedModelError, match=r"label_emb\.0\.0\.weight has shape \[2816\]"):
        detect_family(meta)


@pytest.mark.parametrize("fixture, preset, read", [("sdxl_base_keys.tsv", "sdxl", None),
                                                    ("sd21_768v_keys.tsv", "sd21v", reader(0.2))])
def test_full_size_published_layouts_are_laid_out_with_the_family_heads(fixture, preset, read):
    """The UNet of a full-size SDXL / SD2.1-v file is inferred (64-wide heads from the family) and every key
    checked, from the header alone (no 7 GB file needed)."""
    from types import SimpleNamespace

    from diffusion.checkpoint import FileIdentity, _unet_part

    meta = fixture_meta(fixture)
    family = detect_family(meta, read)
    source = SimpleNamespace(meta=meta, path=Path(fixture))
    layout = _unet_part(fixture, source, FileIdentity(Path(fixture), 0, 0), family, "model.diffusion_model.", False)
    assert layout.config == PRESETS[preset].unet and layout.config.head_dim == 64
