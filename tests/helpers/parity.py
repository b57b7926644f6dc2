"""What the parity tests share: a diffusers pipeline built from components, a seeded generator, our prompt
encoding with the same components."""
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
