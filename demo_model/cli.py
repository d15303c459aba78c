"""`sdgraph train-demo`: reproduce the bundled demo model from scratch (VAE, then UNet + text encoder, then two
phrasing rounds that teach the text encoder everyday phrasing, then export).

Snapshots go to a work folder every few hundred steps (atomically); `--resume` continues from them after an
interruption, at exactly the step and data position where they were taken. With no arguments the command
reproduces `models/checkpoints/sdgraph-demo.safetensors` (same seeds, same schedule). `--start-from FILE` runs only
the phrasing stages (and export) from an export: `--stages phrasing,phrasing2,export` from a stage-2 file,
`--stages phrasing2,export` from a file that already had the first round.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from demo_model.denoiser import DenoiserSchedule, train_denoiser
from demo_model.models import ARCHITECTURES, export_checkpoint, load_parts
from demo_model.phrasing import SECOND_ROUND, PhrasingSchedule, train_phrasing
from demo_model.vae import VAESchedule, train_vae

DEFAULT_OUT = Path("models/checkpoints/sdgraph-demo.safetensors")
DEFAULT_WORK = Path("temp/train-demo")
STAGES = ("vae", "denoiser", "phrasing", "phrasing2", "export")


def progress_bar(total: int, start: int, label: str, log_every: int):
    """A tqdm bar plus a plain log line every `log_every` steps (readable in a log file); returns (bar, hook)."""
    bar = tqdm(total=total, initial=start, desc=label, unit="step", dynamic_ncols=True, file=sys.stderr)
    started = time.monotonic()

    def hook(step: int, metrics: dict) -> None:
        bar.update(step - bar.n)
        bar.set_postfix({k: f"{v:.4f}" for k, v in metrics.items()})
        if step % log_every == 0 or step == total:
            text = " ".join(f"{k}={v:.5f}" for k, v in metrics.items())
            bar.write(f"{label} step {step}/{total} {text} elapsed={time.monotonic() - started:.0f}s", file=sys.stdout)
            sys.stdout.flush()

    return bar, hook


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdgraph train-demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"checkpoint to write (default {DEFAULT_OUT})")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK,
                        help=f"folder for resumable snapshots (default {DEFAULT_WORK})")
    parser.add_argument("--resume", action="store_true", help="continue from the snapshots in --work")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help="comma-separated subset of vae,denoiser,phrasing,phrasing2,export")
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), default="demo", help="demo (shipped) or micro")
    parser.add_argument("--vae-steps", type=int, default=VAESchedule.steps)
    parser.add_argument("--steps", type=int, default=DenoiserSchedule.steps, help="UNet + text encoder steps")
    parser.add_argument("--batch-size", type=int, default=DenoiserSchedule.batch_size)
    parser.add_argument("--layout-from", type=int, default=DenoiserSchedule.layout_from,
                        help="UNet step from which high-noise timesteps weigh more (see --layout-weight-cap)")
    parser.add_argument("--layout-weight-cap", type=float, default=DenoiserSchedule.layout_weight_cap,
                        help="loss weight 1/SNR(t) clamped to [1, cap] from --layout-from on (1: plain eps loss)")
    parser.add_argument("--phrasing-steps", type=int, default=PhrasingSchedule.steps,
                        help="stage 3 steps: the text encoder learns varied captions (0: export the stage-2 model)")
    parser.add_argument("--phrasing2-steps", type=int, default=SECOND_ROUND.steps,
                        help="stage 3b steps: a second phrasing round, from stage 3's encoder, with more templates")
    parser.add_argument("--start-from", type=Path,
                        help="run stage 3 from this exported stage-2 checkpoint instead of training stages 1-2")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--no-bf16", action="store_true", help="train the UNet in float32 instead of bf16 autocast")
    parser.add_argument("--log-every", type=int, default=50)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        parser.error(f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES)}")
    snapshots = [args.work / name for name in ("vae.pt", "denoiser.pt", "phrasing.pt", "phrasing2.pt")]
    fresh = "vae" in stages or (args.start_from and {"phrasing", "phrasing2"} & set(stages))
    if not args.resume and fresh and any(p.exists() for p in snapshots):
        parser.error(f"{args.work} already holds snapshots; pass --resume to continue them or remove the folder")
    torch.set_num_threads(args.threads)
    arch = ARCHITECTURES[args.arch]()
    vae_schedule = VAESchedule(steps=args.vae_steps)
    denoiser_schedule = dataclasses.replace(DenoiserSchedule(), steps=args.steps, batch_size=args.batch_size,
                                            bf16=not args.no_bf16, layout_from=args.layout_from,
                                            layout_weight_cap=args.layout_weight_cap)
    started = time.monotonic()

    if args.start_from:
        unet, vae, text = load_parts(args.start_from, arch)
        step = int(start_metadata(args.start_from).get("denoiser_steps", 0))
        phrasing_step = int(start_metadata(args.start_from).get("phrasing_steps", 0))
    else:
        unet, vae, text, step = train_stages_1_2(arch, args, stages, denoiser_schedule, vae_schedule)
        phrasing_step = 0
        if unet is None:
            return 0

    # 3. Everyday phrasing: the text encoder learns varied captions from the stage-2 one.
    if "phrasing" in stages and args.phrasing_steps > 0:
        bar, hook = progress_bar(args.phrasing_steps, 0, "phrasing", args.log_every)
        schedule = PhrasingSchedule(steps=args.phrasing_steps)
        text, phrasing_step = train_phrasing(text, args.work / "phrasing.pt", schedule, progress=hook, unet=unet,
                                             vae=vae)
        bar.close()
    # 3b. A second round, from stage 3's encoder, with more sentence templates.
    phrasing2_step = 0
    if "phrasing2" in stages and args.phrasing2_steps > 0:
        bar, hook = progress_bar(args.phrasing2_steps, 0, "phrasing2", args.log_every)
        schedule = dataclasses.replace(SECOND_ROUND, steps=args.phrasing2_steps)
        text, phrasing2_step = train_phrasing(text, args.work / "phrasing2.pt", schedule, progress=hook, unet=unet,
                                              vae=vae)
        bar.close()

    # 4. The SD1 single-file checkpoint.
    if "export" in stages:
        metadata = {"sdgraph_demo": "1", "denoiser_steps": str(step), "vae_steps": str(vae_schedule.steps),
                    "phrasing_steps": str(phrasing_step), "phrasing2_steps": str(phrasing2_step)}
        path = export_checkpoint(args.out, unet, vae, text, metadata)
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB) after {step} UNet and {phrasing_step} phrasing steps")
    print(f"train-demo finished in {(time.monotonic() - started) / 60:.1f} min")
    return 0


def start_metadata(path: Path) -> dict[str, str]:
    """The metadata of a demo checkpoint (its stage-2 step count is kept in the file stage 3 writes)."""
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def train_stages_1_2(arch, args, stages: list[str], denoiser_schedule: DenoiserSchedule, vae_schedule: VAESchedule):
    """Stage 1 (the autoencoder, loaded as is when its snapshot is complete) and stage 2 (the UNet and text encoder
    on frozen-VAE latents); returns (unet, vae, text, step), with unet None when only the VAE was asked for."""
    bar, hook = progress_bar(vae_schedule.steps, 0, "vae", args.log_every)
    vae = train_vae(arch, args.work / "vae.pt", vae_schedule, progress=hook)
    bar.close()
    if not {"denoiser", "phrasing", "export"} & set(stages):
        return None, vae, None, 0
    if "denoiser" in stages:
        bar, hook = progress_bar(denoiser_schedule.steps, 0, "unet+text", args.log_every)
    else:
        bar, hook = None, None
        denoiser_schedule = dataclasses.replace(denoiser_schedule, steps=0)
    unet, text, step = train_denoiser(arch, vae, args.work / "denoiser.pt", denoiser_schedule, progress=hook)
    if bar:
        bar.close()
    return unet, vae, text, step
