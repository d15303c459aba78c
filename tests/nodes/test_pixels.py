"""Size rules of the built-in nodes (issue #11, pixel budget bypass): chains that multiply sizes are refused at
validation, naming the node, and the graphs in graphs/ still validate. No torch is needed for any of it."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from engine import validate
from engine.sizes import Size, SizeLimits
from nodes import build_registry
from nodes.folders import Folders
from nodes.pixels import crop_mask_size, image_file_size, image_scale_size, mask_composite_size
from nodes.runtime import Runtime

from .conftest import DEFAULT_CHECKPOINT, ROOT


@pytest.fixture(scope="module")
def registry():
    return build_registry(entry_points=False)


def _solid_scaled(*factors: float, side: int = 2048) -> dict:
    """SolidMask -> MaskToImage -> ImageScaleBy per factor -> SaveImage."""
    api = {"1": {"class_type": "SolidMask", "inputs": {"width": side, "height": side}},
           "2": {"class_type": "MaskToImage", "inputs": {"mask": ["1", 0]}}}
    for i, factor in enumerate(factors, start=3):
        api[str(i)] = {"class_type": "ImageScaleBy",
                       "inputs": {"image": [str(i - 1), 0], "upscale_method": "nearest-exact", "scale_by": factor}}
    api["99"] = {"class_type": "SaveImage", "inputs": {"images": [str(len(factors) + 2), 0]}}
    return api


def test_the_131072_square_chain_is_refused_at_the_first_node_over_the_limit(registry):
    result = validate(_solid_scaled(8, 8), registry)
    (error,) = result.errors
    assert (error.code, error.node_id, error.node_type) == ("image_too_large", "3", "ImageScaleBy")
    assert "1 x 16384x16384 pixels: 256 megapixels per image" in error.message
    assert validate(_solid_scaled(8, 8), registry, sizes=SizeLimits(131072**2, 131072**2)).ok
    assert validate(_solid_scaled(2), registry).ok  # 4096 x 4096: 16 megapixels, at the limit


def test_scaling_a_batch_counts_the_whole_batch(tiny_base, registry):
    api = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": DEFAULT_CHECKPOINT}},
           "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 64}},
           "3": {"class_type": "VAEDecode", "inputs": {"samples": ["2", 0], "vae": ["1", 2]}},
           "4": {"class_type": "ImageScale", "inputs": {"image": ["3", 0], "upscale_method": "bilinear",
                                                        "width": 4096, "height": 4096, "crop": "disabled"}},
           "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0]}}}
    runtime = Runtime(Folders.at(tiny_base))
    (error,) = validate(api, registry, resources=runtime).errors
    assert (error.node_id, error.node_type) == ("4", "ImageScale")
    assert "1024 megapixels in the batch, more than the limit of 64" in error.message
    api["2"]["inputs"]["batch_size"] = 4096  # the empty latent itself is then too large
    (error,) = validate(api, registry, resources=runtime).errors
    assert (error.node_id, error.node_type) == ("2", "EmptyLatentImage")


def test_load_image_reads_the_size_from_the_file_header(tmp_path, registry):
    (tmp_path / "input").mkdir()
    Image.new("RGB", (40, 30)).save(tmp_path / "input" / "small.png")
    api = {"1": {"class_type": "LoadImage", "inputs": {"image": "small.png"}},
           "2": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "bilinear",
                                                        "width": 0, "height": 300, "crop": "disabled"}},
           "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0]}}}
    runtime = Runtime(Folders.at(tmp_path))
    assert validate(api, registry, resources=runtime, sizes=SizeLimits(120_000, 120_000)).ok
    (error,) = validate(api, registry, resources=runtime, sizes=SizeLimits(100_000, 10**9)).errors
    assert error.node_id == "2" and "1 x 400x300 pixels" in error.message


def test_image_file_size_reads_frames_and_exif_rotation(tmp_path):
    frames = [Image.new("RGB", (8, 6), color) for color in ("red", "blue", "green")]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    assert image_file_size(tmp_path / "anim.gif") == Size(3, 6, 8)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated a quarter turn: LoadImage turns it upright
    Image.new("RGB", (8, 6)).save(tmp_path / "turned.jpg", exif=exif)
    assert image_file_size(tmp_path / "turned.jpg") == Size(1, 8, 6)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    assert image_file_size(tmp_path / "broken.png") is None


def test_rules_follow_what_the_nodes_do():
    image = Size(2, 300, 400)
    assert image_scale_size(image, 0, 150) == Size(2, 150, 200)
    assert image_scale_size(image, 0, 0) == image
    assert crop_mask_size(image, 350, 10, 512, 512) == Size(2, 290, 50)
    assert mask_composite_size(Size(1, 10, 20), Size(4, 5, 5)) == Size(4, 10, 20)


@pytest.mark.parametrize("name", ["txt2img", "img2img", "inpaint"])
def test_the_shipped_graphs_still_validate(name, registry):
    api = json.loads((ROOT / "graphs" / f"{name}.json").read_text())
    result = validate(api, registry, resources=Runtime(Folders.at(ROOT)))
    assert result.ok, [str(e) for e in result.errors]
