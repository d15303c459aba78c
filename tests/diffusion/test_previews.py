"""Issue #14, live previews: latent2rgb per family (ComfyUI's latent_formats factors), TAESD when its weights
are present (else latent2rgb), none; and the binary websocket frame they travel in."""

from __future__ import annotations

import io
import json
import struct

import torch
from PIL import Image
from safetensors.torch import save_file

from diffusion import taesd
from diffusion.previews import LatentPreview, Previewer, family_of, latent_format, latent_to_rgb
from service.messages import preview_frame


def test_latent2rgb_uses_each_familys_factors():
    latent = torch.zeros(4, 2, 3)
    latent[0] = 1.0  # channel 0 alone: its row of factors, mapped from [-1, 1] to [0, 1]
    sd1 = latent_to_rgb(latent, "sd1")
    assert sd1.shape == (2, 3, 3)
    assert torch.allclose(sd1[0, 0], (torch.tensor([0.3512, 0.2297, 0.3227]) + 1) / 2)
    sdxl = latent_to_rgb(latent, "sdxl")
    assert torch.allclose(sdxl[0, 0], (torch.tensor([0.3651 + 0.1084, 0.4232 - 0.0175, 0.4341 - 0.0011]) + 1) / 2)
    assert latent_to_rgb(torch.full((4, 1, 1), 50.0)).max() == 1.0  # clamped


def test_family_decides_the_latent_format():
    class Model:
        family = None
    assert latent_format(family_of(Model())) == "sd1"
    Model.family = "sdxl_refiner"
    assert latent_format(family_of(Model())) == "sdxl"
    Model.family = type("Family", (), {"name": "sd2"})()
    assert family_of(Model()) == "sd2" and latent_format("sd2") == "sd1"


def test_previewer_methods(tmp_path):
    preview = LatentPreview(torch.randn(4, 8, 6), "sd1")
    image = Previewer("latent2rgb")(preview)
    assert isinstance(image, Image.Image) and image.size == (48, 64)  # the output's size, in 8x8 blocks
    assert Previewer("none")(preview) is None
    assert Previewer("taesd", tmp_path)(preview).size == (48, 64)  # no weights: latent2rgb
    marker = object()
    assert Previewer("latent2rgb")(marker) is marker  # images a node made itself pass through


def test_taesd_decodes_with_weights_in_vae_approx(tmp_path):
    """TAESD: the network mirrors the published files' keys (strict load) and upsamples 8x."""
    torch.manual_seed(0)
    save_file(taesd.decoder().state_dict(), str(tmp_path / "taesd_decoder.safetensors"))
    assert taesd.find_weights(tmp_path, "sd1") == tmp_path / "taesd_decoder.safetensors"
    assert taesd.find_weights(tmp_path, "sdxl") is None
    image = Previewer("taesd", tmp_path)(LatentPreview(torch.randn(4, 4, 5), "sd1"))
    assert image.size == (40, 32)
    keys = set(taesd.decoder().state_dict())
    assert {"1.weight", "3.conv.0.weight", "3.conv.4.bias", "7.weight", "19.weight"} <= keys and "7.bias" not in keys


def test_preview_frames_are_comfyuis_binary_previews():
    frames = preview_frame(LatentPreview(torch.randn(4, 8, 8)), Previewer("latent2rgb"), node_id="3", prompt_id="p")
    assert struct.unpack(">II", frames.plain[:8]) == (1, 1)  # PREVIEW_IMAGE, JPEG
    assert Image.open(io.BytesIO(frames.plain[8:])).size == (64, 64)
    kind, length = struct.unpack(">II", frames.with_metadata[:8])  # PREVIEW_IMAGE_WITH_METADATA: drawn on node 3
    metadata = json.loads(frames.with_metadata[8:8 + length])
    assert kind == 4 and metadata == {"node_id": "3", "display_node_id": "3", "parent_node_id": None,
                                      "real_node_id": "3", "prompt_id": "p", "image_type": "image/jpeg"}
    assert frames.with_metadata[8 + length:] == frames.plain[8:]
    assert preview_frame(LatentPreview(torch.randn(4, 8, 8)), Previewer("none")) is None
