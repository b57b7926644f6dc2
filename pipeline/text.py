"""Prompt encoding for FLUX.1, as diffusers FluxPipeline.encode_prompt does it, returned as native Flux
CONDITIONING: `[[t5_hidden[B, N, D], {"pooled_output": clip_pooled[B, W], "guidance": g}]]`.

CLIP-L: padded to 77 (passed explicitly: ComfyUI's bundled tokenizer says 8192), truncated, pooled output
(final-LN hidden state at the first EOS; no projection). T5: padded to `max_sequence_length` (diffusers 512,
schnell usually 256), truncated, no attention mask. Truncation is reported, never silent.
"""
from __future__ import annotations

import torch

from ..common.errors import BadInput
from ._notes import note
from .device import execution_device

CLIP_MAX_LENGTH = 77


def _as_list(prompt) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise BadInput("prompt", f"expected a string or a list of strings, got {type(prompt).__name__}")


def _tokenize(tokenizer, prompts: list[str], max_length: int, which: str, notes) -> torch.Tensor:
    ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                    return_overflowing_tokens=False, return_length=False, return_tensors="pt").input_ids
    full = tokenizer(prompts, padding="longest", truncation=False, return_tensors="pt").input_ids
    if full.shape[-1] > max_length:
        for i, prompt in enumerate(prompts):
            row = tokenizer(prompt, truncation=False).input_ids
            if len(row) > max_length:
                dropped = tokenizer.decode(row[max_length - 1:-1], skip_special_tokens=True)
                note(f"{which}: prompt {i} has {len(row)} tokens, more than {max_length}; "
                     f"this part was cut off: {dropped!r}", notes)
    return ids


def clip_pooled(tokenizer, model, prompts, max_length: int = CLIP_MAX_LENGTH, notes=None) -> torch.Tensor:
    """CLIP pooler_output [B, width] for the prompts (diffusers `_get_clip_prompt_embeds`)."""
    ids = _tokenize(tokenizer, _as_list(prompts), max_length, "CLIP-L", notes)
    out = model(ids.to(execution_device(model)), output_hidden_states=False)
    return out.pooler_output


def t5_hidden(tokenizer, model, prompts, max_sequence_length: int = 512, notes=None) -> torch.Tensor:
    """T5 last hidden state [B, max_sequence_length, d_model] (diffusers `_get_t5_prompt_embeds`)."""
    ids = _tokenize(tokenizer, _as_list(prompts), max_sequence_length, "T5", notes)
    return model(ids.to(execution_device(model)), output_hidden_states=False)[0]


@torch.no_grad()
def encode_prompt(clip_tokenizer, clip_model, t5_tokenizer, t5_model, prompt, prompt_2=None,
                  max_sequence_length: int = 512, num_images: int = 1, guidance: float | None = 3.5,
                  clip_max_length: int = CLIP_MAX_LENGTH, device="cpu", dtype: torch.dtype | None = torch.float32,
                  notes: list | None = None) -> list:
    """Encode a prompt (or a list) into native Flux CONDITIONING.

    `prompt` goes to CLIP-L, `prompt_2` (default: `prompt`) to T5, like diffusers. Each prompt is
    repeated `num_images` times (prompt 0 x n, prompt 1 x n, ...). The tensors are returned on `device`
    in `dtype` (None keeps the encoders' dtypes). Truncation notes are logged and appended to `notes`.
    """
    if not 1 <= int(max_sequence_length) <= 512:
        raise BadInput("max_sequence_length", f"{max_sequence_length}: must be between 1 and 512")
    prompts = _as_list(prompt)
    prompts_2 = _as_list(prompt_2) if prompt_2 is not None else prompts
    if len(prompts_2) != len(prompts):
        raise BadInput("prompt_2", f"{len(prompts_2)} prompts for T5 but {len(prompts)} for CLIP-L")
    pooled = clip_pooled(clip_tokenizer, clip_model, prompts, clip_max_length, notes)
    hidden = t5_hidden(t5_tokenizer, t5_model, prompts_2, int(max_sequence_length), notes)
    n = int(num_images)
    if n > 1:
        pooled = pooled.repeat_interleave(n, dim=0)
        hidden = hidden.repeat_interleave(n, dim=0)
    hidden = hidden.to(device=device, dtype=dtype if dtype is not None else hidden.dtype)
    pooled = pooled.to(device=device, dtype=dtype if dtype is not None else pooled.dtype)
    return [[hidden, {"pooled_output": pooled, "guidance": guidance}]]


def set_guidance(conditioning: list, guidance: float | None) -> list:
    """A copy of a CONDITIONING with "guidance" set on every entry (like native FluxGuidance;
    None disables it like FluxDisableGuidance). The tensors are shared, not copied."""
    return [[c, dict(d, guidance=guidance)] for c, d in conditioning]
