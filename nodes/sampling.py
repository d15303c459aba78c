"""KSampler and KSamplerAdvanced: denoise a latent with a model, two conditionings, a sampler and a schedule."""

from __future__ import annotations

from diffusion.samplers import SAMPLER_NAMES, SCHEDULER_NAMES
from engine import COMBO, FLOAT, INT, Input, Output, node

SEED_MAX = 0xFFFF_FFFF_FFFF_FFFF


MODEL_INPUT = Input("model", "MODEL", tooltip="the model that predicts noise")


def _latent_size(latent_image):
    """Sampling keeps the latent's size (validation bounds it: engine/sizes.py)."""
    return latent_image


def _common_inputs(seed_name: str) -> list[Input]:
    return [
        Input(seed_name, INT, default=0, min=0, max=SEED_MAX, control_after_generate=True,
              tooltip="the random seed of the noise (same seed + graph = same image as ComfyUI)"),
        Input("steps", INT, default=20, min=1, max=10000, tooltip="denoising steps"),
        Input("cfg", FLOAT, default=8.0, min=0.0, max=100.0, step=0.1, extra={"round": 0.01},
              tooltip="classifier-free guidance scale; 1 skips the negative prompt"),
        Input("sampler_name", COMBO, options=SAMPLER_NAMES, default="euler"),
        Input("scheduler", COMBO, options=SCHEDULER_NAMES, default="normal"),
        Input("positive", "CONDITIONING"),
        Input("negative", "CONDITIONING"),
        Input("latent_image", "LATENT"),
    ]


def _run(ctx, model, latent_image, positive, negative, **settings):
    import math

    from diffusion.latent import Conditioning, Latent
    from diffusion.sampling import sample

    total = settings["steps"]

    def report(step, _total, *_rest):
        ctx.progress(step + 1, _total or total)

    # The UNet is borrowed from the model manager for the whole loop, with room made for one call's working
    # memory: every conditioning entry is batched into that call (cond and uncond together under CFG).
    shape = tuple(Latent.from_value(latent_image).samples.shape)
    entries = len(Conditioning.from_value(positive).entries)
    if not math.isclose(settings["cfg"], 1.0):
        entries += len(Conditioning.from_value(negative).entries)
    with ctx.resources.models.use(model.handle, working=model.working_bytes(shape, max(entries, 1))) as unet:
        return sample(model.forward_function(unet), latent_image, positive, negative, callback=report, **settings)


@node("KSampler", category="sampling", size_rule=_latent_size,
      description="Denoise a latent: txt2img from an empty latent, img2img with denoise < 1, inpainting when "
                  "the latent carries a noise mask.",
      inputs=[MODEL_INPUT, *_common_inputs("seed"),
              Input("denoise", FLOAT, default=1.0, min=0.0, max=1.0, step=0.01,
                    tooltip="how much of the schedule to run (1 = all; lower keeps more of the input)")],
      outputs=[Output("LATENT", "LATENT")])
def ksampler(ctx, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise):
    return _run(ctx, model, latent_image, positive, negative, seed=seed, steps=steps, cfg=cfg,
                sampler_name=sampler_name, scheduler=scheduler, denoise=denoise)


@node("KSamplerAdvanced", category="sampling", display_name="KSampler (Advanced)", size_rule=_latent_size,
      description="KSampler with control over the step range and the noise: run steps start_at_step to "
                  "end_at_step of the schedule, optionally without adding noise or leaving the rest of the "
                  "noise in (to hand over to another sampler).",
      inputs=[
          MODEL_INPUT,
          Input("add_noise", COMBO, options=("enable", "disable"), default="enable"),
          *_common_inputs("noise_seed"),
          Input("start_at_step", INT, default=0, min=0, max=10000),
          Input("end_at_step", INT, default=10000, min=0, max=10000),
          Input("return_with_leftover_noise", COMBO, options=("disable", "enable"), default="disable"),
      ],
      outputs=[Output("LATENT", "LATENT")])
def ksampler_advanced(ctx, add_noise, model, noise_seed, steps, cfg, sampler_name, scheduler, positive, negative,
                      latent_image, start_at_step, end_at_step, return_with_leftover_noise):
    return _run(ctx, model, latent_image, positive, negative, seed=noise_seed, steps=steps, cfg=cfg,
                sampler_name=sampler_name, scheduler=scheduler, denoise=1.0, add_noise=add_noise == "enable",
                start_step=start_at_step, last_step=end_at_step,
                force_full_denoise=return_with_leftover_noise != "enable")


NODES = [ksampler, ksampler_advanced]
