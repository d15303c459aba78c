"""bench/profile_family.py: the per-block clock covers every top-level block of the UNet, once per call, and leaves no
hook behind (a second profile of the same UNet must not count twice). A tiny SDXL-shaped UNet; no timing asserted."""

import torch

from bench.profile_family import attention_shapes, block_names, time_blocks, unet_inputs
from diffusion.make_checkpoint import PRESETS
from diffusion.unet import UNetConfig, UNetModel

TINY_SDXL = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
                       transformer_depth=(0, 1), middle_depth=1, context_dim=64, num_heads=None, head_dim=32,
                       linear_projection=True, adm_in_channels=96)


def test_every_block_is_timed_once_and_hooks_are_removed():
    unet = UNetModel(TINY_SDXL).eval()
    x, t, context, y = unet_inputs(TINY_SDXL, 64)
    assert y is not None and y.shape == (2, 96) and context.shape == (2, 77, 64) and x.shape == (2, 4, 8, 8)
    calls = []
    with torch.inference_mode():
        spent = time_blocks(unet, lambda: calls.append(unet(x, t, context, None, y)))
    names = block_names(unet)
    assert list(spent) == names and len(calls) == 1 and all(seconds > 0 for seconds in spent.values())
    assert names[0] == "input_blocks.0" and "middle_block" in names and names[-1] == "out"
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in unet.modules())


def test_attention_shapes_are_each_levels_self_attention():
    """SDXL: no transformer at level 0, 10 then 20 heads of 64; SD2.1-v: levels 0-2 (and the middle at level 3)."""
    assert attention_shapes(PRESETS["sdxl"].unet, 1024) == [(1, 10, 4096, 64), (2, 20, 1024, 64)]
    assert attention_shapes(PRESETS["sd21v"].unet, 768) == [(0, 5, 9216, 64), (1, 10, 2304, 64), (2, 20, 576, 64),
                                                            (3, 20, 144, 64)]
