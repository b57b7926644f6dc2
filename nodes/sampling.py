"""Sampling: the FLUX.1 schedule, adding noise, one Euler step, and the whole sampler.

The transformer's LoRA stack is put on the shared base module where the model runs (`with
transformer.patched()`, `runtime.models.use_stack`) and stays there until a use with another stack: a loop of
SchedulerSteps applies it once. Applying is atomic, so an interrupt or an error while it is applied leaves
the cached base as it was.
"""
from __future__ import annotations

import torch

from ..runtime import host
from ..common.errors import BadInput
from ..pipeline import latents as latents_lib
from ..pipeline import schedule as schedule_lib
from ..pipeline.kontext import REFERENCE_KEY
from ..pipeline.sample import check_conditioning, sample, working_memory
from ..runtime.node_specs import MAX_RESOLUTION
from ._common import CATEGORY, MAX_SEED, TRANSFORMER, checked, io, node_id, ui

SAMPLING = CATEGORY + "/sampling"
SHIFTS = ("auto", "dynamic", "fixed")


def shift_choice(shift: str, transformer=None) -> tuple[bool, str]:
    """(dynamic shift?, why): auto follows the model as diffusers' pipelines do (dev-type models, with
    guidance embeddings: dynamic; schnell: fixed shift 1.0). auto without a model is refused rather than
    guessed: a guess of dev would give a schnell graph the wrong schedule without a word."""
    if shift not in SHIFTS:
        raise BadInput("shift", f"{shift!r}: expected one of {', '.join(SHIFTS)}")
    if shift != "auto":
        return shift == "dynamic", f"shift {shift} as chosen"
    if transformer is None:
        raise BadInput("shift", "auto needs the transformer connected, since the model decides the schedule "
                                "(dev-type: dynamic shift, schnell: fixed); connect it, or choose dynamic or fixed")
    if transformer.variant == "schnell" or not transformer.guidance_embeds:
        return False, f"auto: {transformer.name} is {transformer.variant} (no guidance embedding)"
    return True, f"auto: {transformer.name} is {transformer.variant} (with guidance embedding)"


def _named(transformer) -> str:
    return f"the transformer {transformer.name!r}"


def _check_conditionings(transformer, positive, negative) -> None:
    """Before the model loads: the conditionings fit the transformer (both parts named): their widths, and
    their image inputs (a control image needs the input channels a Depth/Canny model or control LoRA
    gives; Kontext references need a Kontext model)."""
    config = dict(transformer.config, in_channels=transformer.input_channels())
    for which, cond in (("positive", positive), ("negative", negative)):
        if cond is None:
            continue
        _, extra = check_conditioning(cond, config, which, _named(transformer))
        refs = extra.get(REFERENCE_KEY)
        if refs and transformer.variant != "kontext":
            raise BadInput(which, f"the {which} conditioning carries {len(refs)} Kontext reference image(s), but "
                                  f"{_named(transformer)} is FLUX.1 {transformer.variant} (detected from its "
                                  f"weights and name); if it is FLUX.1 Kontext, set the loader's variant to kontext")


class Scheduler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FluxBridgeScheduler",
            display_name="FluxBridge Scheduler",
            category=SAMPLING,
            description="The FLUX.1 flow-matching sigmas, exactly as diffusers computes them. auto (needs the "
                        "transformer): the resolution-dependent (dynamic) shift for dev-type models, none for "
                        "schnell. The node says which schedule it used and why.",
            inputs=[
                io.Int.Input("steps", default=28, min=1, max=1000),
                io.Int.Input("width", default=1024, min=16, max=MAX_RESOLUTION, step=16),
                io.Int.Input("height", default=1024, min=16, max=MAX_RESOLUTION, step=16),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01),
                io.Combo.Input("shift", options=list(SHIFTS), default="auto"),
                TRANSFORMER.Input("transformer", optional=True,
                                  tooltip="Decides what auto means (schnell: fixed; dev: dynamic); auto needs "
                                          "it, dynamic and fixed do not."),
            ],
            outputs=[io.Sigmas.Output(display_name="sigmas")],
        )

    @classmethod
    def execute(cls, steps=28, width=1024, height=1024, denoise=1.0, shift="auto", transformer=None):
        steps, width, height, denoise = checked(cls, steps=steps, width=width, height=height, denoise=denoise)
        notes = []
        w, h, _ = latents_lib.snap_size(int(width), int(height), notes=notes)
        dynamic, why = shift_choice(shift, transformer)
        sigmas = schedule_lib.flux_sigmas(steps, schedule_lib.image_tokens(w, h), dynamic_shift=dynamic,
                                          denoise=denoise)  # fixed: shift 1.0, as schnell
        values = [float(s) for s in sigmas.tolist()]
        kind = "dynamic shift" if dynamic else "fixed shift 1.0"
        notes.insert(0, f"{len(values) - 1} step(s), {kind} ({why}), sigmas {values[0]:.4f} → {values[-1]:.4f}")
        return io.NodeOutput(sigmas, ui=ui(notes, {"sigmas": values, "shift": "dynamic" if dynamic else "fixed",
                                                   "why": why}, sigmas=values))


class AddNoise(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FluxBridgeAddNoise",
            display_name="FluxBridge Add Noise",
            category=SAMPLING,
            description="Noises a LATENT to the first sigma (sigma·noise + (1−sigma)·latent, in the model's "
                        "normalised space), with the sampler's noise for a seed. Start of a step-by-step loop.",
            inputs=[
                io.Latent.Input("latent"),
                io.Sigmas.Input("sigmas"),
                io.Int.Input("seed", default=0, min=0, max=MAX_SEED, control_after_generate=True),
            ],
            outputs=[io.Latent.Output(display_name="latent")],
        )

    @classmethod
    def execute(cls, latent, sigmas, seed=0):
        seed = checked(cls, seed=seed)
        notes = []
        fmt = latents_lib.LatentFormat()
        raw = latents_lib.latent_samples(latent, fmt.channels, notes).to(torch.float32)
        sig = schedule_lib.as_sigmas(sigmas)
        eps = latents_lib.noise(int(seed), raw.shape)
        x = schedule_lib.add_noise(fmt.process_in(raw.cpu()), eps, sig[0])
        out = dict(latent)
        out["samples"] = fmt.process_out(x).to(host.intermediate_device())
        return io.NodeOutput(out, ui=ui(notes))


class SchedulerStep(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FluxBridgeSchedulerStep",
            display_name="FluxBridge Scheduler Step",
            category=SAMPLING,
            description="One flow-matching Euler step, from sigmas[step] to sigmas[step+1]. Chained over every "
                        "step after FluxBridge Add Noise, it gives the sampler's result.",
            inputs=[
                TRANSFORMER.Input("transformer"),
                io.Conditioning.Input("positive"),
                io.Latent.Input("latent"),
                io.Sigmas.Input("sigmas"),
                io.Int.Input("step", default=0, min=0, max=999),
                io.Conditioning.Input("negative", optional=True),
                io.Float.Input("true_cfg", default=1.0, min=1.0, max=30.0, step=0.1),
            ],
            outputs=[io.Latent.Output(display_name="latent")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, transformer, positive, latent, sigmas, step=0, negative=None, true_cfg=1.0):
        step, true_cfg = checked(cls, step=step, true_cfg=true_cfg)
        notes = []
        sig = schedule_lib.as_sigmas(sigmas)
        step = int(step)
        if not 0 <= step < sig.numel() - 1:
            raise BadInput("step", f"step {step} is outside the schedule of {sig.numel() - 1} step(s) "
                                   f"(0..{sig.numel() - 2})")
        _check_conditionings(transformer, positive, negative)
        fmt = latents_lib.LatentFormat(channels=transformer.latent_channels)
        raw = latents_lib.latent_samples(latent, fmt.channels, notes, model=_named(transformer))
        raw = raw.to(torch.float32).cpu()
        if latent.get("noise_mask") is not None:
            notes.append("noise_mask ignored: a single step cannot re-noise the kept area (use the sampler)")
        host.load_to_device([transformer.handle], memory_required=working_memory(transformer.module, raw.shape, positive))
        host.check_interrupt()
        with transformer.patched() as module:  # one iteration of the sampler's loop
            out = sample(module, positive, {"samples": raw}, sig[step:step + 2], negative=negative,
                         true_cfg=float(true_cfg), latent_format=fmt, notes=notes, add_noise_first=False,
                         output_device=host.intermediate_device())
        out = dict(latent, samples=out["samples"])
        bar = host.progress(1, node_id=node_id(cls))
        bar.update_absolute(1)
        return io.NodeOutput(out, ui=ui(notes))


class Sampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FluxBridgeSampler",
            display_name="FluxBridge Sampler",
            category=SAMPLING,
            description="Samples a LATENT with the FLUX.1 transformer (flow-matching Euler, as diffusers' "
                        "FluxPipeline). denoise < 1 or a non-empty latent: image to image. sigmas overrides "
                        "steps and denoise.",
            inputs=[
                TRANSFORMER.Input("transformer"),
                io.Conditioning.Input("positive"),
                io.Latent.Input("latent"),
                io.Int.Input("seed", default=0, min=0, max=MAX_SEED, control_after_generate=True),
                io.Int.Input("steps", default=28, min=1, max=1000),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01),
                io.Float.Input("true_cfg", default=1.0, min=1.0, max=30.0, step=0.1,
                               tooltip="> 1 with a negative prompt: true classifier-free guidance "
                                       "(two model calls per step)."),
                io.Conditioning.Input("negative", optional=True),
                io.Sigmas.Input("sigmas", optional=True),
            ],
            outputs=[io.Latent.Output(display_name="latent")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, transformer, positive, latent, seed=0, steps=28, denoise=1.0, true_cfg=1.0, negative=None,
                sigmas=None):
        seed, steps, denoise, true_cfg = checked(cls, seed=seed, steps=steps, denoise=denoise, true_cfg=true_cfg)
        notes = []
        samples = latents_lib.latent_samples(latent, transformer.latent_channels, notes, model=_named(transformer))
        latent = dict(latent, samples=samples)
        _check_conditionings(transformer, positive, negative)
        if sigmas is None:
            h, w = int(samples.shape[2]), int(samples.shape[3])
            tokens = ((h + 1) // 2) * ((w + 1) // 2)
            sigmas = schedule_lib.flux_sigmas(steps, tokens, dynamic_shift=shift_choice("auto", transformer)[0],
                                              denoise=denoise)
        sig = schedule_lib.as_sigmas(sigmas)
        host.load_to_device([transformer.handle], memory_required=working_memory(transformer.module, samples.shape, positive))
        bar = host.progress(sig.numel() - 1, node_id=node_id(cls))
        with transformer.patched() as module:
            out = sample(module, positive, latent, sig, seed=int(seed), negative=negative, true_cfg=float(true_cfg),
                         progress=bar, check_interrupt=host.check_interrupt, notes=notes,
                         output_device=host.intermediate_device())
        return io.NodeOutput(out, ui=ui(notes))
