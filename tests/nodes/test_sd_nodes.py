"""The SD node set through the real registry, validator and executor, on a tiny generated checkpoint."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from engine import Progress, validate
from nodes import build_registry
from nodes.folders import Folders
from nodes.runtime import Runtime

from .conftest import DEFAULT_CHECKPOINT, run_api


def txt2img(width=64, height=64, steps=2, **ksampler):
    return {
        "1": {"class_type": "LoadCheckpoint", "inputs": {"ckpt_name": DEFAULT_CHECKPOINT}},
        "2": {"class_type": "CLIPEncode", "inputs": {"text": "a red circle", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"seed": 1, "steps": steps, "cfg": 5.0, "sampler_name": "euler",
                                                   "scheduler": "normal", "denoise": 1.0, "model": ["1", 0],
                                                   "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], **ksampler}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
    }


def check(api, base):
    registry = build_registry(entry_points=False)
    return validate(api, registry, resources=Runtime(Folders.at(base)))


def test_node_modules_do_not_import_torch():
    import subprocess
    code = "import sys, nodes; r = nodes.build_registry(entry_points=False); assert 'torch' not in sys.modules; " \
           "print(len(r))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout) >= 29


def test_sizes_must_be_multiples_of_8_before_anything_runs(tiny_base):
    result = check(txt2img(width=100), tiny_base)
    assert [(e.code, e.node_id) for e in result.errors] == [("custom_validation_failed", "4")]
    assert "width 100 is not a multiple of 8; use 96 or 104" in result.errors[0].message


def test_unknown_checkpoint_lists_the_available_files(tiny_base):
    api = txt2img()
    api["1"]["inputs"]["ckpt_name"] = "missing.safetensors"
    (error,) = check(api, tiny_base).errors
    assert (error.code, error.node_id, error.input_name) == ("value_not_in_list", "1", "ckpt_name")
    assert DEFAULT_CHECKPOINT in error.message


def test_bad_sampler_and_seed_range(tiny_base):
    api = txt2img(sampler_name="euler_fast", seed=2**64)
    codes = sorted((e.code, e.input_name) for e in check(api, tiny_base).errors)
    assert codes == [("value_bigger_than_max", "seed"), ("value_not_in_list", "sampler_name")]


def test_txt2img_reports_progress_per_step(tiny_base):
    events = []
    registry = build_registry(entry_points=False)
    runtime = Runtime(Folders.at(tiny_base))
    from engine import Executor
    result = validate(txt2img(steps=3), registry, resources=runtime)
    report = Executor(registry, resources=runtime).run(result.graph, listeners=[events.append])
    assert report.ok, report.error
    steps = [(e.value, e.max) for e in events if isinstance(e, Progress) and e.node_id == "5"]
    assert steps == [(1, 3), (2, 3), (3, 3)]


def test_same_seed_same_latent_different_seed_differs(tiny_base):
    def latent(seed):
        api = txt2img(seed=seed)
        registry = build_registry(entry_points=False)
        runtime = Runtime(Folders.at(tiny_base))
        from engine import Executor
        graph = validate(api, registry, targets=["5"], resources=runtime).graph
        return Executor(registry, resources=runtime).run(graph).outputs["5"][0][0].samples

    a, b, c = latent(3), latent(3), latent(4)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_clip_set_last_layer_changes_conditioning_and_refuses_too_deep(tiny_base):
    def encode(layer):
        api = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": DEFAULT_CHECKPOINT}},
               "2": {"class_type": "CLIPSetLastLayer", "inputs": {"clip": ["1", 1], "stop_at_clip_layer": layer}},
               "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["2", 0]}}}
        registry = build_registry(entry_points=False)
        runtime = Runtime(Folders.at(tiny_base))
        from engine import Executor
        return Executor(registry, resources=runtime).run(
            validate(api, registry, targets=["3"], resources=runtime).graph)

    last, skip = encode(-1), encode(-2)
    assert last.ok and skip.ok
    a, b = last.outputs["3"][0][0].entries[0].context, skip.outputs["3"][0][0].entries[0].context
    assert a.shape == b.shape == (1, 77, 32)
    assert not torch.allclose(a, b)
    too_deep = encode(-5)
    assert too_deep.error is not None and "has 2 layers" in too_deep.error.message


def test_conditioning_combine_keeps_both_entries(tiny_base):
    from diffusion.latent import CondEntry, Conditioning
    from nodes.conditioning import conditioning_combine
    one = Conditioning((CondEntry(torch.zeros(1, 77, 8)),))
    two = Conditioning((CondEntry(torch.ones(1, 77, 8), strength=0.5),))
    combined = conditioning_combine.fn(None, one, two)
    assert [e.strength for e in combined.entries] == [1.0, 0.5]


def test_vae_encode_crops_to_multiple_of_8_and_round_trips_shape(tiny_base):
    api = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": DEFAULT_CHECKPOINT}},
           "2": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
           "3": {"class_type": "ImageScale", "inputs": {"image": ["2", 0], "upscale_method": "bilinear",
                                                        "width": 70, "height": 61, "crop": "disabled"}},
           "4": {"class_type": "VAEEncode", "inputs": {"pixels": ["3", 0], "vae": ["1", 2]}},
           "5": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["1", 2]}}}
    registry = build_registry(entry_points=False)
    runtime = Runtime(Folders.at(tiny_base))
    from engine import Executor
    report = Executor(registry, resources=runtime).run(validate(api, registry, targets=["5"],
                                                                resources=runtime).graph)
    assert report.ok, report.error
    image = report.outputs["5"][0][0]
    assert image.shape == (1, 56, 64, 3)
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0


def test_vae_encode_for_inpaint_greys_masked_pixels_and_grows_mask(tmp_path):
    from types import SimpleNamespace

    from nodes.latent import vae_encode_for_inpaint
    from runtime.models import ModelHandle

    seen = {}

    class FakeVae:
        downscale = 8
        handle = ModelHandle("fake-vae", load=lambda device: torch.nn.Identity())

        def encode_working_bytes(self, shape):
            return 0

        def encode(self, pixels, network):
            seen["pixels"], seen["network"] = pixels, network
            return torch.zeros(pixels.shape[0], 4, pixels.shape[1] // 8, pixels.shape[2] // 8)

    pixels = torch.zeros(1, 16, 16, 3)
    mask = torch.zeros(1, 16, 16)
    mask[0, 8, 8] = 1.0
    ctx = SimpleNamespace(resources=Runtime(Folders.at(tmp_path)))
    latent = vae_encode_for_inpaint.fn(ctx, pixels, FakeVae(), mask, 2)
    assert isinstance(seen["network"], torch.nn.Identity)  # borrowed from the runtime's model manager
    assert float(seen["pixels"][0, 8, 8, 0]) == 0.5 and float(seen["pixels"][0, 0, 0, 0]) == 0.0
    grown = latent.noise_mask[0, 0]
    assert grown.shape == (16, 16)
    # ComfyUI's growth by 2: a 2x2 box with padding 1, cut to size: one pixel down and right (issue #12)
    assert float(grown[8:10, 8:10].min()) == 1.0 and float(grown.sum()) == 4.0


def test_set_latent_noise_mask_reshapes_to_batch_channel():
    from diffusion.latent import Latent
    from nodes.latent import set_latent_noise_mask
    latent = set_latent_noise_mask.fn(None, Latent(torch.zeros(1, 4, 8, 8)), torch.ones(64, 64))
    assert latent.noise_mask.shape == (1, 1, 64, 64)


def test_vae_loader_replaces_the_checkpoint_vae(tiny_base: Path, tmp_path: Path):
    from safetensors.torch import load_file, save_file

    state = load_file(str(tiny_base / "models" / "checkpoints" / DEFAULT_CHECKPOINT))
    vae_only = {k.removeprefix("first_stage_model."): v for k, v in state.items()
                if k.startswith("first_stage_model.")}
    (tiny_base / "models" / "vae").mkdir(parents=True, exist_ok=True)
    save_file(vae_only, str(tiny_base / "models" / "vae" / "tiny-vae.safetensors"))
    api = txt2img()
    api["8"] = {"class_type": "VAELoader", "inputs": {"vae_name": "tiny-vae.safetensors"}}
    api["6"]["inputs"]["vae"] = ["8", 0]
    report, _ = run_api(api, tiny_base)
    assert report.ok


@pytest.mark.slow
def test_full_size_sd15_checkpoint_runs_one_step(tmp_path: Path, link_sd15):
    """A generated checkpoint with the full SD1.5 shapes loads and samples one 64x64 step through the graph."""
    link_sd15(tmp_path, DEFAULT_CHECKPOINT)
    report, runtime = run_api(txt2img(steps=1), tmp_path)
    (item,) = report.ui["7"]["images"]
    assert (runtime.folders.root("temp") / item["subfolder"] / item["filename"]).is_file()
