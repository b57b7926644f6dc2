"""The sampling loop's own behaviour: native conventions in and out, interrupt, determinism, progress and
previews, Fill/control inputs, and errors that name both sides of a mismatch."""
import pytest
import torch

from fluxbridge.headless import factory
from fluxbridge import pipeline as P
from fluxbridge.common.errors import BadInput



class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def comps():
    return factory.tiny_pipeline_components("dev")  # the real tokenizers the pack carries


@pytest.fixture(scope="module")
def cond(comps):
    return P.encode_prompt(comps["tokenizer"], comps["text_encoder"], comps["tokenizer_2"],
                           comps["text_encoder_2"], "a photo of a cat", max_sequence_length=32)


def _sigmas(steps=4, size=64):
    return P.flux_sigmas(steps, width=size, height=size)


class CallCounter:
    def __init__(self, module):
        self.calls = 0
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, *_):
        self.calls += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_returns_native_latent(comps, cond):
    latent = P.empty_latent(64, 96)
    out = P.sample(comps["transformer"], cond, latent, _sigmas(2), seed=1)
    assert out is not latent and set(out) == {"samples"}
    assert out["samples"].shape == latent["samples"].shape == (1, 16, 12, 8)
    assert out["samples"].dtype == torch.float32 and out["samples"].device.type == "cpu"
    assert not latent["samples"].any()  # the input is not modified


def test_interrupt_stops_and_changes_nothing(comps, cond):
    tr = comps["transformer"]
    before = {k: v.clone() for k, v in tr.state_dict().items()}
    first = P.sample(tr, cond, P.empty_latent(64, 64), _sigmas(4), seed=3)
    for k in (0, 2):
        seen = []

        def check():
            if len(seen) == k:
                raise Interrupted()
            seen.append(1)

        with CallCounter(tr) as counter, pytest.raises(Interrupted):
            P.sample(tr, cond, P.empty_latent(64, 64), _sigmas(4), seed=3, check_interrupt=check)
        assert counter.calls == k  # no transformer call after the interrupt
    second = P.sample(tr, cond, P.empty_latent(64, 64), _sigmas(4), seed=3)
    assert torch.equal(first["samples"], second["samples"])  # bitwise repeatable after an interrupt
    assert all(torch.equal(before[k], v) for k, v in tr.state_dict().items())
    assert not tr.training and not any(p.requires_grad for p in tr.parameters())


def test_one_transformer_call_per_step_two_with_true_cfg(comps, cond):
    tr = comps["transformer"]
    with CallCounter(tr) as counter:
        P.sample(tr, cond, P.empty_latent(64, 64), _sigmas(3), seed=0)
    assert counter.calls == 3
    with CallCounter(tr) as counter:
        P.sample(tr, cond, P.empty_latent(64, 64), _sigmas(3), seed=0, negative=cond, true_cfg=2.0)
    assert counter.calls == 6
    notes = []
    with CallCounter(tr) as counter:
        P.sample(tr, cond, P.empty_latent(64, 64), _sigmas(3), seed=0, negative=cond, true_cfg=1.0, notes=notes)
    assert counter.calls == 3 and any("negative" in n for n in notes)


def test_progress_factory_object_and_previews(comps, cond):
    class Bar:
        def __init__(self, total):
            self.total, self.events = total, []

        def update(self, n):
            self.events.append(("update", n))

        def update_absolute(self, value, total=None, preview=None):
            self.events.append(("abs", value, total, preview))

    bars = []

    def factory_(total):
        bars.append(Bar(total))
        return bars[-1]

    P.sample(comps["transformer"], cond, P.empty_latent(64, 64), _sigmas(3), progress=factory_)
    assert bars[0].total == 3 and bars[0].events == [("update", 1)] * 3

    seen = []

    def preview(step, x0):
        seen.append((step, tuple(x0.shape)))
        return f"img{step}"

    bar = Bar(3)
    P.sample(comps["transformer"], cond, P.empty_latent(64, 64), _sigmas(3), progress=bar, preview=preview)
    assert seen == [(i, (1, 16, 8, 8)) for i in range(3)]
    assert bar.events == [("abs", i + 1, 3, f"img{i}") for i in range(3)]


def test_native_latent_from_outside_is_used_as_raw_vae_space(comps, cond):
    """A LATENT is raw VAE space: sampling at a low first sigma keeps it close to its input, and
    an img2img run from an encoded image equals sampling its raw latents."""
    raw = P.encode(comps["vae"], torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0)))
    sig = P.flux_sigmas(10, width=64, height=64, denoise=0.1)
    out = P.sample(comps["transformer"], cond, {"samples": raw}, sig, seed=2)
    far = P.sample(comps["transformer"], cond, {"samples": raw + 5.0}, sig, seed=2)
    assert (out["samples"] - raw).abs().mean() < (far["samples"] - raw).abs().mean()


def test_four_channel_empty_latent_is_adapted_with_a_note(comps, cond):
    notes = []
    out = P.sample(comps["transformer"], cond, {"samples": torch.zeros(1, 4, 8, 8)}, _sigmas(2), seed=5,
                   notes=notes)
    ref = P.sample(comps["transformer"], cond, P.empty_latent(64, 64), _sigmas(2), seed=5)
    assert torch.equal(out["samples"], ref["samples"]) and len(notes) == 1
    with pytest.raises(BadInput, match="4 channels.*16"):
        P.sample(comps["transformer"], cond, {"samples": torch.ones(1, 4, 8, 8)}, _sigmas(2))


def test_odd_latent_size_is_padded_and_cropped(comps, cond):
    notes = []
    out = P.sample(comps["transformer"], cond, {"samples": torch.zeros(1, 16, 9, 7)}, _sigmas(2), seed=1,
                   notes=notes)
    assert out["samples"].shape == (1, 16, 9, 7) and torch.isfinite(out["samples"]).all()
    assert any("padded" in n for n in notes)


def test_conditioning_batch_is_broadcast(comps, cond):
    out = P.sample(comps["transformer"], cond, P.empty_latent(64, 64, batch=2), _sigmas(2), seed=4)
    single = P.sample(comps["transformer"], cond, P.empty_latent(64, 64), _sigmas(2),
                      noise=P.noise(4, (2, 16, 8, 8))[:1])
    assert out["samples"].shape[0] == 2
    assert torch.allclose(out["samples"][:1], single["samples"], atol=1e-5)


def test_guidance_from_conditioning_and_override(comps, cond):
    tr = comps["transformer"]
    a = P.sample(tr, P.set_guidance(cond, 7.0), P.empty_latent(64, 64), _sigmas(2), seed=1)
    b = P.sample(tr, cond, P.empty_latent(64, 64), _sigmas(2), seed=1, guidance=7.0)
    c = P.sample(tr, cond, P.empty_latent(64, 64), _sigmas(2), seed=1)
    assert torch.equal(a["samples"], b["samples"]) and not torch.equal(a["samples"], c["samples"])
    with pytest.raises(BadInput, match="guidance"):
        P.sample(tr, P.set_guidance(cond, None), P.empty_latent(64, 64), _sigmas(2))


def test_mismatches_name_both_parts(comps, cond):
    tr = comps["transformer"]
    wide = [[torch.zeros(1, 8, 48), {"pooled_output": torch.zeros(1, 32)}]]
    with pytest.raises(BadInput, match="48.*32"):
        P.sample(tr, wide, P.empty_latent(64, 64), _sigmas(2))
    pooled = [[torch.zeros(1, 8, 32), {"pooled_output": torch.zeros(1, 768)}]]
    with pytest.raises(BadInput, match="768.*32"):
        P.sample(tr, pooled, P.empty_latent(64, 64), _sigmas(2))
    with pytest.raises(BadInput, match="pooled_output"):
        P.sample(tr, [[torch.zeros(1, 8, 32), {}]], P.empty_latent(64, 64), _sigmas(2))
    with pytest.raises(BadInput, match="320 channels.*only 64"):
        P.sample(tr, cond, P.empty_latent(64, 64), _sigmas(2), fill=torch.zeros(1, 16, 320))
    with pytest.raises(BadInput, match="32 input channels.*64"):
        P.sample(factory.tiny_flux_transformer(in_channels=32), cond, P.empty_latent(64, 64), _sigmas(2))
    with pytest.raises(BadInput, match="guidance"):
        P.sample(tr, cond, P.empty_latent(64, 64), _sigmas(2), guidance="high")
    with pytest.raises(BadInput, match="noise"):
        P.sample(tr, cond, P.empty_latent(64, 64), _sigmas(2), noise=torch.zeros(1, 16, 4, 4))


def test_fill_model_without_mask_inputs_names_both_parts(cond):
    fill_tr = factory.tiny_flux_transformer(in_channels=384)
    with pytest.raises(BadInput, match="384.*64.*320"):
        P.sample(fill_tr, cond, P.empty_latent(64, 64), _sigmas(2))
    with pytest.raises(BadInput, match="64.*384|384.*64"):
        P.sample(fill_tr, cond, P.empty_latent(64, 64), _sigmas(2), fill=torch.zeros(1, 16, 64))


def test_vae_that_does_not_fit_is_named(comps):
    sd_vae = factory.tiny_flux_vae(latent_channels=4)
    with pytest.raises(BadInput, match="16 latent channels.*VAE has 4"):
        P.decode(sd_vae, torch.zeros(1, 16, 8, 8))


def test_fill_from_native_inpaint_conditioning(cond):
    """ComfyUI's InpaintModelConditioning sets concat_latent_image (raw) + concat_mask on the conditioning;
    a Fill model then samples with exactly the input fill_from_latent builds."""
    fill_tr = factory.tiny_flux_transformer(in_channels=384, seed=3)
    g = torch.Generator().manual_seed(0)
    masked_raw = torch.randn(1, 16, 8, 8, generator=g)
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 16:48] = 1.0
    native = [[cond[0][0], dict(cond[0][1], concat_latent_image=masked_raw, concat_mask=mask)]]
    a = P.sample(fill_tr, native, P.empty_latent(64, 64), _sigmas(2), seed=1)
    b = P.sample(fill_tr, cond, P.empty_latent(64, 64), _sigmas(2), seed=1,
                 fill=P.fill_from_latent(masked_raw, mask))
    assert torch.equal(a["samples"], b["samples"])


def test_fill_conditioning_layout():
    """Mask channels: 8x8 pixel block folded to 64 channels (index = py*8 + px), then 2x2-packed."""
    mask = torch.zeros(1, 16, 16)
    mask[0, 3, 5] = 1.0  # latent pixel (0, 0), inside-block offset (3, 5)
    packed = P.pack_mask(mask)
    assert packed.shape == (1, 1, 256)
    assert packed[0, 0].nonzero().flatten().tolist() == [(3 * 8 + 5) * 4]
    vae = factory.tiny_flux_vae()
    image = torch.rand(2, 32, 48, 3)
    cond_in = P.fill_conditioning(vae, image, torch.ones(1, 32, 48))
    assert cond_in.shape == (2, 2 * 3, 320)
    with pytest.raises(BadInput, match="mask"):
        P.fill_conditioning(vae, image, torch.ones(1, 32, 32))


def test_control_conditioning_for_depth_models(cond):
    depth = factory.tiny_flux_transformer(in_channels=128)
    vae = factory.tiny_flux_vae()
    control = P.control_conditioning(vae, torch.rand(1, 64, 64, 3))
    assert control.shape == (1, 16, 64)
    out = P.sample(depth, cond, P.empty_latent(64, 64), _sigmas(2), fill=control)
    assert out["samples"].shape == (1, 16, 8, 8)


def test_working_memory_counts_the_kontext_references_as_comfyui_does():
    """ComfyUI's estimate for its FLUX.1 model: 0.031 MiB per latent pixel, image and byte of the compute dtype,
    the Kontext references' latent pixels counted with the image's (batch 2, float32 here)."""
    from fluxbridge.pipeline.kontext import REFERENCE_KEY
    from fluxbridge.pipeline.sample import working_memory
    tr = factory.tiny_flux_transformer(width=32, heads=2, double=1, single=1, seed=0)
    per_pixel = 4 * 0.031 * (1 << 20)
    cond = [[torch.zeros(1, 4, 32), {"pooled_output": torch.zeros(1, 16)}]]
    assert working_memory(tr, (2, 16, 8, 6)) == working_memory(tr, (2, 16, 8, 6), cond) == pytest.approx(2 * 48 * per_pixel, abs=1)
    refs = [[cond[0][0], dict(cond[0][1], **{REFERENCE_KEY: [torch.zeros(1, 16, 4, 4), torch.zeros(1, 16, 2, 6)]})]]
    assert working_memory(tr, (2, 16, 8, 6), refs) == pytest.approx(2 * (48 + 16 + 12) * per_pixel, abs=1)
