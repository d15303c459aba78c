"""Issue #15, replay's verdicts and reasons as pure functions: identical / within tolerance (>= 99.9% of values
within 2/255) / different, and each manifest difference named."""

from __future__ import annotations

import math

import numpy as np

from nodes.replay import DIFFERENT, IDENTICAL, WITHIN_TOLERANCE, changed_keys, compare_pixels, likely_reasons


def test_verdicts():
    saved = np.full((40, 50, 3), 100, dtype=np.uint8)
    assert compare_pixels(saved, saved.copy()).verdict == IDENTICAL
    near = saved.copy()
    near[0, 0, 0] = 103  # one value of 6000 off by 3, the rest equal: 99.98% within 2/255
    near[1, :, :] = 102
    result = compare_pixels(saved, near)
    assert (result.verdict, result.max_difference) == (WITHIN_TOLERANCE, 3) and result.matches
    assert math.isclose(result.within, 1 - 1 / 6000) and 40 < result.psnr < 60
    far = saved.copy()
    far[:1, :8] = 0  # 24 of 6000 values off: 99.6% within
    assert compare_pixels(saved, far).verdict == DIFFERENT and not compare_pixels(saved, far).matches
    other_size = compare_pixels(saved, saved[:20])
    assert other_size.verdict == DIFFERENT and "50x20" in other_size.describe()


def test_each_difference_is_named():
    saved = {"torch": "2.13.0", "sdgraph": "0.1.0", "device": "cpu",
             "dtype": {"unet": "float32", "text": "float32", "vae": "float32", "unet_output_fp32": False},
             "models": [{"node": "4", "input": "ckpt_name", "kind": "checkpoints", "name": "a.safetensors",
                         "sha256": "a" * 64},
                        {"node": "4", "input": "vae_name", "kind": "vae", "name": "v.safetensors", "sha256": "b" * 64}],
             "nodes": {"3": {"type": "KSampler", "version": "1"}}, "keys": {"3": "k1", "4": "k2"}}
    assert likely_reasons(saved, saved) == [] and changed_keys(saved, saved) == []
    now = {**saved, "torch": "2.14.0", "device": "cuda:0",
           "dtype": {**saved["dtype"], "unet": "float16"},
           "models": [{**saved["models"][0], "sha256": "c" * 64}],
           "nodes": {"3": {"type": "KSampler", "version": "2"}}, "keys": {"3": "k9", "4": "k2"}}
    reasons = likely_reasons(saved, now)
    assert reasons[0].startswith("model file checkpoints/a.safetensors (node 4 input 'ckpt_name') changed: its "
                                 "sha256 was aaaaaaaaaaaa... when the image was saved, cccccccccccc... now")
    assert reasons[1] == "model file vae/v.safetensors (node 4 input 'vae_name') is missing now"
    assert reasons[2] == "device: cpu when the image was saved, cuda:0 now"
    assert reasons[3].startswith("dtype: unet float32, text float32, vae float32 when the image was saved, "
                                 "unet float16, text float32")
    assert reasons[4] == "node 3 (KSampler) changed version: 1 when the image was saved, 2 now"
    assert reasons[5] == "torch version: 2.13.0 when the image was saved, 2.14.0 now"
    assert changed_keys(saved, now) == ["3"]
