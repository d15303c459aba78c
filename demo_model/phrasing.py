"""Stage 3: teach the trained model everyday phrasing, by training on varied captions of the same scenes.

It starts from the stage-2 EMA weights rounded to fp16 (exactly what a stage-2 export holds, so it can also start
from such a file: `sdgraph train-demo --start-from`), with a fresh optimiser and EMA, and trains the UNet and
text encoder on the same latent pool with captions from `demo_model.captions` (a quarter in the original
grammar, the rest from the training templates, 10% with a typo; held-out templates never). The high-noise
weighting of stage 2 stays on from the first step, so that position is not forgotten, and batches and noise come
from their own stream (salt 1).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from functools import partial

from transformers import CLIPTextModel

from demo_model.captions import training_captions
from demo_model.denoiser import DenoiserSchedule, train_denoiser
from demo_model.models import DemoArchitecture, round_to_fp16
from diffusion.unet import UNetModel
from diffusion.vae import AutoencoderKL

PHRASING_SCHEDULE = dataclasses.replace(DenoiserSchedule(), steps=1500, lr=3e-4, warmup=50, layout_from=0,
                                        save_every=50, stream_salt=1)


def train_phrasing(arch: DemoArchitecture, vae: AutoencoderKL, start: tuple[UNetModel, CLIPTextModel],
                   snapshot_path, schedule: DenoiserSchedule = PHRASING_SCHEDULE,
                   progress: Callable[[int, dict], None] | None = None) -> tuple[UNetModel, CLIPTextModel, int]:
    """Fine-tune copies of `start` (UNet, text encoder) on varied captions; returns the EMA copies and the step."""
    unet, text = copy.deepcopy(start[0]), copy.deepcopy(start[1])
    round_to_fp16(unet, text)
    return train_denoiser(arch, vae, snapshot_path, schedule, progress, start=(unet, text),
                          captioner=partial(training_captions, schedule.data_seed))
