"""The schedule equals the one diffusers' Flux pipelines compute (same sigmas & mu through
FlowMatchEulerDiscreteScheduler.set_timesteps), and the Euler step equals scheduler.step."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from fluxbridge.headless import factory
from fluxbridge import pipeline as P
from fluxbridge.common.errors import BadInput
from fluxbridge.pipeline.schedule import calculate_shift


def _diffusers_sigmas(variant, steps, height=None, width=None, strength=None):
    """What FluxPipeline / FluxImg2ImgPipeline do before their loop (retrieve_timesteps + get_timesteps)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift as d_shift, retrieve_timesteps
    sched = factory.tiny_scheduler(variant)
    base = np.linspace(1.0, 1 / steps, steps)
    seq = (height // 16) * (width // 16) if height else 4096
    c = sched.config
    mu = d_shift(seq, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                 c.get("base_shift", 0.5), c.get("max_shift", 1.15))
    retrieve_timesteps(sched, steps, "cpu", sigmas=base, mu=mu)
    sigmas = sched.sigmas
    if strength is not None:  # FluxImg2ImgPipeline.get_timesteps
        init = min(steps * strength, steps)
        t_start = int(max(steps - init, 0))
        sigmas = sigmas[t_start:]
    return sigmas


@pytest.mark.parametrize("steps", [1, 2, 4, 20, 28, 50])
@pytest.mark.parametrize("height,width", [(1024, 1024), (512, 512), (768, 1360), (1360, 768), (64, 96),
                                          (1000, 1000), (2048, 2048)])
def test_dev_sigmas_equal_diffusers(steps, height, width):
    ours = P.flux_sigmas(steps, width=width, height=height)
    ref = _diffusers_sigmas("dev", steps, height, width)
    assert ours.dtype == torch.float32 and ours.shape == (steps + 1,) and ours[-1] == 0
    assert (ours - ref).abs().max().item() <= 1e-6
    assert torch.equal(ours, ref)  # identical operations: not merely close
    assert torch.equal(ours, P.flux_sigmas(steps, image_seq_len=(height // 16) * (width // 16)))


@pytest.mark.parametrize("steps", [1, 4, 8])
def test_schnell_sigmas_equal_diffusers(steps):
    ours = P.flux_sigmas(steps, dynamic_shift=False, shift=1.0)
    ref = _diffusers_sigmas("schnell", steps)
    assert torch.equal(ours, ref)
    assert torch.equal(P.schnell_sigmas(steps), ours)


def test_static_shift_equals_diffusers():
    from diffusers import FlowMatchEulerDiscreteScheduler
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 10, 10))
    assert torch.equal(P.flux_sigmas(10, dynamic_shift=False, shift=3.0), sched.sigmas)


@pytest.mark.parametrize("strength", [0.1, 0.3, 0.6, 0.75, 0.95, 1.0])
@pytest.mark.parametrize("steps", [4, 10, 28])
def test_img2img_strength_equals_get_timesteps(steps, strength):
    if steps - int(max(steps - min(steps * strength, steps), 0)) < 1:
        with pytest.raises(BadInput):
            P.flux_sigmas(steps, width=512, height=512, denoise=strength)
        return
    ours = P.flux_sigmas(steps, width=512, height=512, denoise=strength)
    assert torch.equal(ours, _diffusers_sigmas("dev", steps, 512, 512, strength))


def test_known_mu_values_and_schnell_grid():
    assert calculate_shift(4096) == pytest.approx(1.15)
    assert calculate_shift(1024) == pytest.approx(0.63)
    assert P.image_tokens(1000, 1000) == 62 * 62  # diffusers floors to 16-pixel multiples
    assert P.flux_sigmas(4, dynamic_shift=False).tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]


def test_bad_schedule_inputs():
    with pytest.raises(BadInput):
        P.flux_sigmas(0, width=64, height=64)
    with pytest.raises(BadInput):
        P.flux_sigmas(4)  # dynamic shift without a size
    with pytest.raises(BadInput):
        P.flux_sigmas(4, width=64, height=64, denoise=1.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_euler_step_equals_scheduler_step(dtype):
    sched = factory.tiny_scheduler("dev")
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 5, 5), mu=0.8)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 64, generator=g).to(dtype)
    for i, t in enumerate(sched.timesteps):
        v = torch.randn(2, 16, 64, generator=g).to(dtype)
        ref = sched.step(v, t, x, return_dict=False)[0]
        ours = P.euler_step(x, v, sched.sigmas[i], sched.sigmas[i + 1])
        assert ours.dtype == ref.dtype == dtype
        assert torch.equal(ours, ref)
        x = ref


def test_euler_step_keeps_float32_when_asked():
    x = torch.randn(1, 4, 8)
    v = torch.randn(1, 4, 8).bfloat16()
    out = P.euler_step(x, v, 0.75, 0.5, out_dtype=torch.float32)
    assert out.dtype == torch.float32
    assert torch.equal(out, x + torch.tensor(0.5 - 0.75, dtype=torch.float32) * v)


def test_add_noise_equals_scheduler_scale_noise():
    sched = factory.tiny_scheduler("dev")
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 4, 4), mu=0.7)
    sched.set_begin_index(1)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 16, 8, 8, generator=g)
    ref = sched.scale_noise(x0, sched.timesteps[1:2], noise)
    assert torch.equal(P.add_noise(x0, noise, sched.sigmas[1]), ref)
    assert torch.equal(P.add_noise(x0, noise, 1.0), noise)  # sigma 1: pure noise, whatever x0 is


@settings(max_examples=40, deadline=None)
@given(steps=st.integers(1, 60), h=st.integers(1, 160), w=st.integers(1, 160))
def test_sigmas_match_diffusers_for_any_size(steps, h, w):
    height, width = h * 16, w * 16
    assert torch.equal(P.flux_sigmas(steps, width=width, height=height),
                       _diffusers_sigmas("dev", steps, height, width))
