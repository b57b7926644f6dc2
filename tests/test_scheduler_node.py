"""FluxBridgeScheduler picks the schedule the model was made for, and says which one and why: `auto` follows
the connected transformer as diffusers' pipelines do (FLUX.1-dev: dynamic shift, FLUX.1-schnell: fixed shift
1.0, the schedulers published with them), and without a transformer `auto` is refused rather than guessed."""
import numpy as np
import pytest
import torch

from fluxbridge.common.errors import BadInput
from fluxbridge.headless import factory
from fluxbridge.nodes import loaders, sampling

SIZE, STEPS = 256, 4


@pytest.fixture(scope="module")
def transformers(tmp_path_factory):
    """A models folder with a tiny dev (guidance embedding) and schnell (none) transformer, BFL layout."""
    root = tmp_path_factory.mktemp("scheduler-models")
    for name, guidance in (("flux1-dev.safetensors", True), ("flux1-schnell.safetensors", False)):
        model = factory.tiny_flux_transformer(width=32, heads=2, double=1, single=1, guidance=guidance, seed=1)
        factory.save_layout(model, root / "diffusion_models" / name, "bfl")
    return root


@pytest.fixture
def models_dir(transformers):
    return transformers


def _load(name):
    return loaders.LoadTransformer.execute(model_name=name, weight_dtype="default", quantize="none").args[0]


def _schedule(**inputs):
    out = sampling.Scheduler.execute(steps=STEPS, width=SIZE, height=SIZE, denoise=1.0, **inputs)
    return out.args[0], out.ui


def _published(variant):
    """The sigmas diffusers' FluxPipeline gets from the scheduler published with the model."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
    sched = factory.tiny_scheduler(variant)
    c = sched.config
    mu = calculate_shift((SIZE // 16) ** 2, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    retrieve_timesteps(sched, STEPS, "cpu", sigmas=np.linspace(1.0, 1 / STEPS, STEPS), mu=mu)
    return sched.sigmas


@pytest.mark.parametrize("name,variant,shift", [("flux1-dev.safetensors", "dev", "dynamic"),
                                                ("flux1-schnell.safetensors", "schnell", "fixed")])
def test_auto_follows_the_connected_model_and_says_why(on_host, name, variant, shift):
    transformer = _load(name)
    assert transformer.variant == variant
    sigmas, ui = _schedule(shift="auto", transformer=transformer)
    assert torch.equal(sigmas, _published(variant))
    assert ui["fluxbridge"][0]["shift"] == shift
    why = ui["fluxbridge"][0]["why"]
    assert why.startswith("auto: ") and name in why and variant in why
    assert why in ui["text"][0] and f"{shift} shift" in ui["text"][0]


def test_auto_without_a_transformer_is_refused_not_guessed(on_host):
    with pytest.raises(BadInput, match="auto needs the transformer connected"):
        _schedule(shift="auto")


def test_dynamic_and_fixed_need_no_transformer_and_say_so(on_host):
    dyn, ui = _schedule(shift="dynamic")
    assert torch.equal(dyn, _published("dev")) and "shift dynamic as chosen" in ui["text"][0]
    fixed, ui = _schedule(shift="fixed")
    assert fixed.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0] and "shift fixed as chosen" in ui["text"][0]
    # an explicit choice wins over the model's own schedule
    forced, _ = _schedule(shift="fixed", transformer=_load("flux1-dev.safetensors"))
    assert torch.equal(forced, fixed)
    half = sampling.Scheduler.execute(steps=STEPS, width=SIZE, height=SIZE, denoise=0.5, shift="dynamic").args[0]
    assert torch.equal(half, dyn[2:])
