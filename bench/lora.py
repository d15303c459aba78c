"""LoRA on the full-size SD1.5 checkpoint: time and resident memory to apply a rank-8 kohya LoRA, to switch to
another one and back to none (the loaded weights are re-used: the manager's load count must not move), and what a
patched UNet call costs beside a plain one (patches are computed from the untouched weights at every call).

usage: flock /tmp/fullsize.lock python bench/lora.py [CHECKPOINT] [--size 256] [--rank 8]
(CHECKPOINT defaults to the parity kit's ~/.cache/sdgraph-parity/sd15_random_seed1.safetensors)
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import proc_status  # noqa: E402

DEFAULT = Path.home() / ".cache" / "sdgraph-parity" / "sd15_random_seed1.safetensors"
MB = 1 << 20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", type=Path, default=DEFAULT)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels for the UNet call timing")
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args(argv)

    import torch

    from diffusion.checkpoint import open_checkpoint
    from diffusion.components import checkpoint_values
    from diffusion.device import Precision
    from diffusion.lora import load_lora
    from diffusion.make_lora import write_lora
    from diffusion.tokenizer import ClipTokenizer
    from runtime.models import ModelManager

    torch.set_grad_enabled(False)
    manager = ModelManager()
    precision = Precision(torch.float32, torch.float32, torch.float32)
    layout = open_checkpoint(args.checkpoint)
    model, _, _ = checkpoint_values(layout, device=torch.device("cpu"), precision=precision,
                                    tokenizer=ClipTokenizer())
    with tempfile.TemporaryDirectory() as tmp:
        paths = [write_lora(Path(tmp) / f"r{args.rank}_{seed}.safetensors", preset="sd15", seed=seed, rank=args.rank)
                 for seed in (1, 2)]
        start = time.perf_counter()
        with manager.use(model.handle):
            pass
        print(f"UNet load: {time.perf_counter() - start:.1f} s, RSS {proc_status('VmRSS:') / MB:.0f} MB")
        loads = manager.stats["loads"]

        def apply(path: Path | None) -> tuple[object, float, float]:
            gc.collect()
            rss, start = proc_status("VmRSS:"), time.perf_counter()
            value = model
            if path is not None:
                value = model.with_lora(load_lora(path, layout.unet.config, None).unet, 1.0)
            with manager.use(value.handle):
                pass
            return value, time.perf_counter() - start, (proc_status("VmRSS:") - rss) / MB

        patched, seconds, grown = apply(paths[0])
        print(f"apply rank-{args.rank} LoRA ({len(patched.handle.patches[0][0].adapters)} layers): {seconds:.2f} s, "
              f"+{grown:.1f} MB RSS")
        _, seconds, grown = apply(paths[1])
        print(f"switch to another LoRA: {seconds:.2f} s, +{grown:.1f} MB RSS")
        _, seconds, grown = apply(None)
        print(f"back to no LoRA: {seconds:.2f} s, {grown:+.1f} MB RSS")
        print(f"checkpoint reads while switching: {manager.stats['loads'] - loads} (must be 0)")

        side = args.size // 8
        x, t = torch.randn(2, 4, side, side), torch.tensor([500.0, 500.0])
        context = torch.randn(2, 77, 768)
        for label, value in (("plain", model), ("patched", patched), ("plain", model), ("patched", patched)):
            with manager.use(value.handle) as unet:
                eps = value.forward_function(unet)
                start = time.perf_counter()
                eps(x, t, context)
                print(f"UNet call at {args.size} px, batch 2, {label}: {time.perf_counter() - start:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
