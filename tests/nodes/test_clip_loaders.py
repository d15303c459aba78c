"""CLIPLoader and DualCLIPLoader (issue #13): files from models/text_encoders and models/clip, the encoder told
from the file and checked against `type`, SDXL's two files in either order."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from engine import CancelToken, RunContext, validate
from nodes import build_registry, conditioning
from nodes import clip_loaders as loaders
from nodes.folders import Folders
from nodes.runtime import Runtime

WIDTH = 64


def _openclip(layers: int) -> dict[str, torch.Tensor]:
    from diffusion.make_checkpoint import random_weights
    from diffusion.openclip import openclip_layout

    return random_weights(openclip_layout(width=WIDTH, layers=layers, projection=WIDTH), seed=layers)


def _clip_l() -> dict[str, torch.Tensor]:
    from diffusion.make_checkpoint import random_weights
    from diffusion.text_encoder import clip_text_config, expected_text_weights, text_encoder_on_meta

    meta = expected_text_weights(text_encoder_on_meta(clip_text_config(width=WIDTH, layers=2, intermediate_size=256)))
    return random_weights({"text_model." + k: (torch.float32, tuple(v.shape)) for k, v in meta.items()
                           if k != "embeddings.position_ids"}, seed=1)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """clip_l and bigG in models/text_encoders, ViT-H in the legacy models/clip."""
    root = tmp_path_factory.mktemp("clip_base")
    for folder, name, weights in (("text_encoders", "clip_l.safetensors", _clip_l()),
                                  ("text_encoders", "clip_g.safetensors", _openclip(32)),
                                  ("clip", "open_clip_h.safetensors", _openclip(24))):
        (root / "models" / folder).mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in weights.items()}, root / "models" / folder / name)
    return root


@pytest.fixture
def ctx(base):
    return RunContext("run", "1", "test", Runtime(Folders.at(base)), CancelToken(), lambda event: None)


def encode(ctx, clip, text="a cat"):
    return conditioning.clip_text_encode.fn(ctx, text=text, clip=clip).entries[0]


def test_files_of_both_folders_are_offered(base):
    api = {"1": {"class_type": "CLIPLoader", "inputs": {"clip_name": "open_clip_h.safetensors", "type": "sd2"}},
           "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a", "clip": ["1", 0]}}}
    runtime = Runtime(Folders.at(base))
    assert loaders._text_encoder_names(runtime) == ["clip_g.safetensors", "clip_l.safetensors",
                                                    "open_clip_h.safetensors"]
    registry = build_registry(entry_points=False)
    assert validate(api, registry, targets=["2"], resources=runtime).ok
    api["1"]["inputs"]["clip_name"] = "missing.safetensors"
    (error,) = validate(api, registry, targets=["2"], resources=runtime).errors
    assert (error.code, error.input_name) == ("value_not_in_list", "clip_name")


@pytest.mark.parametrize(("name", "type_", "family", "encoders"), [
    ("clip_l.safetensors", "stable_diffusion", "sd1", ("clip_l",)),
    ("open_clip_h.safetensors", "stable_diffusion", "sd2", ("open_clip_h",)),
    ("open_clip_h.safetensors", "sd2", "sd2", ("open_clip_h",)),
    ("clip_g.safetensors", "sdxl", "sdxl_refiner", ("open_clip_g",)),
    ("clip_g.safetensors", "stable_diffusion", "sdxl_refiner", ("open_clip_g",)),
])
def test_clip_loader_tells_the_encoder_from_the_file(ctx, name, type_, family, encoders):
    clip = loaders.clip_loader.fn(ctx, clip_name=name, type=type_)
    assert (clip.family, clip.encoders) == (family, encoders)
    entry = encode(ctx, clip)
    assert entry.context.shape == (1, 77, WIDTH)
    assert entry.pooled.shape == (1, WIDTH)


@pytest.mark.parametrize(("name", "type_", "says"), [
    ("clip_l.safetensors", "sd2", r"CLIP-L .*2 layers, 64 wide.*of sd1 models, not of type 'sd2'"),
    ("clip_l.safetensors", "sdxl", r"use DualCLIPLoader"),
    ("open_clip_h.safetensors", "sd1", r"OpenCLIP ViT-H/14"),
])
def test_clip_loader_refuses_a_file_of_another_type(ctx, name, type_, says):
    with pytest.raises(ValueError, match=f"CLIPLoader: '{name}' holds .*{says}"):
        loaders.clip_loader.fn(ctx, clip_name=name, type=type_)


def test_clip_loader_names_both_folders_for_a_missing_file(ctx):
    with pytest.raises(FileNotFoundError, match=r"CLIPLoader input 'clip_name'.*text_encoders or .*clip"):
        loaders.clip_loader.fn(ctx, clip_name="nope.safetensors", type="sd1")


def test_dual_clip_loader_takes_either_order(ctx):
    a = loaders.dual_clip_loader.fn(ctx, clip_name1="clip_l.safetensors", clip_name2="clip_g.safetensors")
    b = loaders.dual_clip_loader.fn(ctx, clip_name1="clip_g.safetensors", clip_name2="clip_l.safetensors")
    assert a.encoders == b.encoders == ("clip_l", "open_clip_g") and a.handle == b.handle
    assert (a.family, a.clip_type) == ("sdxl", "sdxl")
    first, second = encode(ctx, a, "a red cat"), encode(ctx, b, "a red cat")
    assert first.context.shape == (1, 77, 2 * WIDTH) and torch.equal(first.context, second.context)
    assert torch.equal(first.pooled, second.pooled)


def test_dual_clip_loader_refuses_two_files_that_are_not_clip_l_and_bigg(ctx):
    with pytest.raises(ValueError, match=r"DualCLIPLoader: .*'clip_l.safetensors' holds CLIP-L.*"
                                         r"'open_clip_h.safetensors' holds OpenCLIP ViT-H"):
        loaders.dual_clip_loader.fn(ctx, clip_name1="clip_l.safetensors", clip_name2="open_clip_h.safetensors")


def test_clip_set_last_layer_reaches_bigg_layers_beyond_clip_l(ctx):
    """SDXL: CLIPSetLastLayer may go as deep as bigG's 32 layers; CLIP-L (2 layers here) then uses its last."""
    clip = loaders.dual_clip_loader.fn(ctx, clip_name1="clip_l.safetensors", clip_name2="clip_g.safetensors")
    deep = conditioning.clip_set_last_layer.fn(ctx, clip=clip, stop_at_clip_layer=-24)
    assert deep.layer == -24
    assert encode(ctx, deep).context.shape == (1, 77, 2 * WIDTH)
    assert not torch.equal(encode(ctx, deep).context, encode(ctx, clip).context)
