"""LoadImage, LoadImageMask, SaveImage, PreviewImage: files in, files out, and the paths they may touch."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine import CancelToken, Executor, NodeRegistry, RunContext, read_graph_file, validate
from engine.discovery import register_module
from engine.formats import png_text_chunks
from nodes import image as image_nodes
from nodes import image_io, register_types
from nodes import mask as mask_nodes
from nodes.folders import Folders, UnsafePathError
from nodes.runtime import Runtime

ROOT = Path(__file__).resolve().parents[2]
MODULES = ("nodes.image", "nodes.mask", "nodes.image_io")


def make_ctx(base: Path, prompt=None, extra=None) -> RunContext:
    return RunContext("run", "9", "test", Runtime(Folders.at(base)), CancelToken(), lambda event: None,
                      prompt or {}, extra or {})


@pytest.fixture
def ctx(tmp_path):
    return make_ctx(tmp_path)


def put_input(base: Path, name: str, picture: Image.Image | bytes, **save) -> Path:
    path = base / "input" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(picture, bytes):
        path.write_bytes(picture)
    else:
        picture.save(path, **save)
    return path


def load(ctx, name):
    return image_io.load_image.fn(ctx, image=name)


# --- modules -------------------------------------------------------------------------------------------------

def test_importing_the_modules_loads_no_torch_numpy_or_pillow():
    code = (f"import sys; import {', '.join(MODULES)}; "
            "print([m for m in ('torch', 'numpy', 'PIL') if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_modules_register_with_comfyui_names():
    registry = NodeRegistry()
    register_types(registry)
    for module in (image_nodes, mask_nodes, image_io):
        register_module(registry, module, pack="sdgraph")
    assert registry.load_errors == []
    assert {d.name for d in registry} == {
        "ImageScale", "ImageScaleBy", "ImageInvert", "ImageCompositeMasked", "MaskComposite", "SolidMask",
        "InvertMask", "CropMask", "FeatherMask", "GrowMask", "ThresholdMask", "ImageToMask", "MaskToImage",
        "LoadImage", "LoadImageMask", "SaveImage", "PreviewImage", "ImagePadForOutpaint", "ImageCrop", "ImageBatch"}
    assert registry.get("LoadImage").input("image").extra == {"image_upload": True}
    assert [o.type for o in registry.get("LoadImage").outputs] == ["IMAGE", "MASK"]
    assert registry.get("SaveImage").output_node and registry.get("PreviewImage").output_node
    assert registry.get("LoadImage").input("image").combo_options(None) == []


# --- LoadImage -----------------------------------------------------------------------------------------------

def test_alpha_becomes_mask(ctx, tmp_path):
    rgba = np.array([[[255, 0, 0, 0], [0, 255, 0, 128], [0, 0, 255, 255]]], dtype=np.uint8)
    put_input(tmp_path, "a.png", Image.fromarray(rgba))
    image, mask = load(ctx, "a.png")
    assert image.shape == (1, 1, 3, 3) and mask.shape == (1, 1, 3)
    assert image.dtype == mask.dtype == torch.float32
    assert image[0, 0].tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    torch.testing.assert_close(mask, torch.tensor([[[1.0, 1 - 128 / 255, 0.0]]]), rtol=0, atol=1e-7)


def test_no_alpha_gives_zero_mask_of_the_image_size(ctx, tmp_path):
    put_input(tmp_path, "rgb.png", Image.new("RGB", (5, 3), (255, 51, 0)))
    image, mask = load(ctx, "rgb.png")
    assert image.shape == (1, 3, 5, 3)
    torch.testing.assert_close(image[0, 0, 0], torch.tensor([1.0, 0.2, 0.0]))
    assert mask.shape == (1, 3, 5) and not mask.any()


def test_palette_transparency_becomes_mask(ctx, tmp_path):
    picture = Image.new("P", (2, 1))
    picture.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    picture.putdata([0, 1])
    put_input(tmp_path, "p.png", picture, transparency=0)
    image, mask = load(ctx, "p.png")
    assert image[0, 0].tolist() == [[0, 0, 0], [1, 0, 0]]
    assert mask.tolist() == [[[1.0, 0.0]]]


def test_sixteen_bit_grey_keeps_its_range(ctx, tmp_path):
    put_input(tmp_path, "g16.png", Image.fromarray(np.array([[0, 255, 32768, 65535]], dtype=np.uint16)))
    image, mask = load(ctx, "g16.png")
    expected = torch.tensor([0, 255, 32768, 65535], dtype=torch.float32) / 65535
    torch.testing.assert_close(image[0, 0], expected[:, None].expand(4, 3), rtol=0, atol=1e-7)
    assert mask.shape == (1, 1, 4) and not mask.any()


def test_exif_orientation_is_applied(ctx, tmp_path):
    pixels = np.array([[0, 30, 60], [90, 120, 150]], dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to view"
    put_input(tmp_path, "exif.png", Image.fromarray(pixels), exif=exif)
    image, mask = load(ctx, "exif.png")
    assert image.shape == (1, 3, 2, 3) and mask.shape == (1, 3, 2)
    assert (image[0, :, :, 0] * 255).round().tolist() == [[90, 0], [120, 30], [150, 60]]


def test_frames_become_a_batch_of_the_first_frames_size(ctx, tmp_path):
    frames = [Image.new("RGB", (2, 2), (10, 10, 10)), Image.new("RGB", (3, 3), (50, 50, 50)),
              Image.new("RGB", (2, 2), (200, 200, 200))]
    put_input(tmp_path, "frames.tiff", frames[0], save_all=True, append_images=frames[1:])
    image, mask = load(ctx, "frames.tiff")
    assert image.shape == (2, 2, 2, 3) and mask.shape == (2, 2, 2)
    assert [round(float(v) * 255) for v in image[:, 0, 0, 0]] == [10, 200]


def test_missing_file_is_named(ctx):
    with pytest.raises(FileNotFoundError, match="'nope.png'"):
        load(ctx, "nope.png")


def test_not_an_image_is_named(ctx, tmp_path):
    put_input(tmp_path, "notes.png", b"just text, not a PNG")
    with pytest.raises(ValueError, match="'notes.png' is not an image"):
        load(ctx, "notes.png")


def secrets_outside_input(base: Path) -> None:
    """secret.png beside input/ and in elsewhere/, which input/link points at."""
    outside = base / "elsewhere"
    outside.mkdir()
    Image.new("RGB", (1, 1)).save(outside / "secret.png")
    Image.new("RGB", (1, 1)).save(base / "secret.png")
    (base / "input").mkdir()
    os.symlink(outside, base / "input" / "link")


@pytest.mark.parametrize("name", ["../secret.png", "/etc/secret.png", "..\\secret.png", "a/../../secret.png",
                                  "bad\0.png", "link/secret.png"])
def test_names_outside_input_are_refused(ctx, tmp_path, name):
    secrets_outside_input(tmp_path)
    with pytest.raises(UnsafePathError):
        load(ctx, name)


def test_fingerprint_is_the_file_digest_and_follows_changes(ctx, tmp_path):
    path = put_input(tmp_path, "f.png", Image.new("RGB", (2, 2), (1, 2, 3)))
    fingerprint = image_io.load_image.fingerprint
    first = fingerprint(ctx.resources, image="f.png")
    assert first == hashlib.sha256(path.read_bytes()).hexdigest()
    assert fingerprint(ctx.resources, image="f.png") == first
    stat = path.stat()
    Image.new("RGB", (2, 2), (1, 2, 4)).save(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same timestamp: only the bytes differ
    assert fingerprint(ctx.resources, image="f.png") != first
    assert image_io.load_image_mask.fingerprint(ctx.resources, image="f.png") != first


# --- LoadImageMask -------------------------------------------------------------------------------------------

def test_load_image_mask_channels(ctx, tmp_path):
    put_input(tmp_path, "m.png", Image.fromarray(np.array([[[51, 102, 153, 204]]], dtype=np.uint8)))
    for channel, value in (("red", 0.2), ("green", 0.4), ("blue", 0.6), ("alpha", 1 - 0.8)):
        out = image_io.load_image_mask.fn(ctx, image="m.png", channel=channel)
        assert out.shape == (1, 1, 1)
        assert out.item() == pytest.approx(value, abs=1e-6)


def test_load_image_mask_alpha_of_opaque_image_is_zero(ctx, tmp_path):
    put_input(tmp_path, "grey.png", Image.new("L", (3, 2), 200))
    out = image_io.load_image_mask.fn(ctx, image="grey.png", channel="alpha")
    assert out.shape == (1, 2, 3) and not out.any()
    red = image_io.load_image_mask.fn(ctx, image="grey.png", channel="red")
    torch.testing.assert_close(red, torch.full((1, 2, 3), 200 / 255))


# --- SaveImage -----------------------------------------------------------------------------------------------

def save(ctx, images, prefix="ComfyUI"):
    return image_io.save_image.fn(ctx, images=images, filename_prefix=prefix)


def files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def test_save_names_and_counter(ctx, tmp_path):
    out = tmp_path / "output"
    first = save(ctx, torch.zeros(2, 2, 2, 3))
    assert first.outputs == ()
    assert first.ui == {"images": [{"filename": "ComfyUI_00001_.png", "subfolder": "", "type": "output"},
                                   {"filename": "ComfyUI_00002_.png", "subfolder": "", "type": "output"}]}
    assert save(ctx, torch.zeros(1, 2, 2, 3)).ui["images"][0]["filename"] == "ComfyUI_00003_.png"
    assert files(out) == ["ComfyUI_00001_.png", "ComfyUI_00002_.png", "ComfyUI_00003_.png"]


def test_counter_continues_from_the_highest_file_of_that_prefix(ctx, tmp_path):
    out = tmp_path / "output"
    out.mkdir()
    for name in ("ComfyUI_00041_.png", "ComfyUI_00007_.png", "ComfyUIx_00099_.png", "Other_00500_.png",
                 "ComfyUI_temp_abcde_00077_.png"):
        (out / name).write_bytes(b"")
    assert save(ctx, torch.zeros(1, 1, 1, 3)).ui["images"][0]["filename"] == "ComfyUI_00042_.png"


def test_subfolder_prefix(ctx, tmp_path):
    ui = save(ctx, torch.zeros(1, 1, 1, 3), "portraits/img").ui["images"][0]
    assert ui == {"filename": "img_00001_.png", "subfolder": "portraits", "type": "output"}
    assert (tmp_path / "output" / "portraits" / "img_00001_.png").is_file()
    assert save(ctx, torch.zeros(1, 1, 1, 3), "portraits/img").ui["images"][0]["filename"] == "img_00002_.png"


def test_prefix_variables(ctx, tmp_path):
    ui = save(ctx, torch.zeros(2, 3, 5, 3), "w%width%_h%height%_%batch_num%").ui["images"]
    assert [i["filename"] for i in ui] == ["w5_h3_0_00001_.png", "w5_h3_1_00002_.png"]


def test_text_chunks_carry_the_graph(tmp_path):
    prompt = {"1": {"class_type": "SaveImage", "inputs": {"filename_prefix": "é"}}}
    workflow = {"nodes": [], "links": [], "note": "ünïcode"}
    ctx = make_ctx(tmp_path, prompt, {"extra_pnginfo": {"workflow": workflow, "other": [1, 2]}})
    ui = save(ctx, torch.zeros(1, 2, 2, 3)).ui["images"][0]
    path = tmp_path / "output" / ui["filename"]
    chunks = png_text_chunks(path.read_bytes())
    assert json.loads(chunks["prompt"]) == prompt
    assert json.loads(chunks["workflow"]) == workflow
    assert json.loads(chunks["other"]) == [1, 2]
    assert chunks["prompt"] == json.dumps(prompt)  # byte for byte what ComfyUI writes
    assert read_graph_file(path, NodeRegistry()) == prompt  # so `sdgraph run out.png` redoes it


def test_no_prompt_no_chunk(ctx, tmp_path):
    ui = save(ctx, torch.zeros(1, 1, 1, 3)).ui["images"][0]
    assert png_text_chunks((tmp_path / "output" / ui["filename"]).read_bytes()) == {}


def test_pixels_are_truncated_like_comfyui(ctx, tmp_path):
    values = [0.0, 0.5, 0.999, 1.0, 1.5, -0.2, 1 / 255, 0.00392]
    image = torch.tensor(values)[None, None, :, None].repeat(1, 1, 1, 3)
    ui = save(ctx, image).ui["images"][0]
    pixels = np.asarray(Image.open(tmp_path / "output" / ui["filename"]))
    assert pixels.shape == (1, len(values), 3)
    assert pixels[0, :, 0].tolist() == [0, 127, 254, 255, 255, 0, 1, 0]


def test_rgba_and_grey_batches_are_saved(ctx, tmp_path):
    for channels, mode in ((4, "RGBA"), (1, "L")):
        ui = save(ctx, torch.full((1, 2, 2, channels), 0.5)).ui["images"][0]
        assert Image.open(tmp_path / "output" / ui["filename"]).mode == mode


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_pixels_are_refused_and_nothing_is_written(ctx, tmp_path, bad):
    images = torch.zeros(2, 2, 2, 3)
    images[1, 1, 1, 2] = bad
    with pytest.raises(ValueError, match=r"SaveImage: 1 of 24 .*NaN or infinite.*fp32"):
        save(ctx, images)
    assert files(tmp_path / "output") == []


@pytest.mark.parametrize("prefix", ["../x", "/tmp/x", "..\\x", "sub\\..\\..\\x", "a/../../x", "C:\\x", "x\0y", "",
                                    "sub/..", "link/img"])
def test_prefixes_outside_output_are_refused(ctx, tmp_path, prefix):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (tmp_path / "output").mkdir()
    os.symlink(outside, tmp_path / "output" / "link")
    with pytest.raises(UnsafePathError):
        save(ctx, torch.zeros(1, 1, 1, 3), prefix)
    assert files(outside) == [] and files(tmp_path / "output") == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "output"]


@pytest.mark.parametrize("prefix", ["../x", "/tmp/x", "..\\x", "x\0y", ""])
def test_validation_refuses_bad_prefixes_before_running(prefix):
    verdict = image_io.save_image.validate(filename_prefix=prefix)
    assert isinstance(verdict, str) and "filename_prefix" in verdict
    assert image_io.save_image.validate(filename_prefix="portraits/img") is True
    assert image_io.save_image.validate() is True  # a linked prefix is checked when it runs


def test_backslash_prefix_is_a_subfolder(ctx, tmp_path):
    ui = save(ctx, torch.zeros(1, 1, 1, 3), "portraits\\img").ui["images"][0]
    assert (ui["subfolder"], ui["filename"]) == ("portraits", "img_00001_.png")


def test_a_file_in_the_way_of_the_subfolder_is_an_error(ctx, tmp_path):
    (tmp_path / "output").mkdir()
    (tmp_path / "output" / "taken").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="'taken'"):
        save(ctx, torch.zeros(1, 1, 1, 3), "taken/img")


def test_never_overwrites_a_file_taken_meanwhile(ctx, tmp_path, monkeypatch):
    out = tmp_path / "output"
    out.mkdir()
    (out / "ComfyUI_00001_.png").write_bytes(b"someone else's")
    calls = []
    real = image_io.next_counter

    def stale(folder, filename):  # the listing happened before the other run wrote its file
        calls.append(filename)
        return 1 if len(calls) == 1 else real(folder, filename)

    monkeypatch.setattr(image_io, "next_counter", stale)
    ui = save(ctx, torch.zeros(1, 1, 1, 3)).ui["images"][0]
    assert ui["filename"] == "ComfyUI_00002_.png"
    assert (out / "ComfyUI_00001_.png").read_bytes() == b"someone else's"
    assert files(out) == ["ComfyUI_00001_.png", "ComfyUI_00002_.png"]  # no temporary file left behind


def _zlib_level(png: bytes) -> int:
    """FLEVEL of the first IDAT's zlib stream: 0 fastest (levels 0-1), 1 fast (2-5), 2 default, 3 best."""
    at = png.index(b"IDAT") + 4
    zlib.decompressobj().decompress(png[at:at + 2])  # a valid zlib header
    return png[at + 1] >> 6


def test_preview_goes_to_temp_with_fast_compression(ctx, tmp_path):
    images = torch.rand(1, 8, 8, 3, generator=torch.Generator().manual_seed(0))
    ui = image_io.preview_image.fn(ctx, images=images).ui["images"][0]
    assert ui["type"] == "temp" and ui["subfolder"] == ""
    assert re.fullmatch(r"ComfyUI_temp_[a-z]{5}_00001_\.png", ui["filename"])
    preview = (tmp_path / "temp" / ui["filename"]).read_bytes()
    saved = (tmp_path / "output" / save(ctx, images).ui["images"][0]["filename"]).read_bytes()
    assert (_zlib_level(preview), _zlib_level(saved)) == (0, 1)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(preview))), np.asarray(Image.open(io.BytesIO(saved))))


def test_preview_refuses_nan(ctx):
    with pytest.raises(ValueError, match="PreviewImage"):
        image_io.preview_image.fn(ctx, images=torch.full((1, 1, 1, 3), float("nan")))


# --- through the engine --------------------------------------------------------------------------------------

def test_load_composite_save_through_the_executor(tmp_path):
    registry = NodeRegistry()
    register_types(registry)
    for module in (image_nodes, mask_nodes, image_io):
        register_module(registry, module, pack="sdgraph")
    runtime = Runtime(Folders.at(tmp_path))
    put_input(tmp_path, "sub/in.png", Image.new("RGBA", (4, 4), (255, 0, 0, 0)))
    api = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "sub/in.png"}},
        "2": {"class_type": "InvertMask", "inputs": {"mask": ["1", 1]}},
        "3": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 2, "height": 2}},
        "4": {"class_type": "MaskComposite", "inputs": {"destination": ["2", 0], "source": ["3", 0], "x": 1, "y": 1,
                                                        "operation": "add"}},
        "5": {"class_type": "MaskToImage", "inputs": {"mask": ["4", 0]}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "out/test"}},
    }
    result = validate(api, registry, resources=runtime)
    assert result.ok, [str(e) for e in result.errors]
    executor = Executor(registry, resources=runtime)
    report = executor.run(result.graph, prompt=api)
    assert report.ok, report.error
    [item] = report.ui["6"]["images"]
    pixels = np.asarray(Image.open(tmp_path / "output" / "out" / item["filename"]))
    assert pixels[..., 0].tolist() == [[0, 0, 0, 0], [0, 255, 255, 0], [0, 255, 255, 0], [0, 0, 0, 0]]
    assert read_graph_file(tmp_path / "output" / "out" / item["filename"], registry) == api

    again = executor.run(validate(api, registry, resources=runtime).graph, prompt=api)
    assert again.executed == [] and again.cached == ["6"]  # same file, same bytes: nothing runs again
    Image.new("RGBA", (4, 4), (255, 0, 0, 255)).save(tmp_path / "input" / "sub" / "in.png")
    changed = executor.run(validate(api, registry, resources=runtime).graph, prompt=api)
    assert "1" in changed.executed and "6" in changed.executed

    bad = dict(api, **{"1": {"class_type": "LoadImage", "inputs": {"image": "missing.png"}}})
    errors = validate(bad, registry, resources=runtime).errors
    assert any("missing.png" in str(e) for e in errors)


# --- issue #11: one resolver, at validation where it can and always where the file is opened ----------------

def _image_registry(**v1_classes) -> NodeRegistry:
    import types

    registry = NodeRegistry()
    register_types(registry)
    for module in (image_nodes, mask_nodes, image_io):
        register_module(registry, module, pack="sdgraph")
    if v1_classes:
        pack = types.ModuleType("v1_pack")
        pack.NODE_CLASS_MAPPINGS = v1_classes
        register_module(registry, pack, pack="v1_pack")
        assert not registry.load_errors, registry.load_errors
    return registry


def test_save_prefix_through_a_symlink_out_of_output_is_refused_at_queue_time(tmp_path):
    """Issue #11, paths: a SaveImage prefix whose folder is a symlink leading out of output/ passed validation."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (tmp_path / "output").mkdir()
    os.symlink(outside, tmp_path / "output" / "link")
    api = {"0": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 1, "height": 1}},
           "1": {"class_type": "MaskToImage", "inputs": {"mask": ["0", 0]}},
           "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "link/sub/img"}}}
    registry = _image_registry()
    result = validate(api, registry, resources=Runtime(Folders.at(tmp_path)))
    assert [(e.code, e.node_id) for e in result.errors] == [("custom_validation_failed", "2")]
    assert "'link/sub'" in result.errors[0].message and "output/" in result.errors[0].message
    assert str(outside) not in result.errors[0].message  # the server's own paths are not echoed
    trusted = validate(api, registry, resources=Runtime(Folders.at(tmp_path, trusted=True)))
    assert trusted.ok, [str(e) for e in trusted.errors]  # the CLI trusts its folders' links


class _PickAnyImage:
    """A ComfyUI-style pack node whose VALIDATE_INPUTS accepts anything (skipping the combo check) and passes
    the name on as a combo value, the way "image picker" packs feed LoadImage."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": (["a.png"],)}}

    RETURN_TYPES = (["a.png"],)
    FUNCTION = "pick"

    @classmethod
    def VALIDATE_INPUTS(cls, image):
        return True

    def pick(self, image):
        return (image,)


@pytest.mark.parametrize("name", ["../../etc/passwd", "../secret.png", "link/secret.png"])
def test_a_v1_validate_inputs_that_lets_anything_through_is_stopped_where_the_file_opens(tmp_path, name):
    """Issue #11, paths: VALIDATE_INPUTS returning True let `../` names reach LoadImage; the resolver refuses
    them when the file is opened, naming the node input and the file."""
    secrets_outside_input(tmp_path)
    registry = _image_registry(PickAnyImage=_PickAnyImage)
    runtime = Runtime(Folders.at(tmp_path))
    api = {"1": {"class_type": "PickAnyImage", "inputs": {"image": name}},
           "2": {"class_type": "LoadImage", "inputs": {"image": ["1", 0]}},
           "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}}
    result = validate(api, registry, resources=runtime)
    assert result.ok, [str(e) for e in result.errors]  # the plugin's hook let it through
    report = Executor(registry, resources=runtime).run(result.graph, prompt=api)
    assert not report.ok and report.error.node_id == "2"
    assert report.error.exception_type == "UnsafePathError"
    assert f"LoadImage input 'image' {name!r}" in report.error.message
    assert str(tmp_path) not in report.error.message
