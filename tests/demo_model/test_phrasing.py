"""Stage 3 of train-demo (#14, everyday phrasing): the text encoder is distilled onto varied captions."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from demo_model import captions, cli, dataset, models, readout
from demo_model.denoiser import caption_ids
from demo_model.phrasing import (
    SECOND_ROUND,
    PhrasingSchedule,
    check_lengths,
    context_loss,
    encodings,
    phrasing_batch,
    position_mask,
    train_phrasing,
)
from diffusion.tokenizer import ClipTokenizer

ARCH = models.micro_architecture()
TINY = PhrasingSchedule(steps=3, batch_size=8, warmup=1, save_every=1, readout_from=2, bank_scenes=4, bank_size=50)


def _text_encoder(seed: int = 5):
    return models.new_denoiser(ARCH, seed)[1].eval()


def test_batches_pair_a_varied_caption_with_the_original_caption_of_its_scene():
    schedule = PhrasingSchedule()
    students, teachers = phrasing_batch(schedule, 17)
    assert (students, teachers) == phrasing_batch(schedule, 17)
    assert (students, teachers) != phrasing_batch(schedule, 18)
    originals = {dataset.scene(schedule.data_seed, i).caption for i in range(schedule.scenes)}
    assert all(t in originals or t == s == "" for s, t in zip(students, teachers, strict=True))
    assert 5 < sum(s != t for s, t in zip(students, teachers, strict=True)) < schedule.batch_size


def _template_of(text: str, templates) -> bool:
    return any(captions.template_pattern(t).fullmatch(text) for t in templates)


def test_second_round_draws_other_batches_from_every_training_template():
    """Stage 3b (#14): the first round keeps its 15 templates (the recipe reproduces the earlier stage 3); the
    second draws other batches, from the added templates too."""
    first = [s for step in range(40) for s, t in zip(*phrasing_batch(PhrasingSchedule(), step), strict=True)]
    second = [s for step in range(40) for s, t in zip(*phrasing_batch(SECOND_ROUND, step), strict=True)]
    assert not any(_template_of(s, captions.MORE_TEMPLATES) for s in first)
    assert sum(_template_of(s, captions.MORE_TEMPLATES) for s in second) > len(second) // 5
    assert phrasing_batch(SECOND_ROUND, 3) != phrasing_batch(dataclasses.replace(SECOND_ROUND, batch_salt="x"), 3)


def test_every_generated_caption_ends_before_the_compared_positions():
    """The loss compares a varied caption with its original only at positions that are padding in both."""
    tokenizer, cache = ClipTokenizer(), {}
    for schedule in (PhrasingSchedule(), SECOND_ROUND):
        for step in range(0, 3000, 13):
            students, teachers = phrasing_batch(schedule, step)
            check_lengths(caption_ids(tokenizer, students + teachers, cache), tokenizer.eos_id, schedule.pad_from,
                          students + teachers)
    with pytest.raises(ValueError, match="pad_from"):
        check_lengths(caption_ids(tokenizer, ["a red circle on the left"], cache), tokenizer.eos_id, 4, ["a red"])


def test_position_mask_compares_same_captions_everywhere_and_varied_ones_at_padding():
    mask = position_mask(["a", "b"], ["a", "c"], 10, 6)
    assert mask[0].tolist() == [1.0] * 10
    assert mask[1].tolist() == [0.0] * 6 + [1.0] * 4


def test_context_loss_is_zero_for_the_same_encoder_and_caption_and_positive_otherwise():
    tokenizer, text = ClipTokenizer(), _text_encoder()
    ids = caption_ids(tokenizer, ["a small red circle on the left on a blue background"], {})
    other = caption_ids(tokenizer, ["blue background, red circle, left"], {})
    mask = position_mask(["x"], ["x"], 77, 32)
    assert context_loss(*encodings(text, text, ids, ids, tokenizer.eos_id), mask).item() == 0.0
    assert context_loss(*encodings(text, text, other, ids, tokenizer.eos_id), mask).item() > 1e-4


def test_readout_compares_what_the_unet_reads_wherever_the_words_stand():
    """The UNet-side comparison: zero for the same context, zero when the tokens are reordered (cross-attention
    does not see order), positive for another context; the bank holds real queries of every layer."""
    unet, text = models.new_denoiser(ARCH, 3)
    vae = models.new_vae(ARCH, 0).eval()
    bank = readout.query_bank(unet, vae, text.eval(), 3, scenes=4, per_layer=50)
    layers = readout.cross_attentions(unet)
    assert len(bank) == len(layers) >= 3
    assert all(q.shape == (50, layer.to_q.out_features) for q, layer in zip(bank, layers, strict=True))
    context = torch.randn(2, 77, ARCH.text.hidden_size)

    def loss(student):
        return readout.readout_loss(layers, bank, student, context, 16, torch.Generator().manual_seed(0)).item()

    assert loss(context) == 0.0
    assert loss(context[:, torch.randperm(77)]) < 1e-10
    assert loss(torch.randn(2, 77, ARCH.text.hidden_size)) > 0.01


def test_phrasing_stage_starts_from_the_fp16_weights_learns_and_resumes_exactly(tmp_path):
    """It starts from the stage-2 encoder as an fp16 export holds it (not a fresh one), leaves that encoder alone,
    and a run resumed across the switch to readout comparison ends with the same weights as a straight one."""
    unet, start = models.new_denoiser(ARCH, 5)
    parts = {"unet": unet, "vae": models.new_vae(ARCH, 0).eval()}
    before = {k: v.clone() for k, v in start.state_dict().items()}
    unchanged, step = train_phrasing(start, tmp_path / "zero.pt", dataclasses.replace(TINY, steps=0))
    assert step == 0
    assert all(torch.equal(v, before[k].half().float()) for k, v in unchanged.state_dict().items())
    losses = []
    straight, step = train_phrasing(start, tmp_path / "straight.pt", TINY,
                                    progress=lambda s, m: losses.append(m["loss"]), **parts)
    assert step == 3 and all(torch.equal(start.state_dict()[k], v) for k, v in before.items())
    assert not all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(), unchanged.state_dict().values(),
                                                     strict=True))
    train_phrasing(start, tmp_path / "resumed.pt", dataclasses.replace(TINY, steps=2))
    resumed, step = train_phrasing(start, tmp_path / "resumed.pt", TINY, **parts)
    assert step == 3
    assert all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(), resumed.state_dict().values(),
                                                 strict=True))
    with pytest.raises(ValueError, match="unet and vae"):
        train_phrasing(start, tmp_path / "no-unet.pt", TINY)


def test_phrasing_stage_lowers_the_distillation_loss(tmp_path):
    losses = []
    train_phrasing(_text_encoder(), tmp_path / "fit.pt", PhrasingSchedule(steps=40, batch_size=16, lr=2e-3,
                                                                          warmup=1, save_every=100),
                   progress=lambda s, m: losses.append(m["loss"]))
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses


def _train_from_export(tmp_path, metadata: dict[str, str], args: list[str]) -> dict[str, str]:
    """Run `train-demo --start-from` on a micro export with `metadata`; check that only the text encoder changed
    and return the new file's metadata."""
    vae = models.new_vae(ARCH, 0).eval()
    unet, text = models.new_denoiser(ARCH, 9)
    start = models.export_checkpoint(tmp_path / "start.safetensors", unet, vae, text.eval(), metadata)
    out = tmp_path / "out.safetensors"
    code = cli.main(["--arch", "micro", "--start-from", str(start), *args, "--work", str(tmp_path / "work"),
                     "--out", str(out)])
    assert code == 0
    before, after = load_file(start), load_file(out)
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("cond_stage_model."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("cond_stage_model."))
    return cli.start_metadata(out)


def test_train_demo_start_from_runs_the_phrasing_stage_on_an_export(tmp_path):
    """`sdgraph train-demo --start-from FILE --stages phrasing,export`: a new text encoder, the same UNet and
    VAE, and the step counts in the metadata."""
    metadata = _train_from_export(tmp_path, {"denoiser_steps": "77", "vae_steps": "5"},
                                  ["--stages", "phrasing,export", "--phrasing-steps", "2"])
    assert metadata["denoiser_steps"] == "77" and metadata["phrasing_steps"] == "2"


def test_train_demo_second_round_continues_from_a_phrased_export(tmp_path):
    """`sdgraph train-demo --start-from FILE --stages phrasing2,export` (#14, stage 3b): only the text encoder
    changes, and the metadata keeps the file's stage-3 step count beside the new round's."""
    metadata = _train_from_export(tmp_path, {"denoiser_steps": "77", "vae_steps": "5", "phrasing_steps": "1200"},
                                  ["--stages", "phrasing2,export", "--phrasing2-steps", "2"])
    assert (metadata["phrasing_steps"], metadata["phrasing2_steps"]) == ("1200", "2")
