"""What the parity tests share: a diffusers pipeline built from components, a seeded generator, our prompt
encoding with the same components, and our image against the pipeline's."""
import torch

from fluxbridge import pipeline as P


def pipe(cls, comps):
    p = cls(**comps)
    p.set_progress_bar_config(disable=True)
    return p


def gen(seed):
    return torch.Generator("cpu").manual_seed(seed)


def encode(comps, prompt, **kw):
    return P.encode_prompt(comps["tokenizer"], comps["text_encoder"], comps["tokenizer_2"],
                           comps["text_encoder_2"], prompt, **kw)


def image_diff(ours, ref) -> float:
    """The largest per-pixel difference between our IMAGE [B, H, W, C] and a pipeline's `output_type="pt"`
    images [B, C, H, W] (compared in float32); their shapes must agree."""
    ref = ref.permute(0, 2, 3, 1).float()
    assert ours.shape == ref.shape, (tuple(ours.shape), tuple(ref.shape))
    return (ours.float() - ref).abs().max().item()


def assert_image_close(ours, ref, tol=1 / 255) -> float:
    """Our image is the pipeline's within `tol` per pixel; returns the largest difference."""
    diff = image_diff(ours, ref)
    assert diff <= tol, f"max pixel diff {diff * 255:.2f}/255 > {tol * 255:.2f}/255"
    return diff
