from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusion.make_checkpoint import PRESETS, random_weights
from diffusion.vae import AutoencoderKL, Downsample, VAEConfig, build_vae, vae_config_from_state_dict

SD15_KEYS = Path(__file__).resolve().parents[1] / "fixtures" / "sd15_keys.tsv"
PREFIX = "first_stage_model."
TINY = PRESETS["tiny"].vae


def meta_state_dict(config: VAEConfig) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return AutoencoderKL(config).state_dict()


def random_vae_weights(config: VAEConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    layout = {PREFIX + k: (torch.float32, tuple(t.shape)) for k, t in meta_state_dict(config).items()}
    return random_weights(layout, seed)


def strip(sd):
    return {k.removeprefix(PREFIX): v for k, v in sd.items()}


def diffusers_vae(config: VAEConfig, checkpoint) -> DiffusersAutoencoderKL:
    n = len(config.channel_mult)
    kwargs = dict(
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=config.level_channels,
        layers_per_block=config.num_res_blocks,
        latent_channels=config.latent_channels,
        norm_num_groups=32,
    )
    model = DiffusersAutoencoderKL(**kwargs)
    model.load_state_dict(convert_ldm_vae_checkpoint(checkpoint, kwargs), strict=True)
    return model.eval()


def test_sd15_keys_and_shapes_match_the_public_file():
    rows = [line.rstrip("\n").split("\t") for line in open(SD15_KEYS)]
    want = {k.removeprefix(PREFIX): shape.replace(" ", "") for k, _, shape in rows if k.startswith(PREFIX)}
    got = {k: str(list(t.shape)).replace(" ", "") for k, t in meta_state_dict(VAEConfig()).items()}
    assert got == want


@settings(max_examples=30, deadline=None)
@given(
    base_channels=st.sampled_from([32, 64, 128]),
    channel_mult=st.lists(st.integers(1, 4), min_size=1, max_size=5).map(tuple),
    num_res_blocks=st.integers(1, 3),
    latent_channels=st.sampled_from([4, 16]),
)
def test_config_round_trips_through_shapes(**fields):
    config = VAEConfig(**fields)
    assert vae_config_from_state_dict(meta_state_dict(config)) == config


def test_sd1_default_config_is_inferred():
    assert vae_config_from_state_dict(meta_state_dict(VAEConfig())) == VAEConfig()
    assert VAEConfig().downscale == 8 and TINY.downscale == 8


def test_missing_key_is_named():
    sd = meta_state_dict(TINY)
    del sd["decoder.conv_in.weight"]
    with pytest.raises(ValueError, match=r"decoder\.conv_in\.weight"):
        vae_config_from_state_dict(sd)


@pytest.mark.parametrize("config", [TINY, VAEConfig(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2)])
def test_matches_diffusers(config):
    checkpoint = random_vae_weights(config, seed=5)
    ours = build_vae(strip(checkpoint))
    theirs = diffusers_vae(config, checkpoint)
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(2, 3, 32, 40, generator=g) * 2 - 1
    with torch.no_grad():
        latent = ours.encode(pixels)
        want_latent = theirs.encode(pixels).latent_dist.mode()
        decoded = ours.decode(latent)
        want_decoded = theirs.decode(latent).sample
    assert latent.shape == (2, 4, 32 // config.downscale, 40 // config.downscale)
    assert decoded.shape == pixels.shape
    assert latent.std() > 0.01 and decoded.std() > 0.01
    assert (latent - want_latent).abs().max().item() < 1e-4
    assert (decoded - want_decoded).abs().max().item() < 1e-4


def test_downsampling_pads_right_and_bottom_only():
    down = Downsample(32)
    with torch.no_grad():
        down.conv.weight.zero_()
        down.conv.bias.zero_()
        down.conv.weight[:, :, 0, 0] = torch.eye(32)  # picks the top-left input pixel of each 3x3 window
    x = torch.arange(32 * 4 * 4, dtype=torch.float32).reshape(1, 32, 4, 4)
    with torch.no_grad():
        out = down(x)
    assert out.shape == (1, 32, 2, 2)
    torch.testing.assert_close(out, x[:, :, ::2, ::2])  # no padding on top/left: windows start at pixel 0


def test_encode_returns_the_mean_unscaled():
    model = build_vae(strip(random_vae_weights(TINY)))
    pixels = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        moments = model.quant_conv(model.encoder(pixels))
        torch.testing.assert_close(model.encode(pixels), moments[:, :4])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_follows_the_input(dtype):
    weights = strip(random_vae_weights(TINY))
    reference, half = build_vae(weights), build_vae({k: v.to(dtype) for k, v in weights.items()})
    latent = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = reference.decode(latent)
        got = half.decode(latent.to(dtype))
    assert got.dtype == dtype
    tolerance = {torch.float16: 0.02, torch.bfloat16: 0.1}[dtype]  # bf16 keeps 8 bits of mantissa
    assert (got.float() - want).abs().max() < tolerance * want.abs().max()


def test_sdxl_vae_is_the_published_layout_and_decodes_as_diffusers():
    """Issue #13: the SDXL base file's VAE has our default VAE's keys and shapes (tests/fixtures/sdxl_base_keys.tsv),
    and at that full size it decodes as diffusers' AutoencoderKL built from SDXL's published VAE config (latents
    unscaled: the 0.13025 scale is the MODEL family's business)."""
    fixture = SD15_KEYS.parent / "sdxl_base_keys.tsv"
    rows = [line.rstrip("\n").split("\t") for line in open(fixture)]
    want = {k.removeprefix(PREFIX): shape.replace(" ", "") for k, _, shape in rows if k.startswith(PREFIX)}
    got = {k: str(list(t.shape)).replace(" ", "") for k, t in meta_state_dict(VAEConfig()).items()}
    assert got == want
    checkpoint = random_vae_weights(VAEConfig(), seed=2)
    ours = build_vae(strip(checkpoint))
    kwargs = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                  layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=1024,
                  scaling_factor=0.13025, force_upcast=True)  # SDXL's published vae/config.json
    theirs = DiffusersAutoencoderKL(**kwargs)
    theirs.load_state_dict(convert_ldm_vae_checkpoint(checkpoint, kwargs), strict=True)
    latent = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        decoded, want = ours.decode(latent), theirs.eval().decode(latent).sample
    assert decoded.std() > 0.01 and (decoded - want).abs().max().item() < 1e-4
