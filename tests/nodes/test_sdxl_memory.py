"""Issue #13 (memory) with the real SDXL code: the full-size numbers the manager's plans use
(tests/fixtures/sdxl_full_size.json) are SDXL's; a tiny SDXL UNet streamed block by block computes what it computes
whole; and `run --explain` on the SDXL graph says why the text encoders were unloaded before sampling."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from nodes.folders import Folders
from nodes.runtime import Runtime

ROOT = Path(__file__).resolve().parents[2]
FULL = json.loads((ROOT / "tests" / "fixtures" / "sdxl_full_size.json").read_text())
SDXL = "sd_xl_base_1.0.safetensors"


@pytest.fixture(scope="module")
def sdxl_base(tmp_path_factory) -> Path:
    from diffusion.make_checkpoint import make_checkpoint

    base = tmp_path_factory.mktemp("sdxl")
    make_checkpoint(base / "models" / "checkpoints" / SDXL, preset="sdxl-tiny", seed=0)
    return base


def test_the_full_size_plan_numbers_are_sdxls():
    from diffusion import components
    from diffusion.make_checkpoint import checkpoint_layout

    params = {"text": 0, "unet": 0, "vae": 0}
    for key, (_, shape) in checkpoint_layout("sdxl").items():
        part = ("unet" if key.startswith("model.diffusion_model.") else
                "vae" if key.startswith("first_stage_model.") else "text")
        params[part] += math.prod(shape)
    assert params == FULL["params"]
    latent = (1, 4, 128, 128)  # 1024 x 1024
    unet = components.DiffusionModel.working_bytes(SimpleNamespace(), latent, 2)
    vae = components.ImageAutoencoder.decode_working_bytes(SimpleNamespace(dtype=torch.float32), latent)
    assert {"unet": unet, "vae_decode_fp32": vae} == FULL["working_1024"]


class PoisonedHome:
    """Device accounting in which weights at home ("cpu") are NaN and only weights moved to "cuda:0" are real: a
    streamed call that computes with any weight it did not move first returns NaN."""

    def __init__(self):
        self.real: dict[int, torch.Tensor] = {}

    def free(self, device: str) -> int:
        return 1 << 40

    def move(self, module, device: str, *, recurse: bool = True) -> None:
        for tensor in [*module.parameters(recurse=recurse), *module.buffers(recurse=recurse)]:
            if not tensor.is_floating_point():
                continue
            real = self.real.setdefault(id(tensor), tensor.data.clone())
            tensor.data = real.clone() if device == "cuda:0" else torch.full_like(real, float("nan"))

    def release(self, device: str) -> None:
        pass

    def settle(self, device: str) -> None:
        pass


def test_a_streamed_sdxl_unet_computes_what_it_computes_whole(sdxl_base):
    """lowvram: the SDXL UNet (label embedding, deeper transformer levels) of a GPU run, kept in RAM and streamed to
    a GPU that cannot hold it, uses every weight only after moving it there. (Before: a UNet kept in RAM to stream
    had its convolutions packed for oneDNN, which cannot move to a GPU.)"""
    from diffusion.checkpoint import open_checkpoint
    from diffusion.components import model_value
    from diffusion.device import pick_precision
    from runtime.models import ModelManager

    runtime = Runtime(Folders.at(sdxl_base), dtype="fp32")
    layout = open_checkpoint(sdxl_base / "models" / "checkpoints" / SDXL)
    precision = pick_precision(torch.device("cpu"), "fp32")
    on_cpu = model_value(layout.unet, layout.family, device=torch.device("cpu"), precision=precision)
    on_gpu = model_value(layout.unet, layout.family, device=torch.device("cuda:0"), precision=precision)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 2816, generator=g)
    context, t = torch.randn(2, 77, 96, generator=g), torch.tensor([999.0, 400.0])
    with runtime.models.use(on_cpu.handle) as unet:
        whole = on_cpu.forward_function(unet)(x, t, context, y=y)
    small = ModelManager(PoisonedHome(), budgets={"cuda": on_gpu.handle.weight_bytes // 3},
                         reserves={"cpu": 0, "cuda": 0})
    with small.use(on_gpu.handle) as unet:  # (computed on the CPU here: the fake GPU is the poison's antidote)
        assert not any(t.layout != torch.strided for t in unet.buffers()), "packed weights cannot go to a GPU"
        streamed = on_cpu.forward_function(unet)(x, t, context, y=y)
    assert small.stats["streamed"] == 1
    assert torch.isfinite(streamed).all() and torch.allclose(streamed, whole, rtol=1e-4, atol=1e-5)


def test_explain_says_the_text_encoders_were_unloaded_before_sampling(sdxl_base):
    from nodes.loaders import checkpoint_loader

    runtime = Runtime(Folders.at(sdxl_base))
    model, clip, vae = checkpoint_loader.fn(SimpleNamespace(resources=runtime), SDXL)
    latent = (1, 4, 8, 8)
    sampling = model.handle.weight_bytes + model.working_bytes(latent, 2)
    budget = sampling + clip.handle.weight_bytes // 2  # holds the UNet and its working memory, not the encoders too
    api = json.loads((ROOT / "graphs" / "sdxl_txt2img.json").read_text())
    api["5"]["inputs"].update(width=64, height=64)
    api["3"]["inputs"]["steps"] = 2
    graph = sdxl_base / "graph.json"
    graph.write_text(json.dumps(api))
    done = subprocess.run([sys.executable, "-c", "import sys, cli; sys.exit(cli.main())", "run", str(graph),
                           "--base-dir", str(sdxl_base), "--ram-budget", str(budget), "--explain", "--no-disk-cache"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    memory = [line for line in done.stderr.splitlines() if line.startswith("node 3 (KSampler): memory: ")]
    assert len(memory) == 1, done.stderr
    assert memory[0].startswith("node 3 (KSampler): memory: unloaded CLIP-L (OpenAI CLIP ViT-L/14) of "
                                "sd_xl_base_1.0.safetensors + "), memory
    assert "to make room for UNet of sd_xl_base_1.0.safetensors, which needs" in memory[0]
