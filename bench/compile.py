"""Does torch.compile pay back within one typical run? Compile time against per-step gain for the full-size UNet.

Compares, in one process, the UNet as sdgraph runs it by default on this CPU (eager, bf16 with an fp32 last
level, convolutions prepacked for oneDNN, sliced bf16 attention) with `torch.compile` of the same network
unpacked (inductor with freezing, which prepacks weights and fuses pointwise ops itself). Compile time is
measured with an empty inductor cache (a fresh directory) and again with the cache warm (a second process would
see that).

    .venv/bin/python bench/compile.py [--size 512] [--steps 20]

Prints seconds per UNet call (CFG batch of 2), compile seconds, and the break-even number of steps.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def worker(size: int, checkpoint: Path, cache: str) -> None:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
    import torch
    import torch._inductor.config as inductor

    from diffusion.checkpoint import open_checkpoint
    from diffusion.components import checkpoint_values
    from diffusion.device import pick_precision
    from diffusion.tokenizer import ClipTokenizer
    from diffusion.unet import precision_sensitive_prefixes, set_attention_dtype

    inductor.freezing = True
    layout = open_checkpoint(checkpoint)
    cpu = torch.device("cpu")
    precision = pick_precision(cpu)
    model, _, _ = checkpoint_values(layout, device=cpu, precision=precision, tokenizer=ClipTokenizer())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, size // 8, size // 8, generator=g)
    context, t = torch.randn(2, 77, 768, generator=g), torch.tensor([500.0, 500.0])

    def timed(fn, n=3):
        fn()
        start = time.perf_counter()
        for _ in range(n):
            out = fn()
        return (time.perf_counter() - start) / n, out

    with torch.inference_mode():
        packed = [model.forward_function(model.handle.load("cpu"))]  # what sdgraph runs
        eager_s, want = timed(lambda: packed[0](x, t, context))
        packed.clear()  # free it before loading the copy to compile
        overrides = {prefix: torch.float32 for prefix in precision_sensitive_prefixes(layout.unet.config)}
        plain = layout.unet.load(dtype=torch.bfloat16, channels_last=True, overrides=overrides)
        set_attention_dtype(plain, torch.bfloat16)  # the same network as the eager one, unpacked
        compiled = torch.compile(plain)
        x_in = x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        start = time.perf_counter()
        compiled(x_in, t, context)
        compile_s = time.perf_counter() - start
        compiled_s, got = timed(lambda: compiled(x_in, t, context).float())
    error = ((got - want).norm() / want.norm()).item()
    print(f"RESULT {eager_s} {compiled_s} {compile_s} {error}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20, help="steps of the typical run to amortise over")
    parser.add_argument("--checkpoint", default=str(ROOT / "models/checkpoints/sd15_random_seed1.safetensors"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.size, Path(args.checkpoint), args.cache)
        return 0
    cache = tempfile.mkdtemp(prefix="sdgraph-inductor-")
    for label in ("cold cache", "warm cache"):
        done = subprocess.run([sys.executable, __file__, "--worker", "--size", str(args.size), "--checkpoint",
                               args.checkpoint, "--cache", cache], capture_output=True, text=True, cwd=ROOT)
        line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(done.stderr[-3000:], file=sys.stderr)
            return 1
        eager_s, compiled_s, compile_s, error = map(float, line.split()[1:])
        gain = eager_s - compiled_s
        breakeven = f"{compile_s / gain:.0f} steps" if gain > 0 else "never"
        load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
        print(f"{args.size}px, {label}: eager {eager_s:.2f} s/call, compiled {compiled_s:.2f} s/call "
              f"({eager_s / compiled_s:.2f}x), compile + first call {compile_s:.0f} s, pays back after {breakeven} "
              f"(a typical run: {args.steps}); compiled vs eager relative difference {error:.4f}; load {load}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
