"""Issue #12: areas, masks, strengths, timestep ranges and controls in the sampler (ComfyUI's calc_cond_batch)."""

import pytest
import torch
import torch.nn.functional as F

from diffusion.denoisers import CFGDenoiser, predict_sides
from diffusion.latent import CondEntry, Conditioning
from diffusion.regions import NEVER_STARTED, percent_to_sigma
from diffusion.schedules import sd1_schedule

SD1 = sd1_schedule()


class FakeModel:
    """denoised = x * 0 + mean(context): one value per entry, so a side's output shows the weights; records the
    crop, context and control of each call."""

    def __init__(self, uses_x=False):
        self.calls = []
        self.uses_x = uses_x

    def __call__(self, x, sigma, context, control=None):
        self.calls.append({"x": x.clone(), "context": context.clone(), "control": control})
        assert x.shape[0] == sigma.shape[0] == context.shape[0]
        value = context.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return x * value if self.uses_x else torch.zeros_like(x) + value


def entry(value, **fields):
    return CondEntry(torch.full((1, 77, 8), float(value)), **fields)


def weight_of(out):
    """With a whole-latent entry predicting 0 and the entry under test predicting 1, out = w / (1 + w)."""
    return out / (1 - out)


def test_an_area_entry_only_changes_its_area_and_gets_the_crop():
    model = FakeModel()
    x, sigma = torch.randn(1, 4, 32, 32), torch.tensor([1.0])
    (out,) = predict_sides(model, x, sigma, [[entry(0.0), entry(1.0, area=(16, 16, 8, 8))]])
    outside = torch.ones(32, 32, dtype=torch.bool)
    outside[8:24, 8:24] = False
    assert out[..., outside].eq(0).all()
    torch.testing.assert_close(out[..., 12:20, 12:20], torch.full((1, 4, 8, 8), 0.5))
    shapes = sorted(tuple(c["x"].shape) for c in model.calls)
    assert shapes == [(1, 4, 16, 16), (1, 4, 32, 32)]
    crop_call = next(c for c in model.calls if c["x"].shape[-1] == 16)
    assert torch.equal(crop_call["x"], x[..., 8:24, 8:24])


def test_area_feathering_on_inner_sides_only():
    """rr = min(8, size // 4) cells, weights (t+1)/rr, on sides not on the latent's border."""
    x, sigma = torch.zeros(1, 4, 64, 64), torch.tensor([1.0])
    (out,) = predict_sides(FakeModel(), x, sigma, [[entry(0.0), entry(1.0, area=(40, 64, 0, 0))]])
    w = weight_of(out[0, 0])
    column = w[:40, 10]
    torch.testing.assert_close(column[:32], torch.ones(32))  # top side on the border: no fade
    torch.testing.assert_close(column[32:], torch.tensor([8, 7, 6, 5, 4, 3, 2, 1]) / 8.0)  # rr = min(8, 40 // 4)
    torch.testing.assert_close(w[5], torch.ones(64))  # full width: no fade left or right
    assert out[0, 0, 40:].eq(0).all()
    (small,) = predict_sides(FakeModel(), x, sigma, [[entry(0.0), entry(1.0, area=(12, 12, 20, 20))]])
    row = weight_of(small[0, 0, 26, 20:32])
    torch.testing.assert_close(row, torch.tensor([1 / 3, 2 / 3, 1, 1, 1, 1, 1, 1, 1, 1, 2 / 3, 1 / 3]))  # rr = 3


def test_a_masked_entry_is_weighted_by_the_resized_mask_times_strength():
    mask = torch.zeros(1, 16, 16)
    mask[:, :, 8:] = 1.0
    mask[:, 4, 3] = 0.7
    x, sigma = torch.zeros(1, 4, 8, 8), torch.tensor([1.0])
    (out,) = predict_sides(FakeModel(), x, sigma, [[entry(0.0), entry(1.0, mask=mask, mask_strength=0.5)]])
    resized = F.interpolate(mask.unsqueeze(1), size=(8, 8), mode="bilinear", align_corners=False)[0, 0] * 0.5
    torch.testing.assert_close(weight_of(out[0, 0]), resized)


def test_a_mask_with_an_area_is_not_feathered_and_strength_multiplies():
    x, sigma = torch.zeros(1, 4, 32, 32), torch.tensor([1.0])
    masked = entry(1.0, mask=torch.ones(32, 32), area=(16, 16, 8, 8), strength=2.0)
    (out,) = predict_sides(FakeModel(), x, sigma, [[entry(0.0), masked]])
    w = weight_of(out[0, 0])
    torch.testing.assert_close(w[8:24, 8:24], torch.full((16, 16), 2.0))
    assert w[:8].eq(0).all()


def test_mask_bounds_become_the_area():
    mask = torch.zeros(1, 32, 32)
    mask[:, 4:20, 10:12] = 1.0  # 16 x 2 -> at least 8 x 8
    model = FakeModel()
    predict_sides(model, torch.zeros(1, 4, 32, 32), torch.tensor([1.0]),
                  [[entry(1.0, mask=mask, set_area_to_bounds=True)]])
    assert model.calls[0]["x"].shape == (1, 4, 16, 8)


def test_percentage_areas_resolve_against_the_latent():
    model = FakeModel()
    x = torch.randn(1, 4, 16, 16)
    predict_sides(model, x, torch.tensor([1.0]), [[entry(1.0, area=("percentage", 0.5, 0.25, 0.25, 0.5))]])
    assert torch.equal(model.calls[0]["x"], x[..., 4:12, 8:12])


def test_two_areas_are_averaged_by_weight_in_one_call():
    model = FakeModel()
    x, sigma = torch.zeros(1, 4, 32, 32), torch.tensor([1.0])
    a, b = entry(1.0, area=(16, 16, 8, 8), strength=1.0), entry(5.0, area=(16, 16, 8, 8), strength=3.0)
    (out,) = predict_sides(model, x, sigma, [[a, b]])
    assert len(model.calls) == 1 and model.calls[0]["x"].shape == (2, 4, 16, 16)
    torch.testing.assert_close(out[0, 0, 16, 16], torch.tensor((1.0 * 1 + 5.0 * 3) / 4))


def test_areas_of_different_shapes_run_separately():
    model = FakeModel()
    predict_sides(model, torch.zeros(1, 4, 32, 32), torch.tensor([1.0]),
                  [[entry(1.0, area=(16, 16, 0, 0)), entry(1.0, area=(16, 8, 0, 0))]])
    assert len(model.calls) == 2


def test_an_entry_outside_its_timestep_range_is_skipped():
    to_sigma = lambda p: percent_to_sigma(SD1, p)  # noqa: E731
    late = entry(1.0, start_percent=0.5)  # from halfway: sigma <= sigma(0.5)
    early = entry(3.0, end_percent=0.5)  # until halfway: sigma >= sigma(0.5)
    half = percent_to_sigma(SD1, 0.5)
    x = torch.zeros(1, 4, 4, 4)
    for sigma, values in [(14.0, {3.0}), (half * 1.01, {3.0}), (half, {1.0, 3.0}), (half * 0.99, {1.0}),
                          (0.05, {1.0})]:
        model = FakeModel()
        predict_sides(model, x, torch.tensor([sigma]), [[late, early]], to_sigma)
        seen = {float(v) for c in model.calls for v in c["context"].mean(dim=(1, 2))}
        assert seen == values, sigma


def test_percent_to_sigma_follows_the_schedule():
    assert percent_to_sigma(SD1, 0.0) == NEVER_STARTED == 999999999.9
    assert percent_to_sigma(SD1, 1.0) == 0.0
    assert percent_to_sigma(SD1, 0.5) == float(SD1.sigma(torch.tensor(0.5 * 999.0)))
    assert percent_to_sigma(SD1, 0.001) == pytest.approx(float(SD1.sigma_max), rel=1e-2)


def test_a_timestep_range_without_a_schedule_is_a_clear_error():
    with pytest.raises(ValueError, match="timestep range"):
        predict_sides(FakeModel(), torch.zeros(1, 4, 4, 4), torch.tensor([1.0]), [[entry(1.0, end_percent=0.5)]])


def test_entries_with_different_controls_are_not_batched_together():
    first, second = object(), object()
    model = FakeModel()
    sides = [[entry(1.0, control=first), entry(2.0, control=second)], [entry(3.0, control=first), entry(4.0)]]
    predict_sides(model, torch.zeros(1, 4, 4, 4), torch.tensor([1.0]), sides)
    groups = {(id(c["control"]) if c["control"] is not None else None): sorted(c["context"].mean(dim=(1, 2)).tolist())
              for c in model.calls}
    assert len(model.calls) == 3
    assert groups == {id(first): [1.0, 3.0], id(second): [2.0], None: [4.0]}


def test_an_area_outside_the_latent_is_a_clear_error():
    with pytest.raises(ValueError, match="outside"):
        predict_sides(FakeModel(), torch.zeros(1, 4, 8, 8), torch.tensor([1.0]), [[entry(1.0, area=(8, 8, 8, 0))]])


def test_cfg_gives_an_area_entry_a_twin_on_the_other_side():
    """ComfyUI's create_cond_with_same_area_if_none: the negative is also predicted on the positive's area."""
    model = FakeModel(uses_x=True)
    x, sigma = torch.randn(1, 4, 32, 32), torch.tensor([1.0])
    positive = Conditioning((entry(2.0), entry(4.0, area=(16, 16, 0, 0))))
    CFGDenoiser(model, positive, Conditioning((entry(0.5),)), 3.0)(x, sigma)
    crops = [c for c in model.calls if c["x"].shape[-1] == 16]
    assert len(crops) == 1 and sorted(crops[0]["context"].mean(dim=(1, 2)).tolist()) == [0.5, 4.0]


def test_no_twin_when_the_other_side_has_the_same_area():
    model = FakeModel()
    area = (16, 16, 0, 0)
    positive, negative = Conditioning((entry(4.0, area=area),)), Conditioning((entry(0.5, area=area),))
    CFGDenoiser(model, positive, negative, 3.0)(torch.zeros(1, 4, 32, 32), torch.tensor([1.0]))
    assert len(model.calls) == 1 and model.calls[0]["x"].shape[0] == 2


@pytest.mark.parametrize("to_uncond", [True, False])
def test_control_apply_to_uncond_gives_the_negative_the_positive_control(to_uncond):
    """ControlNetApply (ComfyUI's apply_empty_x_to_equal_area): the negative is run with the same control."""
    control, model = object(), FakeModel()
    positive = Conditioning((entry(2.0, control=control, control_apply_to_uncond=to_uncond),))
    CFGDenoiser(model, positive, Conditioning((entry(0.5),)), 3.0)(torch.zeros(1, 4, 4, 4), torch.tensor([1.0]))
    if to_uncond:
        assert len(model.calls) == 1 and model.calls[0]["control"] is control
    else:
        assert [c["control"] for c in model.calls] == [control, None]


def test_a_control_that_asks_for_the_uncond_is_shared_too():
    """A ControlNetApply chain marks itself (apply_to_uncond) instead of the entry: same effect."""
    control, model = type("Chain", (), {"apply_to_uncond": True})(), FakeModel()
    positive = Conditioning((entry(2.0, control=control),))
    CFGDenoiser(model, positive, Conditioning((entry(0.5),)), 3.0)(torch.zeros(1, 4, 4, 4), torch.tensor([1.0]))
    assert len(model.calls) == 1 and model.calls[0]["control"] is control
