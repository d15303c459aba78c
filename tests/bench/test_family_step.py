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
