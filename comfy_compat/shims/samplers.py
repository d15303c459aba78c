"""`comfy.samplers`: only the names of the samplers and schedulers sdgraph has (`KSampler.SAMPLERS`,
`KSampler.SCHEDULERS`); ComfyUI's sampling objects (CFGGuider, KSAMPLER, sampling_function) are its model
internals and import as placeholders."""

from __future__ import annotations

from typing import Any

from . import ShimModule


def build(env: Any, name: str) -> ShimModule:
    from diffusion.samplers import SAMPLER_NAMES, SCHEDULER_NAMES

    class KSampler:
        SAMPLERS = list(SAMPLER_NAMES)
        SCHEDULERS = list(SCHEDULER_NAMES)

    return ShimModule(name, {"KSampler": KSampler, "SAMPLER_NAMES": list(SAMPLER_NAMES),
                             "SCHEDULER_NAMES": list(SCHEDULER_NAMES)})
