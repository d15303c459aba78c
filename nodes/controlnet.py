"""ControlNet nodes (ControlNetLoader, ControlNetApply, ControlNetApplyAdvanced) and the Canny edge detector.

ComfyUI's semantics: applying a ControlNet puts a `ControlChain` (diffusion/controlnet.py) on every conditioning
entry, on top of the control the entry already had, so several ControlNets add up; strength 0 returns the
conditioning unchanged; the Advanced node puts the same control on the positive and the negative entries
(one chain per distinct previous control, so entries that shared a control still share one). The hint is
resized to the latent's size x 8 when sampling. Canny is kornia's (`kornia.filters.canny`), as ComfyUI's is.
"""

from __future__ import annotations

from engine import COMBO, FLOAT, Input, Output, node

from .loaders import file_identity
from .pixels import same_as_image

CONTROL_NET = "CONTROL_NET"


def _controlnet_names(resources) -> list[str]:
    return resources.folders.list_models("controlnet") if resources is not None else []


def _controlnet_identity(resources, control_net_name):
    return file_identity(resources, "controlnet", control_net_name)


@node("ControlNetLoader", category="loaders", display_name="Load ControlNet Model",
      description="Load a ControlNet (SD1.x, SD2.x or SDXL) from models/controlnet: the single-file layout "
                  "(control_v11p_sd15_*) or the diffusers one (diffusion_pytorch_model.safetensors); the weights are "
                  "read when sampling first uses them.",
      fingerprint=_controlnet_identity,
      inputs=[Input("control_net_name", COMBO, options=_controlnet_names, tooltip="a file in models/controlnet")],
      outputs=[Output("CONTROL_NET", CONTROL_NET)])
def controlnet_loader(ctx, control_net_name):
    from diffusion.controlnet import controlnet_value, open_controlnet
    from diffusion.safetensors_header import CheckpointError

    runtime = ctx.resources
    path = runtime.folders.model_path("controlnet", control_net_name, what="ControlNetLoader input 'control_net_name'")
    device, precision = runtime.placement()
    try:
        layout = open_controlnet(path, allow_pickle=runtime.allow_pickle)  # checked from the header; nothing read
    except CheckpointError as e:
        raise CheckpointError(f"ControlNetLoader: {e}") from None
    return controlnet_value(layout, device=device, dtype=precision.unet, models=runtime.models,
                            name=control_net_name)


def _origin(ctx) -> str:
    return f"{ctx.node_type} (node {ctx.node_id})"


def _hint(image):
    """IMAGE [B, H, W, C] -> the hint [B, C, H, W] a ControlChain keeps."""
    return image.movedim(-1, 1)


_STRENGTH = Input("strength", FLOAT, default=1.0, min=0.0, max=10.0, step=0.01,
                  tooltip="multiplies everything the ControlNet adds; 0 leaves the conditioning unchanged")


@node("ControlNetApply", category="conditioning/controlnet", display_name="Apply ControlNet (OLD)",
      description="Steer sampling with a ControlNet and a hint image (e.g. Canny edges), over the whole schedule. "
                  "As in ComfyUI, a negative prompt without a ControlNet of its own gets this one too.",
      inputs=[Input("conditioning", "CONDITIONING"), Input("control_net", CONTROL_NET), Input("image", "IMAGE"),
              _STRENGTH],
      outputs=[Output("CONDITIONING", "CONDITIONING")])
def controlnet_apply(ctx, conditioning, control_net, image, strength):
    from diffusion.controlnet import ControlChain
    from diffusion.latent import Conditioning

    if strength == 0:
        return conditioning
    hint, origin = _hint(image), _origin(ctx)

    def chain(previous):  # ComfyUI: a new control for every entry
        return ControlChain(control_net, hint, strength, previous=previous, apply_to_uncond=True, origin=origin)

    return Conditioning(tuple(_with_control(conditioning.entries, chain)))


@node("ControlNetApplyAdvanced", category="conditioning/controlnet", display_name="Apply ControlNet",
      description="Steer sampling with a ControlNet and a hint image on both the positive and the negative "
                  "conditioning, between start_percent and end_percent of the schedule.",
      inputs=[Input("positive", "CONDITIONING"), Input("negative", "CONDITIONING"),
              Input("control_net", CONTROL_NET), Input("image", "IMAGE"), _STRENGTH,
              Input("start_percent", FLOAT, default=0.0, min=0.0, max=1.0, step=0.001,
                    tooltip="fraction of the schedule where the ControlNet starts acting"),
              Input("end_percent", FLOAT, default=1.0, min=0.0, max=1.0, step=0.001,
                    tooltip="fraction of the schedule where it stops"),
              Input("vae", "VAE", optional=True,
                    tooltip="needed only by ControlNets that read latents (none of those sdgraph loads)")],
      outputs=[Output("positive", "CONDITIONING"), Output("negative", "CONDITIONING")])
def controlnet_apply_advanced(ctx, positive, negative, control_net, image, strength, start_percent, end_percent,
                              vae=None):
    from diffusion.controlnet import ControlChain
    from diffusion.latent import Conditioning

    if strength == 0:
        return positive, negative
    hint, origin = _hint(image), _origin(ctx)
    chains: dict[int, ControlChain] = {}  # shared by both sides, as ComfyUI's `cnets`

    def chain(previous):
        if id(previous) not in chains:
            chains[id(previous)] = ControlChain(control_net, hint, strength, start_percent, end_percent, previous,
                                                origin=origin)
        return chains[id(previous)]

    return (Conditioning(tuple(_with_control(positive.entries, chain))),
            Conditioning(tuple(_with_control(negative.entries, chain))))


def _with_control(entries, chain):
    """Each entry with `chain(its previous control)` as its control."""
    import dataclasses

    return [dataclasses.replace(e, control=chain(e.control)) for e in entries]


@node("Canny", category="image/preprocessors", size_rule=same_as_image,
      description="Edges of an image (white on black), by kornia's Canny detector: the hint a canny ControlNet "
                  "wants. Thresholds are on the gradient magnitude of the 0..1 image.",
      inputs=[Input("image", "IMAGE"),
              Input("low_threshold", FLOAT, default=0.4, min=0.01, max=0.99, step=0.01,
                    tooltip="weaker edges are dropped"),
              Input("high_threshold", FLOAT, default=0.8, min=0.01, max=0.99, step=0.01,
                    tooltip="stronger edges are kept; those between the two only when connected to one")],
      outputs=[Output("IMAGE", "IMAGE")])
def canny(ctx, image, low_threshold, high_threshold):
    from kornia.filters import canny as kornia_canny

    if low_threshold > high_threshold:
        raise ValueError(f"Canny: low_threshold {low_threshold} is above high_threshold {high_threshold}; make it "
                         "the smaller of the two")
    _, edges = kornia_canny(image.movedim(-1, 1), low_threshold, high_threshold)
    return edges.repeat(1, 3, 1, 1).movedim(1, -1)


NODES = [controlnet_loader, controlnet_apply, controlnet_apply_advanced, canny]
