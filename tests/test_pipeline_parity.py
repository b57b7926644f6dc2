"""End-to-end parity: our pipeline functions against diffusers' own Flux pipelines, on tiny random models
(CPU, float32, real CLIP-L / T5 tokenizers). Images must agree within 1/255 per pixel; in practice they are
bitwise equal, because every step does the same arithmetic in the same order."""
import pytest
import torch

from fluxbridge.headless import factory
from fluxbridge import pipeline as P
from parity import assert_image_close as _close, encode as _encode, gen as _gen, pipe as _pipe  # tests/helpers

PROMPT = "a photo of a cat sitting on a chair, soft light"

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _components(variant):
    return factory.tiny_pipeline_components(variant)  # the real tokenizers the pack carries


@pytest.fixture(scope="module")
def dev():
    return _components("dev")


@pytest.fixture(scope="module")
def schnell():
    return _components("schnell")


@pytest.fixture(scope="module")
def fill():
    return _components("fill")


def _image(h, w, seed=5):
    """A smooth random test picture, [1, 3, H, W] in 0..1 (diffusers' tensor convention)."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(1, 3, h // 8, w // 8, generator=g)
    return torch.nn.functional.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)


def _bhwc(x):
    return x.permute(0, 2, 3, 1)


@pytest.mark.parametrize("height,width", [(64, 64), (64, 96), (128, 80)])
def test_dev_text_to_image_matches_flux_pipeline(dev, height, width):
    from diffusers import FluxPipeline
    steps, seed, guidance = 3, 7, 3.5
    ref = _pipe(FluxPipeline, dev)(PROMPT, height=height, width=width, num_inference_steps=steps,
                                   guidance_scale=guidance, generator=_gen(seed), output_type="pt").images
    cond = _encode(dev, PROMPT, guidance=guidance)
    latent = P.empty_latent(width, height)
    out = P.sample(dev["transformer"], cond, latent, P.flux_sigmas(steps, width=width, height=height), seed=seed)
    _close(P.decode(dev["vae"], out["samples"]), ref)


def test_dev_guidance_value_reaches_the_model(dev):
    """Different guidance gives a different image, and the pipeline agrees at each value."""
    from diffusers import FluxPipeline
    pipe = _pipe(FluxPipeline, dev)
    images = []
    for g in (1.0, 5.0):
        ref = pipe(PROMPT, height=64, width=64, num_inference_steps=2, guidance_scale=g, generator=_gen(1),
                   output_type="pt").images
        cond = P.set_guidance(_encode(dev, PROMPT), g)
        out = P.sample(dev["transformer"], cond, P.empty_latent(64, 64), P.flux_sigmas(2, width=64, height=64),
                       seed=1)
        images.append(P.decode(dev["vae"], out["samples"]))
        _close(images[-1], ref)
    assert not torch.equal(images[0], images[1])


def test_schnell_text_to_image_matches_flux_pipeline(schnell):
    from diffusers import FluxPipeline
    assert not schnell["transformer"].config.guidance_embeds
    steps, seed = 4, 3
    ref = _pipe(FluxPipeline, schnell)(PROMPT, height=64, width=96, num_inference_steps=steps,
                                       guidance_scale=0.0, max_sequence_length=256, generator=_gen(seed),
                                       output_type="pt").images
    cond = _encode(schnell, PROMPT, max_sequence_length=256)
    assert cond[0][0].shape[1] == 256
    sigmas = P.flux_sigmas(steps, dynamic_shift=False, shift=1.0)
    assert sigmas.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    out = P.sample(schnell["transformer"], cond, P.empty_latent(96, 64), sigmas, seed=seed)
    _close(P.decode(schnell["vae"], out["samples"]), ref)


def test_true_cfg_with_negative_prompt_matches_flux_pipeline(dev):
    from diffusers import FluxPipeline
    steps, seed, scale, negative = 3, 2, 4.0, "blurry, low quality"
    ref = _pipe(FluxPipeline, dev)(PROMPT, negative_prompt=negative, true_cfg_scale=scale, height=64, width=64,
                                   num_inference_steps=steps, guidance_scale=3.5, generator=_gen(seed),
                                   output_type="pt").images
    out = P.sample(dev["transformer"], _encode(dev, PROMPT), P.empty_latent(64, 64),
                   P.flux_sigmas(steps, width=64, height=64), seed=seed, negative=_encode(dev, negative),
                   true_cfg=scale)
    ours = P.decode(dev["vae"], out["samples"])
    _close(ours, ref)
    plain = P.sample(dev["transformer"], _encode(dev, PROMPT), P.empty_latent(64, 64),
                     P.flux_sigmas(steps, width=64, height=64), seed=seed)
    assert not torch.equal(plain["samples"], out["samples"])  # the negative branch really ran


def test_img2img_strength_matches_flux_img2img_pipeline(dev):
    """FluxImg2ImgPipeline, strength 0.6: posterior *sample* with the generator, then noise from the same
    generator, sigmas cut by get_timesteps, noise added with scale_noise at the first kept sigma."""
    from diffusers import FluxImg2ImgPipeline
    steps, seed, strength, h, w = 4, 9, 0.6, 64, 96
    image = _image(h, w)
    ref = _pipe(FluxImg2ImgPipeline, dev)(PROMPT, image=image, strength=strength, height=h, width=w,
                                          num_inference_steps=steps, guidance_scale=3.5, generator=_gen(seed),
                                          output_type="pt").images
    gen = _gen(seed)
    raw = P.encode(dev["vae"], _bhwc(image), sample_mode="sample", generator=gen)
    noise = torch.randn(raw.shape, generator=gen)
    sigmas = P.flux_sigmas(steps, width=w, height=h, denoise=strength)
    assert len(sigmas) == 4  # t_start = int(4 - 2.4) = 1: 3 steps
    out = P.sample(dev["transformer"], _encode(dev, PROMPT), {"samples": raw}, sigmas, noise=noise)
    _close(P.decode(dev["vae"], out["samples"]), ref)


def test_fill_matches_flux_fill_pipeline(fill):
    """FluxFillPipeline (384-channel transformer): masked image latents + 8x8-folded mask, concatenated to
    the packed latents at every step. The mask has values that must be binarised at 0.5."""
    from diffusers import FluxFillPipeline
    assert fill["transformer"].config.in_channels == 384
    steps, seed, h, w = 3, 4, 64, 64
    image = _image(h, w, seed=2)
    mask = torch.zeros(1, 1, h, w)
    mask[..., 16:48, 8:44] = 0.8
    mask[..., 0:8, 0:12] = 0.3
    ref = _pipe(FluxFillPipeline, fill)(PROMPT, image=image, mask_image=mask, height=h, width=w,
                                        num_inference_steps=steps, guidance_scale=30.0, generator=_gen(seed),
                                        output_type="pt").images
    gen = _gen(seed)
    P.encode(fill["vae"], _bhwc(image), sample_mode="sample", generator=gen)  # the pipeline's first draw
    noise = torch.randn(1, 16, h // 8, w // 8, generator=gen)
    cond_in = P.fill_conditioning(fill["vae"], _bhwc(image), mask[:, 0], sample_mode="sample", generator=gen)
    assert cond_in.shape == (1, (h // 16) * (w // 16), 320)
    out = P.sample(fill["transformer"], _encode(fill, PROMPT, guidance=30.0), P.empty_latent(w, h),
                   P.flux_sigmas(steps, width=w, height=h), noise=noise, fill=cond_in)
    _close(P.decode(fill["vae"], out["samples"]), ref)


def test_denoise_mask_matches_flux_inpaint_pipeline(dev):
    """A native noise_mask on a base model equals FluxInpaintPipeline (the kept region is re-noised to the
    next sigma after each step). The mask is on 8-pixel blocks, where our bilinear and diffusers' nearest
    downscaling agree."""
    from diffusers import FluxInpaintPipeline
    steps, seed, strength, h, w = 4, 6, 0.8, 64, 64
    image = _image(h, w, seed=3)
    mask = torch.zeros(1, 1, h, w)
    mask[..., 8:40, 16:56] = 1.0
    ref = _pipe(FluxInpaintPipeline, dev)(PROMPT, image=image, mask_image=mask, strength=strength, height=h,
                                          width=w, num_inference_steps=steps, guidance_scale=3.5,
                                          generator=_gen(seed), output_type="pt").images
    gen = _gen(seed)
    raw = P.encode(dev["vae"], _bhwc(image), sample_mode="sample", generator=gen)
    noise = torch.randn(raw.shape, generator=gen)
    latent = {"samples": raw, "noise_mask": mask[:, 0]}
    out = P.sample(dev["transformer"], _encode(dev, PROMPT), latent,
                   P.flux_sigmas(steps, width=w, height=h, denoise=strength), noise=noise)
    _close(P.decode(dev["vae"], out["samples"]), ref)
    assert torch.equal(out["noise_mask"], mask[:, 0])  # other LATENT keys are carried, like KSampler


def test_batch_of_prompts_and_images_per_prompt(dev):
    """Two prompts x two images each, one generator: same order and same noise as the pipeline."""
    from diffusers import FluxPipeline
    prompts = [PROMPT, "a red fox in the snow"]
    ref = _pipe(FluxPipeline, dev)(prompts, num_images_per_prompt=2, height=64, width=64, num_inference_steps=2,
                                   guidance_scale=3.5, generator=_gen(8), output_type="pt").images
    cond = _encode(dev, prompts, num_images=2)
    assert cond[0][0].shape[0] == 4
    out = P.sample(dev["transformer"], cond, P.empty_latent(64, 64, batch=4),
                   P.flux_sigmas(2, width=64, height=64), seed=8)
    _close(P.decode(dev["vae"], out["samples"]), ref)


def test_latents_interchange_with_the_pipeline(dev):
    """The pipeline's own packed, normalised output (`output_type="latent"`) is our LATENT after
    unpack + process_out; and our LATENT goes through diffusers' decode path (vae.decode(x) +
    postprocess) to the pipeline's image."""
    from diffusers import FluxPipeline
    from diffusers.image_processor import VaeImageProcessor
    pipe = _pipe(FluxPipeline, dev)
    kw = dict(height=64, width=96, num_inference_steps=3, guidance_scale=3.5, output_type="latent")
    packed = pipe(PROMPT, generator=_gen(4), **kw).images
    out = P.sample(dev["transformer"], _encode(dev, PROMPT), P.empty_latent(96, 64),
                   P.flux_sigmas(3, width=96, height=64), seed=4)
    theirs = P.process_out(P.unpack(packed, 8, 12), dev["vae"])
    assert torch.equal(out["samples"], theirs)
    decoded = dev["vae"].decode(out["samples"], return_dict=False)[0]
    via_diffusers = VaeImageProcessor(vae_scale_factor=16).postprocess(decoded, output_type="pt")
    assert torch.equal(P.decode(dev["vae"], out["samples"]), _bhwc(via_diffusers))
