import pytest
import torch

from diffusion import attention
from diffusion.attention import FLASH_HEAD_WIDTH, SLICE_MIN_KEYS, multihead_attention, sliced_attention
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
    assert len(calls) == 1 and got.dtype == short.dtype == torch.bfloat16  # short keys stay with SDPA
    want = reference(q, k, v, 2)
    assert ((got.double() - want).norm() / want.norm()) < 0.01


def test_long_bf16_attention_with_64_wide_heads_stays_with_flash(monkeypatch):
    """Issue #13: SD2.x's and SDXL's 64-wide heads took the sliced path, 2-6x slower than flash for their shapes."""
    monkeypatch.setattr(attention, "sliced_attention", lambda *a, **kw: pytest.fail("64-wide heads were sliced"))
    heads = 2
    q, k, v = qkv(queries=SLICE_MIN_KEYS, keys=SLICE_MIN_KEYS, inner=heads * FLASH_HEAD_WIDTH)
    with torch.inference_mode():
        got = multihead_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), heads=heads)
    want = reference(q, k, v, heads)
    assert got.dtype == torch.bfloat16 and ((got.double() - want).norm() / want.norm()) < 0.01


def test_the_vaes_one_wide_head_keeps_the_sliced_path(monkeypatch):
    """Only 64-wide heads changed path: the VAE's single 512-wide head (a multiple of 64) is still sliced."""
    calls = []
    monkeypatch.setattr(attention, "sliced_attention", lambda *a, **kw: calls.append(a) or sliced_attention(*a))
    q, k, v = qkv(queries=SLICE_MIN_KEYS, keys=SLICE_MIN_KEYS, inner=8 * FLASH_HEAD_WIDTH, batch=1)
    with torch.inference_mode():
        multihead_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), heads=1)
    assert len(calls) == 1


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
