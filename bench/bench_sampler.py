"""The sampling loop's own cost: `pipeline.sample.sample` against the bare loop, on the same small model.

Measured in the same run, interleaved (A B, B A, A B, ...), on one random FLUX.1-structured transformer
(CPU, float32; default width 256 = 2 heads of 128, 2 double + 4 single blocks, 256x256 pixels = 256 image
tokens, 64 text tokens, 28 steps: one forward takes tens of milliseconds, so per-step overhead shows):

  ours   `sample(transformer, conditioning, latent, sigmas, seed, progress=host.progress(steps),
         check_interrupt=host.check_interrupt)`: what FluxBridge Sampler calls, with the standalone host's
         progress bar (tqdm) and interrupt check, from a native LATENT to a native LATENT
  floor  the same transformer calls and the same Euler update written as plainly as possible: noise drawn,
         packed and position ids built once, then `x = x + dt * transformer(x, ...)` per step, unpacked at
         the end; no checks, no progress, no interrupt

Both give the same latent (checked bitwise). A second, shorter measurement replaces the transformer with a
module that returns a stored tensor, so what is left is the loop's own cost per step, in microseconds.

Target: ours / floor <= 1.02 (median of the per-pair ratios).
Run: python bench/bench_sampler.py [--runs 20] [--steps 28] [--size 256] [--text-tokens 64] [--width 256]
                                  [--threads 1]
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time

import torch

import checkout  # noqa: E402,F401  (the pack as `fluxbridge`, installed or not)

from fluxbridge.headless import factory
from fluxbridge.runtime import host  # noqa: E402
from fluxbridge import pipeline as P  # noqa: E402
from fluxbridge.pipeline.sample import sample  # noqa: E402


# ------------------------------------------------------------------------------------------ the two loops

def ours(transformer, conditioning, latent, sigmas, seed):
    steps = sigmas.numel() - 1
    return sample(transformer, conditioning, latent, sigmas, seed=seed, progress=host.progress(steps),
                  check_interrupt=host.check_interrupt)["samples"]


@torch.no_grad()
def floor(transformer, hidden, pooled, guidance, sigmas, seed, shape):
    """The plainest loop doing the same work: same noise, same transformer inputs, same Euler update."""
    b, c, h, w = shape
    fmt = P.LatentFormat()
    x = P.pack(P.noise(seed, shape))  # sigma 1: the start is pure noise
    img_ids, txt_ids = P.image_ids(h // 2, w // 2), P.text_ids(hidden.shape[1])
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        v = transformer(hidden_states=x, timestep=sigmas[i:i + 1], guidance=guidance, pooled_projections=pooled,
                        encoder_hidden_states=hidden, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        x = x + v * (s[i + 1] - s[i])
    return fmt.process_out(P.unpack(x, h, w))


class StoredOutput(torch.nn.Module):
    """Stands in for the transformer (same config, one parameter) and returns a stored tensor: what remains
    of a loop's time is its own per-step work."""

    def __init__(self, transformer, out):
        super().__init__()
        self.config = transformer.config
        self.anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
        self.out = out

    @property
    def dtype(self):
        return torch.float32

    def forward(self, hidden_states, **kwargs):
        return (self.out,)


# ----------------------------------------------------------------------------------------------- timing

def timed(fn):
    gc.collect()
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def interleaved(a, b, runs: int, warmup: int = 2):
    """Times of a and b over `runs` rounds, alternating which goes first; returns (ta, tb, ratios a/b)."""
    for _ in range(warmup):
        a(), b()
    ta, tb = [], []
    for r in range(runs):
        if r % 2 == 0:
            x, _ = timed(a)
            y, _ = timed(b)
        else:
            y, _ = timed(b)
            x, _ = timed(a)
        ta.append(x)
        tb.append(y)
    return ta, tb, [x / y for x, y in zip(ta, tb)]


def mmm(values, scale=1.0, fmt="{:.3f}") -> str:
    """min / median / max."""
    lo, med, hi = min(values), statistics.median(values), max(values)
    return " / ".join(fmt.format(v * scale) for v in (lo, med, hi))


# ------------------------------------------------------------------------------------------------- main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20, help="interleaved rounds (one run of each per round)")
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--size", type=int, default=256, help="image size in pixels (square, multiple of 16)")
    ap.add_argument("--text-tokens", type=int, default=64)
    ap.add_argument("--width", type=int, default=256, help="transformer width (heads of 128)")
    ap.add_argument("--double", type=int, default=2)
    ap.add_argument("--single", type=int, default=4)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (0: torch's default). 1 by default: on a shared machine, OpenMP threads "
                         "that wait for each other make times swing by 10x and more")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import logging
    logging.getLogger("fluxbridge.pipeline").setLevel(logging.ERROR)

    text_width = 64
    tr = factory.tiny_flux_transformer(width=args.width, heads=args.width // 128, double=args.double,
                                       single=args.single, joint_attention_dim=text_width,
                                       pooled_projection_dim=text_width)
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(1, args.text_tokens, text_width, generator=g)
    pooled = torch.randn(1, text_width, generator=g)
    conditioning = [[hidden, {"pooled_output": pooled, "guidance": 3.5}]]
    guidance = torch.full([1], 3.5)
    latent = P.empty_latent(args.size, args.size)
    shape = latent["samples"].shape
    tokens = (shape[2] // 2) * (shape[3] // 2)
    sigmas = P.flux_sigmas(args.steps, image_seq_len=tokens)
    n_params = sum(p.numel() for p in tr.parameters())

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; transformer width {args.width}, "
          f"{args.double} double + {args.single} single blocks, {n_params / 1e6:.1f} M params, float32, CPU")
    print(f"{args.size}x{args.size} px = {tokens} image tokens + {args.text_tokens} text tokens, {args.steps} steps, "
          f"{args.runs} interleaved rounds (2 warm-up)")

    run_ours = lambda: ours(tr, conditioning, latent, sigmas, args.seed)  # noqa: E731
    run_floor = lambda: floor(tr, hidden, pooled, guidance, sigmas, args.seed, shape)  # noqa: E731
    same = torch.equal(run_ours(), run_floor())
    print(f"same latent as the floor (bitwise): {same}")

    t_ours, t_floor, ratios = interleaved(run_ours, run_floor, args.runs)
    per_step = statistics.median(t_floor) / args.steps
    print("\nwhole sampling call, seconds (min / median / max):")
    print(f"  ours  {mmm(t_ours)}")
    print(f"  floor {mmm(t_floor)}   ({per_step * 1e3:.1f} ms per step)")

    # the loop alone: a transformer that costs nothing
    v = torch.randn(1, tokens, 64, generator=g)
    null = StoredOutput(tr, v)
    n_null = max(args.runs * 5, 50)
    t_on, t_fn, _ = interleaved(lambda: ours(null, conditioning, latent, sigmas, args.seed),
                                lambda: floor(null, hidden, pooled, guidance, sigmas, args.seed, shape), n_null)
    us_ours = statistics.median(t_on) / args.steps * 1e6
    us_floor = statistics.median(t_fn) / args.steps * 1e6
    print(f"\nloop alone (transformer replaced by a stored output, {n_null} rounds), microseconds per step "
          f"(min / median / max):")
    print(f"  ours  {mmm(t_on, 1e6 / args.steps, '{:.0f}')}   (setup + {args.steps} steps + unpack, per step)")
    print(f"  floor {mmm(t_fn, 1e6 / args.steps, '{:.0f}')}")
    extra = (us_ours - us_floor) / (per_step * 1e6)
    print(f"  ours' extra work = {us_ours - us_floor:.0f} us per step = {extra * 100:.2f} % of one forward")

    print(f"\nratio ours / floor (per interleaved pair, min / median / max): {mmm(ratios)}   (target <= 1.02)")
    print(f"ratio of the medians: {statistics.median(t_ours) / statistics.median(t_floor):.3f}")


if __name__ == "__main__":
    sys.exit(main())
