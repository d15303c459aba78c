import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from diffusion.checkpoint import (
    CheckpointError,
    FileIdentity,
    detect_format,
    load_checkpoint,
    load_vae,
    read_state_dict,
)
from diffusion.make_checkpoint import make_checkpoint, random_state_dict
from diffusion.text_encoder import build_text_encoder
from diffusion.unet import build_unet
from diffusion.vae import build_vae

ROOT = Path(__file__).resolve().parents[2]
UNET, VAE, TEXT = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."
IDS = torch.tensor([[49406, 320, 1125, 49407] + [49407] * 73])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors", preset="tiny", seed=0)


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    return random_state_dict("tiny", seed=0)


def save(sd, path) -> Path:
    save_file({k: v.contiguous() for k, v in sd.items()}, path)
    return path


def outputs(unet, vae, text_encoder) -> list[torch.Tensor]:
    """One call of each network on fixed inputs."""
    g = torch.Generator().manual_seed(0)
    dtype = next(unet.parameters()).dtype
    latent = torch.randn(1, 4, 8, 8, generator=g).to(dtype)
    context = torch.randn(1, 77, unet.config.context_dim, generator=g).to(dtype)
    with torch.no_grad():
        return [
            unet(latent, torch.tensor([500.0]), context),
            vae.decode(latent),
            vae.encode(torch.rand(1, 3, 64, 64, generator=g).to(dtype) * 2 - 1),
            text_encoder(IDS).last_hidden_state,
        ]


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor]):
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def part(sd, prefix):
    return {k.removeprefix(prefix): v for k, v in sd.items() if k.startswith(prefix)}


def test_loads_the_tiny_checkpoint(tiny):
    ckpt = load_checkpoint(tiny)
    assert ckpt.unet_config.model_channels == 32 and ckpt.unet_config.context_dim == 32
    assert ckpt.vae_config.downscale == 8 and ckpt.text_config.hidden_size == 32
    assert ckpt.file == FileIdentity(tiny.resolve(), tiny.stat().st_size, tiny.stat().st_mtime_ns)
    assert ckpt.vae_file is None
    for module in (ckpt.unet, ckpt.vae, ckpt.text_encoder):
        assert not module.training
        params = list(module.parameters())
        assert all(p.dtype == torch.float32 and p.device.type == "cpu" and not p.requires_grad for p in params)
    assert all(not b.is_meta for b in ckpt.text_encoder.buffers())


def test_file_and_memory_give_identical_outputs(tiny, tiny_state):
    ckpt = load_checkpoint(tiny)
    sd = {k: v.float() if v.is_floating_point() else v for k, v in tiny_state.items()}
    in_memory = build_unet(part(sd, UNET)), build_vae(part(sd, VAE)), build_text_encoder(part(sd, TEXT))
    assert_same(outputs(ckpt.unet, ckpt.vae, ckpt.text_encoder), outputs(*in_memory))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_loads_in_half_precision(tiny, dtype):
    ckpt = load_checkpoint(tiny, dtype=dtype)
    assert {p.dtype for m in (ckpt.unet, ckpt.vae, ckpt.text_encoder) for p in m.parameters()} == {dtype}
    assert all(o.dtype == dtype and torch.isfinite(o).all() for o in outputs(ckpt.unet, ckpt.vae, ckpt.text_encoder))


def _parts(ckpt):
    return ckpt.unet, ckpt.vae, ckpt.text_encoder


def test_leftovers_and_old_text_layout_are_accepted(tiny, tiny_state, tmp_path):
    sd = {k.replace(f"{TEXT}text_model.", TEXT): v for k, v in tiny_state.items() if "position_ids" not in k}
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd["model_ema.diffusion_modelout2weight"] = torch.zeros(3)
    sd["alphas_cumprod"] = torch.linspace(1, 0, 1000)
    ckpt = load_checkpoint(save(sd, tmp_path / "old.safetensors"))
    assert_same(outputs(*_parts(ckpt)), outputs(*_parts(load_checkpoint(tiny))))


def test_reading_in_small_chunks_changes_nothing(tiny, monkeypatch):
    """The tiny file fits one chunk; with 4 kB chunks most tensors share a run and big ones get their own."""
    import diffusion.tensor_file as checkpoint_module

    want = outputs(*_parts(load_checkpoint(tiny)))
    monkeypatch.setattr(checkpoint_module, "CHUNK_BYTES", 4096)
    chunks = checkpoint_module.TensorFile(tiny)._chunks(list(checkpoint_module.TensorFile(tiny).meta))
    assert len(chunks) > 50 and any(len(c) == 1 for c in chunks) and any(len(c) > 5 for c in chunks)
    assert_same(outputs(*_parts(load_checkpoint(tiny))), want)


def test_weights_do_not_alias_the_file(tiny_state, tmp_path):
    """Same dtype in file and memory is the zero-conversion path: the model must still own its memory."""
    path = save({k: v.float() if v.is_floating_point() else v for k, v in tiny_state.items()}, tmp_path / "f32.st")
    ckpt = load_checkpoint(path)
    before = outputs(*_parts(ckpt))
    size = path.stat().st_size
    with open(path, "r+b") as f:  # overwrite the tensor data in place (keep the header)
        f.seek(int.from_bytes(path.read_bytes()[:8], "little") + 8)
        f.write(b"\0" * (size - f.tell()))
    assert_same(before, outputs(*_parts(ckpt)))


def test_format_comes_from_bytes_not_the_name(tiny, tmp_path):
    renamed = tmp_path / "model.ckpt"
    renamed.write_bytes(tiny.read_bytes())
    assert detect_format(renamed) == "safetensors"
    assert load_checkpoint(renamed).unet_config.model_channels == 32

    pickled = tmp_path / "model.safetensors"
    torch.save({"state_dict": read_state_dict(tiny)}, pickled)
    assert detect_format(pickled) == "torch-zip"
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(pickled)
    message = str(e.value)
    for needed in (str(pickled), "pickle", "run code", "allow_pickle=True", "safetensors"):
        assert needed in message


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_pickle_loads_when_allowed(tiny, tmp_path, zip_format):
    state = read_state_dict(tiny)
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": state, "global_step": 470000}, path, _use_new_zipfile_serialization=zip_format)
    assert detect_format(path) == ("torch-zip" if zip_format else "pickle")
    assert_same(outputs(*_parts(load_checkpoint(path, allow_pickle=True))), outputs(*_parts(load_checkpoint(tiny))))
    assert read_state_dict(path, allow_pickle=True).keys() == state.keys()


class NotATensor:
    pass


def test_pickled_objects_are_refused_even_when_allowed(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "callback": NotATensor()}, path)
    with pytest.raises(CheckpointError, match="weights-only"):
        read_state_dict(path, allow_pickle=True)


@pytest.mark.parametrize(
    "content, match",
    [(b"", "not a checkpoint format"), (b"<html>404 Not Found</html>", "not a checkpoint format")],
)
def test_garbage_is_refused(tmp_path, content, match):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path)


def test_corrupt_header_is_named(tmp_path):
    path = tmp_path / "bad.safetensors"
    header = b'{"x": {"dtype": "F16"}}'
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 16)
    with pytest.raises(CheckpointError, match="corrupt safetensors header entry for 'x'"):
        read_state_dict(path)


def test_truncated_download_is_named(tiny, tmp_path):
    path = tmp_path / "cut.safetensors"
    path.write_bytes(tiny.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        load_checkpoint(tmp_path / "nothing.safetensors")
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        read_state_dict(tmp_path / "nothing.safetensors")
    (tmp_path / "diffusers_model").mkdir()
    with pytest.raises(CheckpointError, match="is a folder"):
        load_vae(tmp_path / "diffusers_model")


def test_read_state_dict_keeps_file_dtypes(tiny, tiny_state):
    sd = read_state_dict(tiny)
    assert sd.keys() == tiny_state.keys()
    assert all(torch.equal(sd[k], tiny_state[k]) and sd[k].dtype == tiny_state[k].dtype for k in sd)


def test_missing_keys_are_named_and_counted(tiny_state, tmp_path):
    dropped = [k for k in tiny_state if k.startswith(UNET + "output_blocks.")]
    sd = {k: v for k, v in tiny_state.items() if k not in dropped}
    path = save(sd, tmp_path / "broken.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    message = str(e.value)
    assert str(path) in message and f"{len(dropped)} missing" in message and UNET + "output_blocks.0.0." in message


def test_shape_mismatch_and_unexpected_keys_are_named(tiny_state, tmp_path):
    sd = dict(tiny_state)
    key = TEXT + "text_model.final_layer_norm.weight"
    sd[key] = torch.ones(33, dtype=torch.float16)
    with pytest.raises(CheckpointError, match=rf"{key} \(model needs \[32\], file has \[33\]\)"):
        load_checkpoint(save(sd, tmp_path / "a.safetensors"))
    sd[key] = tiny_state[key]
    sd[UNET + "input_blocks.0.1.weight"] = torch.zeros(4, 4, dtype=torch.float16)
    with pytest.raises(CheckpointError, match=r"1 unexpected: model\.diffusion_model\.input_blocks\.0\.1\.weight"):
        load_checkpoint(save(sd, tmp_path / "b.safetensors"))


def test_other_model_families_are_named(tmp_path):
    sdxl = {"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.zeros(2),
            "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3)}  # fmt: skip
    with pytest.raises(CheckpointError, match="no UNet of a known family.*Supported families: SD1.x.*SDXL base"):
        load_checkpoint(save(sdxl, tmp_path / "sdxl.safetensors"))
    with pytest.raises(CheckpointError, match="keys start with alpha, beta"):
        load_checkpoint(save({"alpha": torch.zeros(1), "beta.x": torch.zeros(1)}, tmp_path / "x.safetensors"))


def test_parts_from_different_models_are_refused(tiny_state, tmp_path):
    sd = dict(tiny_state)
    for k, v in tiny_state.items():  # a UNet that attends to 48-wide text features
        if ".attn2.to_k." in k or ".attn2.to_v." in k:
            sd[k] = torch.zeros(v.shape[0], 48, dtype=v.dtype)
    with pytest.raises(CheckpointError, match="48-wide text features but the text encoder emits 32"):
        load_checkpoint(save(sd, tmp_path / "mixed.safetensors"))


def test_separate_vae_files(tiny, tiny_state, tmp_path):
    other = random_state_dict("tiny", seed=7)
    bare = save(part(other, VAE), tmp_path / "bare_vae.safetensors")
    prefixed = save({k: v for k, v in other.items() if k.startswith(VAE)}, tmp_path / "prefixed_vae.pt")
    want = build_vae({k: v.float() for k, v in part(other, VAE).items()})
    latent = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for path in (bare, prefixed):
            assert torch.equal(load_vae(path).decode(latent), want.decode(latent))

        no_vae = save({k: v for k, v in tiny_state.items() if not k.startswith(VAE)}, tmp_path / "no_vae.safetensors")
        with pytest.raises(CheckpointError, match="vae_path"):
            load_checkpoint(no_vae)
        for checkpoint in (no_vae, tiny):
            ckpt = load_checkpoint(checkpoint, vae_path=bare)
            assert ckpt.vae_file.path == bare.resolve()
            assert torch.equal(ckpt.vae.decode(latent), want.decode(latent))


def test_diffusers_layout_vae_is_refused(tmp_path):
    path = save({"encoder.down_blocks.0.resnets.0.conv1.weight": torch.zeros(1)}, tmp_path / "vae.safetensors")
    with pytest.raises(CheckpointError, match="diffusers-layout VAE"):
        load_vae(path)


# --- full size -----------------------------------------------------------------------------------------------

LOAD_AND_RUN = textwrap.dedent("""
    import json, resource, sys, time
    import torch
    from diffusion.checkpoint import load_checkpoint
    def peak_rss():
        # VmHWM is this process's own high-water mark. getrusage's ru_maxrss is not: Linux carries the
        # parent's (pytest's) peak across fork/exec into it, so it can only be used where /proc is missing.
        try:
            line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
            return int(line.split()[1]) * 1024
        except OSError:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    dtype = getattr(torch, sys.argv[2])
    start = time.perf_counter()
    ckpt = load_checkpoint(sys.argv[1], dtype=dtype)
    report = {"load_s": time.perf_counter() - start,
              "peak_rss": peak_rss(),
              "weight_bytes": sum(p.numel() * p.element_size() for m in (ckpt.unet, ckpt.vae, ckpt.text_encoder)
                                  for p in m.parameters())}
    if dtype == torch.float32:
        g = torch.Generator().manual_seed(0)
        latent, context = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 768, generator=g)
        with torch.no_grad():
            for name in ("unet_first_s", "unet_s"):
                start = time.perf_counter()
                eps = ckpt.unet(latent, torch.tensor([999.0]), context)
                report[name] = time.perf_counter() - start
            start = time.perf_counter()
            pixels = ckpt.vae.decode(latent)
            report["decode_s"] = time.perf_counter() - start
        report.update(eps_shape=list(eps.shape), eps_std=eps.std().item(), pixels_shape=list(pixels.shape),
                      pixels_std=pixels.std().item(),
                      finite=bool(torch.isfinite(eps).all() and torch.isfinite(pixels).all()))
    print(json.dumps(report))
""")


@pytest.fixture(scope="module")
def sd15(sd15_checkpoint) -> Path:
    return sd15_checkpoint  # tests/conftest.py makes it once for every full-size test


def load_in_subprocess(path: Path, dtype: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", LOAD_AND_RUN, str(path), dtype], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    print(dtype, report)
    return report


@pytest.fixture(scope="module")
def sd15_fp32_run(sd15) -> dict:
    return load_in_subprocess(sd15, "float32")


@pytest.mark.slow
def test_sd15_preset_is_the_parity_reference_file(sd15):
    import hashlib

    digest = hashlib.sha256()
    with open(sd15, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    assert digest.hexdigest() == (ROOT / "tests/fixtures/sd15_random_seed1.sha256").read_text().split()[0]


@pytest.mark.slow
def test_full_size_fp32_load_peak_memory(sd15_fp32_run):
    assert sd15_fp32_run["weight_bytes"] > 4_000_000_000
    assert sd15_fp32_run["peak_rss"] <= 1.3 * sd15_fp32_run["weight_bytes"]


@pytest.mark.slow
def test_full_size_fp16_load_peak_memory(sd15):
    report = load_in_subprocess(sd15, "float16")
    assert report["weight_bytes"] > 2_000_000_000
    assert report["peak_rss"] <= 1.3 * report["weight_bytes"]


@pytest.mark.slow
def test_full_size_unet_step_and_decode(sd15_fp32_run):
    assert sd15_fp32_run["eps_shape"] == [1, 4, 8, 8] and sd15_fp32_run["pixels_shape"] == [1, 3, 64, 64]
    assert sd15_fp32_run["finite"]
    assert 0.05 < sd15_fp32_run["eps_std"] < 2 and 0.05 < sd15_fp32_run["pixels_std"] < 1
