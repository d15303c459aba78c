"""VAE decode: sdgraph's default precision against diffusers' AutoencoderKL in bf16 + channels_last, in one run.

Both decoders hold the same checkpoint's VAE weights: sdgraph's as its loader builds it (the default VAE dtype of
this device, channels_last, 3x3 convolutions packed for oneDNN), diffusers' built in code from the published
SD1.5 / SDXL `vae/config.json` with the file's weights converted in memory (diffusers' LDM converter). A decode
is one network call on one random latent (post_quant_conv included, no clamping); its time is the median of
`--rounds` calls after a warm-up, the two decoders taking turns so that load changes hit both alike. The line
per size prints the ratio (target: sdgraph >= 1.7x diffusers, issue #17) and the PSNR of sdgraph's default
decode against sdgraph's fp32 decode of the same latent (target: > 45 dB).

    .venv/bin/python bench/vae_decode.py                       # SD1.5 VAE at 256² and 512²
    .venv/bin/python bench/vae_decode.py --family sdxl         # SDXL VAE at 1024²
    .venv/bin/python bench/vae_decode.py --sizes 512 --profile # where sdgraph's decode goes, by block and op

Without --checkpoint it uses the parity kit's full-size random files in ~/.cache/sdgraph-parity/. Only the VAE's
tensors are read (about 160 MB per copy in bf16), so the SDXL file does not have to fit in memory.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

TARGET_RATIO, TARGET_PSNR_DB = 1.7, 45.0
PARITY = Path.home() / ".cache" / "sdgraph-parity"
FAMILIES = {  # checkpoint, sizes, the published vae/config.json's scaling_factor and sample_size
    "sd15": ("sd15_random_seed1.safetensors", [256, 512], 0.18215, 512),
    "sdxl": ("sdxl_random_seed1.safetensors", [1024], 0.13025, 1024),
}


def sdgraph_vae(checkpoint: Path, dtype: torch.dtype | None, fold: bool | None = None
                ) -> tuple[torch.nn.Module, torch.dtype]:
    """The VAE as sdgraph's loader makes it; dtype None is the default precision's VAE dtype for this family.
    `fold` False builds it without the folded upsampling (diffusion/phase_upsample.py), to measure the fold."""
    from diffusion.checkpoint import open_checkpoint
    from diffusion.components import load_part
    from diffusion.device import pick_precision, safe_vae_dtype
    from diffusion.onednn import pack_for_cpu
    from diffusion.tensor_file import TensorFile
    from diffusion.vae import vae_holding

    layout = open_checkpoint(checkpoint)
    cpu = torch.device("cpu")
    dtype = dtype or safe_vae_dtype(pick_precision(cpu).vae, cpu, layout.family)
    if fold is None:
        return load_part(layout.vae, dtype, True, {}, "cpu", "cpu"), dtype
    part_key = {file_key: key for key, file_key in layout.vae.keys.items()}
    state = {part_key[k]: t.to(dtype, copy=True, memory_format=torch.channels_last if t.ndim == 4
                               else torch.preserve_format) for k, t in TensorFile(checkpoint).read(part_key)}
    return pack_for_cpu(vae_holding(layout.vae.config, state, fold)), dtype


def diffusers_vae(checkpoint: Path, sample_size: int, scaling_factor: float) -> torch.nn.Module:
    """diffusers' AutoencoderKL in bf16 with channels_last, holding the file's VAE weights."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    from diffusion.checkpoint import VAE_PREFIX, TensorFile

    config = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                  layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=sample_size,
                  scaling_factor=scaling_factor)
    source = TensorFile(checkpoint)
    state = {k: t.to(torch.bfloat16, copy=True) for k, t in source.read([k for k in source.meta
                                                                           if k.startswith(VAE_PREFIX)])}
    with torch.device("meta"):
        vae = AutoencoderKL(**config)
    vae.load_state_dict(convert_ldm_vae_checkpoint(state, config), strict=True, assign=True)
    return vae.eval().requires_grad_(False).to(memory_format=torch.channels_last)


def pixels(out: torch.Tensor) -> torch.Tensor:
    """What ImageAutoencoder.decode makes of a decode: values in 0..1."""
    return torch.clamp((out.float() + 1.0) / 2.0, 0.0, 1.0)


def psnr(image: torch.Tensor, reference: torch.Tensor) -> float:
    mse = float(torch.mean((image - reference) ** 2))
    return float("inf") if mse == 0 else 10.0 * torch.log10(torch.tensor(1.0 / mse)).item()


def timed(decode, z: torch.Tensor) -> tuple[float, float]:
    """Wall and process CPU seconds (all threads) of one call: on a shared machine CPU time varies less."""
    start, cpu = time.perf_counter(), time.process_time()
    decode(z)
    return time.perf_counter() - start, time.process_time() - cpu


def medians(calls: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(c[0] for c in calls), statistics.median(c[1] for c in calls)


def block_times(vae: torch.nn.Module, z: torch.Tensor) -> dict[str, float]:
    """Seconds per decoder block of one call (forward hooks; the CPU computes synchronously)."""
    starts, spent = {}, defaultdict(float)
    names = ["post_quant_conv", "decoder.conv_in", "decoder.mid.block_1", "decoder.mid.attn_1",
             "decoder.mid.block_2", "decoder.norm_out", "decoder.conv_out"]
    names += [n for n, _ in vae.named_modules() if re.fullmatch(r"decoder\.up\.\d+\.(block\.\d+|upsample)", n)]
    hooks = []
    for name in names:
        module = vae.get_submodule(name)
        hooks.append(module.register_forward_pre_hook(lambda m, a, n=name: starts.__setitem__(n, time.perf_counter())))
        hooks.append(module.register_forward_hook(
            lambda m, a, o, n=name: spent.__setitem__(n, spent[n] + time.perf_counter() - starts[n])))
    try:
        vae.decode(z)
    finally:
        for hook in hooks:
            hook.remove()
    return dict(spent)


def profile(vae: torch.nn.Module, z: torch.Tensor) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    vae.decode(z)  # warm-up
    times = block_times(vae, z)
    total = sum(times.values())
    print(f"by block (sum {total:.2f} s):")
    for name, seconds in sorted(times.items(), key=lambda kv: -kv[1]):
        print(f"  {name:32s} {seconds:6.3f} s {100 * seconds / total:5.1f}%")
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        vae.decode(z)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), default="sd15")
    parser.add_argument("--checkpoint", default=None, help="default: the parity kit's file of the family")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="image sizes (default: 256 512 for "
                        "sd15, 1024 for sdxl)")
    parser.add_argument("--rounds", type=int, default=3, help="timed calls per decoder after a warm-up")
    parser.add_argument("--profile", action="store_true", help="profile sdgraph's default decode instead")
    parser.add_argument("--unfolded", action="store_true", help="also time sdgraph's default dtype without the "
                        "folded upsampling (diffusion/phase_upsample.py)")
    args = parser.parse_args(argv)
    file_name, sizes, scaling_factor, sample_size = FAMILIES[args.family]
    checkpoint = Path(args.checkpoint) if args.checkpoint else PARITY / file_name
    if not checkpoint.exists():
        parser.error(f"{checkpoint} does not exist; make it with `sdgraph make-checkpoint --preset "
                     f"{'sdxl' if args.family == 'sdxl' else 'sd15'} --seed 1` or pass --checkpoint")
    sizes = args.sizes or sizes
    ours, dtype = sdgraph_vae(checkpoint, None)
    print(f"{checkpoint.name}: sdgraph default VAE dtype {dtype}, {torch.get_num_threads()} threads", flush=True)
    generator = torch.Generator().manual_seed(1)
    latents = {s: torch.randn(1, 4, s // 8, s // 8, generator=generator) / scaling_factor for s in sizes}
    with torch.inference_mode():
        if args.profile:
            for size in sizes:
                print(f"--- {size}²")
                profile(ours, latents[size].to(dtype, memory_format=torch.channels_last))
            return 0
        theirs = diffusers_vae(checkpoint, sample_size, scaling_factor)
        plain = sdgraph_vae(checkpoint, dtype, fold=False)[0] if args.unfolded else None
        results = {}
        for size in sizes:
            z = latents[size].to(dtype, memory_format=torch.channels_last)
            zd = latents[size].to(torch.bfloat16, memory_format=torch.channels_last)
            ours.decode(z), theirs.decode(zd)  # warm-up
            mine, peer, unfolded = [], [], []
            for _ in range(args.rounds):
                mine.append(timed(ours.decode, z))
                peer.append(timed(theirs.decode, zd))
                if plain is not None:
                    unfolded.append(timed(plain.decode, z))
            if plain is not None:
                (wall, cpu), (folded_wall, folded_cpu) = medians(unfolded), medians(mine)
                print(f"{size}²: without the folded upsampling {wall:.3f} s (cpu {cpu:.2f} s), folded "
                      f"{folded_wall:.3f} s (cpu {folded_cpu:.2f} s)", flush=True)
            results[size] = (medians(mine), medians(peer), pixels(ours.decode(z)))
        theirs = ours = plain = None  # freed before the fp32 copy is made
        reference_vae, _ = sdgraph_vae(checkpoint, torch.float32)
        for size in sizes:
            (ours_s, ours_cpu), (theirs_s, theirs_cpu), image = results[size]
            start = time.perf_counter()
            reference = pixels(reference_vae.decode(latents[size].contiguous(memory_format=torch.channels_last)))
            fp32_s = time.perf_counter() - start
            ratio, db = theirs_s / ours_s, psnr(image, reference)
            verdict = "PASS" if ratio >= TARGET_RATIO and db > TARGET_PSNR_DB else "MISS"
            print(f"{size}²: sdgraph default {ours_s:.3f} s (cpu {ours_cpu:.2f}), diffusers bf16+channels_last "
                  f"{theirs_s:.3f} s (cpu {theirs_cpu:.2f}) -> x{ratio:.2f} (cpu x{theirs_cpu / ours_cpu:.2f}; target "
                  f"x{TARGET_RATIO}); PSNR vs sdgraph fp32 ({fp32_s:.2f} s) {db:.1f} dB "
                  f"(target > {TARGET_PSNR_DB:.0f}): {verdict}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
