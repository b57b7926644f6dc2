"""Latent conventions: packing and ids equal diffusers' Flux helpers, the native LATENT normalisation, empty
latents and seeded noise."""
import logging

import pytest
import torch
from hypothesis import given, settings, strategies as st

from fluxbridge.headless import factory
from fluxbridge import pipeline as P
from fluxbridge.common.errors import BadInput
from fluxbridge.pipeline.latents import FLUX_SCALE, FLUX_SHIFT, LatentFormat


@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 3), c=st.sampled_from([1, 4, 16]), h=st.integers(1, 12), w=st.integers(1, 12))
def test_pack_unpack_equal_diffusers(b, c, h, w):
    from diffusers import FluxPipeline
    x = torch.randn(b, c, 2 * h, 2 * w)
    packed = P.pack(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, b, c, 2 * h, 2 * w))
    assert torch.equal(P.unpack(packed, 2 * h, 2 * w), x)
    # diffusers' unpack takes the pixel size and the VAE factor
    assert torch.equal(P.unpack(packed, 2 * h, 2 * w), FluxPipeline._unpack_latents(packed, 16 * h, 16 * w, 8))


def test_pack_order_is_c_ph_pw():
    x = torch.arange(2 * 4 * 4, dtype=torch.float32).view(1, 2, 4, 4)
    token0 = P.pack(x)[0, 0]
    assert token0.tolist() == [x[0, c, ph, pw].item() for c in range(2) for ph in range(2) for pw in range(2)]


@pytest.mark.parametrize("rows,cols", [(1, 1), (4, 6), (8, 5)])
def test_ids_equal_diffusers(rows, cols):
    from diffusers import FluxPipeline
    ref = FluxPipeline._prepare_latent_image_ids(1, rows, cols, "cpu", torch.float32)
    assert torch.equal(P.image_ids(rows, cols), ref)
    assert P.image_ids(rows, cols, index=1)[:, 0].eq(1).all()
    assert torch.equal(P.text_ids(7), torch.zeros(7, 3))


def test_process_in_out_flux_constants_and_round_trip():
    raw = torch.randn(1, 16, 4, 4)
    assert torch.equal(P.process_in(raw), (raw - FLUX_SHIFT) * FLUX_SCALE)
    assert torch.equal(P.process_out(raw), raw / FLUX_SCALE + FLUX_SHIFT)
    assert torch.allclose(P.process_out(P.process_in(raw)), raw, atol=1e-6)


def test_latent_format_comes_from_the_vae_config():
    vae = factory.tiny_flux_vae(scaling_factor=0.5, shift_factor=0.25)
    fmt = LatentFormat.from_vae(vae)
    assert (fmt.scale, fmt.shift, fmt.channels, fmt.downscale) == (0.5, 0.25, 16, 8)
    raw = torch.randn(1, 16, 2, 2)
    assert torch.equal(P.process_in(raw, vae), (raw - 0.25) * 0.5)
    assert torch.equal(P.process_out(raw, vae), raw / 0.5 + 0.25)
    sd = factory.tiny_flux_vae(latent_channels=4, scaling_factor=0.18215, shift_factor=None)
    assert LatentFormat.from_vae(sd).shift == 0.0 and LatentFormat.from_vae(sd).channels == 4
    assert LatentFormat.from_vae(None) == LatentFormat()


def test_empty_latent_is_native():
    lat = P.empty_latent(1024, 768, batch=2)
    assert set(lat) == {"samples"}
    assert lat["samples"].shape == (2, 16, 96, 128) and lat["samples"].dtype == torch.float32
    assert not lat["samples"].any()


def test_empty_latent_rounds_down_with_a_note(caplog):
    notes = []
    with caplog.at_level(logging.WARNING, logger="fluxbridge.pipeline"):
        lat = P.empty_latent(1000, 70, notes=notes)
    assert lat["samples"].shape == (1, 16, 8, 124)  # 992 x 64
    assert len(notes) == 1 and "992x64" in notes[0]
    assert "992x64" in caplog.text
    notes.clear()
    P.empty_latent(512, 512, notes=notes)
    assert notes == []
    with pytest.raises(BadInput):
        P.empty_latent(8, 512)


@pytest.mark.parametrize("seed", [0, 42, 2**40 + 3])
def test_noise_equals_diffusers_randn_tensor(seed):
    from diffusers.utils.torch_utils import randn_tensor
    shape = (2, 16, 2 * (96 // 16), 2 * (128 // 16))
    ref = randn_tensor(shape, generator=torch.Generator("cpu").manual_seed(seed), device=torch.device("cpu"),
                       dtype=torch.float32)
    assert torch.equal(P.noise(seed, shape), ref)
    assert not torch.equal(P.noise(seed + 1, shape), ref)
