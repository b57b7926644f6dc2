"""Plain pipeline functions shared by the nodes and the headless runner (torch + diffusers/transformers model
objects; no ComfyUI). Native conventions throughout: IMAGE [B,H,W,3] 0..1, LATENT {"samples": raw VAE
latents}, CONDITIONING [[t5, {"pooled_output", "guidance"}]], SIGMAS 1-D float32 ending in 0.

    latents   LatentFormat, latent_samples, process_in/out, pack/unpack, image_ids/text_ids, empty_latent, noise
    schedule  flux_sigmas, calculate_shift, euler_step, add_noise
    text      encode_prompt, set_guidance
    sample    sample, check_conditioning
    vae       decode (tiled, out-of-memory fallback), encode
    fill      fill_conditioning, control_conditioning, from_native_conditioning
    device    execution_device (where a partly loaded or offloaded model computes), set_execution_device,
              execution_dtype (the dtype it computes in)
"""
from .fill import control_conditioning, fill_conditioning, fill_from_latent, from_native_conditioning, pack_mask
from .latents import (LatentFormat, empty_latent, image_ids, latent_samples, noise, pack, process_in, process_out,
                      snap_size, text_ids, unpack)
from .sample import check_conditioning, sample
from .schedule import add_noise, calculate_shift, euler_step, flux_sigmas, image_tokens, schnell_sigmas
from .text import encode_prompt, set_guidance
from .vae import decode, encode

__all__ = [
    "LatentFormat", "empty_latent", "image_ids", "latent_samples", "noise", "pack", "process_in", "process_out", "snap_size",
    "text_ids", "unpack", "add_noise", "calculate_shift", "euler_step", "flux_sigmas", "image_tokens",
    "schnell_sigmas", "encode_prompt", "set_guidance", "sample", "check_conditioning", "decode", "encode", "fill_conditioning",
    "fill_from_latent", "from_native_conditioning", "pack_mask", "control_conditioning",
]
