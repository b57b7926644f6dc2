"""VAE decode/encode in the native IMAGE convention, tiled decode and the out-of-memory fallback."""
from unittest import mock

import pytest
import torch

from fluxbridge.headless import factory
from fluxbridge import pipeline as P
from fluxbridge.common.errors import BadInput
from fluxbridge.pipeline import vae as V


@pytest.fixture(scope="module")
def vae():
    return factory.tiny_flux_vae(seed=1)


def test_decode_equals_diffusers_decode_and_postprocess(vae):
    from diffusers.image_processor import VaeImageProcessor
    raw = torch.randn(2, 16, 8, 12, generator=torch.Generator().manual_seed(0))
    image = P.decode(vae, raw)
    assert image.shape == (2, 64, 96, 3) and image.dtype == torch.float32 and image.device.type == "cpu"
    assert 0 <= image.min() and image.max() <= 1
    ref = VaeImageProcessor(vae_scale_factor=16).postprocess(vae.decode(raw).sample, output_type="np")
    assert torch.equal(image, torch.from_numpy(ref))


def test_encode_is_the_posterior_mean_or_a_seeded_sample(vae):
    image = torch.rand(1, 64, 48, 4)  # an alpha channel is ignored, like VAEEncode
    raw = P.encode(vae, image)
    assert raw.shape == (1, 16, 8, 6)
    dist = vae.encode((2 * image[..., :3].permute(0, 3, 1, 2) - 1).contiguous()).latent_dist  # as pipelines pass it
    assert torch.equal(raw, dist.mean)
    s1 = P.encode(vae, image, sample_mode="sample", generator=torch.Generator().manual_seed(3))
    ref = dist.sample(torch.Generator().manual_seed(3))
    assert torch.equal(s1, ref)
    with pytest.raises(BadInput):
        P.encode(vae, image, sample_mode="mode")


def test_encode_crops_to_the_vae_block_with_a_note(vae):
    notes = []
    raw = P.encode(vae, torch.rand(1, 70, 45, 3), notes=notes)
    assert raw.shape == (1, 16, 8, 5) and len(notes) == 1


def test_encode_does_not_depend_on_the_image_memory_layout(vae):
    """Native nodes return BHWC views of BCHW tensors; the convolutions must see the same layout either way
    (channels-last input rounds differently: 6e-6 here, a pixel level after sampling)."""
    x = torch.rand(1, 3, 128, 96)
    assert torch.equal(P.encode(vae, x.permute(0, 2, 3, 1)), P.encode(vae, x.permute(0, 2, 3, 1).contiguous()))


def test_decode_round_trip_shape_and_native_layout(vae):
    image = torch.rand(1, 32, 32, 3)
    assert P.decode(vae, P.encode(vae, image)).shape == image.shape


def test_single_tile_equals_full_decode(vae):
    raw = torch.randn(1, 16, 8, 8)
    assert torch.equal(P.decode(vae, raw, tiled=True, tile_size=8, overlap=2), P.decode(vae, raw))


class LocalVAE(torch.nn.Module):
    """A stand-in decoder that is purely local (8x nearest upsampling of 3 channels), so a correctly
    blended tiled decode must reproduce the full decode exactly."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.config = type("C", (), {"block_out_channels": (1, 1, 1, 1), "latent_channels": 16})()

    def decode(self, z, return_dict=True):
        out = torch.nn.functional.interpolate(z[:, :3], scale_factor=8, mode="nearest").tanh()
        return (out,)


@pytest.mark.parametrize("h,w,tile,overlap", [(20, 33, 8, 3), (16, 16, 8, 4), (9, 40, 16, 5), (24, 24, 8, 0)])
def test_tiles_blend_to_the_full_decode(h, w, tile, overlap):
    local = LocalVAE()
    raw = torch.randn(2, 16, h, w)
    full = P.decode(local, raw, tiled=False)
    tiled = P.decode(local, raw, tiled=True, tile_size=tile, overlap=overlap)
    assert tiled.shape == full.shape == (2, 8 * h, 8 * w, 3)
    assert torch.allclose(tiled, full, atol=1e-6)


def test_tiled_decode_of_the_real_structure_is_close(vae):
    raw = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(2)) * 0.5
    full, tiled = P.decode(vae, raw), P.decode(vae, raw, tiled=True, tile_size=12, overlap=4)
    assert tiled.shape == full.shape
    assert (tiled - full).abs().mean() < 0.1  # tiles see less context (mid-block attention, group norm)


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"),
                                   RuntimeError("CUDA error: out of memory")])
def test_out_of_memory_falls_back_to_tiles_with_a_note(vae, error):
    raw = torch.randn(1, 16, 12, 12)
    real = vae.decode

    def decode(z, *a, **k):
        if z.shape[-1] > 8:
            raise error
        return real(z, *a, **k)

    notes = []
    with mock.patch.object(vae, "decode", side_effect=decode):
        image = P.decode(vae, raw, tile_size=8, overlap=4, notes=notes)
        with pytest.raises(type(error)):
            P.decode(vae, raw, tiled=False)
    assert torch.equal(image, P.decode(vae, raw, tiled=True, tile_size=8, overlap=4))
    assert len(notes) == 1 and "out of memory" in notes[0]


def test_other_errors_are_not_swallowed(vae):
    with mock.patch.object(vae, "decode", side_effect=RuntimeError("shape mismatch")):
        with pytest.raises(RuntimeError, match="shape mismatch"):
            P.decode(vae, torch.zeros(1, 16, 4, 4))


def test_bad_images_and_latents(vae):
    with pytest.raises(BadInput):
        P.decode(vae, torch.zeros(16, 8, 8))
    with pytest.raises(BadInput):
        P.encode(vae, torch.zeros(1, 4, 4, 3))
    with pytest.raises(BadInput):
        P.decode(vae, torch.zeros(1, 16, 8, 8), tiled=True, tile_size=4, overlap=4)
    assert V.is_oom(RuntimeError("CUDA out of memory")) and not V.is_oom(ValueError("out of memory"))
