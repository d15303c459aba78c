"""ControlNet (issue #12): the network and its single-file layout, the UNet's control residuals, chained controls,
start/end percent ranges, the hint's resizing, and ControlNetApply's controls on the uncond."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusion.controlnet import (
    ControlChain,
    ControlNetModel,
    add_residuals,
    controlnet_value,
    open_controlnet,
    percent_to_sigma,
    prepare_hint,
)
from diffusion.denoisers import ModelDenoiser
from diffusion.make_checkpoint import PRESETS, make_checkpoint, random_state_dict
from diffusion.make_controlnet import controlnet_layout, write_controlnet
from diffusion.safetensors_header import CheckpointError
from diffusion.sampling import select_sigmas
from diffusion.schedules import sd1_schedule
from diffusion.unet import ControlResiduals, build_unet
from runtime.models import ModelManager

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
TINY = PRESETS["tiny"].unet


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory) -> Path:
    return write_controlnet(tmp_path_factory.mktemp("cn") / "tiny_cn.safetensors", preset="tiny", seed=0)


@pytest.fixture(scope="module")
def tiny_net(tiny_file) -> ControlNetModel:
    return controlnet_value(open_controlnet(tiny_file), device=torch.device("cpu"), dtype=torch.float32,
                            models=ModelManager(), name=tiny_file.name)


@pytest.fixture(scope="module")
def tiny_unet():
    prefix = "model.diffusion_model."
    state = {k[len(prefix):]: v.float() for k, v in random_state_dict("tiny", 0).items() if k.startswith(prefix)}
    return build_unet(state)


def inputs(batch=2, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, size, size, generator=g), torch.full((batch,), 500.0),
            torch.randn(batch, 77, TINY.context_dim, generator=g))


def test_sd15_layout_is_the_published_control_v11p_sd15_one():
    published = {}
    for line in (FIXTURES / "controlnet_sd15_keys.tsv").read_text().splitlines():
        key, dtype, shape = line.split("\t")[:3]
        published[key] = (dtype, tuple(int(s) for s in shape.strip("[]").split(",") if s.strip()))
    ours = {k: ("F16" if d == torch.float16 else str(d), s) for k, (d, s) in controlnet_layout("sd15").items()}
    assert ours == published


def test_tiny_file_loads_and_gives_one_residual_per_skip(tiny_file, tiny_unet):
    layout = open_controlnet(tiny_file)
    assert layout.config.unet == TINY and layout.config.hint_channels == 3
    assert all(v.startswith("control_model.") for v in layout.keys.values())
    net = layout.load()
    x, t, context = inputs()
    out = net(x, torch.rand(2, 3, 64, 64), t, context)
    skips = [x]
    h = x
    emb = tiny_unet.time_embed(torch.zeros(2, TINY.model_channels))
    for block in tiny_unet.input_blocks:
        h = block(h, emb, context)
        skips.append(h)
    assert [r.shape for r in out.skips] == [s.shape for s in skips[1:]]
    assert out.middle.shape == tiny_unet.middle_block(h, emb, context).shape


def test_file_without_the_control_model_prefix_loads_the_same(tiny_file, tmp_path):
    bare = tmp_path / "bare.safetensors"
    save_file({k.removeprefix("control_model."): v for k, v in load_file(tiny_file).items()}, bare)
    x, t, context = inputs()
    hint = torch.rand(2, 3, 64, 64)
    a, b = open_controlnet(tiny_file).load(), open_controlnet(bare).load()
    assert torch.equal(a(x, hint, t, context).middle, b(x, hint, t, context).middle)


@pytest.mark.parametrize("kind, message", [("checkpoint", "a checkpoint, not a ControlNet"),
                                           ("union", "a ControlNet Union"),
                                           ("diffusers", "cannot read the ControlNet architecture"),
                                           ("missing", "missing: control_model.zero_convs.3.0.bias")])
def test_other_files_are_refused_naming_the_file(kind, message, tiny_file, tmp_path):
    path = tmp_path / f"{kind}.safetensors"
    if kind == "checkpoint":
        make_checkpoint(path, preset="tiny")
    elif kind == "union":
        save_file({"task_embedding": torch.zeros(8, 320), "controlnet_cond_embedding.conv_in.weight":
                   torch.zeros(16, 3, 3, 3)}, path)
    elif kind == "diffusers":  # a diffusers-layout file with only its hint encoder's first layer
        save_file({"controlnet_cond_embedding.conv_in.weight": torch.zeros(16, 3, 3, 3)}, path)
    else:
        state = load_file(tiny_file)
        del state["control_model.zero_convs.3.0.bias"]
        save_file(state, path)
    with pytest.raises(CheckpointError, match=message) as error:
        open_controlnet(path)
    assert str(path) in str(error.value)


def test_unet_with_zero_residuals_equals_the_unet_without_control(tiny_unet, tiny_net):
    x, t, context = inputs()
    shapes = tiny_net.residuals(x, t, context, torch.rand(2, 3, 64, 64))
    zero = ControlResiduals(tuple(torch.zeros(r.shape) for r in shapes.skips), torch.zeros(shapes.middle.shape))
    with torch.no_grad():
        plain = tiny_unet(x, t, context)
        controlled = tiny_unet(x, t, context, control=zero)
        nudged_middle = tiny_unet(x, t, context, control=zero._replace(middle=torch.ones(shapes.middle.shape)))
        first_skip = (torch.ones(shapes.skips[0].shape), *zero.skips[1:])
        nudged_skip = tiny_unet(x, t, context, control=zero._replace(skips=first_skip))
    assert torch.equal(plain, controlled)
    assert not torch.allclose(plain, nudged_middle) and not torch.allclose(plain, nudged_skip)


def test_a_residual_of_another_shape_is_a_clear_error(tiny_unet):
    x, t, context = inputs()
    bad = ControlResiduals((None,) * 4, torch.zeros(2, 1280, 4, 4))
    with pytest.raises(ValueError, match="made for another model"):
        tiny_unet(x, t, context, control=bad)


def test_chained_controls_add_up(tiny_net):
    x, t, context = inputs()
    sigma = torch.full((2,), 3.0)
    hint_a, hint_b = torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64)
    first = ControlChain(tiny_net, hint_a, 0.7)
    second = ControlChain(tiny_net, hint_b, 1.3, previous=first)
    alone = ControlChain(tiny_net, hint_b, 1.3)
    both, a, b = second(x, t, context, sigma), first(x, t, context, sigma), alone(x, t, context, sigma)
    expected = add_residuals(a, b)
    assert all(torch.equal(p, q) for p, q in zip(both.skips, expected.skips, strict=True))
    assert torch.equal(both.middle, expected.middle)
    assert not torch.equal(a.middle, b.middle)
    assert torch.allclose(a.middle, first.net_handle.residuals(x, t, context, hint_a.expand(2, -1, -1, -1)).middle
                          * 0.7)


def test_percent_to_sigma_as_comfyui():
    schedule = sd1_schedule()
    assert percent_to_sigma(schedule, 0.0) == 999999999.9 and percent_to_sigma(schedule, 1.0) == 0.0
    assert percent_to_sigma(schedule, 0.5) == pytest.approx(float(schedule.sigma(torch.tensor(499.5))))


@pytest.mark.parametrize("start, end, expected", [
    (0.0, 0.8, [True] * 5 + [False]),  # the parity case: end 0.8 drops only the last of 6 euler steps
    (0.0, 1.0, [True] * 6),
    (0.5, 1.0, [False] * 3 + [True] * 3),
    (0.2, 0.6, [False, True, True, True, False, False]),
])
def test_start_and_end_percent_skip_the_right_steps(tiny_net, start, end, expected):
    schedule = sd1_schedule()
    sigmas = select_sigmas(schedule, "normal", "euler", 6)[:-1]
    chain = ControlChain(tiny_net, torch.rand(1, 3, 8, 8), 1.0, start, end)
    active = [chain.active(s.reshape(1)) for s in sigmas]
    comfy = [not (float(s) > percent_to_sigma(schedule, start) or float(s) < percent_to_sigma(schedule, end))
             for s in sigmas]
    assert active == comfy == expected


def test_a_skipped_link_passes_its_previous_links_residuals_on(tiny_net):
    x, t, context = inputs()
    late = torch.full((2,), 0.05)  # near the end of the schedule
    first = ControlChain(tiny_net, torch.rand(1, 3, 64, 64), 1.0)
    early_only = ControlChain(tiny_net, torch.rand(1, 3, 64, 64), 1.0, 0.0, 0.5, previous=first)
    assert torch.equal(early_only(x, t, context, late).middle, first(x, t, context, late).middle)
    assert ControlChain(tiny_net, torch.rand(1, 3, 64, 64), 1.0, 0.0, 0.5)(x, t, context, late) is None


class RecordingUNet:
    def __init__(self):
        self.calls = []

    def __call__(self, x, t, context, **kwargs):
        self.calls.append(kwargs)
        return torch.zeros_like(x)


def test_eps_denoiser_passes_the_controls_residuals_to_the_unet():
    unet = RecordingUNet()
    denoiser = ModelDenoiser(unet, sd1_schedule())
    x, sigma, context = torch.randn(1, 4, 8, 8), torch.tensor([2.0]), torch.randn(1, 77, 32)
    seen = []

    def control(x_in, timesteps, ctx, s, schedule=None, y=None):
        seen.append((x_in, timesteps, s, y))
        assert schedule is denoiser.schedule  # percents on the sampled model's schedule (issue #13)
        return "residuals"

    denoiser(x, sigma, context, control=control)
    denoiser(x, sigma, context, control=lambda *_, **__: None)
    denoiser(x, sigma, context)
    assert unet.calls == [{"control": "residuals"}, {}, {}]
    x_in, timesteps, s, y = seen[0]
    assert torch.allclose(x_in, x / (2.0**2 + 1) ** 0.5) and timesteps.dtype == torch.float32 and s is sigma
    assert y is None
    label = torch.randn(1, 16)
    denoiser(x, sigma, context, control=control, y=label)
    assert seen[-1][3] is label  # an SDXL ControlNet gets the UNet's label vector


def test_hint_is_resized_nearest_exact_after_a_centre_crop():
    hint = torch.arange(2 * 4 * 6, dtype=torch.float32).reshape(1, 2, 4, 6)  # 6 wide, 4 high
    out = prepare_hint(hint, 8, 8, 3)  # square: one column cut on each side, then 2x
    assert out.shape == (3, 2, 8, 8)
    assert torch.equal(out[0], hint[0, :, :, 1:5].repeat_interleave(2, 1).repeat_interleave(2, 2))
    pair = torch.rand(2, 3, 8, 8)
    assert torch.equal(prepare_hint(pair, 8, 8, 4), torch.cat([pair, pair]))  # b hints serve a multiple of b


def test_a_hint_batch_that_cannot_match_the_latents_is_an_error_naming_the_node(tiny_net):
    x, t, context = inputs(batch=3)
    chain = ControlChain(tiny_net, torch.rand(2, 3, 64, 64), 1.0, origin="ControlNetApplyAdvanced (node 13)")
    with pytest.raises(ValueError, match=r"ControlNetApplyAdvanced \(node 13\): the ControlNet hint has 2 images"):
        chain(x, t, context, torch.full((3,), 1.0))
    with pytest.raises(ValueError, match="3 channels"):
        ControlChain(tiny_net, torch.rand(1, 4, 64, 64), 1.0)


DIFFUSERS_CONFIGS = {  # diffusers' ControlNetModel arguments of the published SD1.5 and SDXL ControlNets' configs
    "sd15": dict(cross_attention_dim=768),
    "sdxl": dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 block_out_channels=(320, 640, 1280), cross_attention_dim=2048, transformer_layers_per_block=(1, 2, 10),
                 attention_head_dim=(5, 10, 20), use_linear_projection=True, addition_embed_type="text_time",
                 addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816),
}


@pytest.mark.parametrize("preset", sorted(DIFFUSERS_CONFIGS))
def test_diffusers_layout_is_diffusers_controlnet_model_key_for_key(preset):
    """What make-checkpoint writes (and the loader renames) is what diffusers' ControlNetModel.save_pretrained
    writes for the full-size SD1.5 and SDXL ControlNets: every key and shape (built on the meta device)."""
    from diffusers import ControlNetModel

    from diffusion.controlnet_keys import ldm_keys
    from diffusion.make_controlnet import diffusers_layout

    with torch.device("meta"):
        theirs = {k: tuple(v.shape) for k, v in ControlNetModel(**DIFFUSERS_CONFIGS[preset]).state_dict().items()}
    layout = diffusers_layout(preset)
    assert {k: shape for k, (_, shape) in layout.items()} == theirs
    ours = {k.removeprefix("control_model."): shape for k, (_, shape) in controlnet_layout(preset).items()}
    assert {name: theirs[key] for name, key in ldm_keys(theirs).items()} == ours


def test_a_diffusers_layout_file_computes_what_the_single_file_one_does(tiny_file, tmp_path):
    path = write_controlnet(tmp_path / "diffusion_pytorch_model.safetensors", preset="tiny", seed=0, diffusers=True)
    layout = open_controlnet(path)
    assert layout.config == open_controlnet(tiny_file).config
    assert layout.keys["zero_convs.0.0.weight"] == "controlnet_down_blocks.0.weight"
    x, t, context = inputs()
    hint = torch.rand(2, 3, 64, 64)
    a, b = open_controlnet(tiny_file).load()(x, hint, t, context), layout.load()(x, hint, t, context)
    assert all(torch.equal(p, q) for p, q in zip((*a.skips, a.middle), (*b.skips, b.middle), strict=True))


def test_an_unknown_key_in_a_diffusers_file_is_named(tmp_path):
    path = write_controlnet(tmp_path / "cn.safetensors", preset="tiny", seed=0, diffusers=True)
    state = load_file(path)
    state["controlnet_extra.weight"] = torch.zeros(2)
    save_file(state, path)
    with pytest.raises(CheckpointError, match=r"unexpected: controlnet_extra\.weight"):
        open_controlnet(path)


@pytest.mark.parametrize("diffusers", [False, True])
def test_an_sdxl_controlnet_takes_the_label_vector(diffusers, tmp_path):
    path = write_controlnet(tmp_path / "xl.safetensors", preset="sdxl-tiny", seed=0, diffusers=diffusers)
    layout = open_controlnet(path)
    unet = PRESETS["sdxl-tiny"].unet
    assert layout.config.unet == unet
    net = controlnet_value(layout, device=torch.device("cpu"), dtype=torch.float32, models=ModelManager(),
                           name=path.name)
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, unet.context_dim, generator=g)
    y, hint, t = torch.randn(2, unet.adm_in_channels, generator=g), torch.rand(2, 3, 64, 64), torch.full((2,), 500.0)
    with_y = net.residuals(x, t, context, hint, y)
    assert not torch.equal(with_y.middle, net.residuals(x, t, context, hint, y + 1).middle)  # y reaches the net
    with pytest.raises(ValueError, match="made for SDXL.*label vector.*does not give"):
        net.residuals(x, t, context, hint)


def test_an_sdxl_controlnet_computes_what_diffusers_controlnet_model_computes(tmp_path):
    """The same diffusers-layout file in diffusers' ControlNetModel (SDXL's text_time conditioning from the size
    ids) and in ours (the label vector y built as ComfyUI builds it): every residual within 1e-4, fp32."""
    from diffusers import ControlNetModel

    from diffusion.adm import sdxl_label

    path = write_controlnet(tmp_path / "xl.safetensors", preset="sdxl-tiny", seed=0, diffusers=True)
    unet = PRESETS["sdxl-tiny"].unet
    theirs = ControlNetModel(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        block_out_channels=(32, 64, 128), layers_per_block=1, cross_attention_dim=unet.context_dim,
        transformer_layers_per_block=(1, 1, 2), attention_head_dim=(1, 1, 2), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=unet.adm_in_channels)
    theirs.load_state_dict({k: v.float() for k, v in load_file(path).items()}, strict=True)
    ours = open_controlnet(path).load()
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, unet.context_dim, generator=g)
    pooled, hint = torch.randn(2, 1280, generator=g), torch.rand(2, 3, 64, 64, generator=g)
    t = torch.tensor([500.0, 500.0])
    ids = [64.0, 64.0, 0.0, 0.0, 64.0, 64.0]
    y = sdxl_label(pooled, height=64, width=64, crop_h=0, crop_w=0, target_height=64, target_width=64)
    with torch.inference_mode():
        skips, middle = theirs(x, t, context, hint, added_cond_kwargs={"text_embeds": pooled, "time_ids":
                                                                     torch.tensor([ids, ids])}, return_dict=False)
        out = ours(x, hint, t, context, y)
    for a, b in zip((*out.skips, out.middle), (*skips, middle), strict=True):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max()
