"""bench/sd15_step.py's floor (issue #17): a step's FLOPs are counted from the UNet's shapes, attention included,
and the closing lines say PASS/MISS against the issue's three targets. Meta-device networks: no weights, no time."""

from bench.sd15_step import MAX_OVER_FLOOR, floor_lines, step_flops
from diffusion.make_checkpoint import TINY_UNET
from diffusion.unet import UNetConfig


def attention_products(config, size: int, batch: int = 2, context_tokens: int = 77) -> int:
    """The two products (scores, weighted values) of every attention of the tiny UNet, counted by hand."""
    total = 0
    levels = [(level, width) for level, width in enumerate(config.level_channels) if config.depth_at(level)]
    # each attention level has num_res_blocks transformers on the way down and num_res_blocks + 1 on the way up
    for level, width in levels:
        tokens = (size // 8 // 2**level) ** 2
        per = 2 * 2 * batch * tokens * width * (tokens + context_tokens)  # self- and cross-attention
        total += per * (2 * config.num_res_blocks + 1) * config.depth_at(level)
    deepest = len(config.channel_mult) - 1
    tokens = (size // 8 // 2**deepest) ** 2
    return total + 2 * 2 * batch * tokens * config.level_channels[-1] * (tokens + 77) * config.mid_depth


def test_step_flops_count_the_attention_products_from_the_shapes():
    flops = step_flops(64, TINY_UNET)
    assert flops["bmm"] == attention_products(TINY_UNET, 64)
    assert flops["convolution"] > 0 and flops["addmm"] > 0


def test_sd15_step_flops_grow_with_the_image():
    small, large = sum(step_flops(256).values()), sum(step_flops(512).values())
    assert 1.3e12 < large < 1.7e12  # 1.35 TFLOP without attention (issue #17), 1.61 with it
    assert 4 < large / small < 5  # convolutions scale with the pixels, self-attention with their square
    assert step_flops(512, UNetConfig()) == step_flops(512)


def test_floor_lines_say_pass_or_miss_per_target():
    floor = {"mm_bf16": 1e12, "mm_fp32": 2.5e11, "512": {"flops": {"convolution": 1e12}}}  # a 1 s floor
    results = {"sdgraph-default": {"512": {"step_s": 1.1}}, "sdgraph-fp32": {"512": {"step_s": 3.0}},
               "diffusers-bf16": {"512": {"step_s": 2.2}}}
    text = "\n".join(floor_lines(floor, results, [512]))
    assert f"x1.10 the floor (<= x{MAX_OVER_FLOOR}: PASS)" in text
    assert "x2.73 sdgraph-fp32 (>= x3.0: MISS)" in text
    assert "x2.00 diffusers-bf16 (>= x1.8: PASS)" in text
