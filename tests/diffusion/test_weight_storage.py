"""UNETLoader's fp8 weight storage (diffusion/weight_storage.py): which tensors are stored, how layers compute."""

import torch
from torch import nn

from diffusion.unet import weight_dtype
from diffusion.weight_storage import StoredConv2d, StoredLinear, cast_stored_layers, storage_overrides

F8, BF16, F32 = torch.float8_e4m3fn, torch.bfloat16, torch.float32


def test_overrides_keep_vectors_in_the_compute_dtype_and_the_kept_layers_first():
    keys = {k: k for k in ("a.weight", "a.bias", "norm.weight", "out.0.weight", "out.0.bias")}
    overrides = storage_overrides(frozenset({"a.weight", "out.0.weight"}), keys, BF16, {"out.": F32})
    assert overrides == {"out.": F32, "a.bias": BF16, "norm.weight": BF16}


def test_stored_layers_cast_their_weights_to_the_input_and_match_the_rounded_layer():
    torch.manual_seed(0)
    linear, conv = nn.Linear(8, 4), nn.Conv2d(3, 5, 3, padding=1)
    for layer in (linear, conv):
        layer.weight.data = layer.weight.data.to(F8)
    model = cast_stored_layers(nn.Sequential(conv, nn.Flatten(), nn.LazyLinear(1)))
    assert type(conv) is StoredConv2d and type(model[2]) is nn.LazyLinear  # a float32 layer keeps its class
    cast_stored_layers(linear)
    assert type(linear) is StoredLinear
    x = torch.randn(2, 8)
    want = x @ linear.weight.float().t() + linear.bias
    torch.testing.assert_close(linear(x), want)
    image = torch.randn(1, 3, 6, 6)
    want = nn.functional.conv2d(image, conv.weight.float(), conv.bias, padding=1)
    torch.testing.assert_close(conv(image), want)


def test_weight_dtype_is_the_compute_dtype_of_a_block_whose_weights_are_fp8():
    block = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4))
    block[0].weight.data = block[0].weight.data.to(F8)
    block[0].bias.data, block[1].weight.data, block[1].bias.data = (
        t.data.to(BF16) for t in (block[0].bias, block[1].weight, block[1].bias))
    assert weight_dtype(block, F32) == BF16
    only_stored = nn.Linear(2, 2, bias=False)
    only_stored.weight.data = only_stored.weight.data.to(F8)
    assert weight_dtype(only_stored, F32) == F32  # nothing says: the caller's default
