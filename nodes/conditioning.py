"""Prompts to conditioning: CLIPTextEncode, CLIPSetLastLayer, ConditioningCombine."""

from __future__ import annotations

import os

from engine import INT, STRING, Input, Output, node


def _embedding_files(resources, text=None):
    """A prompt naming `embedding:` reads files in models/embeddings: their names, sizes and dates are part of the
    node's key, so a changed embedding is encoded again (and a stored encoding is not reused)."""
    folders = getattr(resources, "folders", None)
    if folders is None or (text is not None and "embedding:" not in text.lower()):
        return ""
    root = folders.models("embeddings")
    found = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            try:
                stat = os.stat(os.path.join(dirpath, name))
            except OSError:
                continue
            found.append((os.path.relpath(os.path.join(dirpath, name), root), stat.st_size, stat.st_mtime_ns))
    return sorted(found)


@node("CLIPTextEncode", category="conditioning", aliases=("CLIPEncode",), display_name="CLIP Text Encode (Prompt)",
      description="Encode a prompt with the text encoder. Weighting as ComfyUI: (word) x1.1, (word:1.3), "
                  "\\( escapes; embedding:name uses models/embeddings/name.",
      fingerprint=_embedding_files,
      inputs=[Input("text", STRING, multiline=True, default="", tooltip="the prompt"),
              Input("clip", "CLIP")],
      outputs=[Output("CONDITIONING", "CONDITIONING")])
def clip_text_encode(ctx, text, clip):
    with ctx.resources.models.use(clip.handle) as text_model:
        return clip.encode(text, text_model)


@node("CLIPSetLastLayer", category="conditioning", display_name="CLIP Set Last Layer",
      description="Condition on an earlier layer of the text encoder: -1 is the last, -2 is 'clip skip 2'.",
      inputs=[Input("clip", "CLIP"), Input("stop_at_clip_layer", INT, default=-1, min=-24, max=-1, step=1)],
      outputs=[Output("CLIP", "CLIP")])
def clip_set_last_layer(ctx, clip, stop_at_clip_layer):
    layers = clip.layers
    if -stop_at_clip_layer > layers:
        raise ValueError(f"stop_at_clip_layer {stop_at_clip_layer} goes past the first layer: this text encoder "
                         f"has {layers} layers, so use a value from -1 to -{layers}")
    return clip.with_layer(stop_at_clip_layer)


@node("ConditioningCombine", category="conditioning", display_name="Conditioning (Combine)",
      description="Use both conditionings: each is predicted separately and the predictions are averaged.",
      inputs=[Input("conditioning_1", "CONDITIONING"), Input("conditioning_2", "CONDITIONING")],
      outputs=[Output("CONDITIONING", "CONDITIONING")])
def conditioning_combine(ctx, conditioning_1, conditioning_2):
    return conditioning_1.combine(conditioning_2)


NODES = [clip_text_encode, clip_set_last_layer, conditioning_combine]
