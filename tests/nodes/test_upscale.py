"""Upscale models (issue #12): UpscaleModelLoader + ImageUpscaleWithModel through spandrel on tiny ESRGAN-shaped
files (random weights, the published key layouts), tiled upscaling, and the refusals (unknown file, pickle)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from diffusion.tiling import feather_mask, tile_starts, tiled_scale
from diffusion.upscale import UpscaleModelError, upscale_tiled
from engine import CancelToken, RunContext
from engine.sizes import Size
from nodes import upscale
from nodes.folders import MODEL_KINDS, Folders
from nodes.runtime import Runtime

FEATURES, GROWTH = 8, 32  # spandrel reads ESRGAN's growth channels as the published 32


def _conv(out_channels, in_channels, generator, size=3):
    return {"weight": torch.randn(out_channels, in_channels, size, size, generator=generator) * 0.05,
            "bias": torch.randn(out_channels, generator=generator) * 0.01}


def _dense_block(prefix, generator, style):
    """One residual dense block: five 3x3 convolutions, each seeing the block input and all earlier outputs."""
    tensors = {}
    for i in range(5):
        out_channels = FEATURES if i == 4 else GROWTH
        name = f"{prefix}.conv{i + 1}.0" if style == "old" else f"{prefix}.conv{i + 1}"
        for key, value in _conv(out_channels, FEATURES + i * GROWTH, generator).items():
            tensors[f"{name}.{key}"] = value
    return tensors


def esrgan_old(seed=0):
    """The original ESRGAN layout (model.0 ... model.10, `sub` trunk, RDB1..3), 4x, one RRDB block."""
    return _rrdb_net(seed, "model.0", "model.1.sub.0.RDB{}", "old",
                     ["model.1.sub.1", "model.3", "model.6", "model.8"], "model.10")


def realesrgan(seed=0):
    """The RealESRGAN (BasicSR) layout: conv_first, body.N.rdbK, conv_body, conv_up1/2, conv_hr, conv_last."""
    return _rrdb_net(seed, "conv_first", "body.0.rdb{}", "new", ["conv_body", "conv_up1", "conv_up2", "conv_hr"],
                     "conv_last")


def _rrdb_net(seed, first, block, style, middle, last):
    """One RRDB block (three dense blocks) between a first conv from RGB, FEATURES-wide convs and a last to RGB."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    def put(name, out_channels, in_channels):
        tensors.update({f"{name}.{k}": v for k, v in _conv(out_channels, in_channels, g).items()})
    put(first, FEATURES, 3)
    for rdb in (1, 2, 3):
        tensors.update(_dense_block(block.format(rdb), g, style))
    for name in middle:
        put(name, FEATURES, FEATURES)
    put(last, 3, FEATURES)
    return tensors


@pytest.fixture
def ctx(tmp_path):
    (tmp_path / "models" / "upscale_models").mkdir(parents=True)
    return RunContext("run", "1", "test", Runtime(Folders.at(tmp_path)), CancelToken(), lambda event: None)


def folder(ctx):
    return ctx.resources.folders.models("upscale_models")


def load(ctx, name):
    return upscale.upscale_model_loader.fn(ctx, model_name=name)


def test_esrgan_safetensors_upscales_4x(ctx):
    save_file(esrgan_old(), str(folder(ctx) / "tiny_esrgan.safetensors"))
    model = load(ctx, "tiny_esrgan.safetensors")
    assert (model.architecture, model.scale) == ("ESRGAN", 4)
    image = torch.rand(2, 12, 10, 3)
    out = upscale.image_upscale_with_model.fn(ctx, upscale_model=model, image=image)
    assert out.shape == (2, 48, 40, 3) and out.min() >= 0 and out.max() <= 1


def test_realesrgan_pth_loads_weights_only(ctx):
    torch.save({"params_ema": realesrgan()}, folder(ctx) / "tiny_realesrgan.pth")
    model = load(ctx, "tiny_realesrgan.pth")
    assert model.scale == 4
    out = upscale.image_upscale_with_model.fn(ctx, upscale_model=model, image=torch.rand(1, 8, 8, 4))  # RGBA
    assert out.shape == (1, 32, 32, 3)


class NeedsPickle:
    pass


def test_pth_that_needs_pickle_is_refused(ctx):
    torch.save({"params": esrgan_old(), "extra": NeedsPickle()}, folder(ctx) / "pickled.pth")
    with pytest.raises(UpscaleModelError, match=r"UpscaleModelLoader.*pickled\.pth.*pickle"):
        load(ctx, "pickled.pth")


def test_file_spandrel_does_not_know_is_refused_by_name(ctx):
    save_file({"encoder.weight": torch.zeros(4, 4)}, str(folder(ctx) / "mystery.safetensors"))
    with pytest.raises(UpscaleModelError, match=r"UpscaleModelLoader.*mystery\.safetensors.*not an upscale model"):
        load(ctx, "mystery.safetensors")


def test_tiled_upscale_equals_the_whole_away_from_seams(ctx):
    """Tiles of 24 pixels overlapping by 8: the corner only the first tile covers, farther from its inner edges
    than the network sees (about 20 low-resolution pixels), matches the untiled result."""
    save_file(esrgan_old(seed=1), str(folder(ctx) / "tiny.safetensors"))
    with torch.inference_mode():
        network = load(ctx, "tiny.safetensors").handle.load("cpu")
        image = torch.rand(1, 3, 40, 40, generator=torch.Generator().manual_seed(0))
        whole = network(image).clamp(0, 1)
        tiled = upscale_tiled(network, image, 4, tile=32, overlap=8)
    assert tiled.shape == whole.shape == (1, 3, 160, 160)
    assert torch.allclose(tiled[..., :8, :8], whole[..., :8, :8], atol=1e-5)
    assert (tiled - whole).abs().mean() < 0.05


def test_tiled_upscale_halves_the_tile_when_memory_runs_out():
    tiles = []
    def network(x):
        tiles.append(x.shape[-1])
        if x.shape[-1] > 128:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")
        return x.repeat_interleave(2, -1).repeat_interleave(2, -2)
    image = torch.rand(1, 3, 300, 300)
    out = upscale_tiled(network, image, 2)
    assert tiles[:2] == [300, 256] and max(tiles[2:]) == 128  # 512 (whole) fails, 256 fails, 128 works
    assert torch.allclose(out, image.repeat_interleave(2, -1).repeat_interleave(2, -2), atol=1e-6)


def test_tile_starts_and_feathered_blend_reconstruct_a_pointwise_function():
    assert tile_starts(100, 40, 10) == [0, 30, 60]
    assert tile_starts(30, 40, 10) == [0]
    mask = feather_mask((6,), (3,))[0, 0]
    assert torch.allclose(mask, torch.tensor([1 / 3, 2 / 3, 1.0, 1.0, 2 / 3, 1 / 3]))
    x = torch.rand(2, 3, 37, 53)
    out = tiled_scale(x, lambda t: t * 2.0, (16, 20), 4, 1, 3)
    assert torch.allclose(out, x * 2.0, atol=1e-6)


def test_size_rule_and_registration():
    from nodes import build_registry

    registry = build_registry(entry_points=False)
    rule = registry.get("ImageUpscaleWithModel").size_rule
    assert rule(image=Size(2, 10, 12)) == Size(2, 40, 48)  # validation assumes the usual 4x
    assert "upscale_models" in MODEL_KINDS
