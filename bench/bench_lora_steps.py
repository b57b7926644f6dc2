"""A LoRA in a custom sampling loop: 28 FluxBridge Scheduler Step node runs with a LoRA stack against the same
loop without it.

The stack is applied by the first step and stays on the model for the other 27 (`runtime.models.use_stack`),
so the loop with the LoRA should cost what the loop without it costs, plus one apply. Setup, in the
standalone host: a random FLUX.1-structured transformer (default width 256 = 2 heads of 128, 2 double + 4
single blocks) written as a bf16 BFL checkpoint and loaded by `models.load_transformer` (CPU: float32, so
the weights are copies and the LoRA's originals are read again from the file on removal), a rank-16 kohya
LoRA on every block linear, 256x256 pixels, 28 steps, each step a `SchedulerStep.execute` call as ComfyUI or
the runner makes it.

  with     the model with the LoRA; before each loop (outside the clock) the stack is taken off, so each
           loop pays for applying it once, as a run after a change of stack does
  without  the same model without the LoRA (the base, nothing applied)
  per-step the stack taken off after every step (inside the clock): what the loop cost when every node run
           applied and removed the whole stack, as before this change (here with removal by reading the
           file again)

Rounds interleave the variants (order rotated); ratios are taken per round, the median is the figure. Wall
time and the process's CPU time are both measured (on a shared, busy machine the CPU time is the steadier).
Progress bars are off (TQDM_DISABLE), the same for every variant. Target: with / without <= 1.05.

    python bench/bench_lora_steps.py [--runs 6] [--steps 28] [--size 256] [--width 256] [--rank 16] [--threads 1]
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # read by tqdm when it is imported: before anything imports it

import torch  # noqa: E402

import checkout  # noqa: E402,F401  (the pack as `fluxbridge`, installed or not)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=6, help="interleaved rounds (default 6)")
    ap.add_argument("--steps", type=int, default=28, help="SchedulerStep runs per loop (default 28)")
    ap.add_argument("--size", type=int, default=256, help="image size in pixels (default 256)")
    ap.add_argument("--width", type=int, default=256, help="transformer width (default 256)")
    ap.add_argument("--double", type=int, default=2, help="double blocks (default 2)")
    ap.add_argument("--single", type=int, default=4, help="single blocks (default 4)")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default; default 1)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from bench_lora import make_lora

    from fluxbridge.headless.factory import save_layout, tiny_flux_transformer
    from fluxbridge.nodes import latent, sampling
    from fluxbridge.runtime import host, models

    def node(cls, **inputs):
        return cls.execute(**inputs).args

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for sub in ("diffusion_models", "loras"):
            (root / sub).mkdir()
        host.set_models_dir(root)
        host.set_output_dir(root / "output")
        net = tiny_flux_transformer(width=args.width, heads=args.width // 128, double=args.double,
                                    single=args.single, joint_attention_dim=64, pooled_projection_dim=64,
                                    dtype=torch.bfloat16)
        path = save_layout(net, root / "diffusion_models" / "flux1-dev.safetensors", "bfl")
        modules = make_lora(root / "loras" / "lora.safetensors", net, "kohya", args.rank)  # every block Linear
        base, _ = models.load_transformer(path)
        lora = base.with_lora("lora", models.open_lora(root / "loras" / "lora.safetensors"), 1.0)
        g = torch.Generator().manual_seed(1)
        cond = [[torch.randn(1, 64, 64, generator=g), {"pooled_output": torch.randn(1, 64, generator=g),
                                                       "guidance": 3.5}]]
        (empty,) = node(latent.EmptyLatent, width=args.size, height=args.size, batch_size=1)
        (sig,) = node(sampling.Scheduler, steps=args.steps, width=args.size, height=args.size, denoise=1.0,
                      shift="auto", transformer=base)
        (start,) = node(sampling.AddNoise, latent=empty, sigmas=sig, seed=7)

        def loop(tr, release_each_step=False):
            x = start
            for step in range(args.steps):
                (x,) = node(sampling.SchedulerStep, transformer=tr, positive=cond, latent=x, sigmas=sig, step=step)
                if release_each_step:
                    models.release_loras(tr.module)
            return x["samples"]

        variants = {"with": lambda: loop(lora), "without": lambda: loop(base),
                    "per-step": lambda: loop(lora, release_each_step=True)}
        n_params = sum(p.numel() for p in base.module.parameters())
        print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); transformer width {args.width}, "
              f"{args.double} double + {args.single} single blocks, {n_params / 1e6:.1f} M params, bf16 file "
              f"loaded as {base.dtype} on the CPU; LoRA rank {args.rank} on {modules} modules; "
              f"{args.size}x{args.size} px, {args.steps} steps; {args.runs} rounds + 1 warm-up")
        models.release_loras(base.module)
        same = torch.equal(variants["with"](), variants["per-step"]())
        print(f"the loop with the stack kept equals the loop applying it every step (bitwise): {same}")
        times = {k: [] for k in variants}
        cpu = {k: [] for k in variants}
        names = list(variants)
        for r in range(args.runs + 1):
            for k in names[r % 3:] + names[:r % 3]:
                models.release_loras(base.module)  # each loop starts from the clean base (outside the clock)
                gc.collect()
                t0, c0 = time.perf_counter(), time.process_time()
                variants[k]()
                if r:  # round 0 warms up
                    times[k].append(time.perf_counter() - t0)
                    cpu[k].append(time.process_time() - c0)
        with lora.patched():
            handle = models.applied_handle(base.module)
            originals = handle.reports[0]["applied"]["originals"]
        models.clear_cache()
        host.set_models_dir(None)
        host.set_output_dir(None)

    med = statistics.median
    for k in names:
        print(f"  {k:9s} wall {med(times[k]):7.3f} s, CPU {med(cpu[k]):7.3f} s per {args.steps}-step loop "
              f"(wall min {min(times[k]):.3f}, max {max(times[k]):.3f})")
    print(f"originals of the patched weights while applied: {originals}")
    for clock, t in (("wall", times), ("CPU", cpu)):
        ratio = sorted(a / b for a, b in zip(t["with"], t["without"]))
        old = sorted(a / b for a, b in zip(t["per-step"], t["without"]))
        print(f"{clock:4s} with / without, per round: median {med(ratio):.3f}x (min {ratio[0]:.3f}, "
              f"max {ratio[-1]:.3f}; target <= 1.05);  per-step apply + remove / without: median {med(old):.3f}x")


if __name__ == "__main__":
    sys.exit(main())
