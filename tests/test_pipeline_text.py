"""Prompt encoding: equal to FluxPipeline.encode_prompt, native CONDITIONING, truncation is reported."""
import pytest
import torch

from fluxbridge.headless import factory
from fluxbridge import pipeline as P
from fluxbridge.common.errors import BadInput
from fluxbridge.runtime.models import PACK_TOKENIZERS
from parity import encode as _encode  # tests/helpers

LONG = " ".join(["a very detailed photo of a small cat sitting on a red chair in the garden"] * 12)


@pytest.fixture(scope="module")
def comps():
    return factory.tiny_pipeline_components("dev")  # the real tokenizers the pack carries


@pytest.fixture(scope="module")
def pipe(comps):
    from diffusers import FluxPipeline
    return FluxPipeline(**comps)


def test_conditioning_is_native_flux(comps):
    cond = _encode(comps, "a photo of a cat")
    assert isinstance(cond, list) and len(cond) == 1 and len(cond[0]) == 2
    hidden, extra = cond[0]
    assert set(extra) == {"pooled_output", "guidance"}
    assert hidden.shape == (1, 512, 32) and hidden.dtype == torch.float32 and hidden.device.type == "cpu"
    assert extra["pooled_output"].shape == (1, 32)
    assert extra["guidance"] == 3.5
    assert _encode(comps, "x", guidance=None)[0][1]["guidance"] is None
    assert P.set_guidance(cond, 2.0)[0][1]["guidance"] == 2.0 and extra["guidance"] == 3.5


@pytest.mark.parametrize("max_len", [512, 256, 77])
def test_equals_flux_pipeline_encode_prompt(comps, pipe, max_len):
    prompt, prompt_2 = "a photo of a cat", "a cat on a chair, oil painting"
    t5, pooled, _ = pipe.encode_prompt(prompt, prompt_2=prompt_2, max_sequence_length=max_len)
    cond = _encode(comps, prompt, prompt_2=prompt_2, max_sequence_length=max_len)
    assert torch.equal(cond[0][0], t5)
    assert torch.equal(cond[0][1]["pooled_output"], pooled)


def test_batches_like_the_pipeline(comps, pipe):
    prompts = ["a photo of a cat", "a red fox"]
    t5, pooled, _ = pipe.encode_prompt(prompts, num_images_per_prompt=3)
    cond = _encode(comps, prompts, num_images=3)
    assert torch.equal(cond[0][0], t5) and torch.equal(cond[0][1]["pooled_output"], pooled)


def test_clip_uses_77_even_when_the_tokenizer_says_8192(comps, pipe):
    """ComfyUI's bundled CLIP tokenizer has model_max_length 8192; we pass 77 explicitly."""
    from transformers import CLIPTokenizer
    tok = CLIPTokenizer.from_pretrained(str(PACK_TOKENIZERS / "clip_l"), model_max_length=8192)
    assert tok.model_max_length == 8192
    cond = P.encode_prompt(tok, comps["text_encoder"], comps["tokenizer_2"], comps["text_encoder_2"], LONG)
    _, pooled, _ = pipe.encode_prompt(LONG)
    assert torch.equal(cond[0][1]["pooled_output"], pooled)


def test_truncation_is_reported(comps):
    notes = []
    cond = _encode(comps, LONG, max_sequence_length=64, notes=notes)
    assert cond[0][0].shape[1] == 64
    assert any(n.startswith("CLIP-L") and "77" in n for n in notes)
    assert any(n.startswith("T5") and "64" in n for n in notes)
    assert all("cut off" in n for n in notes)
    quiet = []
    _encode(comps, "short prompt", max_sequence_length=64, notes=quiet)
    assert quiet == []


def test_bad_text_inputs(comps):
    with pytest.raises(BadInput):
        _encode(comps, "x", max_sequence_length=600)
    with pytest.raises(BadInput):
        _encode(comps, 3)
    with pytest.raises(BadInput):
        _encode(comps, ["a", "b"], prompt_2=["c"])
