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


# --- Detection: which family a checkpoint (or a bare UNet file) is, from its keys and shapes alone -------------

UNET_PREFIX = "model.diffusion_model."
V_PRED_PROBE = "output_blocks.11.1.transformer_blocks.0.norm1.bias"  # ComfyUI's SD2 v-prediction probe
V_PRED_STD = 0.09  # population std of that bias above which an SD2 UNet predicts v (ComfyUI's rule)
SDXL_ADM = 2816  # pooled CLIP-G (1280) + 6 size embeddings of 256
SDXL_REFINER_ADM = 2560  # pooled CLIP-G (1280) + 4 size embeddings + the aesthetic score embedding
INPAINT_CHANNELS = 9  # 4 latent + 4 masked-image latent + 1 mask

# (marker found in the UNet's keys, after any 'model.diffusion_model.' prefix, or the file's, what it is)
UNSUPPORTED_MARKERS = (
    ("joint_blocks.", "Stable Diffusion 3 / 3.5 (MMDiT)"),
    ("double_blocks.", "Flux"),
    ("double_layers.", "AuraFlow"),
    ("clf.", "Stable Cascade (stage C)"),
    ("clip_txt_mapper.", "Stable Cascade"),
    ("effnet_mapper.", "Stable Cascade (stage B)"),
    ("t_block.", "PixArt"),
    ("mlp_t5.", "HunyuanDiT"),
    ("extra_embedder.", "HunyuanDiT"),
    ("adaln_single.", "LTX-Video / PixArt"),
    ("patch_embedding.", "Wan (video)"),
    ("cap_embedder.", "Lumina"),
    ("encoder_hid_proj.", "Kolors"),
    ("time_stack.", "Stable Video Diffusion"),
    ("time_mixer.", "Stable Video Diffusion"),
    ("down_blocks.", "a diffusers-format UNet (convert it to the single-file LDM layout)"),
    ("edm_mean", "Playground v2.5 (EDM sampling)"),
    ("edm_vpred.", "an EDM v-prediction model (CosXL)"),
)
EXPECTED_LAYOUT = ("a UNet in the LDM layout: 'model.diffusion_model.input_blocks.0.0.weight' (or bare "
                   "'input_blocks.0.0.weight') and 'middle_block.1.transformer_blocks.0.attn2.to_k.weight'")


class UnsupportedModelError(ValueError):
    """A model file of a family we do not run, or a layout we do not recognise (CheckpointError subclasses it
    where the checkpoint module raises it)."""


def supported_labels() -> str:
    return ", ".join(f.label for f in FAMILIES.values())


def unet_prefix(keys) -> str:
    """'model.diffusion_model.' when the file is a full checkpoint, '' for a bare UNet file."""
    return UNET_PREFIX if any(k.startswith(UNET_PREFIX) for k in keys) else ""


def _looks_like(keys) -> str | None:
    """What family the keys say, among those we refuse (a marker at the start of a key or of one of its parts)."""
    for marker, what in UNSUPPORTED_MARKERS:
        if any(k.startswith(marker) or f".{marker}" in k for k in keys):
            return what
    return None


def _refuse(what: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"this looks like {what}, which sdgraph does not run; supported families: "
                                 f"{supported_labels()}")


def detect_family(meta, read=None) -> Family:
    """The family of a checkpoint or bare UNet file from its keys and shapes (never its name).

    `meta`: {key: tensor} with at least shapes (meta tensors do); `read(key)` reads one small tensor's values,
    needed only for SD2 files without a `v_pred` key (ComfyUI's rule: an SD2 UNet whose
    output_blocks.11.1.transformer_blocks.0.norm1.bias has a population std above 0.09 predicts v; a 9-channel
    SD2 inpainting model is always eps). A `v_pred` key means v-prediction for any family, `ztsnr` zero terminal
    SNR. Raises UnsupportedModelError naming what the file looks like, or what was expected.
    """
    keys = list(meta)
    what = _looks_like(keys)
    if what:
        raise _refuse(what)
    prefix = unet_prefix(keys)
    first, to_k = prefix + "input_blocks.0.0.weight", prefix + "middle_block.1.transformer_blocks.0.attn2.to_k.weight"
    if first not in meta or to_k not in meta:
        tops = sorted({k.split(".", 1)[0] for k in keys})[:8]
        raise UnsupportedModelError(f"no UNet of a known family: expected {EXPECTED_LAYOUT}; the file's keys start "
                                    f"with {', '.join(tops) or 'nothing (it is empty)'}. Supported families: "
                                    f"{supported_labels()}")
    for key, dims in ((first, 4), (to_k, 2), (prefix + "label_emb.0.0.weight", 2)):
        if key in meta and len(meta[key].shape) != dims:
            raise UnsupportedModelError(f"cannot read the UNet architecture: {key} has shape {list(meta[key].shape)}, "
                                        f"where a UNet has a {dims}-D weight; the file is damaged or crafted")
    in_channels = tuple(meta[first].shape)[1]
    adm = tuple(meta[prefix + "label_emb.0.0.weight"].shape)[1] if prefix + "label_emb.0.0.weight" in meta else None
    linear = len(tuple(meta[prefix + "middle_block.1.proj_in.weight"].shape)) == 2 \
        if prefix + "middle_block.1.proj_in.weight" in meta else False
    family = _family_of(in_channels, adm, linear, keys)
    return _with_sampling(family, meta, read, prefix)


def _family_of(in_channels: int, adm: int | None, linear: bool, keys) -> Family:
    if in_channels not in (4, INPAINT_CHANNELS):
        guess = "an InstructPix2Pix model (8 input channels)" if in_channels == 8 else \
            f"a UNet with {in_channels} input channels"
        raise _refuse(guess)
    inpaint = in_channels == INPAINT_CHANNELS
    if adm is None:
        name = "sd2" if linear else "sd1"  # SD2.x projects in and out of its transformers with Linear layers
    elif adm == SDXL_ADM:
        name = "sdxl"
    elif adm == SDXL_REFINER_ADM:
        name = "sdxl_refiner"
    else:
        guesses = {1536: "SD2.x unCLIP (ViT-L)", 2048: "SD2.x unCLIP (ViT-H)", 768: "Stable Video Diffusion",
                   5632: "Kolors"}
        raise _refuse(guesses.get(adm, f"a UNet with a {adm}-wide label embedding (SDXL takes 2816, its refiner "
                                       "2560)"))
    if inpaint:
        if name.startswith("sdxl"):
            raise _refuse("an SDXL inpainting model (9 input channels)")
        name += "_inpaint"
    return FAMILIES[name]


def _with_sampling(family: Family, meta, read, prefix: str) -> Family:
    from dataclasses import replace

    v = "v_pred" in meta
    if not v and family.name == "sd2":
        probe = prefix + V_PRED_PROBE
        if probe in meta:
            if read is None:
                raise ValueError(f"telling SD2 eps from v needs the values of {probe}; pass read=")
            v = float(read(probe).float().std(unbiased=False)) > V_PRED_STD
    zsnr = "ztsnr" in meta
    if not v and not zsnr:
        return family
    sampling = replace(family.sampling, prediction="v_prediction" if v else family.sampling.prediction, zsnr=zsnr)
    return replace(family, sampling=sampling)
