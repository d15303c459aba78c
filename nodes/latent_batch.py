"""Latent compositing and batches: LatentComposite, LatentCompositeMasked, LatentBlend, RepeatLatentBatch,
LatentFromBatch (ComfyUI's names, inputs and semantics; x, y and feather are in pixels, divided by 8).

Each keeps the first latent's noise mask and batch indices as ComfyUI does (its `samples.copy()`), except where
ComfyUI changes them (the batch nodes). Torch is imported inside the node functions only.
"""

from __future__ import annotations

import math

from engine import BOOLEAN, COMBO, FLOAT, INT, Input, Output, node
from engine.sizes import Size

from .pixels import LATENT_FACTOR, MAX_RESOLUTION, same_as_destination


def _eighths(name: str, tooltip: str) -> Input:
    return Input(name, INT, default=0, min=0, max=MAX_RESOLUTION, step=8, tooltip=tooltip)


def _same_as_samples_to(samples_to: Size) -> Size:
    return samples_to


def _same_as_samples1(samples1: Size) -> Size:
    return samples1


def _repeated_size(samples: Size, amount: int) -> Size:
    return Size(samples.batch * amount, samples.height, samples.width)


def _from_batch_size(samples: Size, batch_index: int, length: int) -> Size:
    start = min(samples.batch - 1, batch_index)
    return Size(min(samples.batch - start, length), samples.height, samples.width)


def edge_ramp(length: int, feather: int, start: bool, end: bool):
    """Weights along one side of a pasted latent: the t-th cell from a feathered edge (t = 0 outermost) is
    multiplied by (t+1)/feather, over `feather` cells (a short side gets both ramps multiplied)."""
    import torch

    ramp = torch.ones(length, dtype=torch.float32)
    for t in range(min(feather, length)):
        factor = (1.0 / feather) * (t + 1)
        if start:
            ramp[t] *= factor
        if end:
            ramp[length - 1 - t] *= factor
    return ramp


@node("LatentComposite", category="latent", display_name="Latent Composite", size_rule=_same_as_samples_to,
      description="Paste samples_from onto samples_to at (x, y) pixels (divided by 8), optionally feathered on the "
                  "sides that are not on samples_to's border.",
      inputs=[Input("samples_to", "LATENT"), Input("samples_from", "LATENT"),
              _eighths("x", "left edge, pixels"), _eighths("y", "top edge, pixels"),
              _eighths("feather", "pixels over which the pasted edges fade in")],
      outputs=[Output("LATENT", "LATENT")])
def latent_composite(ctx, samples_to, samples_from, x, y, feather):
    x, y, feather = x // LATENT_FACTOR, y // LATENT_FACTOR, feather // LATENT_FACTOR
    out = samples_to.samples.clone()
    height, width = out.shape[-2:]
    source = samples_from.samples[:, :, :max(height - y, 0), :max(width - x, 0)].to(out.dtype)
    rows, cols = source.shape[-2:]
    region = out[:, :, y:y + rows, x:x + cols]
    if feather == 0:
        out[:, :, y:y + rows, x:x + cols] = source
    else:
        mask = edge_ramp(rows, feather, y != 0, y + rows < height)[:, None] \
            * edge_ramp(cols, feather, x != 0, x + cols < width)[None, :]
        out[:, :, y:y + rows, x:x + cols] = source * mask + region * (1.0 - mask)
    return samples_to.replace(samples=out)


@node("LatentCompositeMasked", category="latent", display_name="Latent Composite Masked",
      size_rule=same_as_destination,
      description="Paste source onto destination at (x, y) pixels (divided by 8), blended by an optional mask "
                  "(stretched to the source's size).",
      inputs=[Input("destination", "LATENT"), Input("source", "LATENT"),
              _eighths("x", "left edge, pixels"), _eighths("y", "top edge, pixels"),
              Input("resize_source", BOOLEAN, default=False,
                    tooltip="stretch the source (bilinear) to the destination's size first"),
              Input("mask", "MASK", optional=True)],
      outputs=[Output("LATENT", "LATENT")])
def latent_composite_masked(ctx, destination, source, x, y, resize_source, mask=None):
    from . import imaging

    out = imaging.composite(destination.samples, source.samples, x, y, mask, LATENT_FACTOR, resize_source)
    return destination.replace(samples=out)


@node("LatentBlend", category="_for_testing", display_name="Latent Blend", size_rule=_same_as_samples1,
      description="samples1 * blend_factor + samples2 * (1 - blend_factor); samples2 is first resized (bicubic, "
                  "centre crop) to samples1's size when they differ.",
      inputs=[Input("samples1", "LATENT"), Input("samples2", "LATENT"),
              Input("blend_factor", FLOAT, default=0.5, min=0.0, max=1.0, step=0.01),
              Input("blend_mode", COMBO, options=("normal",), default="normal", optional=True)],
      outputs=[Output("LATENT", "LATENT")])
def latent_blend(ctx, samples1, samples2, blend_factor, blend_mode="normal"):
    from . import imaging

    first, second = samples1.samples, samples2.samples
    if first.shape != second.shape:
        second = imaging.upscale(second, first.shape[3], first.shape[2], "bicubic", "center")
    return samples1.replace(samples=first * blend_factor + second * (1 - blend_factor))


@node("RepeatLatentBatch", category="latent/batch", display_name="Repeat Latent Batch", size_rule=_repeated_size,
      description="The batch repeated `amount` times (noise masks of several items and batch indices follow).",
      inputs=[Input("samples", "LATENT"), Input("amount", INT, default=1, min=1, max=64)],
      outputs=[Output("LATENT", "LATENT")])
def repeat_latent_batch(ctx, samples, amount):
    changes = {"samples": samples.samples.repeat((amount, 1, 1, 1))}
    mask = samples.noise_mask
    if mask is not None and mask.shape[0] > 1:
        changes["noise_mask"] = mask.repeat((amount, 1, 1, 1))
    if samples.batch_index is not None:
        index = list(samples.batch_index)
        offset = max(index) - min(index) + 1
        changes["batch_index"] = index + [i + k * offset for k in range(1, amount) for i in index]
    return samples.replace(**changes)


@node("LatentFromBatch", category="latent/batch", display_name="Latent From Batch", size_rule=_from_batch_size,
      description="`length` items of the batch from `batch_index` (clamped to the batch); they keep their place "
                  "in the seed's noise (batch_index).",
      inputs=[Input("samples", "LATENT"), Input("batch_index", INT, default=0, min=0, max=63),
              Input("length", INT, default=1, min=1, max=64)],
      outputs=[Output("LATENT", "LATENT")])
def latent_from_batch(ctx, samples, batch_index, length):
    batch = samples.samples.shape[0]
    start = min(batch - 1, batch_index)
    length = min(batch - start, length)
    changes = {"samples": samples.samples[start:start + length].clone()}
    mask = samples.noise_mask
    if mask is not None and mask.shape[0] > 1:
        if mask.shape[0] < batch:
            mask = mask.repeat(math.ceil(batch / mask.shape[0]), 1, 1, 1)[:batch]
        changes["noise_mask"] = mask[start:start + length].clone()
    index = samples.batch_index
    changes["batch_index"] = list(range(start, start + length)) if index is None else index[start:start + length]
    return samples.replace(**changes)


LATENT_BATCH_NODES = [latent_composite, latent_composite_masked, latent_blend, repeat_latent_batch,
                      latent_from_batch]
