"""The FLUX.1 flow-matching schedule, exactly as diffusers computes it.

diffusers' FluxPipeline passes `sigmas = linspace(1, 1/n, n)` and `mu = calculate_shift((H//16)(W//16))`
to `FlowMatchEulerDiscreteScheduler.set_timesteps`, which casts the sigmas to float32, applies the
exponential time shift (dev: dynamic shifting) or the static shift `s*x/(1+(s-1)x)` (schnell: shift 1.0),
and appends 0. We do the same operations in the same order and precision (numpy float32), so the values
are identical, not merely close.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..common.errors import BadInput


def as_sigmas(sigmas) -> torch.Tensor:
    """Native SIGMAS (a tensor or list) as a 1-D float32 CPU tensor of at least 2 values (1 step)."""
    sig = torch.as_tensor(sigmas, dtype=torch.float32).detach().cpu().reshape(-1)
    if sig.numel() < 2:
        raise BadInput("sigmas", f"need at least 2 values (1 step), got {sig.numel()}")
    return sig


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """mu for the dynamic time shift: linear in the number of image tokens (256 -> 0.5, 4096 -> 1.15)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def image_tokens(width: int, height: int, downscale: int = 8) -> int:
    """Packed image tokens for a pixel size, as diffusers counts them: (H // 16) * (W // 16)."""
    p = downscale * 2
    return (int(height) // p) * (int(width) // p)


def flux_sigmas(steps: int, image_seq_len: int | None = None, width: int | None = None,
                height: int | None = None, dynamic_shift: bool = True, base_shift: float = 0.5,
                max_shift: float = 1.15, base_seq_len: int = 256, max_seq_len: int = 4096, shift: float = 1.0,
                denoise: float = 1.0, downscale: int = 8) -> torch.Tensor:
    """Native SIGMAS (1-D float32, length steps+1 for denoise 1, ending in 0).

    dev: `dynamic_shift=True` with the image size (`image_seq_len`, or `width`+`height` in pixels);
    schnell: `dynamic_shift=False, shift=1.0` (gives [1, .75, .5, .25, 0] for 4 steps).
    `denoise` < 1 keeps the tail of the schedule the way FluxImg2ImgPipeline's `get_timesteps(strength)`
    does: `t_start = int(steps - min(steps * denoise, steps))`, sigmas[t_start:].
    """
    steps = int(steps)
    if steps < 1:
        raise BadInput("steps", f"{steps}: needs at least 1 step")
    if not 0.0 <= float(denoise) <= 1.0:
        raise BadInput("denoise", f"{denoise}: must be between 0 and 1")
    # The same float64 grid as np.linspace in the pipeline, then float32 as in set_timesteps.
    sig = np.linspace(1.0, 1.0 / steps, steps).astype(np.float32)
    if dynamic_shift:
        if image_seq_len is None:
            if width is None or height is None:
                raise BadInput("sigmas", "dynamic shift needs image_seq_len or width and height")
            image_seq_len = image_tokens(width, height, downscale)
        mu = calculate_shift(image_seq_len, base_seq_len, max_seq_len, base_shift, max_shift)
        sig = math.exp(mu) / (math.exp(mu) + (1 / sig - 1) ** 1.0)
    else:
        sig = shift * sig / (1 + (shift - 1) * sig)
    sigmas = torch.cat([torch.from_numpy(np.asarray(sig, dtype=np.float32)), torch.zeros(1)])
    if denoise < 1.0:
        init = min(steps * denoise, steps)
        t_start = int(max(steps - init, 0))
        if steps - t_start < 1:
            raise BadInput("denoise", f"{denoise} with {steps} steps leaves no step to run")
        sigmas = sigmas[t_start:]
    return sigmas


def schnell_sigmas(steps: int, denoise: float = 1.0) -> torch.Tensor:
    return flux_sigmas(steps, dynamic_shift=False, shift=1.0, denoise=denoise)


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma, sigma_next, out_dtype: torch.dtype | None = None):
    """One flow-matching Euler step, `x + (sigma_next - sigma) * v`, like FlowMatchEulerDiscreteScheduler:
    the sample is upcast to float32, dt is a float32 scalar, and the result is cast to `v`'s dtype (or to
    `out_dtype`, e.g. float32 to keep a full-precision running sample)."""
    dt = torch.as_tensor(sigma_next, dtype=torch.float32) - torch.as_tensor(sigma, dtype=torch.float32)
    out = x.to(torch.float32) + dt.to(v.device) * v
    return out.to(v.dtype if out_dtype is None else out_dtype)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
    """The flow-matching forward process at `sigma`: sigma * noise + (1 - sigma) * x0
    (FlowMatchEulerDiscreteScheduler.scale_noise; ComfyUI CONST noise_scaling)."""
    s = torch.as_tensor(sigma, dtype=x0.dtype, device=x0.device)
    return s * noise + (1.0 - s) * x0
