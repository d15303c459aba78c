"""LoRA loaders: LoraLoader (MODEL and CLIP) and LoraLoaderModelOnly, with ComfyUI's inputs and defaults.

A loader reads the LoRA file (small), maps its keys onto the model and returns the MODEL/CLIP values with the
patch added beside the weights (diffusion/lora.py): nothing is copied, and the model manager applies the patch set
when a node borrows the network. A file made for another model family fails here, before sampling, naming the node
and the file. Keys that match no layer are logged and listed in the node's UI output (`lora_unmatched_keys`).
"""

from __future__ import annotations

import logging

from engine import COMBO, FLOAT, Input, Output, Result, node

log = logging.getLogger(__name__)
STRENGTH = dict(default=1.0, min=-100.0, max=100.0, step=0.01)
SHOWN_UNMATCHED = 20
TEXT_KEY_PREFIXES = ("lora_te", "text_encoder", "te_", "clip_")


def _lora_names(resources) -> list[str]:
    return resources.folders.list_models("loras") if resources is not None else []


def _lora_identity(resources, lora_name, **_):
    """Name, size and modification time: a LoRA file replaced under the same name runs again."""
    path = resources.folders.model_path("loras", lora_name)
    stat = path.stat()
    return (str(path), stat.st_size, stat.st_mtime_ns)


def _open_lora(ctx, node_name: str, lora_name: str, model, clip):
    """The LoRA mapped onto the model (and the text encoder, if `clip`); without `clip`, text-encoder keys are
    expected to match nothing and are not reported."""
    from dataclasses import replace

    from diffusion.lora import LoraError, load_lora

    runtime = ctx.resources
    path = runtime.folders.model_path("loras", lora_name)
    try:
        lora = load_lora(path, model.config, clip.lora_configs if clip is not None else None, family=model.family,
                         allow_pickle=runtime.allow_pickle)
    except LoraError as exc:
        raise LoraError(f"{node_name} (node {ctx.node_id}): LoRA {lora_name!r} cannot be used with this model: "
                        f"{exc}") from exc
    if clip is None:
        lora = replace(lora, unmatched=tuple(k for k in lora.unmatched if not k.startswith(TEXT_KEY_PREFIXES)))
    if lora.unmatched:
        shown = ", ".join(lora.unmatched[:SHOWN_UNMATCHED])
        more = f" and {len(lora.unmatched) - SHOWN_UNMATCHED} more" if len(lora.unmatched) > SHOWN_UNMATCHED else ""
        log.warning("%s (node %s): %d keys of LoRA %r match no layer and were not applied: %s%s", node_name,
                    ctx.node_id, len(lora.unmatched), lora_name, shown, more)
    return lora


def _result(outputs: tuple, lora) -> Result:
    """The outputs, with the unmatched keys (if any) in the UI output."""
    return Result(outputs, {"lora_unmatched_keys": list(lora.unmatched)} if lora.unmatched else None)


@node("LoraLoader", category="loaders", display_name="Load LoRA",
      description="Patch the diffusion model and the text encoder with a LoRA from models/loras (kohya, "
                  "diffusers/PEFT, LoCon, LoHa, LoKr, DoRA). Negative strengths subtract; 0 leaves a part as it is.",
      fingerprint=_lora_identity,
      inputs=[Input("model", "MODEL"), Input("clip", "CLIP"),
              Input("lora_name", COMBO, options=_lora_names, tooltip="a file in models/loras"),
              Input("strength_model", FLOAT, **STRENGTH, tooltip="how strongly to patch the diffusion model"),
              Input("strength_clip", FLOAT, **STRENGTH, tooltip="how strongly to patch the text encoder")],
      outputs=[Output("MODEL", "MODEL"), Output("CLIP", "CLIP")])
def lora_loader(ctx, model, clip, lora_name, strength_model, strength_clip):
    if strength_model == 0 and strength_clip == 0:
        return model, clip
    lora = _open_lora(ctx, "LoraLoader", lora_name, model, clip)
    if strength_model != 0 and lora.unet.adapters:
        model = model.with_lora(lora.unet, strength_model)
    if strength_clip != 0 and lora.text_encoder.adapters:
        clip = clip.with_lora(lora.text_encoder, strength_clip)
    return _result((model, clip), lora)


@node("LoraLoaderModelOnly", category="loaders", display_name="Load LoRA (model only)",
      description="Patch only the diffusion model with a LoRA from models/loras; the text encoder is left alone.",
      fingerprint=_lora_identity,
      inputs=[Input("model", "MODEL"),
              Input("lora_name", COMBO, options=_lora_names, tooltip="a file in models/loras"),
              Input("strength_model", FLOAT, **STRENGTH, tooltip="how strongly to patch the diffusion model")],
      outputs=[Output("MODEL", "MODEL")])
def lora_loader_model_only(ctx, model, lora_name, strength_model):
    if strength_model == 0:
        return model
    lora = _open_lora(ctx, "LoraLoaderModelOnly", lora_name, model, None)
    if lora.unet.adapters:
        model = model.with_lora(lora.unet, strength_model)
    return _result((model,), lora)


NODES = [lora_loader, lora_loader_model_only]
