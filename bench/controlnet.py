"""What a ControlNet adds to a sampling step: one CFG model call (cond + uncond batched, as KSampler runs it) on
the full-size SD1.5 checkpoint with and without an SD1.5 ControlNet; prints both times and their ratio (issue #12
asks for at most 1.5x).

    flock /tmp/fullsize.lock python bench/controlnet.py [--sizes 256 512] [--dtype fp32] [--repeats 3]

Defaults: ~/.cache/sdgraph-parity/sd15_random_seed1.safetensors and parity_controlnet_sd15_seed3.safetensors (the
parity kit makes them). Times are the best of `--repeats` calls after one warm-up call of each.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PARITY = Path.home() / ".cache" / "sdgraph-parity"


def timed(call, repeats: int, *args, **kwargs) -> list[float]:
    """Seconds of each of `repeats` calls of call(*args, **kwargs)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call(*args, **kwargs)
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=PARITY / "sd15_random_seed1.safetensors")
    parser.add_argument("--controlnet", type=Path, default=PARITY / "parity_controlnet_sd15_seed3.safetensors")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="image sizes in pixels")
    parser.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: the device's policy)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    import torch

    from diffusion.checkpoint import open_checkpoint
    from diffusion.components import checkpoint_values
    from diffusion.controlnet import ControlChain, controlnet_value, open_controlnet
    from diffusion.denoisers import ModelDenoiser
    from diffusion.device import pick_device, pick_precision
    from diffusion.schedules import sd1_schedule
    from diffusion.tokenizer import ClipTokenizer
    from runtime.models import ModelManager

    # 1. The models, as the loader nodes make them.
    device = pick_device(None)
    precision = pick_precision(device, args.dtype)
    manager = ModelManager()
    model, _, _ = checkpoint_values(open_checkpoint(args.checkpoint), device=device, precision=precision,
                                    tokenizer=ClipTokenizer())
    net = controlnet_value(open_controlnet(args.controlnet), device=device, dtype=precision.unet, models=manager,
                           name=args.controlnet.name)
    print(f"device {device}, UNet dtype {precision.unet}, torch threads {torch.get_num_threads()}")

    # 2. One CFG call at each size, plain and with the control.
    generator = torch.Generator().manual_seed(0)
    for size in args.sizes:
        latent = size // 8
        x = torch.randn(2, 4, latent, latent, generator=generator)
        sigma = torch.full((2,), 3.0)
        context = torch.randn(2, 77, model.config.context_dim, generator=generator)
        chain = ControlChain(net, torch.rand(1, 3, size, size, generator=generator), 1.0)
        with manager.use(model.handle, working=model.working_bytes(tuple(x.shape), 1)) as unet:
            denoiser = ModelDenoiser(model.forward_function(unet), sd1_schedule())
            with torch.inference_mode():
                denoiser(x, sigma, context)
                denoiser(x, sigma, context, control=chain)
                plain = timed(denoiser, args.repeats, x, sigma, context)
                control = timed(denoiser, args.repeats, x, sigma, context, control=chain)
        ratio = min(control) / min(plain)
        print(f"{size}px: plain step {min(plain):.2f} s (median {statistics.median(plain):.2f}), with ControlNet "
              f"{min(control):.2f} s (median {statistics.median(control):.2f}): ratio {ratio:.2f}x "
              f"({'within' if ratio <= 1.5 else 'OVER'} the 1.5x budget)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
