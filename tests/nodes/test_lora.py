"""LoraLoader and LoraLoaderModelOnly through the executor (issue #12, LoRA): patches change the picture, strength 0
changes nothing, switching LoRAs re-uses the loaded weights and restores them exactly, the cache key follows the
file, a LoRA for another family fails before sampling naming the node and the file, unmatched keys are surfaced."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from .conftest import DEFAULT_CHECKPOINT


@pytest.fixture(scope="module")
def lora_base(tiny_base: Path) -> Path:
    from diffusion.make_lora import random_lora, write_lora

    folder = tiny_base / "models" / "loras"
    write_lora(folder / "a.safetensors", preset="tiny", seed=1, rel=2.0)
    write_lora(folder / "b.safetensors", preset="tiny", seed=2, rel=2.0)
    extra = random_lora("tiny", seed=3)
    extra["lora_unet_not_a_layer.lora_up.weight"] = torch.zeros(4, 2)
    extra["lora_unet_not_a_layer.lora_down.weight"] = torch.zeros(2, 4)
    save_file(extra, folder / "extra_keys.safetensors")
    prefix = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    save_file({f"{prefix}.lora_up.weight": torch.zeros(32, 4), f"{prefix}.lora_down.weight": torch.zeros(4, 2048),
               "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(5120, 4),
               "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 1280)},
              folder / "sdxl_style.safetensors")
    return tiny_base


def graph(*loras: tuple[str, float, float], model_only: bool = False) -> dict:
    """checkpoint -> LoRAs in order -> encode -> KSampler -> decode, output the image (PreviewImage-free)."""
    api = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": DEFAULT_CHECKPOINT}}}
    model, clip = ["1", 0], ["1", 1]
    for i, (name, strength_model, strength_clip) in enumerate(loras):
        node = f"l{i}"
        if model_only:
            api[node] = {"class_type": "LoraLoaderModelOnly",
                         "inputs": {"model": model, "lora_name": name, "strength_model": strength_model}}
            model = [node, 0]
        else:
            api[node] = {"class_type": "LoraLoader",
                         "inputs": {"model": model, "clip": clip, "lora_name": name, "strength_model": strength_model,
                                    "strength_clip": strength_clip}}
            model, clip = [node, 0], [node, 1]
    api |= {
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": clip}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": clip}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": model, "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "seed": 3, "steps": 3, "cfg": 4.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
    }
    return api


def run(api: dict, runtime, registry):
    """A fresh executor (no output cache) on a shared runtime (one model manager): returns the report."""
    from engine import Executor, validate

    result = validate(api, registry, resources=runtime, targets=["6"])
    assert result.ok, [str(e) for e in result.errors]
    return Executor(registry, resources=runtime).run(result.graph)


@pytest.fixture(scope="module")
def session(lora_base):
    from nodes import build_registry
    from nodes.folders import Folders
    from nodes.runtime import Runtime

    return Runtime(Folders.at(lora_base), dtype="fp32"), build_registry(entry_points=False)


def image(report) -> torch.Tensor:
    assert report.error is None, report.error and report.error.traceback
    return report.outputs["6"][0][0]


def test_switching_loras_reuses_the_loaded_weights_and_restores_them_exactly(session):
    runtime, registry = session
    plain = image(run(graph(), runtime, registry))
    loads = runtime.models.stats["loads"]
    with_a = image(run(graph(("a.safetensors", 1.0, 1.0)), runtime, registry))
    with_b = image(run(graph(("b.safetensors", 1.0, 1.0)), runtime, registry))
    again = image(run(graph(), runtime, registry))
    assert runtime.models.stats["loads"] == loads  # no part of the checkpoint was read again
    assert runtime.models.stats["patch_sets"] >= 3
    assert not torch.equal(with_a, plain) and not torch.equal(with_b, with_a)
    assert torch.equal(again, plain)


def test_zero_strengths_are_a_no_op_and_negative_strengths_differ(session):
    runtime, registry = session
    plain = image(run(graph(), runtime, registry))
    zero = image(run(graph(("a.safetensors", 0.0, 0.0)), runtime, registry))
    assert torch.equal(zero, plain)
    negative = image(run(graph(("a.safetensors", -1.0, -1.0)), runtime, registry))
    positive = image(run(graph(("a.safetensors", 1.0, 1.0)), runtime, registry))
    assert not torch.equal(negative, plain) and not torch.equal(negative, positive)


def test_stacked_loras_apply_both(session):
    runtime, registry = session
    a = image(run(graph(("a.safetensors", 1.0, 1.0)), runtime, registry))
    both = image(run(graph(("a.safetensors", 1.0, 1.0), ("b.safetensors", 1.0, 1.0)), runtime, registry))
    assert not torch.equal(both, a)


def test_model_only_leaves_clip_alone(session):
    runtime, registry = session
    report = run(graph(("a.safetensors", 1.0, 1.0), model_only=True), runtime, registry)
    clip_side = image(run(graph(("a.safetensors", 0.0, 1.0)), runtime, registry))
    model_side = image(run(graph(("a.safetensors", 1.0, 0.0)), runtime, registry))
    assert torch.equal(image(report), model_side)
    assert not torch.equal(image(report), clip_side)


def test_the_cache_key_follows_the_lora_file(session, lora_base):
    from diffusion.make_lora import write_lora

    runtime, registry = session
    definition = registry.get("LoraLoader")
    before = definition.fingerprint(runtime, lora_name="a.safetensors")
    path = lora_base / "models" / "loras" / "a.safetensors"
    stat = path.stat()
    write_lora(path, preset="tiny", seed=9, rel=2.0)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    try:
        assert definition.fingerprint(runtime, lora_name="a.safetensors") != before
    finally:
        write_lora(path, preset="tiny", seed=1, rel=2.0)


def test_a_lora_for_another_family_fails_before_sampling_naming_node_and_file(session):
    runtime, registry = session
    report = run(graph(("sdxl_style.safetensors", 1.0, 1.0)), runtime, registry)
    assert report.error is not None
    assert report.error.node_id == "l0"
    message = report.error.message
    assert "LoraLoader" in message and "sdxl_style.safetensors" in message and "SDXL" in message


def test_unmatched_keys_are_surfaced_in_the_ui_output(session):
    runtime, registry = session
    api = graph(("extra_keys.safetensors", 1.0, 1.0))
    report = run(api, runtime, registry)
    image(report)
    assert report.ui["l0"]["lora_unmatched_keys"] == ["lora_unet_not_a_layer.lora_down.weight",
                                                      "lora_unet_not_a_layer.lora_up.weight"]


def test_a_lora_patches_a_unet_stored_in_fp8_and_comes_off_exactly(session, lora_base):
    """UNETLoader weight_dtype fp8: the LoRA adds to the fp8 layers' output (or their cast weights), and removing
    it gives the plain fp8 image back bit for bit."""
    from safetensors.torch import load_file

    runtime, registry = session
    folder = lora_base / "models" / "diffusion_models"
    folder.mkdir(parents=True, exist_ok=True)
    state = load_file(str(lora_base / "models" / "checkpoints" / DEFAULT_CHECKPOINT))
    save_file({k.removeprefix("model.diffusion_model."): v for k, v in state.items()
               if k.startswith("model.diffusion_model.")}, str(folder / "fp8.safetensors"))

    def fp8_graph(*loras):
        api = graph(*loras, model_only=True)
        api["u"] = {"class_type": "UNETLoader", "inputs": {"unet_name": "fp8.safetensors",
                                                            "weight_dtype": "fp8_e4m3fn"}}
        first = next((n for n in api if n.startswith("l")), "5")
        api[first]["inputs"]["model"] = ["u", 0]
        return api

    plain = image(run(fp8_graph(), runtime, registry))
    patched = image(run(fp8_graph(("a.safetensors", 1.0, 1.0)), runtime, registry))
    again = image(run(fp8_graph(), runtime, registry))
    assert not torch.equal(patched, plain) and torch.equal(again, plain)


@pytest.fixture(scope="module")
def sdxl_session(lora_base):
    """SDXL base (tiny): a kohya LoRA with lora_unet_, lora_te1_ (CLIP-L) and lora_te2_ (bigG) keys, and one with
    only its lora_te1_ keys."""
    from safetensors.torch import load_file

    from diffusion.make_checkpoint import make_checkpoint
    from diffusion.make_lora import write_lora
    from nodes import build_registry
    from nodes.folders import Folders
    from nodes.runtime import Runtime

    make_checkpoint(lora_base / "models" / "checkpoints" / "xl.safetensors", preset="sdxl-tiny", seed=0)
    loras = lora_base / "models" / "loras"
    write_lora(loras / "xl.safetensors", preset="sdxl-tiny", seed=1, rel=2.0)
    save_file({k: v for k, v in load_file(str(loras / "xl.safetensors")).items() if k.startswith("lora_te1_")},
              loras / "xl_te1.safetensors")
    return Runtime(Folders.at(lora_base), dtype="fp32"), build_registry(entry_points=False)


def sdxl_conditioning(session, lora: str | None):
    """Node 2's conditioning: CLIP-L's 32 context channels, then bigG's 64; the pooled vector is bigG's."""
    from engine import Executor, validate

    runtime, registry = session
    api = graph(*([(lora, 1.0, 1.0)] if lora else []))
    api["1"]["inputs"]["ckpt_name"] = "xl.safetensors"
    result = validate(api, registry, resources=runtime, targets=["2"])
    assert result.ok, [str(e) for e in result.errors]
    report = Executor(registry, resources=runtime).run(result.graph)
    assert report.error is None, report.error and report.error.traceback
    assert "l0" not in (report.ui or {})  # every key of the LoRA matched a layer
    entry = report.outputs["2"][0][0].entries[0]
    return entry.context[..., :32], entry.context[..., 32:], entry.pooled


def test_an_sdxl_lora_patches_each_text_encoder_its_keys_name_and_comes_off_exactly(sdxl_session):
    plain_l, plain_g, plain_pooled = sdxl_conditioning(sdxl_session, None)
    both_l, both_g, both_pooled = sdxl_conditioning(sdxl_session, "xl.safetensors")
    te1_l, te1_g, te1_pooled = sdxl_conditioning(sdxl_session, "xl_te1.safetensors")
    again = sdxl_conditioning(sdxl_session, None)
    assert not torch.equal(both_l, plain_l) and not torch.equal(both_g, plain_g)
    assert not torch.equal(both_pooled, plain_pooled)
    assert torch.equal(te1_l, both_l) and torch.equal(te1_g, plain_g) and torch.equal(te1_pooled, plain_pooled)
    assert all(torch.equal(a, b) for a, b in zip(again, (plain_l, plain_g, plain_pooled), strict=True))


def test_an_sdxl_lora_patches_the_unet(sdxl_session):
    runtime, registry = sdxl_session

    def picture(*loras):
        api = graph(*loras)
        api["1"]["inputs"]["ckpt_name"] = "xl.safetensors"
        return image(run(api, runtime, registry))

    plain = picture()
    assert not torch.equal(picture(("xl.safetensors", 1.0, 0.0)), plain)
    assert torch.equal(picture(), plain)
