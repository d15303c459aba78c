"""bench/family_step.py (issue #13's benchmarks): diffusers' UNet is built from the published SDXL and SD2.1 configs
written in the script, so these must hold the full-size presets' weights key for key, or the comparison would be
against another network. Built on the meta device: no weights, no time."""

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

from bench.family_step import published_unet_config, step_inputs
from diffusion.make_checkpoint import PRESETS
from diffusion.unet import UNetModel


@pytest.mark.parametrize("family", ["sdxl", "sd21v"])
def test_published_config_holds_the_full_size_preset_unet(family):
    with torch.device("meta"):
        ours = {"model.diffusion_model." + k: v for k, v in UNetModel(PRESETS[family].unet).state_dict().items()}
        config = published_unet_config(family)
        theirs = UNet2DConditionModel(**config)
    missing, unexpected = theirs.load_state_dict(convert_ldm_unet_checkpoint(ours, config), strict=True, assign=True)
    assert not missing and not unexpected
    assert sum(p.numel() for p in theirs.parameters()) == sum(v.numel() for v in ours.values())
    # the head count changes no weight: diffusers' attention_head_dim holds heads, ours 64-wide heads
    widths = [w // heads for w, heads in zip(config["block_out_channels"], config["attention_head_dim"], strict=True)]
    assert widths == [PRESETS[family].unet.head_dim] * len(widths)


def test_step_inputs_are_a_cfg_batch_with_sdxl_size_conditioning():
    inputs = step_inputs("sdxl", 1024, torch.bfloat16)
    assert inputs["sample"].shape == (2, 4, 128, 128) and inputs["sample"].dtype == torch.bfloat16
    assert inputs["encoder_hidden_states"].shape == (2, 77, 2048)
    assert inputs["added_cond_kwargs"]["time_ids"].tolist() == [[1024, 1024, 0, 0, 1024, 1024]] * 2
    assert "added_cond_kwargs" not in step_inputs("sd21v", 768, torch.float32)


def test_unknown_family_is_named():
    with pytest.raises(ValueError, match="'sd3'.*sd21v.*sdxl"):
        published_unet_config("sd3")


def test_sdxl_step_flops_are_counted_with_the_label_vector():
    """The floor of an SDXL step: the UNet's shapes on the meta device, with the size/pooled label vector that
    SDXL's UNet requires (13.5 TFLOP for a CFG batch at 1024², ~4.25x the 512² step: attention grows faster)."""
    from bench.sd15_step import step_flops

    at_1024, at_512 = (sum(step_flops(size, PRESETS["sdxl"].unet).values()) for size in (1024, 512))
    assert at_1024 == pytest.approx(13.522e12, rel=1e-3) and at_512 == pytest.approx(3.178e12, rel=1e-3)


def test_floor_lines_give_each_config_as_a_multiple_of_the_floor_and_say_when_the_target_is_below_it():
    from bench.family_step import floor_lines

    floor = {"mm_bf16": 400e9, "1024": {"flops": 4e12}}  # a 10 s floor
    results = {"sdgraph-default": {"1024": {"step_s": 11.0}}, "diffusers-bf16": {"1024": {"step_s": 12.0}}}
    lines = floor_lines(floor, results, [1024])
    assert "bf16 floor 10.00 s" in lines[1] and "sdgraph-default x1.10, diffusers-bf16 x1.20" in lines[1]
    assert "x0.92 the floor (below the floor" in lines[2]
    results["diffusers-bf16"]["1024"]["step_s"] = 14.0  # 1.3x of 14 s is 10.8 s: above the floor
    assert floor_lines(floor, results, [1024])[2].endswith("x1.08 the floor")
