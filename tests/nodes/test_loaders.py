"""Issue #13: UNETLoader (models/diffusion_models and the legacy models/unet, bare or prefixed keys), VAELoader and
CheckpointLoaderSimple across families."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from safetensors.torch import load_file, save_file

from nodes.folders import Folders
from nodes.runtime import Runtime

from .conftest import DEFAULT_CHECKPOINT, run_api
from .test_sd_nodes import txt2img

UNET = "model.diffusion_model."


def unet_file(base: Path, folder: str, name: str, state: dict, *, prefixed: bool) -> str:
    (base / "models" / folder).mkdir(parents=True, exist_ok=True)
    save_file({k if prefixed else k.removeprefix(UNET): v for k, v in state.items() if k.startswith(UNET)},
              str(base / "models" / folder / name))
    return name


@pytest.mark.parametrize("folder, prefixed", [("diffusion_models", False), ("unet", True)])
def test_unet_loader_model_samples_beside_the_checkpoints_clip_and_vae(tiny_base: Path, folder, prefixed):
    state = load_file(str(tiny_base / "models" / "checkpoints" / DEFAULT_CHECKPOINT))
    name = unet_file(tiny_base, folder, f"tiny-unet-{folder}.safetensors", state, prefixed=prefixed)
    api = txt2img()
    api["10"] = {"class_type": "UNETLoader", "inputs": {"unet_name": name, "weight_dtype": "default"}}
    api["5"]["inputs"]["model"] = ["10", 0]
    plain, _ = run_api(txt2img(), tiny_base)
    report, _ = run_api(api, tiny_base)
    assert report.ok and plain.ok


def call(node_name: str, base: Path, **inputs):
    from nodes import build_registry

    registry = build_registry(entry_points=False)
    ctx = SimpleNamespace(resources=Runtime(Folders.at(base), dtype="fp32"))
    return registry.get(node_name).fn(ctx, **inputs)


def test_unet_loader_detects_sdxl_and_lists_both_folders(tmp_path: Path):
    from diffusion.make_checkpoint import PRESETS, random_state_dict

    unet_file(tmp_path, "unet", "xl.safetensors", random_state_dict("sdxl-tiny"), prefixed=False)
    unet_file(tmp_path, "diffusion_models", "one.safetensors", random_state_dict("tiny"), prefixed=True)
    from nodes import build_registry

    options = build_registry(entry_points=False).get("UNETLoader").input("unet_name").combo_options(
        Runtime(Folders.at(tmp_path)))
    assert list(options) == ["one.safetensors", "xl.safetensors"]
    model = call("UNETLoader", tmp_path, unet_name="xl.safetensors", weight_dtype="default")
    assert model.family.name == "sdxl" and model.config == PRESETS["sdxl-tiny"].unet


def test_unet_loader_refuses_fp8_with_the_fix(tmp_path: Path):
    from diffusion.make_checkpoint import random_state_dict

    unet_file(tmp_path, "diffusion_models", "u.safetensors", random_state_dict("tiny"), prefixed=False)
    with pytest.raises(ValueError, match="weight_dtype 'fp8_e4m3fn' is not supported.*'default'"):
        call("UNETLoader", tmp_path, unet_name="u.safetensors", weight_dtype="fp8_e4m3fn")


def test_vae_loader_takes_an_sdxl_vae_file(tmp_path: Path):
    from diffusion.make_checkpoint import PRESETS, random_state_dict

    (tmp_path / "models" / "vae").mkdir(parents=True)
    vae = {k.removeprefix("first_stage_model."): v for k, v in random_state_dict("sdxl-tiny").items()
           if k.startswith("first_stage_model.")}
    save_file(vae, str(tmp_path / "models" / "vae" / "sdxl_vae.safetensors"))
    value = call("VAELoader", tmp_path, vae_name="sdxl_vae.safetensors")
    assert value.config == PRESETS["sdxl-tiny"].vae


def test_checkpoint_loader_description_is_no_longer_sd1_only():
    from nodes import build_registry

    description = build_registry(entry_points=False).get("CheckpointLoaderSimple").description
    assert "SDXL" in description and "SD2" in description
