"""Working memory of one VAE decode (peak RSS above what the process held before it), on the first decode at a size
and on the next one at the same size, in the default precision with the loader's oneDNN packing. A diagnostic for
issue #17's 3 GB target (docs/performance.md, "Which models stay resident"): the first call at a size costs more
than the later ones.

    .venv/bin/python bench/decode_memory.py [--checkpoint PATH] [--size 512] [--dtype bf16|fp32]

Peak RSS is read from /proc/self/status (VmHWM), reset before each decode through /proc/self/clear_refs (Linux).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import proc_status  # noqa: E402
from diffusion.checkpoint import open_checkpoint  # noqa: E402
from diffusion.onednn import pack_for_cpu  # noqa: E402

DEFAULT_CHECKPOINT = Path.home() / ".cache" / "sdgraph-parity" / "sd15_random_seed1.safetensors"


def decode_peak(vae: torch.nn.Module, latent: torch.Tensor) -> int:
    """Bytes of peak RSS above the RSS before one decode of `latent`."""
    before = proc_status("VmRSS:")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    vae.decode(latent)
    return proc_status("VmHWM:") - before


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--size", type=int, default=512, help="image size in pixels (latent size / 8)")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    args = parser.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    vae = pack_for_cpu(open_checkpoint(args.checkpoint).vae.load(dtype=dtype, channels_last=True))
    latent = torch.randn(1, 4, args.size // 8, args.size // 8, generator=torch.Generator().manual_seed(0))
    latent = latent.to(dtype=dtype, memory_format=torch.channels_last)
    with torch.inference_mode():
        first, second = decode_peak(vae, latent), decode_peak(vae, latent)
    print(f"{args.checkpoint.name} VAE, {args.dtype}, {args.size}²: working memory of the first decode "
          f"{first / 2**20:.0f} MB, of the second {second / 2**20:.0f} MB (x{first / second:.2f})")


if __name__ == "__main__":
    main()
