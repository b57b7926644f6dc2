"""FLUX.1-dev at full size on one CUDA GPU: our sampler + VAE decode against diffusers' FluxPipeline.

Random weights, nothing downloaded: the transformer is a `FluxTransformer2DModel` with the FLUX.1-dev config
(3072 wide, 24 heads of 128, 19 double + 38 single blocks, guidance embeddings; 11.9 B parameters), built
on the meta device and materialised directly on the GPU in bf16 (no full-size float32 copy anywhere); the VAE
is an `AutoencoderKL` with the FLUX VAE config, bf16. T5 and CLIP-L are skipped: random text states
[1, 512, 4096] and a random pooled vector [1, 768] (bf16) stand for an encoded prompt, and both sides get
them (`prompt_embeds` / `pooled_prompt_embeds` for diffusers, a native CONDITIONING for ours). Both share
the same transformer and VAE, in the same process. 1024x1024, 28 steps, guidance 3.5, seed 0:

  ours       `pipeline.sample.sample(transformer, conditioning, empty_latent, flux_sigmas(28, 1024, 1024),
             check_interrupt=host.check_interrupt)` then `pipeline.vae.decode(vae, samples)` (native IMAGE on
             the CPU): what FluxBridge Sampler + FluxBridge VAE Decode call
  diffusers  `FluxPipeline(...)(prompt_embeds=, pooled_prompt_embeds=, output_type="np")` (image on the CPU)

Per run: CUDA events after every step (our progress hook / diffusers' callback_on_step_end) give it/s over
steps 2..N (warm, no setup); `torch.cuda.synchronize()` around the run gives the whole image's seconds;
`torch.cuda.max_memory_allocated()` (reset before the run) gives the peak, also shown above the resident
weights. One warm-up image of one step on each side first, then --runs interleaved pairs (order alternates).

Targets: it/s ours / diffusers >= 1.0, whole image ours / diffusers <= 1.0, peak ours / diffusers <= 1.0.
Published anchors (sources in bench/README.md): diffusers bf16 eager on an H100, 28 steps: 6.7-7.1 s per
image; compute roofline 10.7-13.3 it/s.

Without a CUDA device it stops with a message (exit status 2). `--dry-run` runs every code path on the CPU
at a tiny size (same structure, a few blocks; bf16; one thread) in seconds, for checks on machines without a
GPU (the memory figures, which need CUDA, are left out there).

VRAM caps (`--vram-gb 8 12 16 24`, GiB): instead of the comparison above, the same image under each cap
(`torch.cuda.set_per_process_memory_fraction`, so the caching allocator refuses to go past it), the weights
starting in RAM (built on the CPU), for three ways to fit:

  ours                        the standalone host: `host.load_to_device` puts a model that fits on the GPU
                              whole, else runs it with diffusers' group offloading (block level, CUDA
                              stream); the sampler and decode as above
  diffusers model offload     `FluxPipeline.enable_model_cpu_offload()` (one whole model at a time on the GPU)
  diffusers group offload     `FluxPipeline.enable_group_offload(block_level, 1 block per group, CUDA stream)`

printing per cap and way: it/s (steps 2..N), seconds per image, peak allocated memory, or the error (out of
memory). One 1-step warm-up per way and cap (the prefetching hooks learn the block order on the first
pass), then --runs images (default 1 here). With --dry-run the caps cannot be enforced (no CUDA): each way
runs once per cap on the tiny CPU models, ours with group offloading forced on (no stream on the CPU), so
every code path runs.

    python bench/bench_cuda.py [--runs 3] [--steps 28] [--size 1024] [--seed 0]
    python bench/bench_cuda.py --vram-gb 8 12 16 24 [--runs 1]
    python bench/bench_cuda.py --dry-run [--vram-gb 8 24]
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time

import torch

import checkout  # noqa: E402,F401  (the pack as `fluxbridge`, installed or not)

from fluxbridge.runtime import host, offload  # noqa: E402
from fluxbridge import pipeline as P  # noqa: E402
from fluxbridge.pipeline import vae as vae_lib  # noqa: E402
from fluxbridge.pipeline.device import set_execution_device  # noqa: E402
from fluxbridge.pipeline.sample import sample, working_memory  # noqa: E402

# FLUX.1-dev (black-forest-labs/FLUX.1-dev transformer/config.json, vae/config.json)
FLUX_DEV = dict(patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38,
                attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
FLUX_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, act_fn="silu", latent_channels=16, norm_num_groups=32, sample_size=1024,
                scaling_factor=0.3611, shift_factor=0.1159, force_upcast=True, use_quant_conv=False,
                use_post_quant_conv=False, mid_block_add_attention=True)
TEXT_TOKENS = 512  # T5 max_sequence_length of FLUX.1-dev
DEV_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                     max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)

# --dry-run: the same structure, tiny (heads of 32 = RoPE axes 4 + 14 + 14), on the CPU
TINY_DEV = dict(FLUX_DEV, num_layers=1, num_single_layers=2, attention_head_dim=32, num_attention_heads=2,
                joint_attention_dim=64, pooled_projection_dim=32, axes_dims_rope=(4, 14, 14))
TINY_VAE = dict(FLUX_VAE, block_out_channels=(32, 32, 32, 32), layers_per_block=1, sample_size=64)
TINY_TEXT_TOKENS = 16

GUIDANCE = 3.5
NO_CUDA = ("bench_cuda: no CUDA device (torch.cuda.is_available() is False; torch {version}). This benchmark "
           "needs an NVIDIA GPU with about 32 GiB free; run it with --dry-run for a tiny CPU check of its code paths.")


# ------------------------------------------------------------------------------------------------ models

def build_transformer(config: dict, device, dtype, seed: int = 0):
    """A random FluxTransformer2DModel: built on meta, cast there, then allocated once on `device` in `dtype`
    and filled in place (weights N(0, 1/fan_in), biases 0, RMSNorm scales 1): never a float32 copy."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    with init_empty_weights():
        model = FluxTransformer2DModel(**config)
    model = model.to(dtype=dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, p.shape[1] ** -0.5, generator=gen)
            elif "norm" in name.rsplit(".", 2)[-2]:
                p.fill_(1.0)
            else:
                p.zero_()
        for name, b in model.named_buffers():  # none in current diffusers; never leave one uninitialised
            raise RuntimeError(f"unexpected buffer {name}: initialise it before timing")
    return model.eval().requires_grad_(False)


def build_vae(config: dict, device, dtype, seed: int = 0):
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(**config)  # 84 M parameters at full size: default init on the CPU is quick
    return vae.to(device=device, dtype=dtype).eval().requires_grad_(False)


def text_inputs(tokens: int, joint_dim: int, pooled_dim: int, device, dtype, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(1, tokens, joint_dim, generator=g).to(device=device, dtype=dtype)
    pooled = torch.randn(1, pooled_dim, generator=g).to(device=device, dtype=dtype)
    return hidden, pooled


# ------------------------------------------------------------------------------------------------ clocks

class Clock:
    """Time marks: CUDA events on a GPU (recorded in stream order, read after a synchronize), wall clock on
    the CPU. `update(n)` makes it usable as our sampler's progress object."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.steps = []

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    @staticmethod
    def seconds(a, b) -> float:
        if isinstance(a, float):
            return b - a
        return a.elapsed_time(b) / 1000.0

    def update(self, n=1):  # our sampler: after every step's Euler update
        self.steps.append(self.mark())

    def on_step_end(self, pipe, i, t, callback_kwargs):  # diffusers: after every step's scheduler.step
        self.steps.append(self.mark())
        return {}


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak(device):
    return torch.cuda.max_memory_allocated(device) if torch.device(device).type == "cuda" else None


# ---------------------------------------------------------------------------------------------- the two

def run_ours(transformer, vae, hidden, pooled, size, steps, seed, clock):
    conditioning = [[hidden, {"pooled_output": pooled, "guidance": GUIDANCE}]]
    latent = P.empty_latent(size, size)
    sigmas = P.flux_sigmas(steps, width=size, height=size)
    out = sample(transformer, conditioning, latent, sigmas, seed=seed, progress=clock,
                 check_interrupt=host.check_interrupt, latent_format=vae)
    return vae_lib.decode(vae, out["samples"])  # IMAGE [1, H, W, 3] float32 on the CPU


def run_diffusers(pipe, hidden, pooled, size, steps, seed, clock):
    return pipe(prompt_embeds=hidden, pooled_prompt_embeds=pooled, height=size, width=size,
                num_inference_steps=steps, guidance_scale=GUIDANCE, max_sequence_length=hidden.shape[1],
                generator=torch.Generator("cpu").manual_seed(seed), output_type="np",
                callback_on_step_end=clock.on_step_end).images  # [1, H, W, 3] float32 on the CPU


def measure(fn, device, steps) -> dict:
    """One image: whole seconds (synchronized), it/s over steps 2..N, decode seconds, peak memory."""
    clock = Clock(device)
    gc.collect()
    reset_peak(device)
    t0 = time.perf_counter()
    start = clock.mark()
    image = fn(clock)
    end = clock.mark()
    sync(device)
    wall = time.perf_counter() - t0
    marks = clock.steps
    if len(marks) != steps:
        raise RuntimeError(f"expected {steps} step marks, got {len(marks)}")
    its = (steps - 1) / Clock.seconds(marks[0], marks[-1]) if steps > 1 else float("nan")
    return {"seconds": wall, "its": its, "first_step": Clock.seconds(start, marks[0]),
            "decode": Clock.seconds(marks[-1], end), "peak": peak(device), "image": image}


# ---------------------------------------------------------------------------------------------- VRAM caps

WAYS = ("ours", "diffusers model offload", "diffusers group offload")


def set_cap(device, gib: float):
    """Cap this process's CUDA memory at `gib` GiB; returns the fraction set, or None (no CUDA: not enforced).
    Raises ValueError when the device has less."""
    if device.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = gib * 2**30 / total
    if fraction > 1:
        raise ValueError(f"the device has {total / 2**30:.1f} GiB")
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return fraction


def setup_way(way, pipe, transformer, vae, device, force_offload):
    """Get the modules ready for one way of fitting; returns (run(clock) callable, what was done)."""
    if way == "ours":
        t_handle, v_handle = host.wrap(transformer), host.wrap(vae)
        if force_offload:  # the dry run: the decision never offloads on the CPU, so force the path
            for h in (t_handle, v_handle):
                offload.enable(h.model, h.load_device, h.offload_device)
                h.group_offloaded = True

        def run(clock, steps, size, hidden, pooled, seed):
            latent = P.empty_latent(size, size)
            host.load_to_device([t_handle], memory_required=working_memory(transformer, latent["samples"].shape))
            conditioning = [[hidden, {"pooled_output": pooled, "guidance": GUIDANCE}]]
            out = sample(transformer, conditioning, latent, P.flux_sigmas(steps, width=size, height=size),
                         seed=seed, progress=clock, check_interrupt=host.check_interrupt, latent_format=vae)
            host.load_to_device([v_handle], memory_required=vae_lib.decode_memory(vae, out["samples"].shape))
            return vae_lib.decode(vae, out["samples"])

        how = lambda: ", ".join(f"{name} {'group-offloaded' if h.group_offloaded else 'whole on the device'}"  # noqa
                                for name, h in (("transformer", t_handle), ("VAE", v_handle)))
        return run, how
    if way == "diffusers model offload":
        pipe.enable_model_cpu_offload(device=device)
        how = lambda: "enable_model_cpu_offload"  # noqa: E731
    else:
        pipe.enable_group_offload(onload_device=device, offload_device=torch.device("cpu"), offload_type="block_level",
                                  num_blocks_per_group=1, use_stream=device.type == "cuda")
        how = lambda: f"enable_group_offload(block_level, use_stream={device.type == 'cuda'})"  # noqa: E731

    def run(clock, steps, size, hidden, pooled, seed):
        return run_diffusers(pipe, hidden, pooled, size, steps, seed, clock)
    return run, how


def teardown(pipe, transformer, vae):
    """Back to plain modules on the CPU: no hooks, no offloading, nothing left on the GPU."""
    pipe.remove_all_hooks()
    for module in (transformer, vae):
        offload.disable(module)
        set_execution_device(module, None)
        module.to("cpu")
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_caps(args, device, dtype, t_cfg, v_cfg, tokens, size) -> int:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    import diffusers

    runs = args.runs or 1
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run: tiny models, caps not enforced)"
    print(f"{where}; torch {torch.__version__}, diffusers {diffusers.__version__}")
    t0 = time.perf_counter()
    cpu = torch.device("cpu")
    transformer, vae = build_transformer(t_cfg, cpu, dtype), build_vae(v_cfg, cpu, dtype)  # the weights start in RAM
    hidden, pooled = text_inputs(tokens, t_cfg["joint_attention_dim"], t_cfg["pooled_projection_dim"], cpu, dtype)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**DEV_SCHEDULER), vae=vae, text_encoder=None,
                        tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    n_bytes = offload.model_bytes(transformer) + offload.model_bytes(vae)
    print(f"transformer + VAE {n_bytes / 2**30:.2f} GiB of weights ({str(dtype).replace('torch.', '')}), built on the CPU "
          f"in {time.perf_counter() - t0:.1f} s; {size}x{size}, {args.steps} steps, seed {args.seed}; {runs} run(s) per "
          f"way and cap after a 1-step warm-up")
    rows = []
    for gib in args.vram_gb:
        try:
            fraction = set_cap(device, gib)
        except ValueError as exc:
            print(f"\n{gib:g} GiB: skipped ({exc})")
            continue
        print(f"\ncap {gib:g} GiB" + (f" (fraction {fraction:.3f})" if fraction is not None else " (not enforced)"))
        for way in WAYS:
            row = {"cap": gib, "way": way, "its": [], "seconds": [], "peak": [], "error": None, "how": "",
                   "image": None}
            try:
                run, how = setup_way(way, pipe, transformer, vae, device, force_offload=args.dry_run)
                measure(lambda clock: run(clock, 1, size, hidden, pooled, args.seed), device, 1)
                for _ in range(runs):
                    m = measure(lambda clock: run(clock, args.steps, size, hidden, pooled, args.seed), device,
                                args.steps)
                    row["its"].append(m["its"])
                    row["seconds"].append(m["seconds"])
                    row["peak"].append(m["peak"])
                    row["image"] = torch.as_tensor(m["image"]).float()
                row["how"] = how()
            except Exception as exc:  # noqa: BLE001 - a way that does not fit is a result, not a failure
                row["error"] = "out of memory" if vae_lib.is_oom(exc) else f"{type(exc).__name__}: {str(exc)[:160]}"
            finally:
                teardown(pipe, transformer, vae)
            rows.append(row)
            if row["error"]:
                print(f"  {way:24s} failed: {row['error']}")
            else:
                peak = (f" | peak {statistics.median(row['peak']) / 2**30:.2f} GiB" if row["peak"][0] is not None
                        else "")
                print(f"  {way:24s} {statistics.median(row['its']):.3f} it/s | image "
                      f"{statistics.median(row['seconds']):.2f} s{peak} | {row['how']}")
        ours = next(r for r in rows if r["cap"] == gib and r["way"] == "ours")
        for r in rows:
            if r["cap"] == gib and r["way"] != "ours" and not r["error"] and not ours["error"]:
                diff = float((ours["image"] - r["image"]).abs().max())
                print(f"  it/s ours / {r['way']}: {statistics.median(ours['its']) / statistics.median(r['its']):.3f}"
                      f" (images differ by at most {diff:.3g})")
    if device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    if args.dry_run:
        print("\ndry run: every code path ran; the figures above say nothing about GPU performance")
    return 0


# ------------------------------------------------------------------------------------------------- main

def mmm(values, fmt="{:.3f}") -> str:
    lo, med, hi = min(values), statistics.median(values), max(values)
    return " / ".join(fmt.format(v) for v in (lo, med, hi))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=None, help="interleaved pairs (default 3; dry run 1)")
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--size", type=int, default=None, help="image size in pixels (default 1024; dry run 64)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dry-run", action="store_true",
                    help="tiny models on the CPU: runs every code path, measures nothing meaningful")
    ap.add_argument("--vram-gb", type=float, nargs="+", metavar="GIB",
                    help="VRAM caps in GiB (e.g. 8 12 16 24): ours against diffusers' offloading at each cap")
    args = ap.parse_args(argv)

    if args.dry_run:
        torch.set_num_threads(1)  # a shared CPU: waiting OpenMP threads only make it slower and erratic
        device, dtype = torch.device("cpu"), torch.bfloat16
        t_cfg, v_cfg, tokens = TINY_DEV, TINY_VAE, TINY_TEXT_TOKENS
        size, runs = args.size or 64, args.runs or 1
    else:
        if not torch.cuda.is_available():
            print(NO_CUDA.format(version=torch.__version__), file=sys.stderr)
            return 2
        device, dtype = torch.device("cuda", torch.cuda.current_device()), torch.bfloat16
        t_cfg, v_cfg, tokens = FLUX_DEV, FLUX_VAE, TEXT_TOKENS
        size, runs = args.size or 1024, args.runs or 3
    if size % 16:
        ap.error(f"--size {size}: must be a multiple of 16")
    if args.vram_gb:
        return run_caps(args, device, dtype, t_cfg, v_cfg, tokens, size)

    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from diffusers.utils import logging as dlog
    dlog.set_verbosity_error()

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run: tiny models)"
    print(f"{where}; torch {torch.__version__}, diffusers {diffusers.__version__}")
    t0 = time.perf_counter()
    transformer = build_transformer(t_cfg, device, dtype)
    vae = build_vae(v_cfg, device, dtype)
    hidden, pooled = text_inputs(tokens, t_cfg["joint_attention_dim"], t_cfg["pooled_projection_dim"], device, dtype)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**DEV_SCHEDULER), vae=vae, text_encoder=None,
                        tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)  # ours reports to the clock only; keep the two alike
    sync(device)
    n_t = sum(p.numel() for p in transformer.parameters())
    n_v = sum(p.numel() for p in vae.parameters())
    resident = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    print(f"transformer {n_t / 1e6:,.1f} M params ({t_cfg['num_layers']} double + {t_cfg['num_single_layers']} single "
          f"blocks, {t_cfg['num_attention_heads']}x{t_cfg['attention_head_dim']}), VAE {n_v / 1e6:,.1f} M params, "
          f"{str(dtype).replace('torch.', '')}; built in {time.perf_counter() - t0:.1f} s"
          + (f"; resident {resident / 2**30:.2f} GiB" if resident is not None else ""))
    print(f"{size}x{size} ({(size // 16) ** 2} image tokens) + {tokens} text tokens, {args.steps} steps, "
          f"guidance {GUIDANCE}, seed {args.seed}; {runs} interleaved pair(s) after a 1-step warm-up of each")

    sides = {
        "ours": lambda steps: (lambda clock: run_ours(transformer, vae, hidden, pooled, size, steps, args.seed,
                                                      clock)),
        "diffusers": lambda steps: (lambda clock: run_diffusers(pipe, hidden, pooled, size, steps, args.seed,
                                                                clock)),
    }
    for name, make in sides.items():  # warm-up: one step and a decode each (kernels, cuBLAS/cuDNN handles)
        measure(make(1), device, 1)
    if resident is not None:  # what stays allocated between images (weights, text inputs, library workspaces)
        gc.collect()
        resident = torch.cuda.memory_allocated(device)

    results = {name: [] for name in sides}
    for r in range(runs):
        order = list(sides) if r % 2 == 0 else list(reversed(sides))
        for name in order:
            results[name].append(measure(sides[name](args.steps), device, args.steps))
    a, b = results["ours"][-1]["image"], torch.from_numpy(results["diffusers"][-1]["image"])
    diff = float((a.float() - b.float()).abs().max())
    finite = bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())
    print(f"images: ours {tuple(a.shape)}, diffusers {tuple(b.shape)}; largest difference {diff:.3g} "
          f"(bf16; ours keeps the running sample in float32, diffusers rounds it to bf16 each step); "
          f"all finite: {finite}")

    print(f"\nper side (min / median / max over {runs} run(s)):")
    for name in sides:
        rs = results[name]
        line = (f"  {name:9s} image {mmm([x['seconds'] for x in rs])} s | {mmm([x['its'] for x in rs], '{:.2f}')} it/s"
                f" | first step {mmm([x['first_step'] for x in rs])} s | decode {mmm([x['decode'] for x in rs])} s")
        if rs[0]["peak"] is not None:
            line += (f" | peak {mmm([x['peak'] / 2**30 for x in rs], '{:.2f}')} GiB"
                     f" (+{statistics.median(x['peak'] - resident for x in rs) / 2**30:.2f} over the weights)")
        print(line)

    pairs = list(zip(results["ours"], results["diffusers"]))
    print("\nratios ours / diffusers (per pair, min / median / max):")
    print(f"  it/s          {mmm([o['its'] / d['its'] for o, d in pairs])}   (target >= 1.0)")
    print(f"  image seconds {mmm([o['seconds'] / d['seconds'] for o, d in pairs])}   (target <= 1.0)")
    if pairs[0][0]["peak"] is not None:
        print(f"  peak memory   {mmm([o['peak'] / d['peak'] for o, d in pairs])}   (target <= 1.0)")
        print(f"  peak above the weights {mmm([(o['peak'] - resident) / (d['peak'] - resident) for o, d in pairs])}")
    if args.dry_run:
        print("\ndry run: every code path ran; the figures above say nothing about GPU performance")
    return 0


if __name__ == "__main__":
    sys.exit(main())
