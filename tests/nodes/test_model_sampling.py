"""Issue #13: ModelSamplingDiscrete (prediction type and zsnr on the MODEL value) and the SDXL text-encode nodes
(ComfyUI's input names, order and defaults; the size keys on every entry)."""

from __future__ import annotations

import json
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch

from diffusion.components import DiffusionModel
from diffusion.latent import CondEntry, Conditioning
from nodes import conditioning
from nodes.model_sampling import model_sampling_discrete

from .conftest import DEFAULT_CHECKPOINT, ROOT, run_api


def fake_model():
    return DiffusionModel(handle=object(), config=None, dtype=torch.float32, source="fake")


def test_model_sampling_discrete_replaces_the_prediction_and_zsnr_and_keeps_the_weights():
    model = fake_model()
    out = model_sampling_discrete.fn(None, model, "v_prediction", True)
    assert (out.family.sampling.prediction, out.family.sampling.zsnr) == ("v_prediction", True)
    assert out.handle is model.handle and out.family.latent_scale == model.family.latent_scale
    assert model.family.sampling.prediction == "eps" and not model.family.sampling.zsnr
    assert model_sampling_discrete.fn(None, model, "lcm", False).family.sampling.prediction == "lcm"


def test_model_sampling_discrete_lists_comfyuis_options_and_refuses_img_to_img_clearly():
    assert model_sampling_discrete.inputs_by_name["sampling"].options == ("eps", "v_prediction", "lcm", "x0",
                                                                          "img_to_img")
    with pytest.raises(ValueError, match="img_to_img.*Choose eps, v_prediction, lcm or x0"):
        model_sampling_discrete.fn(None, fake_model(), "img_to_img", False)


def _graph(sampling=None, zsnr=False):
    api = json.loads((ROOT / "graphs" / "txt2img.json").read_text())
    api["4"]["inputs"]["ckpt_name"] = DEFAULT_CHECKPOINT
    api["3"]["inputs"].update(steps=2, seed=1)
    api["5"]["inputs"].update(width=64, height=64)
    if sampling is not None:
        api["20"] = {"class_type": "ModelSamplingDiscrete",
                     "inputs": {"model": ["4", 0], "sampling": sampling, "zsnr": zsnr}}
        api["3"]["inputs"]["model"] = ["20", 0]
    return api


def test_the_sampling_changes_the_samplers_key(tiny_base):
    from engine import Executor, validate
    from nodes import build_registry
    from nodes.folders import Folders
    from nodes.runtime import Runtime

    registry = build_registry(entry_points=False)
    executor = Executor(registry, resources=Runtime(Folders.at(tiny_base)))
    keys = [executor.plan(validate(_graph(*args), registry, resources=executor.resources).graph)["3"].key
            for args in ((), ("eps", False), ("v_prediction", False), ("v_prediction", True))]
    assert len(set(keys)) == 4


def test_a_v_prediction_model_samples_differently_from_eps(tiny_base):
    images = []
    for n, args in enumerate((("eps", False), ("v_prediction", True))):
        api = _graph(*args)
        api["9"]["inputs"]["filename_prefix"] = f"model_sampling_{n}"
        report, _ = run_api(api, tiny_base)
        assert "20" in report.executed and "3" in report.executed
        saved = report.ui["9"]["images"][0]
        images.append((tiny_base / "output" / saved["subfolder"] / saved["filename"]).read_bytes())
    assert images[0] != images[1]


class FakeClip:
    handle = "clip-handle"

    def encode(self, text, text_model):
        return Conditioning((CondEntry(torch.full((1, 77, 1280), float(len(text))), torch.ones(1, 1280)),))

    def encode_sdxl(self, text_g, text_l, text_model):
        return Conditioning((CondEntry(torch.full((1, 77, 2048), float(len(text_g + text_l))),
                                       torch.ones(1, 1280)),))


def fake_ctx():
    @contextmanager
    def use(handle, **_):
        yield "text-model"
    return SimpleNamespace(resources=SimpleNamespace(models=SimpleNamespace(use=use)))


def test_clip_text_encode_sdxl_inputs_and_size_keys():
    node = conditioning.clip_text_encode_sdxl
    assert node.input_names == ("clip", "width", "height", "crop_w", "crop_h", "target_width", "target_height",
                                "text_g", "text_l")
    assert [node.inputs_by_name[n].default for n in ("width", "height", "crop_w", "crop_h", "target_width",
                                                     "target_height")] == [1024, 1024, 0, 0, 1024, 1024]
    out = node.fn(fake_ctx(), FakeClip(), 832, 1216, 8, 16, 1024, 1536, "a cat", "photo")
    extra = out.to_comfy()[0][1]
    assert {k: extra[k] for k in ("width", "height", "crop_w", "crop_h", "target_width", "target_height")} == {
        "width": 832, "height": 1216, "crop_w": 8, "crop_h": 16, "target_width": 1024, "target_height": 1536}
    assert float(out.entries[0].context.mean()) == len("a catphoto")


def test_clip_text_encode_sdxl_refuses_a_single_encoder_clip():
    with pytest.raises(ValueError, match="CLIPTextEncodeSDXL needs the CLIP of an SDXL base"):
        conditioning.clip_text_encode_sdxl.fn(fake_ctx(), SimpleNamespace(handle=None), 1024, 1024, 0, 0, 1024,
                                              1024, "a", "b")


def test_clip_text_encode_sdxl_refiner_inputs_and_keys():
    node = conditioning.clip_text_encode_sdxl_refiner
    assert node.input_names == ("ascore", "width", "height", "text", "clip")
    assert node.inputs_by_name["ascore"].default == 6.0
    e = node.fn(fake_ctx(), 2.5, 1024, 768, "blurry", FakeClip()).entries[0]
    assert (e.aesthetic_score, e.width, e.height, e.crop_w) == (2.5, 1024, 768, None)


def test_sdxl_size_keys_survive_the_disk_cache_codec():
    """A stored CLIPTextEncodeSDXL result must come back with its size keys (else a cache hit changes y)."""
    from nodes.codecs import CODECS, SDXL_KEYS

    out = conditioning.clip_text_encode_sdxl.fn(fake_ctx(), FakeClip(), 832, 1216, 8, 16, 1024, 1536, "a", "b")
    refined = conditioning.clip_text_encode_sdxl_refiner.fn(fake_ctx(), 2.5, 1024, 768, "c", FakeClip())
    codec = CODECS["CONDITIONING"]
    for value in (out, refined):
        back, entry = codec.load(codec.dump(value)).entries[0], value.entries[0]
        assert [getattr(back, k) for k in SDXL_KEYS] == [getattr(entry, k) for k in SDXL_KEYS]
