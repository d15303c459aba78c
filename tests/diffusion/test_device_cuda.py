"""Issue #17 (CUDA part): what a CUDA machine would run, checked here without a GPU by faking torch.cuda's
answers (is_available, bf16 support, mem_get_info and the allocator's counters). The tiny generated checkpoint
gives real modules and real byte counts; nothing is moved to a GPU (the fake memory records the moves)."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from diffusion import attention
from diffusion.checkpoint import open_checkpoint
from diffusion.components import checkpoint_values, load_part
from diffusion.device import pick_device, pick_precision, safe_vae_dtype
from diffusion.families import FAMILIES
from diffusion.make_checkpoint import make_checkpoint
from diffusion.onednn import PackedConv2d
from diffusion.tokenizer import ClipTokenizer
from runtime.memory import GiB, MiB, TorchMemory, module_bytes
from runtime.models import ModelManager

CUDA = torch.device("cuda")


@pytest.fixture
def fake_cuda(monkeypatch):
    """A GPU with bf16 (Ampere or later) and 8 GB of which `free["bytes"]` are free; torch caches nothing."""
    free = {"bytes": 8 * GiB, "bf16": True}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: free["bf16"])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 8 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    return free


class RecordedMoves(TorchMemory):
    """The real accounting (torch.cuda's faked answers, MemAvailable) with moves recorded instead of made."""

    def __init__(self):
        self.moves: list[tuple[str, bool]] = []

    def move(self, module, device: str, *, recurse: bool = True) -> None:
        self.moves.append((device, recurse))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("cuda") / "tiny.safetensors", preset="tiny", seed=0)


def cuda_values(path):
    precision = pick_precision(pick_device())
    return checkpoint_values(open_checkpoint(path), device=CUDA, precision=precision, tokenizer=ClipTokenizer())


def test_on_cuda_the_unet_and_text_encoder_run_fp16_whole_and_the_vae_bf16(fake_cuda, tiny):
    """fp16 UNet with no fp32-kept last level (that is the CPU bf16 policy), fp16 text encoder, bf16 VAE; fp32 VAE
    on GPUs without bf16, and an SDXL VAE never fp16 even when fp16 is asked for."""
    unet, clip, vae = cuda_values(tiny)
    assert (unet.dtype, vae.dtype) == (torch.float16, torch.bfloat16)
    assert unet.handle.variant == ("float16", "cuda", ())  # no fp32 overrides
    assert clip.handle.variant == ("float16", "cuda")
    assert all(h.device == "cuda" for h in (unet.handle, clip.handle, vae.handle))
    fake_cuda["bf16"] = False
    assert cuda_values(tiny)[2].dtype == torch.float32
    assert safe_vae_dtype(torch.float16, CUDA, FAMILIES["sdxl"]) == torch.float32


def test_a_unet_for_cuda_is_channels_last_and_not_packed_for_onednn(fake_cuda, tiny):
    """Packed oneDNN weights cannot go to a GPU: a UNet that computes on CUDA but is read into RAM (to be moved
    or streamed there) keeps plain convolutions, in channels_last (what cuDNN's tensor-core kernels want)."""
    unet = open_checkpoint(tiny).unet
    module = load_part(unet, torch.float16, True, {}, "cuda:0", "cpu")
    convs = [m for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and not any(isinstance(m, PackedConv2d) for m in module.modules())
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs
               if m.weight.dim() == 4 and m.weight.shape[-1] > 1)
    assert all(p.dtype == torch.float16 for p in module.parameters())


def test_the_handles_byte_counts_are_what_the_loaded_fp16_modules_hold(fake_cuda, tiny):
    """VRAM is planned from the file's header before anything is read: those counts must be the real ones."""
    unet, clip, vae = cuda_values(tiny)
    for value in (unet, vae):
        module = value.handle.load("cpu")  # what the manager's loader builds (on the CPU here)
        assert value.handle.weight_bytes == module_bytes(module), value.handle.name
    # the text encoder's header count leaves out its int64 position ids (77 x 8 bytes), which are not weights
    assert 0 <= module_bytes(clip.handle.load("cpu")) - clip.handle.weight_bytes <= 77 * 8


def test_cuda_attention_goes_to_sdpa_not_the_cpu_bf16_kernels():
    """The sliced and batched bf16 kernels are a CPU answer to torch's slow CPU flash kernel; on CUDA SDPA picks
    flash or memory-efficient attention itself, whatever the dtype."""
    on = {name: SimpleNamespace(device=torch.device(name)) for name in ("cpu", "cuda")}
    with torch.inference_mode():
        assert attention._cpu_bf16_inference(on["cpu"], torch.bfloat16)
        assert not attention._cpu_bf16_inference(on["cpu"], torch.float32)
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            assert not attention._cpu_bf16_inference(on["cuda"], dtype)
    assert not attention._cpu_bf16_inference(on["cpu"], torch.bfloat16)  # training: autograd needs SDPA


def test_vram_planning_streams_a_unet_that_does_not_fit_and_loads_it_whole_when_it_does(fake_cuda, tiny):
    """The manager's room on cuda:0 comes from mem_get_info less the 768 MB reserve; with the UNet's real fp16
    bytes it loads it whole when it fits and streams its blocks from RAM when it does not."""
    unet = cuda_values(tiny)[0]
    handle = replace(unet.handle, load=lambda device: unet.handle.load("cpu"))  # read into RAM, moves recorded
    need = unet.handle.weight_bytes + unet.working_bytes((1, 4, 8, 8))
    fake_cuda["bytes"] = 768 * MiB + need  # exactly room for it
    memory = RecordedMoves()
    models = ModelManager(memory)
    with models.use(handle, working=unet.working_bytes((1, 4, 8, 8))):
        pass
    assert memory.moves == [("cuda:0", True)] and models.stats["streamed"] == 0
    assert models.held("cuda:0") == unet.handle.weight_bytes
    fake_cuda["bytes"] = 768 * MiB + need - 1  # one byte short
    memory = RecordedMoves()
    models = ModelManager(memory)
    with models.use(handle, working=unet.working_bytes((1, 4, 8, 8))):
        pass
    assert models.stats["streamed"] == 1 and models.where(handle) == "cpu" and models.held("cuda:0") == 0
    [why] = models.decisions("")
    assert why.startswith("streaming UNet of tiny.safetensors block by block to cuda:0")
