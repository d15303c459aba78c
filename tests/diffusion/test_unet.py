import dataclasses
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from diffusers.models.embeddings import get_timestep_embedding
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusion.make_checkpoint import PRESETS, random_weights
from diffusion.unet import UNetConfig, UNetModel, build_unet, timestep_embedding, unet_config_from_state_dict

PREFIX = "model.diffusion_model."
TINY = PRESETS["tiny"].unet
# SD1.5's shape at small widths: 3 levels, no transformer at the last one, 2 res blocks, depth-2 transformers
SMALL_SD15_LIKE = UNetConfig(
    model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2, attention_levels=(0, 1), transformer_depth=2,
    context_dim=48,
)  # fmt: skip

SD15_KEYS = Path(__file__).resolve().parents[1] / "fixtures" / "sd15_keys.tsv"
SIZE_EMBED = 256  # SDXL embeds each size number in 256 sinusoidal values
# SD2.1's shape at small widths: linear projections, 64-wide heads
SMALL_SD21_LIKE = UNetConfig(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(0, 1, 2),
                             context_dim=80, num_heads=None, head_dim=64, linear_projection=True)
# SDXL's shape at small widths: no transformer at level 0, deeper ones below, a 2816-wide label vector
SMALL_SDXL_LIKE = UNetConfig(model_channels=32, channel_mult=(1, 2, 4), num_res_blocks=2, attention_levels=(1, 2),
                             transformer_depth=(0, 1, 2), middle_depth=2, context_dim=96, num_heads=None, head_dim=64,
                             linear_projection=True, adm_in_channels=1280 + 6 * SIZE_EMBED)


def meta_state_dict(config: UNetConfig) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return UNetModel(config).state_dict()


def random_unet_weights(config: UNetConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Checkpoint-layout (prefixed) fp32 weights for `config`, non-trivial norms included."""
    layout = {PREFIX + k: (torch.float32, tuple(t.shape)) for k, t in meta_state_dict(config).items()}
    return random_weights(layout, seed)


def strip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix(PREFIX): v for k, v in sd.items()}


def diffusers_unet(config: UNetConfig, checkpoint: dict[str, torch.Tensor]) -> UNet2DConditionModel:
    """diffusers' UNet for `config` (its own code, configured as the published SD1.5 / SD2.1 / SDXL configs are),
    with `checkpoint` converted by diffusers' LDM converter."""
    levels = range(len(config.channel_mult))
    down = tuple("CrossAttnDownBlock2D" if i in config.attention_levels else "DownBlock2D" for i in levels)
    up = tuple("CrossAttnUpBlock2D" if i in config.attention_levels else "UpBlock2D" for i in reversed(levels))
    kwargs = dict(
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=config.level_channels,
        layers_per_block=config.num_res_blocks,
        cross_attention_dim=config.context_dim,
        # diffusers' historical name for the head count (SDXL's config: [5, 10, 20])
        attention_head_dim=config.num_heads or tuple(max(1, w // config.head_dim) for w in config.level_channels),
        # the last entry is also the middle block's depth in diffusers
        transformer_layers_per_block=tuple(config.depth_at(i) or config.mid_depth for i in levels),
        use_linear_projection=config.linear_projection,
        flip_sin_to_cos=True,
        freq_shift=0,
        norm_num_groups=32,
        norm_eps=1e-5,
    )
    if config.adm_in_channels is not None:  # SDXL: addition_embed_type text_time, as in its published config
        kwargs.update(addition_embed_type="text_time", addition_time_embed_dim=SIZE_EMBED,
                      projection_class_embeddings_input_dim=config.adm_in_channels)
    model = UNet2DConditionModel(**kwargs)
    converted = convert_ldm_unet_checkpoint(checkpoint, kwargs)
    model.load_state_dict(converted, strict=True)
    return model.eval()


def test_sd15_keys_and_shapes_match_the_public_file():
    rows = [line.rstrip("\n").split("\t") for line in open(SD15_KEYS)]
    want = {k.removeprefix(PREFIX): shape.replace(" ", "") for k, _, shape in rows if k.startswith(PREFIX)}
    got = {k: str(list(t.shape)).replace(" ", "") for k, t in meta_state_dict(UNetConfig()).items()}
    assert got == want


def test_sd15_config_is_inferred_from_its_shapes():
    assert unet_config_from_state_dict(meta_state_dict(UNetConfig())) == UNetConfig()


@settings(max_examples=40, deadline=None)
@given(
    model_channels=st.sampled_from([32, 64, 96]),
    channel_mult=st.lists(st.integers(1, 4), min_size=1, max_size=4).map(tuple),
    num_res_blocks=st.integers(1, 3),
    attention_mask=st.lists(st.booleans(), min_size=4, max_size=4),
    transformer_depth=st.integers(1, 3),
    context_dim=st.sampled_from([16, 32, 768]),
    linear_projection=st.booleans(),
    in_channels=st.sampled_from([4, 9]),
)
def test_config_round_trips_through_shapes(attention_mask, channel_mult, **fields):
    levels = tuple(i for i in range(len(channel_mult)) if attention_mask[i])
    config = UNetConfig(channel_mult=channel_mult, attention_levels=levels, **fields)
    assert unet_config_from_state_dict(meta_state_dict(config)) == config


def test_1024_wide_context_means_64_wide_heads():
    config = UNetConfig(model_channels=64, channel_mult=(1, 2), num_res_blocks=1, context_dim=1024,
                        attention_levels=(0, 1), num_heads=None, head_dim=64, linear_projection=True)  # fmt: skip
    assert unet_config_from_state_dict(meta_state_dict(config)) == config


def test_missing_key_is_named():
    sd = meta_state_dict(TINY)
    del sd["out.2.weight"]
    with pytest.raises(ValueError, match=r"out\.2\.weight"):
        unet_config_from_state_dict(sd)


def test_config_rejects_widths_groupnorm_cannot_split():
    with pytest.raises(ValueError, match="GroupNorm"):
        UNetConfig(model_channels=40)
    with pytest.raises(ValueError, match="exactly one"):
        UNetConfig(num_heads=8, head_dim=64)


def test_timestep_embedding_is_ldm_cos_first():
    t = torch.tensor([0.0, 1.0, 17.5, 999.0])
    ours = timestep_embedding(t, 320)
    theirs = get_timestep_embedding(t, 320, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert torch.equal(ours, theirs)  # same float32 operations, same bits
    assert torch.equal(ours[0, :160], torch.ones(160)) and torch.equal(ours[0, 160:], torch.zeros(160))
    assert timestep_embedding(t, 7).shape == (4, 7)


@pytest.mark.parametrize("config", [TINY, SMALL_SD15_LIKE, SMALL_SD21_LIKE, SMALL_SDXL_LIKE],
                         ids=["tiny", "sd15-like", "sd21-like", "sdxl-like"])
def test_matches_diffusers(config):
    """SD1, and (issue #13) SD2 (linear projections, 64-wide heads) and SDXL (depth per level, label_emb fed y
    built from the pooled embedding and six size numbers, diffusers' added_cond_kwargs text_embeds/time_ids)
    within 1e-4."""
    checkpoint = random_unet_weights(config, seed=5)
    ours = holding(config, strip(checkpoint))
    theirs = diffusers_unet(config, checkpoint)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=g)
    context = torch.randn(2, 7, config.context_dim, generator=g)
    t = torch.tensor([999.0, 10.5])
    with torch.no_grad():
        if config.adm_in_channels is None:
            got, want = ours(x, t, context), theirs(x, t, encoder_hidden_states=context).sample
        else:
            pooled = torch.randn(2, 1280, generator=g)
            sizes = torch.tensor([[1024.0, 768.0, 0.0, 16.0, 1024.0, 768.0], [512.0, 512.0, 8.0, 0.0, 640.0, 384.0]])
            y = torch.cat([pooled, timestep_embedding(sizes.flatten(), SIZE_EMBED).reshape(2, -1)], dim=1)
            got = ours(x, t, context, y=y)
            want = theirs(x, t, encoder_hidden_states=context,
                          added_cond_kwargs={"text_embeds": pooled, "time_ids": sizes}).sample
    assert got.std() > 0.05
    assert (got - want).abs().max().item() < 1e-4 * max(1.0, want.abs().max().item())


def test_odd_latent_sizes_keep_their_shape():
    model = build_unet(strip(random_unet_weights(SMALL_SD15_LIKE)))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 9, 7, generator=g)
    with torch.no_grad():
        out = model(x, torch.tensor([500.0]), torch.randn(1, 5, SMALL_SD15_LIKE.context_dim, generator=g))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_batch_elements_are_independent_and_scalar_timesteps_broadcast():
    model = build_unet(strip(random_unet_weights(TINY)))
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, TINY.context_dim, generator=g)
    with torch.no_grad():
        both = model(x, torch.tensor(300.0), context)
        first = model(x[:1], torch.tensor([300.0]), context[:1])
    torch.testing.assert_close(both[:1], first, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_follows_the_input(dtype):
    weights = strip(random_unet_weights(TINY))
    reference = build_unet(weights)
    half = build_unet({k: v.to(dtype) for k, v in weights.items()})
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, TINY.context_dim, generator=g)
    with torch.no_grad():
        want = reference(x, torch.tensor([400.0]), context)
        got = half(x.to(dtype), torch.tensor([400.0]), context)  # fp32 context is cast to the input's dtype
    assert got.dtype == dtype
    tolerance = {torch.float16: 0.02, torch.bfloat16: 0.1}[dtype]  # bf16 keeps 8 bits of mantissa
    assert (got.float() - want).abs().max() < tolerance * want.abs().max()


def test_config_is_frozen_and_hashable():
    with pytest.raises(dataclasses.FrozenInstanceError):
        TINY.model_channels = 64
    assert hash(TINY) == hash(dataclasses.replace(TINY))


def test_precision_sensitive_prefixes_are_in_the_last_level():
    from diffusion.unet import precision_sensitive_prefixes

    sd15 = precision_sensitive_prefixes(UNetConfig())
    assert sd15[:3] == ("output_blocks.9.0.", "output_blocks.10.0.", "output_blocks.11.0.") and sd15[-1] == "out."
    assert "output_blocks.11.1.proj_out." in sd15 and "output_blocks.9.1.norm." in sd15 and len(sd15) == 13
    keys = UNetModel(SMALL_SD15_LIKE).state_dict()
    kept = precision_sensitive_prefixes(SMALL_SD15_LIKE)
    assert all(any(k.startswith(p) for k in keys) for p in kept)  # every prefix names real weights
    assert not any(k.startswith(kept) for k in keys if ".transformer_blocks." in k)  # attention and FF stay
    no_attention = dataclasses.replace(TINY, attention_levels=(1,))
    assert precision_sensitive_prefixes(no_attention) == ("output_blocks.2.0.", "output_blocks.3.0.", "out.")


def test_layers_compute_in_their_own_dtype():
    from diffusion.unet import precision_sensitive_prefixes, weight_dtype

    weights = strip(random_unet_weights(SMALL_SD15_LIKE))
    kept = precision_sensitive_prefixes(SMALL_SD15_LIKE)
    mixed = build_unet({k: v if k.startswith(kept) else v.to(torch.bfloat16) for k, v in weights.items()})
    reference = build_unet(weights)
    assert weight_dtype(mixed.output_blocks[-1], None) == torch.float32
    assert weight_dtype(mixed.output_blocks[-1][1].transformer_blocks, None) == torch.bfloat16
    assert weight_dtype(mixed.output_blocks[0], None) == torch.bfloat16
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 7, SMALL_SD15_LIKE.context_dim, generator=g)
    with torch.no_grad():
        got = mixed(x.to(torch.bfloat16), torch.tensor([400.0, 20.0]), context)
        want = reference(x, torch.tensor([400.0, 20.0]), context)
    assert got.dtype == torch.float32  # the output layer's dtype
    assert (got - want).abs().max() < 0.1 * want.abs().max()


def holding(config: UNetConfig, weights: dict[str, torch.Tensor]) -> UNetModel:
    from diffusion.weights import module_holding

    return module_holding(lambda: UNetModel(config), weights)


def test_label_vector_is_required_exactly_when_the_unet_has_one():
    """Issue #13: y is SDXL's; missing, misshapen or given to a UNet without label_emb is a clear error."""
    sdxl = holding(SMALL_SDXL_LIKE, strip(random_unet_weights(SMALL_SDXL_LIKE)))
    sd1 = build_unet(strip(random_unet_weights(TINY)))
    x, t = torch.zeros(1, 4, 8, 8), torch.tensor([1.0])
    with torch.no_grad(), pytest.raises(ValueError, match="needs the label vector y of 2816"):
        sdxl(x, t, torch.zeros(1, 3, 96))
    with torch.no_grad(), pytest.raises(ValueError, match=r"shape \[1, 2560\], the UNet needs \[1, 2816\]"):
        sdxl(x, t, torch.zeros(1, 3, 96), y=torch.zeros(1, 2560))
    with torch.no_grad(), pytest.raises(ValueError, match="takes no label vector"):
        sd1(x, t, torch.zeros(1, 3, TINY.context_dim), y=torch.zeros(1, 2816))


def test_published_sd21_and_sdxl_configs_round_trip_through_shapes():
    """Issue #13: per-level depth, middle depth, label width and 64-wide heads are read back from shapes."""
    from diffusion.make_checkpoint import SD21_UNET, SDXL_UNET

    for config in (SD21_UNET, SDXL_UNET, SMALL_SDXL_LIKE, dataclasses.replace(SDXL_UNET, adm_in_channels=2560)):
        wide = unet_config_from_state_dict(meta_state_dict(config), wide_heads=True)
        assert wide == config
    assert unet_config_from_state_dict(meta_state_dict(SDXL_UNET)) == SDXL_UNET  # 2048 context: 64-wide heads
    assert SDXL_UNET.depth_at(0) == 0 and SDXL_UNET.depth_at(2) == 10 and SDXL_UNET.mid_depth == 10


def test_sdxl_precision_sensitive_prefixes_skip_level_0_transformers():
    from diffusion.make_checkpoint import SDXL_UNET
    from diffusion.unet import precision_sensitive_prefixes

    kept = precision_sensitive_prefixes(SDXL_UNET)
    assert kept == ("output_blocks.6.0.", "output_blocks.7.0.", "output_blocks.8.0.", "out.")
    keys = meta_state_dict(SDXL_UNET)
    assert all(any(k.startswith(p) for k in keys) for p in kept)
