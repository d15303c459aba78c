"""Issue #12: the conditioning nodes set ComfyUI's cond keys and numbers (area, mask, timestep range, zero-out,
concat, average, inpaint-model conditioning)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from diffusion.latent import CondEntry, Conditioning
from nodes import conditioning as nodes
from nodes.folders import Folders
from nodes.runtime import Runtime

from .conftest import DEFAULT_CHECKPOINT, run_api


def cond(*values, tokens=77, pooled=True):
    return Conditioning(tuple(
        CondEntry(torch.full((1, tokens, 8), float(v)), torch.full((1, 8), float(v)) if pooled else None)
        for v in values))


def test_set_area_is_in_latent_cells_on_every_entry():
    out = nodes.conditioning_set_area.fn(None, cond(1, 2), 256, 128, 64, 16, 0.75)
    assert [(e.area, e.strength, e.set_area_to_bounds) for e in out.entries] == [((16, 32, 2, 8), 0.75, False)] * 2
    assert out.to_comfy()[0][1]["area"] == (16, 32, 2, 8)


def test_set_area_percentage_and_strength():
    out = nodes.conditioning_set_area_percentage.fn(None, cond(1), 0.5, 0.25, 0.5, 0.0, 1.5)
    assert out.entries[0].area == ("percentage", 0.25, 0.5, 0.0, 0.5) and out.entries[0].strength == 1.5
    assert nodes.conditioning_set_area_strength.fn(None, out, 0.3).entries[0].strength == 0.3


def test_set_mask_options():
    mask = torch.ones(16, 16)
    out = nodes.conditioning_set_mask.fn(None, cond(1), mask, 0.4, "mask bounds")
    e = out.entries[0]
    assert e.mask.shape == (1, 16, 16) and e.mask_strength == 0.4 and e.set_area_to_bounds
    assert not nodes.conditioning_set_mask.fn(None, cond(1), mask, 1.0, "default").entries[0].set_area_to_bounds
    extra = out.to_comfy()[0][1]
    assert extra["mask_strength"] == 0.4 and extra["set_area_to_bounds"] is True


def test_set_timestep_range():
    e = nodes.conditioning_set_timestep_range.fn(None, cond(1), 0.2, 0.6).entries[0]
    assert (e.start_percent, e.end_percent) == (0.2, 0.6)


def test_zero_out_zeros_context_and_pooled_and_keeps_the_rest():
    source = Conditioning((CondEntry(torch.ones(1, 77, 8), torch.ones(1, 8), strength=0.5, area=(8, 8, 0, 0)),))
    e = nodes.conditioning_zero_out.fn(None, source).entries[0]
    assert e.context.eq(0).all() and e.context.shape == (1, 77, 8) and e.pooled.eq(0).all()
    assert e.strength == 0.5 and e.area == (8, 8, 0, 0)


def test_concat_appends_the_first_from_context_to_each_to_entry():
    out = nodes.conditioning_concat.fn(None, cond(1, 2), cond(5, 6, tokens=154))
    assert [e.context.shape for e in out.entries] == [(1, 231, 8)] * 2
    assert out.entries[1].context[:, :77].eq(2).all() and out.entries[1].context[:, 77:].eq(5).all()
    assert out.entries[0].pooled.eq(1).all()  # pooled stays the "to" entry's
    with pytest.raises(ValueError, match="ConditioningConcat"):
        nodes.conditioning_concat.fn(None, cond(1), Conditioning((CondEntry(torch.ones(1, 77, 4)),)))


def test_average_weights_context_and_pooled_and_pads_to_the_to_length():
    out = nodes.conditioning_average.fn(None, cond(2, tokens=154), cond(10), 0.25)
    e = out.entries[0]
    assert e.context.shape == (1, 154, 8)
    torch.testing.assert_close(e.context[:, :77], torch.full((1, 77, 8), 2 * 0.25 + 10 * 0.75))
    torch.testing.assert_close(e.context[:, 77:], torch.full((1, 77, 8), 2 * 0.25))  # "from" padded with zeros
    torch.testing.assert_close(e.pooled, torch.full((1, 8), 2 * 0.25 + 10 * 0.75))
    shorter = nodes.conditioning_average.fn(None, cond(2), cond(10, tokens=154), 0.5).entries[0]
    assert shorter.context.shape == (1, 77, 8) and shorter.context.eq(6).all()  # "from" cut to 77 tokens
    no_pooled = nodes.conditioning_average.fn(None, cond(2, pooled=False), cond(10), 0.5).entries[0]
    assert no_pooled.pooled.eq(10).all()


class FakeVae:
    downscale = 8

    def __init__(self):
        from runtime.models import ModelHandle
        self.handle = ModelHandle("fake-vae", load=lambda device: torch.nn.Identity())
        self.seen = []

    def encode_working_bytes(self, shape):
        return 0

    def encode(self, pixels, network):
        from diffusion.components import crop_to_multiple
        pixels = crop_to_multiple(pixels[..., :3], 8)
        self.seen.append(pixels.clone())
        return pixels[:, ::8, ::8, :].movedim(-1, 1).repeat(1, 2, 1, 1)[:, :4]


def test_inpaint_model_conditioning_pixel_prep(tmp_path):
    """Pixels cropped to a multiple of 8 (centred), the mask resized to the image and cropped the same way,
    masked pixels (rounded mask) set to 0.5 for concat_latent_image; the latent encodes the original."""
    pixels = torch.rand(1, 21, 18, 3)  # -> 16 x 16, offsets 2 and 1
    mask = torch.zeros(1, 21, 18)
    mask[0, 2:10, 1:9] = 1.0
    mask[0, 12, 12] = 0.4  # rounds to 0: kept
    vae, ctx = FakeVae(), SimpleNamespace(resources=Runtime(Folders.at(tmp_path)))
    positive, negative, latent = nodes.inpaint_model_conditioning.fn(ctx, cond(1), cond(2), vae, pixels, mask, True)
    masked, original = vae.seen
    assert torch.equal(original, pixels[:, 2:18, 1:17])
    assert masked[0, :8, :8].eq(0.5).all()
    assert torch.equal(masked[0, 8:, 8:], pixels[0, 10:18, 9:17])
    expected_mask = mask[:, None, 2:18, 1:17]
    for side in (positive, negative):
        e = side.entries[0]
        assert torch.equal(e.concat_mask, expected_mask) and e.concat_latent_image.shape == (1, 4, 2, 2)
    assert torch.equal(latent.noise_mask, expected_mask) and latent.samples.shape == (1, 4, 2, 2)
    assert negative.entries[0].context.eq(2).all()
    _, _, no_mask = nodes.inpaint_model_conditioning.fn(ctx, cond(1), cond(2), vae, pixels, mask, False)
    assert no_mask.noise_mask is None


def test_inpaint_model_conditioning_on_the_tiny_vae(tiny_base):
    """Through the executor with the tiny checkpoint's VAE: the latent is VAEEncode's, bit for bit, and the
    attached image is the encoding of the greyed pixels."""
    api = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": DEFAULT_CHECKPOINT}},
           "2": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
           "3": {"class_type": "ImageScale", "inputs": {"image": ["2", 0], "upscale_method": "bilinear",
                                                        "width": 64, "height": 48, "crop": "disabled"}},
           "4": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 32, "height": 24}},
           "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["1", 1]}},
           "6": {"class_type": "InpaintModelConditioning",
                 "inputs": {"positive": ["5", 0], "negative": ["5", 0], "vae": ["1", 2], "pixels": ["3", 0],
                            "mask": ["4", 0], "noise_mask": True}},
           "7": {"class_type": "VAEEncode", "inputs": {"pixels": ["3", 0], "vae": ["1", 2]}}}
    from engine import Executor, validate
    from nodes import build_registry
    registry = build_registry(entry_points=False)
    runtime = Runtime(Folders.at(tiny_base))
    report = Executor(registry, resources=runtime).run(
        validate(api, registry, targets=["1", "6", "7"], resources=runtime).graph)
    assert report.ok, report.error
    (positive,), (negative,), (latent,) = report.outputs["6"]
    assert torch.equal(latent.samples, report.outputs["7"][0][0].samples)
    assert latent.noise_mask.shape == (1, 1, 48, 64) and latent.noise_mask.eq(1).all()
    vae = report.outputs["1"][2][0]
    with runtime.models.use(vae.handle) as network:  # an all-ones mask: the attached image is flat 0.5 grey
        grey = vae.encode(torch.full((1, 48, 64, 3), 0.5), network)
    image = positive.entries[0].concat_latent_image
    assert torch.equal(image, grey) and negative.entries[0].concat_latent_image is image


def test_regional_graph_draws_each_prompt_in_its_half(tiny_base):
    """graphs/regional_prompt.json's wiring (two ConditioningSetArea halves combined) samples end to end."""
    import json

    from .conftest import ROOT
    api = json.loads((ROOT / "graphs" / "regional_prompt.json").read_text())
    for node in api.values():
        if node["class_type"] == "CheckpointLoaderSimple":
            node["inputs"]["ckpt_name"] = DEFAULT_CHECKPOINT
    areas = [n["inputs"] for n in api.values() if n["class_type"] == "ConditioningSetArea"]
    assert sorted(a["x"] for a in areas) == [0, areas[0]["width"]]
    report, _ = run_api(api, tiny_base)
    assert report.ok
