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


@pytest.mark.parametrize("weight_dtype", ["fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"])
def test_unet_loader_stores_layer_weights_in_fp8_and_computes_in_the_policy_dtype(tmp_path: Path, weight_dtype):
    """ComfyUI's UNETLoader weight_dtype: the layers' weights in fp8 (about half of bf16's bytes), biases and norms
    in the compute dtype, and one UNet call close to the same call with unrounded weights."""
    import torch

    from diffusion.make_checkpoint import random_state_dict
    from diffusion.weight_storage import FP8_STORAGE, StoredConv2d, StoredLinear

    unet_file(tmp_path, "diffusion_models", "u.safetensors", random_state_dict("tiny"), prefixed=False)
    stored = call("UNETLoader", tmp_path, unet_name="u.safetensors", weight_dtype=weight_dtype)
    plain = call("UNETLoader", tmp_path, unet_name="u.safetensors", weight_dtype="default")
    assert stored.handle != plain.handle  # another identity: both may be loaded side by side
    assert stored.dtype == plain.dtype == torch.float32  # computes in the policy's dtype (fp32 here)
    storage = FP8_STORAGE[weight_dtype]
    unet, reference = stored.handle.load("cpu"), plain.handle.load("cpu")
    layers = [m for m in unet.modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)]
    assert layers and all(type(m) in (StoredLinear, StoredConv2d) and m.weight.dtype == storage for m in layers)
    assert all(m.bias is None or m.bias.dtype == torch.float32 for m in layers)
    assert all(m.weight.dtype == torch.float32 for m in unet.modules() if isinstance(m, torch.nn.GroupNorm))
    held = sum(t.numel() * t.element_size() for t in [*unet.parameters(), *unet.buffers()])
    assert held == stored.handle.weight_bytes < plain.handle.weight_bytes / 2
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, stored.config.context_dim, generator=g)
    t = torch.tensor([500.0, 500.0])
    with torch.inference_mode():
        got = stored.forward_function(unet)(x, t, context)
        want = plain.forward_function(reference)(x, t, context)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert 0 < ((got - want).norm() / want.norm()).item() < 0.2  # fp8 rounds each weight by up to 6-12%


def test_an_fp8_unet_samples_in_a_graph(tiny_base: Path):
    state = load_file(str(tiny_base / "models" / "checkpoints" / DEFAULT_CHECKPOINT))
    name = unet_file(tiny_base, "diffusion_models", "tiny-unet.safetensors", state, prefixed=False)
    api = txt2img()
    api["10"] = {"class_type": "UNETLoader", "inputs": {"unet_name": name, "weight_dtype": "fp8_e4m3fn"}}
    api["5"]["inputs"]["model"] = ["10", 0]
    report, _ = run_api(api, tiny_base)
    assert report.ok


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
