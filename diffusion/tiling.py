"""Tiled processing of images and latents: run a function on overlapping tiles and blend the results, so a
large input never passes through a network whole (ComfyUI's tiled_scale semantics, our own code).

Used by the tiled VAE nodes (VAEDecodeTiled, VAEEncodeTiled) and by ImageUpscaleWithModel.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch

TileFunction = Callable[[torch.Tensor], torch.Tensor]


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Where the tiles of one axis start: every `tile - overlap` cells from 0 while more than `overlap` cells are
    left (the last tile may be shorter); one tile at 0 when the axis fits in a tile."""
    if size <= tile:
        return [0]
    step = max(tile - overlap, 1)
    return [max(0, min(size - overlap, start)) for start in range(0, size - overlap, step)]


def feather_mask(shape: Sequence[int], feather: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A [1, 1, *shape] weight that ramps linearly as (t+1)/f over the f outermost rows/columns of each side of
    each axis (f = feather of that axis; an axis not longer than its feather is not ramped)."""
    mask = torch.ones((1, 1, *shape), dtype=dtype)
    for axis, (length, f) in enumerate(zip(shape, feather, strict=True)):
        if f <= 0 or f >= length:
            continue
        ramp = torch.ones(length, dtype=torch.float64)
        for t in range(f):
            ramp[t] *= (t + 1) / f
            ramp[length - 1 - t] *= (t + 1) / f
        view = [1] * (len(shape) + 2)
        view[axis + 2] = length
        mask = mask * ramp.to(dtype).reshape(view)
    return mask


def tiled_scale(samples: torch.Tensor, function: TileFunction, tile: Sequence[int], overlap: int, scale: float,
                out_channels: int) -> torch.Tensor:
    """`function` applied to overlapping tiles of `samples` [B, C, *spatial] (tile sizes per spatial axis, in
    input units) and blended with feathered weights; `function` maps a tile of n cells to round(n * scale) cells
    with `out_channels` channels. An item that fits in one tile goes through `function` whole."""
    spatial = samples.shape[2:]
    out_size = [round(n * scale) for n in spatial]
    feather = [round(overlap * scale)] * len(spatial)
    output = torch.empty([samples.shape[0], out_channels, *out_size])
    for index, item in enumerate(samples.split(1)):
        if all(n <= t for n, t in zip(spatial, tile, strict=True)):
            output[index:index + 1] = function(item)
            continue
        total = torch.zeros([1, out_channels, *out_size])
        weight = torch.zeros([1, 1, *out_size])  # one channel: the masks are the same for every channel
        starts = [tile_starts(n, t, overlap) for n, t in zip(spatial, tile, strict=True)]
        for corner in itertools.product(*starts):
            piece = item
            for axis, start in enumerate(corner):
                piece = piece.narrow(axis + 2, start, min(tile[axis], spatial[axis] - start))
            result = function(piece).float().cpu()
            mask = feather_mask(result.shape[2:], feather)
            where = (slice(None), slice(None), *(slice(round(start * scale), round(start * scale) + length)
                                                 for start, length in zip(corner, result.shape[2:], strict=True)))
            total[where] += result * mask
            weight[where] += mask
            del result
        torch.div(total, weight, out=output[index:index + 1])
    return output


def tiled_decode(decode: TileFunction, latent: torch.Tensor, tile: int, overlap: int, factor: int,
                 channels: int = 3) -> torch.Tensor:
    """ComfyUI's 2-D tiled VAE decode, before the [-1, 1] -> [0, 1] mapping: the mean of three tiled passes with
    (height, width) tiles of (2t, t/2), (t/2, 2t) and (t, t) latent cells, summed in that order."""
    def one_pass(height: int, width: int) -> torch.Tensor:
        return tiled_scale(latent, decode, (height, width), overlap, factor, channels)

    return (one_pass(tile * 2, tile // 2) + one_pass(tile // 2, tile * 2) + one_pass(tile, tile)) / 3.0


def tiled_encode(encode: TileFunction, pixels: torch.Tensor, tile: int, overlap: int, factor: int,
                 channels: int) -> torch.Tensor:
    """ComfyUI's 2-D tiled VAE encode of [B, C, H, W] pixels: the mean of three tiled passes with (height, width)
    tiles of (t, t), (t/2, 2t) and (2t, t/2) pixels."""
    def one_pass(height: int, width: int) -> torch.Tensor:
        return tiled_scale(pixels, encode, (height, width), overlap, 1 / factor, channels)

    return (one_pass(tile, tile) + one_pass(tile // 2, tile * 2) + one_pass(tile * 2, tile // 2)) / 3.0
