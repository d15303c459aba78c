"""How far each reduced-precision choice moves results from fp32: the evidence behind diffusion/device.py.

For each checkpoint (the parity kit's full-size random SD1.5 file, and the bundled demo model when it exists):

  1. one UNet call (CFG batch of 2, t=500) at 256 and 512 px: relative L2 error of bf16 against fp32;
  2. the text encoder: relative error of the conditioning (context) in bf16 against fp32;
  3. VAE decode of an fp32-sampled latent: PSNR of a bf16 decode against the fp32 decode;
  4. txt2img through the nodes (euler, --steps, CFG 7): PSNR against the all-fp32 image for the default
     precision and for the variants that keep the text encoder and/or the VAE in fp32.

    .venv/bin/python bench/precision.py [--checkpoint PATH ...] [--size 256] [--steps 8] [--unet-sizes 256 512]
    .venv/bin/python bench/precision.py --checkpoint models/checkpoints/sdxl_random_seed1.safetensors --unet-only \
        --unet-sizes 512
    .venv/bin/python bench/precision.py --checkpoint models/checkpoints/sdgraph-demo.safetensors --size 64 \
        --steps 20 --unet-sizes 64 --seeds 1 2 3 --prompt "a small red circle at the top on a blue background" \
        --prompt "a large green star on the left and a small white square on the right on a black background"
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from demo_model.evaluate import txt2img_graph  # noqa: E402
from diffusion.checkpoint import open_checkpoint  # noqa: E402
from diffusion.device import Precision  # noqa: E402

PROMPT, NEGATIVE = "a photograph of an astronaut riding a horse", "blurry, low quality"
F32, BF16 = torch.float32, torch.bfloat16
DEFAULT = Precision(BF16, F32, BF16, unet_output_fp32=True)  # the default on CPUs with native bf16
ALL_BF16 = Precision(BF16, BF16, BF16, unet_output_fp32=False)  # --dtype bf16
BF16_UNET = Precision(BF16, F32, BF16, unet_output_fp32=False)  # the default without the fp32 last-level layers


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def psnr(got: torch.Tensor, want: torch.Tensor) -> float:
    """PSNR of 8-bit images (values 0..1 rounded as a PNG would store them)."""
    a, b = (got.float() * 255).round(), (want.float() * 255).round()
    mse = (a - b).pow(2).mean().item()
    return 99.0 if mse == 0 else 10 * math.log10(255**2 / mse)


def unet_error(path: Path, size: int, precision: Precision) -> float:
    """Relative error of one UNet call (through the MODEL value's eps function, as sampling calls it)."""
    from diffusion.components import checkpoint_values
    from diffusion.tokenizer import ClipTokenizer

    layout = open_checkpoint(path)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, size // 8, size // 8, generator=g)
    context = torch.randn(2, 77, layout.unet.config.context_dim, generator=g)
    adm = layout.unet.config.adm_in_channels  # SDXL's label vector (pooled text and size ids)
    y = torch.randn(2, adm, generator=g) if adm else None
    t = torch.tensor([500.0, 500.0])
    outputs = []
    for variant in (Precision(F32, F32, F32), precision):
        model, _, _ = checkpoint_values(layout, device=torch.device("cpu"), precision=variant,
                                        tokenizer=ClipTokenizer())
        unet = model.handle.load("cpu")
        with torch.inference_mode():
            outputs.append(model.forward_function(unet)(x, t, context, None, y))
        del unet
    return relative_error(outputs[1], outputs[0])


def text_error(path: Path) -> float:
    from diffusion.prompt import encode_prompt
    from diffusion.tokenizer import ClipTokenizer

    layout, tokenizer = open_checkpoint(path).text_encoder, ClipTokenizer()
    contexts = {}
    for dtype in (F32, BF16):
        with torch.inference_mode():
            contexts[dtype] = encode_prompt(layout.load(dtype=dtype), tokenizer, PROMPT)[0].float()
    return relative_error(contexts[BF16], contexts[F32])


def txt2img(path: Path, precision: Precision, size: int, steps: int, prompt: str = PROMPT,
            seed: int = 42) -> tuple[torch.Tensor, torch.Tensor]:
    """(image, latent) of a txt2img through the nodes with the given precision."""
    from engine import Executor, validate
    from nodes import build_registry
    from nodes.folders import Folders
    from nodes.runtime import Runtime

    base = Path(tempfile.mkdtemp(prefix="sdgraph-precision-"))
    (base / "models" / "checkpoints").mkdir(parents=True)
    (base / "models" / "checkpoints" / path.name).symlink_to(path.resolve())
    runtime = Runtime(Folders.at(base), device="cpu", precision=precision)  # the variant, not the policy
    api = txt2img_graph(path.name, prompt, negative=NEGATIVE, size=size, steps=steps, seed=seed, cfg=7.0)
    registry = build_registry(entry_points=False)
    report = Executor(registry, resources=runtime).run(validate(api, registry, targets=["8"],
                                                                resources=runtime).graph)
    if not report.ok:
        raise RuntimeError(report.error.traceback)
    return report.outputs["8"][0][0], runtime


def decode(path: Path, latent: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    from diffusion.components import vae_value
    from diffusion.onednn import pack_for_cpu

    layout = open_checkpoint(path).vae
    value = vae_value(layout, device=torch.device("cpu"), dtype=dtype)
    return value.decode(latent, pack_for_cpu(layout.load(dtype=dtype, channels_last=True)))


def sample_latent(path: Path, size: int, steps: int) -> torch.Tensor:
    """An fp32 latent from the sampler, for the decode comparison."""
    from diffusion.components import checkpoint_values
    from diffusion.sampling import sample
    from diffusion.tokenizer import ClipTokenizer

    layout = open_checkpoint(path)
    model, clip, _ = checkpoint_values(layout, device=torch.device("cpu"), precision=Precision(F32, F32, F32),
                                       tokenizer=ClipTokenizer())
    text = layout.text_encoder.load(dtype=F32)
    positive, negative = clip.encode(PROMPT, text), clip.encode(NEGATIVE, text)
    unet = layout.unet.load(dtype=F32, channels_last=True)
    from diffusion.latent import Latent

    with torch.inference_mode():
        latent = Latent(torch.zeros(1, 4, size // 8, size // 8))
        return sample(model.forward_function(unet), latent, positive, negative, seed=42, steps=steps, cfg=7.0,
                      sampler_name="euler", scheduler="normal").samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", nargs="+", default=None)
    parser.add_argument("--size", type=int, default=256, help="txt2img and decode size (px)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--unet-sizes", type=int, nargs="+", default=[256, 512], help="sizes of the UNet-call check")
    parser.add_argument("--skip-txt2img", action="store_true")
    parser.add_argument("--unet-only", action="store_true", help="only the UNet-call check (any family: SDXL too)")
    parser.add_argument("--prompt", action="append", default=None, help="txt2img prompt (repeatable)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    args = parser.parse_args(argv)
    paths = [Path(p) for p in args.checkpoint] if args.checkpoint else [
        p for p in (ROOT / "models/checkpoints/sd15_random_seed1.safetensors",
                    ROOT / "models/checkpoints/sdgraph-demo.safetensors") if p.exists()]
    for path in paths:
        print(f"== {path.name}")
        for name, precision in (("default (bf16, sensitive last-level layers fp32)", DEFAULT),
                                ("all bf16", ALL_BF16)):
            errors = ", ".join(f"{size} px {unet_error(path, size, precision):.4%}" for size in args.unet_sizes)
            print(f"UNet call, {name} vs fp32, relative error: {errors}", flush=True)
        if args.unet_only:
            continue
        print(f"text encoder context, bf16 vs fp32, relative error: {text_error(path):.4%}", flush=True)
        latent = sample_latent(path, args.size, args.steps)
        reference = decode(path, latent, F32)
        print(f"VAE decode ({args.size} px), bf16 vs fp32: PSNR {psnr(decode(path, latent, BF16), reference):.1f} dB "
              f"(fp32 image std {reference.std():.3f})", flush=True)
        if args.skip_txt2img:
            continue
        cases = [(prompt, seed) for prompt in (args.prompt or [PROMPT]) for seed in args.seeds]
        wants = [txt2img(path, Precision(F32, F32, F32), args.size, args.steps, p, s)[0] for p, s in cases]
        for name, precision in (("default (bf16 UNet with fp32 sensitive layers, fp32 text, bf16 VAE)", DEFAULT),
                                ("all bf16 (--dtype bf16)", ALL_BF16),
                                ("bf16 UNet without fp32 layers, fp32 text, bf16 VAE", BF16_UNET),
                                ("default with a bf16 text encoder", Precision(BF16, BF16, BF16, True)),
                                ("default with an fp32 VAE", Precision(BF16, F32, F32, True))):
            values = [psnr(txt2img(path, precision, args.size, args.steps, p, s)[0], want)
                      for (p, s), want in zip(cases, wants, strict=True)]
            print(f"txt2img {args.size} px {args.steps} steps, {name} vs fp32: PSNR min {min(values):.1f} dB, "
                  f"median {sorted(values)[len(values) // 2]:.1f} dB over {len(values)} images", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
