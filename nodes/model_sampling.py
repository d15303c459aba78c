"""ModelSamplingDiscrete: the MODEL with another prediction type and (zero terminal SNR) schedule.

The MODEL value carries its family's `ModelSampling` (diffusion/families.py); this node returns a copy with it
replaced, so the weights are shared and every node downstream gets a new cache key (the node's widgets are in it).
Options are ComfyUI's (comfy_extras/nodes_model_advanced.py).
"""

from __future__ import annotations

from engine import BOOLEAN, COMBO, Input, Output, node

SAMPLING_TYPES = ("eps", "v_prediction", "lcm", "x0", "img_to_img")
UNSUPPORTED = {"img_to_img": "it is for image-to-image prediction models (such as Lotus) that take the noisy "
                             "latent unscaled; no SD1/SD2/SDXL checkpoint predicts that way"}


@node("ModelSamplingDiscrete", category="advanced/model",
      description="Sample the model as predicting noise (eps), v (v_prediction, e.g. SD2.x 768-v), the clean "
                  "latent (x0) or a latent consistency model (lcm: its 50-level distilled schedule); zsnr rescales "
                  "the schedule to zero terminal SNR (for models trained that way).",
      inputs=[Input("model", "MODEL"),
              Input("sampling", COMBO, options=SAMPLING_TYPES, default="eps",
                    tooltip="what the network predicts"),
              Input("zsnr", BOOLEAN, default=False, tooltip="rescale the noise schedule to zero terminal SNR")],
      outputs=[Output("MODEL", "MODEL")])
def model_sampling_discrete(ctx, model, sampling, zsnr):
    from dataclasses import replace

    if sampling in UNSUPPORTED:
        raise ValueError(f"sampling {sampling!r} is not supported: {UNSUPPORTED[sampling]}. Choose eps, "
                         f"v_prediction, lcm or x0")
    family = model.family
    new_sampling = replace(family.sampling, prediction=sampling, zsnr=bool(zsnr))
    return replace(model, family=replace(family, sampling=new_sampling))


NODES = [model_sampling_discrete]
