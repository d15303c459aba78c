"""CLIP: the value a checkpoint loader or CLIPLoader/DualCLIPLoader gives, encoding prompts as ComfyUI does.

A CLIP value holds one model handle for all its text encoders (the manager loads them together: one encoder as
its transformers model, several as a `ModuleDict` keyed by encoder name) and, per encoder, how ComfyUI uses it:

| clip_type | encoder     | default layer            | hidden layer normed | pads with | embedding key |
|-----------|-------------|--------------------------|---------------------|-----------|---------------|
| sd1       | clip_l      | last (final layer norm)  | yes                 | end token | clip_l        |
| sd2       | open_clip_h | penultimate              | yes                 | 0         | clip_h        |
| sdxl      | clip_l      | penultimate              | no                  | end token | clip_l        |
| sdxl      | open_clip_g | penultimate              | no                  | 0         | clip_g        |

CLIPSetLastLayer sets one layer for every encoder; an encoder with fewer layers than asked uses its last layer,
normed (ComfyUI's rule). The conditioning's context is the encoders' outputs side by side (SDXL: CLIP-L's 768 and
bigG's 1280 = 2048 wide, cut to the shorter token count); its pooled vector is the last encoder's first-chunk
pooled state, projected when the encoder has a projection (SD2, SDXL: bigG's). ComfyUI stores text encoder
weights in fp16 also on the CPU and computes in fp32: published files are fp16, so a file's values loaded into
fp32 are what it computes with (a LoRA's result is rounded to fp16 as ComfyUI does, `diffusion.lora_patch`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from types import MappingProxyType

import torch
from transformers import CLIPTextConfig

from runtime.models import ModelHandle

from .latent import CondEntry, Conditioning
from .tokenizer import ClipTokenizer

CLIP_TYPES = ("sd1", "sd2", "sdxl")


@dataclass(frozen=True)
class EncoderUse:
    """How ComfyUI uses one text encoder of a CLIP type (see the module docstring's table)."""

    default_layer: int | None  # None: the last layer with the final layer norm
    layer_norm_hidden: bool
    pad_id: int | None  # None: the end token
    embedding_key: str


ENCODER_USES = MappingProxyType({
    ("sd1", "clip_l"): EncoderUse(None, True, None, "clip_l"),
    ("sd2", "open_clip_h"): EncoderUse(-2, True, 0, "clip_h"),
    ("sdxl", "clip_l"): EncoderUse(-2, False, None, "clip_l"),
    ("sdxl", "open_clip_g"): EncoderUse(-2, False, 0, "clip_g"),
})  # fmt: skip


def encoder_use(clip_type: str, encoder: str) -> EncoderUse:
    use = ENCODER_USES.get((clip_type, encoder))
    if use is None:
        raise ValueError(f"a {encoder} text encoder is not used by {clip_type} models")
    return use


def effective_layer(layer: int | None, use: EncoderUse, layers: int) -> int | None:
    """The layer an encoder of `layers` layers is read at: its default without CLIPSetLastLayer, the last one
    (None) when asked for more layers than it has."""
    if layer is None:
        return use.default_layer
    return None if abs(layer) > layers else layer


@dataclass(frozen=True, eq=False)
class TextEncoder:
    """CLIP: the text model(s), the tokenizer, the layer set by CLIPSetLastLayer (None: each encoder's default)
    and the embeddings folder. `encoders` names the encoders in conditioning order, `configs` their configs
    (empty: `(config,)`); `clip_type` ("sd1", "sd2", "sdxl") is what nodes check a CLIP against."""

    handle: ModelHandle
    config: CLIPTextConfig  # the first encoder's
    tokenizer: ClipTokenizer
    source: str
    layer: int | None = None
    embeddings_dir: Path | None = None
    allow_pickle: bool = False  # .pt/.bin textual inversions (loaded with weights_only=True)
    nbytes: int = 0  # the tokenizer is shared by every CLIP value of the runtime, so it is not counted
    clip_type: str = "sd1"
    encoders: tuple[str, ...] = ("clip_l",)
    configs: tuple[CLIPTextConfig, ...] = ()

    def model_handles(self) -> tuple[ModelHandle, ...]:
        return (self.handle,)

    @property
    def family(self) -> str:
        """The family these encoders condition ("sd1", "sd2", "sdxl", "sdxl_refiner"; inpainting models share
        their base's), for nodes that need a particular one (CLIPTextEncodeSDXL, ...Refiner)."""
        return "sdxl_refiner" if self.clip_type == "sdxl" and self.encoders == ("open_clip_g",) else self.clip_type

    @property
    def encoder_configs(self) -> tuple[CLIPTextConfig, ...]:
        return self.configs or (self.config,)

    @property
    def layers(self) -> int:
        """The most layers an encoder has (CLIPSetLastLayer may go that deep)."""
        return max(c.num_hidden_layers for c in self.encoder_configs)

    @property
    def lora_configs(self) -> CLIPTextConfig | MappingProxyType:
        """What LoRA keys are mapped against (`diffusion.lora_keys.lora_targets`): one encoder's config, or {encoder:
        config} when there are several (SDXL base: `lora_te1_` keys patch CLIP-L, `lora_te2_` keys bigG)."""
        if len(self.encoders) == 1:
            return self.config
        return MappingProxyType(dict(zip(self.encoders, self.encoder_configs, strict=True)))

    def with_lora(self, patch, strength: float) -> TextEncoder:
        """This text encoder with a LoRA's patch added (applied when the manager hands out the network)."""
        return replace(self, handle=_with_patch(self.handle, patch, strength), nbytes=self.nbytes + patch.nbytes)

    def with_layer(self, layer: int) -> TextEncoder:
        """CLIPSetLastLayer: -1 is the last layer, -2 the one before ("clip skip 2")."""
        return replace(self, layer=layer)

    def encode(self, text: str, text_model: torch.nn.Module) -> Conditioning:
        """Encode a prompt with the borrowed network (every encoder gets the same text); the conditioning is
        float32 on the CPU."""
        return self.encode_texts(dict.fromkeys(self.encoders, text), text_model)

    def encode_sdxl(self, text_g: str, text_l: str, text_model: torch.nn.Module) -> Conditioning:
        """CLIPTextEncodeSDXL: bigG encodes `text_g`, CLIP-L `text_l`; when their chunk counts differ, the shorter
        is padded with whole chunks of the empty prompt (as ComfyUI)."""
        if self.clip_type != "sdxl" or set(self.encoders) != {"clip_l", "open_clip_g"}:
            raise ValueError(f"this CLIP holds {', '.join(self.encoders)} ({self.clip_type}); CLIPTextEncodeSDXL "
                             "needs SDXL base's two text encoders (clip_l and open_clip_g)")
        return self.encode_texts({"clip_l": text_l, "open_clip_g": text_g}, text_model)

    def encode_texts(self, texts: dict[str, str], text_model: torch.nn.Module) -> Conditioning:
        """Each encoder encodes its own text; the outputs are joined as the module docstring says."""
        from .prompt import encode_chunks

        networks = text_model if isinstance(text_model, torch.nn.ModuleDict) else {self.encoders[0]: text_model}
        chunks = {name: self.tokenize_for(name, texts[name]) for name in self.encoders}
        count = max(len(c) for c in chunks.values())
        outputs = []
        with torch.inference_mode():
            for name, config in zip(self.encoders, self.encoder_configs, strict=True):
                use = encoder_use(self.clip_type, name)
                padded = chunks[name] + self.tokenize_for(name, "") * (count - len(chunks[name]))
                outputs.append(encode_chunks(
                    networks[name], padded, layer=effective_layer(self.layer, use, config.num_hidden_layers),
                    bos_id=self.tokenizer.bos_id, eos_id=self.tokenizer.eos_id, pad_id=use.pad_id,
                    layer_norm_hidden=use.layer_norm_hidden))
            tokens = min(context.shape[1] for context, _ in outputs)
            context = torch.cat([c[:, :tokens].float() for c, _ in outputs], dim=-1)
            return Conditioning((CondEntry(context.cpu(), outputs[-1][1].float().cpu()),))

    def tokenize_for(self, encoder: str, text: str) -> list:
        """The weighted 77-token chunks `encoder` encodes for `text` (its padding, its embedding vectors);
        warnings about the prompt are issued as PromptWarning."""
        from .prompt import PromptWarning, tokenize_prompt

        use = encoder_use(self.clip_type, encoder)
        width = self.encoder_configs[self.encoders.index(encoder)].hidden_size
        tokenized = tokenize_prompt(
            self.tokenizer, text, embeddings_dir=str(self.embeddings_dir) if self.embeddings_dir else None,
            embedding_width=width, allow_pickle=self.allow_pickle, pad_id=use.pad_id, embedding_key=use.embedding_key)
        for note in tokenized.warnings:
            warnings.warn(note, PromptWarning, stacklevel=3)
        return tokenized.chunks


def _with_patch(handle: ModelHandle, patch, strength: float) -> ModelHandle:
    return replace(handle, patches=(*handle.patches, (patch, float(strength))))


def _set_text_patches(module: torch.nn.Module, patches: tuple) -> None:
    from .lora_patch import set_patches

    set_patches(module, patches, part="text_encoder")


def load_text_encoders(layouts: tuple, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """One encoder's model, or a ModuleDict of several keyed by encoder name, read one after the other."""
    if len(layouts) == 1:
        return layouts[0].load(dtype=dtype, device=device)
    return torch.nn.ModuleDict({layout.encoder: layout.load(dtype=dtype, device=device) for layout in layouts})


def text_handle(layouts: tuple, *, dtype: torch.dtype, device: torch.device) -> ModelHandle:
    """A handle whose identity is every encoder's file (path, size, mtime), encoder, dtype and device; LoRA patches
    apply to whichever encoders they name."""
    return ModelHandle(
        origin="+".join(f"{layout.file.path}#{layout.encoder}" for layout in layouts),
        version=tuple((layout.file.size, layout.file.mtime_ns) for layout in layouts),
        variant=(str(dtype).removeprefix("torch."), str(device)),
        weight_bytes=sum(layout.weight_bytes(dtype) for layout in layouts),
        device=str(device),
        load=partial(load_text_encoders, tuple(layouts), dtype),
        label=" + ".join(f"{layout.label} of {layout.file.path.name}" for layout in layouts),
        patch=_set_text_patches,
        cheap_reload=True,  # a plain read of its file, and CLIPTextEncode caches what it computed
    )


def clip_value(layouts: tuple, clip_type: str, *, device: torch.device, dtype: torch.dtype,
               tokenizer: ClipTokenizer, embeddings_dir: Path | None = None,
               allow_pickle: bool = False) -> TextEncoder:
    """The CLIP value for text part layouts (`diffusion.text_parts`) used as `clip_type` models use them; nothing
    is read until the manager loads the handle."""
    for layout in layouts:
        encoder_use(clip_type, layout.encoder)  # refuses an encoder the type does not use
    nbytes = sum(1024 + sum(len(k) + len(v) + 120 for k, v in layout.keys.items()) for layout in layouts)
    configs = tuple(layout.config for layout in layouts)
    return TextEncoder(text_handle(layouts, dtype=dtype, device=device), configs[0], tokenizer,
                       " + ".join(str(layout.file.path) for layout in layouts), embeddings_dir=embeddings_dir,
                       allow_pickle=allow_pickle, nbytes=nbytes, clip_type=clip_type,
                       encoders=tuple(layout.encoder for layout in layouts), configs=configs)
