"""Where one SD1.5 UNet call goes: torch.profiler by operator, and wall time by UNet block, per size.

Builds only the UNet of the full-size SD1.5 file (as the loader does: default precision, its sensitive layers
in fp32, weights channels_last and 3x3 convolutions packed for oneDNN), then per size runs one warm-up call and
one profiled call on a CFG batch of 2 (t=500, random latents and context) and one call timed block by block.

    flock /tmp/bench.lock .venv/bin/python bench/profile_unet.py [--sizes 256 512] [--top 20] [--fp32]

Block times come from forward hooks (perf_counter at each block's start and end; CPU ops run synchronously),
so they add up to the call's time minus the embeddings and the concatenations of the skips.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from diffusion.checkpoint import open_checkpoint  # noqa: E402
from diffusion.device import Precision  # noqa: E402

CHECKPOINT = Path.home() / ".cache" / "sdgraph-parity" / "sd15_random_seed1.safetensors"
DEFAULT = Precision(torch.bfloat16, torch.float32, torch.bfloat16, unet_output_fp32=True)
FP32 = Precision(torch.float32, torch.float32, torch.float32)


def load_unet(path: Path, precision: Precision):
    """(forward function, UNet module) as the MODEL value hands them to the sampler."""
    from diffusion.components import model_value

    layout = open_checkpoint(path)
    model = model_value(layout.unet, layout.family, device=torch.device("cpu"), precision=precision)
    unet = model.handle.load("cpu")
    return model.forward_function(unet), unet, layout.unet.config.context_dim


def call_inputs(size: int, context_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 4, size // 8, size // 8, generator=g), torch.tensor([500.0, 500.0]),
            torch.randn(2, 77, context_dim, generator=g))


def block_names(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The call's blocks in order: time embedding, each input/output block, the middle block and the output."""
    blocks = {"time_embed": unet.time_embed}
    blocks.update({f"input_blocks.{i}": b for i, b in enumerate(unet.input_blocks)})
    blocks["middle_block"] = unet.middle_block
    blocks.update({f"output_blocks.{i}": b for i, b in enumerate(unet.output_blocks)})
    blocks["out"] = unet.out
    return blocks


def time_blocks(forward, unet, inputs) -> tuple[float, dict[str, float]]:
    """(call seconds, seconds per block) of one call."""
    starts: dict[str, float] = {}
    seconds: dict[str, float] = defaultdict(float)
    handles = []
    for name, block in block_names(unet).items():
        handles.append(block.register_forward_pre_hook(lambda m, a, n=name: starts.__setitem__(n, time.perf_counter())))
        handles.append(block.register_forward_hook(
            lambda m, a, o, n=name: seconds.__setitem__(n, seconds[n] + time.perf_counter() - starts[n])))
    try:
        start = time.perf_counter()
        forward(*inputs)
        total = time.perf_counter() - start
    finally:
        for handle in handles:
            handle.remove()
    return total, dict(seconds)


def describe_block(block: torch.nn.Module) -> str:
    return "+".join(type(layer).__name__ for layer in block) if isinstance(block, torch.nn.ModuleList) else \
        type(block).__name__


def profile_size(forward, unet, size: int, context_dim: int, top: int) -> None:
    inputs = call_inputs(size, context_dim)
    forward(*inputs)  # warm-up: oneDNN primitive caches, allocator
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=False) as prof:
        forward(*inputs)
    total, blocks = time_blocks(forward, unet, inputs)
    print(f"\n=== {size}² (latent {size // 8}², batch 2): one call {total:.3f} s (timed by blocks)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))
    named = block_names(unet)
    print(f"{'block':18s} {'layers':38s} {'s':>7s} {'share':>6s}")
    for name, seconds in blocks.items():
        print(f"{name:18s} {describe_block(named[name]):38s} {seconds:7.3f} {seconds / total:6.1%}")
    rest = total - sum(blocks.values())
    print(f"{'(between blocks)':18s} {'skip concatenations, casts':38s} {rest:7.3f} {rest / total:6.1%}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default=str(CHECKPOINT))
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--top", type=int, default=20, help="operators listed per size")
    parser.add_argument("--fp32", action="store_true", help="profile --dtype fp32 instead of the default")
    args = parser.parse_args(argv)
    forward, unet, context_dim = load_unet(Path(args.checkpoint), FP32 if args.fp32 else DEFAULT)
    print(f"{args.checkpoint}, {'fp32' if args.fp32 else 'default precision'}, {torch.get_num_threads()} threads")
    with torch.inference_mode():
        for size in args.sizes:
            profile_size(forward, unet, size, context_dim, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
