import pytest
import torch

from diffusion import attention
from diffusion.attention import (
    PRODUCT_BLOCK,
    SLICE_MIN_KEYS,
    batched_attention,
    multihead_attention,
    sliced_attention,
)
from diffusion.unet import GEGLU, CrossAttention, set_attention_dtype


def reference(q, k, v, heads):
    """Attention written out: softmax(q k^T / sqrt(D)) v, per head, in float64."""
    b, n, inner = q.shape
    d = inner // heads
    q, k, v = (t.double().reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / d**0.5, dim=-1)
    return (weights @ v).transpose(1, 2).reshape(b, n, inner)


def qkv(queries: int, keys: int, inner: int = 48, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, queries, inner, generator=g), torch.randn(batch, keys, inner, generator=g),
            torch.randn(batch, keys, inner, generator=g))


@pytest.mark.parametrize("slice_size", [1, 7, 64, 1000])
def test_sliced_attention_is_attention_for_any_slice_size(slice_size):
    q, k, v = qkv(queries=70, keys=90)
    got = sliced_attention(q, k, v, heads=3, slice_size=slice_size)
    torch.testing.assert_close(got.double(), reference(q, k, v, 3), rtol=1e-5, atol=1e-5)


def test_long_bf16_attention_on_the_cpu_takes_the_sliced_path_within_bf16_rounding(monkeypatch):
    calls = []
    monkeypatch.setattr(attention, "sliced_attention", lambda *a, **kw: calls.append(a) or sliced_attention(*a))
    q, k, v = qkv(queries=SLICE_MIN_KEYS, keys=SLICE_MIN_KEYS, inner=80)
    with torch.inference_mode():
        got = multihead_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), heads=2)
        short = multihead_attention(*(t[:, :77].bfloat16() for t in (q, k, v)), heads=2)
    assert len(calls) == 1 and got.dtype == short.dtype == torch.bfloat16  # short keys take the batched path
    want = reference(q, k, v, 2)
    assert ((got.double() - want).norm() / want.norm()) < 0.01


@pytest.mark.parametrize("head_dim", [40, 64, 80, 512])
def test_every_head_width_of_a_unet_or_vae_takes_the_sliced_path(monkeypatch, head_dim):
    """SD1.5's 40/80-wide heads, SD2.x's and SDXL's 64-wide heads and the VAE's one 512-wide head are all sliced
    (measured 1.2-1.9x faster than flash for each on an idle machine); the result is attention within bf16
    rounding whether the second product is computed transposed (widths not a multiple of PRODUCT_BLOCK) or not."""
    calls = []
    monkeypatch.setattr(attention, "sliced_attention", lambda *a, **kw: calls.append(a) or sliced_attention(*a))
    heads = 2 if head_dim < 512 else 1
    q, k, v = qkv(queries=SLICE_MIN_KEYS + 3, keys=SLICE_MIN_KEYS, inner=heads * head_dim, batch=1)
    with torch.inference_mode():
        got = multihead_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), heads=heads)
    assert len(calls) == 1 and got.dtype == torch.bfloat16
    assert (head_dim % PRODUCT_BLOCK != 0) == (head_dim in (40, 80))
    want = reference(q, k, v, heads)
    assert ((got.double() - want).norm() / want.norm()) < 0.01


def test_transposed_second_product_gives_the_same_bits_as_the_plain_one(monkeypatch):
    """The transposed product is a speed choice only: forcing the plain product changes no value."""
    q, k, v = (t.bfloat16() for t in qkv(queries=700, keys=300, inner=2 * 40, batch=2))
    transposed = sliced_attention(q, k, v, heads=2, slice_size=256)
    monkeypatch.setattr(attention, "PRODUCT_BLOCK", 8)  # 40 is a multiple of 8: the plain product
    assert torch.equal(sliced_attention(q, k, v, heads=2, slice_size=256), transposed)


@pytest.mark.parametrize("score_bytes", [1, 700 * 90 * 2 * 2, 1 << 30])
def test_batched_attention_is_attention_whatever_the_heads_taken_at_a_time(monkeypatch, score_bytes):
    monkeypatch.setattr(attention, "BATCHED_SCORE_BYTES", score_bytes)  # one head, two, or all six at a time
    q, k, v = qkv(queries=700, keys=90)
    got = batched_attention(q, k, v, heads=3)
    torch.testing.assert_close(got.double(), reference(q, k, v, 3), rtol=1e-5, atol=1e-5)


def test_short_bf16_attention_on_the_cpu_takes_the_batched_path_and_flash_elsewhere(monkeypatch):
    """Cross-attention's 77 keys: one batched product of every head's scores (faster than flash on the CPU);
    fp32 and autograd keep SDPA, whose values are ComfyUI's (the parity kits run in fp32)."""
    calls = []
    monkeypatch.setattr(attention, "batched_attention", lambda *a, **kw: calls.append(a) or batched_attention(*a))
    q, k, v = qkv(queries=300, keys=77, inner=80)
    with torch.inference_mode():
        got = multihead_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), heads=2)
        exact = multihead_attention(q, k, v, heads=2)
    assert len(calls) == 1 and got.dtype == torch.bfloat16
    want = reference(q, k, v, 2)
    assert ((got.double() - want).norm() / want.norm()) < 0.01
    torch.testing.assert_close(exact.double(), want, rtol=1e-5, atol=1e-5)


def test_compute_dtype_runs_fp32_inputs_in_bf16_and_returns_fp32(monkeypatch):
    calls = []
    monkeypatch.setattr(attention, "sliced_attention", lambda *a, **kw: calls.append(a[0].dtype) or
                        sliced_attention(*a))
    q, k, v = qkv(queries=64, keys=SLICE_MIN_KEYS)
    with torch.inference_mode():
        got = multihead_attention(q, k, v, heads=4, compute_dtype=torch.bfloat16)
        exact = multihead_attention(q, k, v, heads=4)
    assert calls == [torch.bfloat16] and got.dtype == exact.dtype == torch.float32
    torch.testing.assert_close(exact.double(), reference(q, k, v, 4), rtol=1e-4, atol=1e-4)
    assert ((got.double() - exact.double()).norm() / exact.double().norm()) < 0.01


def test_sliced_path_is_not_used_while_recording_gradients(monkeypatch):
    monkeypatch.setattr(attention, "sliced_attention", lambda *a, **kw: pytest.fail("sliced under autograd"))
    q, k, v = (t.bfloat16().requires_grad_() for t in qkv(queries=8, keys=SLICE_MIN_KEYS))
    multihead_attention(q, k, v, heads=2).float().sum().backward()
    assert q.grad is not None


def test_set_attention_dtype_reaches_every_attention():
    blocks = torch.nn.ModuleList([CrossAttention(16, 16, 2, 8), torch.nn.Sequential(CrossAttention(16, 8, 2, 8))])
    set_attention_dtype(blocks, torch.bfloat16)
    assert [m.compute_dtype for m in blocks.modules() if isinstance(m, CrossAttention)] == [torch.bfloat16] * 2


def test_geglu_is_value_times_gelu_of_gate():
    torch.manual_seed(0)
    layer = GEGLU(8, 16)
    x = torch.randn(2, 5, 8)
    value, gate = layer.proj(x).chunk(2, dim=-1)  # LDM's formulation: the first half is the value
    torch.testing.assert_close(layer(x), value * torch.nn.functional.gelu(gate))
