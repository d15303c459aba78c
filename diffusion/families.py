"""Model families: what a checkpoint is, told from its keys and shapes, and what sampling it with needs.

A `Family` says which text encoders condition the UNet, whether the UNet takes a label vector (SDXL's size and
crop conditioning, "adm") or extra input channels (inpainting models), the latent scale of its VAE and the
default `ModelSampling` (prediction type and noise schedule). The MODEL value carries its family; nodes such as
ModelSamplingDiscrete replace the sampling part.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType

PREDICTIONS = ("eps", "v_prediction", "lcm", "x0")  # ModelSamplingDiscrete's sampling types, in ComfyUI's names


@dataclass(frozen=True)
class ModelSampling:
    """A discrete (DDPM-style) noise schedule and what the network predicts.

    prediction: "eps" (noise), "v_prediction" (v = alpha*eps - sigma*x0, scaled), "lcm" (latent consistency
    boundary conditions) or "x0" (the clean latent). zsnr: rescale the schedule to zero terminal SNR.
    """

    prediction: str = "eps"
    zsnr: bool = False
    linear_start: float = 0.00085
    linear_end: float = 0.012
    timesteps: int = 1000

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction type {self.prediction!r}; expected one of {', '.join(PREDICTIONS)}")


@dataclass(frozen=True)
class Family:
    """name: our id ("sd1", "sd1_inpaint", "sd2", "sd2_inpaint", "sdxl", "sdxl_refiner"); label: how errors name it.

    text_encoders: the encoders whose outputs condition the UNet, in order ("clip_l", "open_clip_h",
    "open_clip_g"). adm: None, "sdxl" (pooled + 6 size embeddings = 2816) or "sdxl_refiner" (pooled + 4 size
    embeddings + aesthetic score = 2560). concat_channels: extra UNet input channels (5 for inpainting models:
    the masked image's latent and the mask). clip_type: the CLIPLoader type that loads its text encoder(s).
    """

    name: str
    label: str
    text_encoders: tuple[str, ...]
    latent_scale: float
    clip_type: str
    adm: str | None = None
    concat_channels: int = 0
    sampling: ModelSampling = field(default_factory=ModelSampling)


SD1_LATENT_SCALE = 0.18215
SDXL_LATENT_SCALE = 0.13025

FAMILIES = MappingProxyType({f.name: f for f in (
    Family("sd1", "SD1.x", ("clip_l",), SD1_LATENT_SCALE, "sd1"),
    Family("sd1_inpaint", "SD1.x inpainting", ("clip_l",), SD1_LATENT_SCALE, "sd1", concat_channels=5),
    Family("sd2", "SD2.x", ("open_clip_h",), SD1_LATENT_SCALE, "sd2"),
    Family("sd2_inpaint", "SD2.x inpainting", ("open_clip_h",), SD1_LATENT_SCALE, "sd2", concat_channels=5),
    Family("sdxl", "SDXL base", ("clip_l", "open_clip_g"), SDXL_LATENT_SCALE, "sdxl", adm="sdxl"),
    Family("sdxl_refiner", "SDXL refiner", ("open_clip_g",), SDXL_LATENT_SCALE, "sdxl", adm="sdxl_refiner"),
)})  # fmt: skip
