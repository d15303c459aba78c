"""Where one UNet call of SDXL or SD2.1-v goes: seconds per UNet block and per torch operator.

Builds only the UNet of a full-size checkpoint as sdgraph runs it (`DiffusionModel.forward_function` of the loaded
part: the default precision on this CPU, or --dtype fp32), makes one warm-up call on the CFG batch of 2 with
random context (and label vector for SDXL), then one call timed per block (forward hooks on input_blocks.N,
middle_block, output_blocks.N, out) and one under torch.profiler (self CPU time per operator).

    flock /tmp/bench.lock .venv/bin/python bench/profile_family.py --family sdxl --size 512
    flock /tmp/bench.lock .venv/bin/python bench/profile_family.py --family sd21v --size 768 --top 25
    flock /tmp/bench.lock .venv/bin/python bench/profile_family.py --family sdxl --size 1024 --attention [--threads 1]

--attention builds no model: it times each level's bf16 self-attention (CFG batch of 2, random values) with torch's
flash kernel and with diffusion/attention.py's sliced kernel, in wall and process CPU seconds.

One model per process: SDXL's bf16 UNet holds 5 GB. Run it under the bench lock on a shared machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.family_step import PARITY_FILES, default_checkpoint  # noqa: E402


def block_names(unet) -> list[str]:
    """The UNet's top-level blocks, in call order."""
    names = [f"input_blocks.{i}" for i in range(len(unet.input_blocks))] + ["middle_block"]
    return names + [f"output_blocks.{i}" for i in range(len(unet.output_blocks))] + ["out"]


def time_blocks(unet, call) -> dict[str, float]:
    """Wall seconds spent in each top-level block during `call()` (hooks: pre starts a clock, post stops it)."""
    spent: dict[str, float] = defaultdict(float)
    handles = []
    for name in block_names(unet):
        module = unet.get_submodule(name)
        started: list[float] = []
        handles.append(module.register_forward_pre_hook(lambda *_, s=started: s.append(time.perf_counter())))
        handles.append(module.register_forward_hook(
            lambda *_, s=started, n=name: spent.__setitem__(n, spent[n] + time.perf_counter() - s.pop())))
    try:
        call()
    finally:
        for handle in handles:
            handle.remove()
    return dict(spent)


def attention_shapes(config, size: int) -> list[tuple[int, int, int, int]]:
    """(level, heads, tokens, head width) of each UNet level with transformers, for `size`² pixels."""
    shapes = []
    for level, mult in enumerate(config.channel_mult):
        if config.depth_at(level) or (level == len(config.channel_mult) - 1 and config.mid_depth):
            heads, width = config.heads_for(config.model_channels * mult)
            shapes.append((level, heads, (size // 8 // 2**level) ** 2, width))
    return shapes


def time_attention(config, size: int, repeats: int = 2) -> None:
    import torch
    import torch.nn.functional as F

    from diffusion.attention import sliced_attention

    def flash(q, k, v, heads):
        b, n, inner = q.shape
        q, k, v = (t.reshape(b, -1, heads, inner // heads).transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, inner)

    with torch.inference_mode():
        for level, heads, tokens, width in attention_shapes(config, size):
            q, k, v = (torch.randn(2, tokens, heads * width).bfloat16() for _ in range(3))
            row = []
            for name, kernel in (("flash", flash), ("sliced", sliced_attention)):
                kernel(q, k, v, heads)
                wall, cpu = time.perf_counter(), time.process_time()
                for _ in range(repeats):
                    kernel(q, k, v, heads)
                row.append(f"{name} {1e3 * (time.perf_counter() - wall) / repeats:.0f} ms "
                           f"(cpu {1e3 * (time.process_time() - cpu) / repeats:.0f} ms)")
            print(f"level {level}: {heads} heads x {tokens} tokens x {width}: " + ", ".join(row), flush=True)


def unet_inputs(config, size: int, seed: int = 0):
    import torch
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, config.in_channels, size // 8, size // 8, generator=g)
    context = torch.randn(2, 77, config.context_dim, generator=g)
    y = torch.randn(2, config.adm_in_channels, generator=g) if config.adm_in_channels else None
    return x, torch.tensor([500.0, 500.0]), context, y


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", choices=sorted(PARITY_FILES), default="sdxl")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--dtype", choices=("default", "fp32"), default="default")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--top", type=int, default=20, help="operators to list")
    parser.add_argument("--no-profiler", action="store_true", help="only the per-block times")
    parser.add_argument("--attention", action="store_true", help="only time flash against sliced attention")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)

    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    from torch.profiler import ProfilerActivity, profile

    from diffusion.checkpoint import open_checkpoint
    from diffusion.components import model_value
    from diffusion.device import pick_precision

    if args.attention:
        from diffusion.make_checkpoint import PRESETS
        time_attention(PRESETS[args.family].unet, args.size)
        return 0
    checkpoint = Path(args.checkpoint) if args.checkpoint else default_checkpoint(args.family)
    layout = open_checkpoint(checkpoint)
    cpu = torch.device("cpu")
    precision = pick_precision(cpu, "fp32" if args.dtype == "fp32" else None)
    model = model_value(layout.unet, layout.family, device=cpu, precision=precision)
    start = time.perf_counter()
    unet = model.handle.load("cpu")
    print(f"{args.family} {args.size}² {args.dtype}: UNet loaded in {time.perf_counter() - start:.1f} s "
          f"({precision.unet})", flush=True)
    forward = model.forward_function(unet)
    x, t, context, y = unet_inputs(layout.unet.config, args.size)

    def call():
        return forward(x, t, context, None, y)

    start = time.perf_counter()
    call()
    print(f"warm-up call {time.perf_counter() - start:.2f} s", flush=True)
    start = time.perf_counter()
    blocks = time_blocks(unet, call)
    total = time.perf_counter() - start
    print(f"timed call {total:.2f} s; per block (s, % of the call):")
    for name, seconds in blocks.items():
        print(f"  {name:18s} {seconds:7.3f}  {100 * seconds / total:5.1f}%")
    if not args.no_profiler:
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            call()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=40))
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=args.top,
                                                                 max_name_column_width=30, max_shapes_column_width=70))
    return 0


if __name__ == "__main__":
    sys.exit(main())
