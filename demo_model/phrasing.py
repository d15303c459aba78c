"""Stage 3: teach the text encoder everyday phrasing, by distillation from the stage-2 text encoder.

The stage-2 model follows captions in its training grammar. This stage trains a copy of its text encoder (the
student) so that a varied caption of a scene ("blue background, red circle at the left", `demo_model.captions`)
encodes to what the frozen stage-2 encoder (the teacher) makes of the scene's original caption ("a large red circle
on the left on a blue background"). The UNet and VAE are not touched.

What is compared: CLIP's text encoder is causal, and every position after a caption's end holds an end token whose
state has read the whole caption; those padding states are most of the 77 the UNet attends to, and they sit at the
same positions whatever the phrasing. So for a varied caption the loss is the mean squared difference of the final
(normed) states at positions `pad_from`..76, which are padding in both captions. For a caption in the original
grammar (a quarter of the batch) or the empty prompt (classifier-free guidance), the student must match the
teacher at every position, which keeps what the stage-2 model did (its content-token states included).

This is a regression without diffusion noise, so it needs far fewer steps than stage 2, and it costs a text
encoder's forward and backward only (no UNet): the stage is cheap enough to run on a busy machine. It starts from
the stage-2 weights rounded to fp16, exactly what a stage-2 export holds, so `sdgraph train-demo --start-from
FILE` can run it from such a file; its batches are pure functions of (seed, step), its snapshots resumable.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import CLIPTextModel

from demo_model import dataset
from demo_model.captions import FIRST_ROUND_TEMPLATES, TRAINING_TEMPLATES, varied_caption
from demo_model.denoiser import caption_ids, update_ema
from demo_model.models import round_to_fp16
from demo_model.readout import cross_attentions, query_bank, readout_loss
from demo_model.state import load_snapshot, save_snapshot, step_generator, warmup_lr
from diffusion.prompt import run_text_model
from diffusion.tokenizer import ClipTokenizer
from diffusion.unet import UNetModel
from diffusion.vae import AutoencoderKL


@dataclass(frozen=True)
class PhrasingSchedule:
    steps: int = 1200
    batch_size: int = 64
    lr: float = 5e-4
    warmup: int = 20
    data_seed: int = 3  # the scenes of stage 2's stream
    scenes: int = 8192  # scene indices drawn from 0..scenes-1
    empty_rate: float = 0.05  # share of empty prompts (compared at every position)
    pad_from: int = 32  # first position compared for a varied caption (padding for every caption the generator makes)
    ema_decay: float = 0.99
    save_every: int = 25
    # From step `readout_from` on, the loss also compares what the UNet's cross-attention reads from the two
    # contexts (`demo_model.readout`): `probes` queries per layer from a bank of `bank_size` per layer, recorded
    # on `bank_scenes` training scenes.
    readout_from: int = 400
    probes: int = 64
    bank_scenes: int = 64
    bank_size: int = 1024
    templates: tuple[str, ...] = FIRST_ROUND_TEMPLATES  # the sentence templates of the varied captions
    batch_salt: str = "phrasing-batch"  # names the stream of batches (another round draws other batches)
    readout_salt: int = 5


# The second round (stage 3b, `--stages phrasing2`): from the first round's encoder (now the teacher), every training
# template, the readout comparison from the start.
SECOND_ROUND = PhrasingSchedule(steps=800, templates=TRAINING_TEMPLATES, readout_from=0,
                                batch_salt="phrasing2-batch", readout_salt=6)


def phrasing_batch(schedule: PhrasingSchedule, step: int) -> tuple[list[str], list[str]]:
    """The (student caption, teacher caption) pairs of one step: a varied caption and the original one of the same
    scene, or twice the empty prompt."""
    rng = random.Random(f"{schedule.batch_salt}:{schedule.data_seed}:{step}")
    students, teachers = [], []
    for _ in range(schedule.batch_size):
        if rng.random() < schedule.empty_rate:
            students.append("")
            teachers.append("")
            continue
        s = dataset.scene(schedule.data_seed, rng.randrange(schedule.scenes))
        students.append(varied_caption(s, rng, schedule.templates))
        teachers.append(s.caption)
    return students, teachers


def position_mask(students: list[str], teachers: list[str], length: int, pad_from: int) -> torch.Tensor:
    """[B, length] weights: every position where the two captions are the same, padding positions otherwise."""
    mask = torch.zeros(len(students), length)
    for row, (student, teacher) in enumerate(zip(students, teachers, strict=True)):
        mask[row, 0 if student == teacher else pad_from:] = 1.0
    return mask


def encodings(student: CLIPTextModel, teacher: CLIPTextModel, student_ids: torch.Tensor,
              teacher_ids: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The final (normed) states [B, 77, D] of the student and (without gradient) of the teacher."""
    with torch.no_grad():
        target, _ = run_text_model(teacher, teacher_ids, [], layer=-1, eos_id=eos_id)
    states, _ = run_text_model(student, student_ids, [], layer=-1, eos_id=eos_id)
    return states.float(), target.float()


def context_loss(states: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of the states, averaged over the positions `mask` selects."""
    return ((states - target).square().mean(-1) * mask).sum() / mask.sum()


def check_lengths(ids: torch.Tensor, eos_id: int, pad_from: int, captions: list[str]) -> None:
    ends = (ids == eos_id).int().argmax(dim=-1)
    for end, text in zip(ends.tolist(), captions, strict=True):
        if end >= pad_from:
            raise ValueError(f"caption {text!r} is {end} tokens long; the phrasing stage compares positions from "
                             f"{pad_from} on, so raise PhrasingSchedule.pad_from or shorten the templates")


def train_phrasing(start: CLIPTextModel, snapshot_path, schedule: PhrasingSchedule = PhrasingSchedule(),
                   progress: Callable[[int, dict], None] | None = None, unet: UNetModel | None = None,
                   vae: AutoencoderKL | None = None) -> tuple[CLIPTextModel, int]:
    """Distil a copy of the `start` text encoder onto varied captions (or resume); returns the EMA copy (eval mode)
    and the step reached. `start` itself is not changed. The readout comparison needs the stage-2 `unet` and
    `vae` (not trained)."""
    teacher = copy.deepcopy(start).eval().requires_grad_(False)
    round_to_fp16(teacher)
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    ema = copy.deepcopy(teacher)
    params = list(student.parameters())
    optimiser = torch.optim.AdamW(params, lr=schedule.lr, weight_decay=0.0, betas=(0.9, 0.99))
    layers, bank = readout_parts(schedule, unet, vae, teacher)
    step = 0
    state = load_snapshot(snapshot_path)
    if state is not None:
        student.load_state_dict(state["text"])
        ema.load_state_dict(state["ema_text"])
        optimiser.load_state_dict(state["optimizer"])
        step = state["step"]
    tokenizer, cache = ClipTokenizer(), {}
    while step < schedule.steps:
        for group in optimiser.param_groups:
            group["lr"] = warmup_lr(schedule.lr, step, schedule.warmup)
        students, teachers = phrasing_batch(schedule, step)
        student_ids, teacher_ids = caption_ids(tokenizer, students, cache), caption_ids(tokenizer, teachers, cache)
        check_lengths(student_ids, tokenizer.eos_id, schedule.pad_from, students)
        mask = position_mask(students, teachers, student_ids.shape[1], schedule.pad_from)
        states, target = encodings(student, teacher, student_ids, teacher_ids, tokenizer.eos_id)
        loss = context_loss(states, target, mask)
        if step >= schedule.readout_from:
            generator = step_generator(schedule.data_seed, step, salt=schedule.readout_salt)
            loss = loss + readout_loss(layers, bank, states, target, schedule.probes, generator)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
        update_ema(ema, student, min(schedule.ema_decay, (1 + step) / (10 + step)))
        step += 1
        if progress:
            progress(step, {"loss": loss.item()})
        if step % schedule.save_every == 0 or step == schedule.steps:
            save_snapshot(snapshot_path, {"text": student.state_dict(), "ema_text": ema.state_dict(),
                                          "optimizer": optimiser.state_dict(), "step": step})
    return ema.eval().requires_grad_(False), step


def readout_parts(schedule: PhrasingSchedule, unet: UNetModel | None, vae: AutoencoderKL | None,
                  teacher: CLIPTextModel) -> tuple[list, list[torch.Tensor]]:
    """The cross-attention layers of a frozen fp16-rounded copy of `unet` and their query bank (none when the
    schedule never compares readouts)."""
    if schedule.readout_from >= schedule.steps:
        return [], []
    if unet is None or vae is None:
        raise ValueError("the phrasing stage compares UNet readouts from step "
                         f"{schedule.readout_from}: pass the stage-2 unet and vae")
    frozen = copy.deepcopy(unet).eval().requires_grad_(False)
    round_to_fp16(frozen)
    bank = query_bank(frozen, vae.eval(), teacher, schedule.data_seed, schedule.bank_scenes, schedule.bank_size)
    return cross_attentions(frozen), bank
