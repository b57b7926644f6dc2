"""fp8 stays fp8 on load: peak resident memory of loading an fp8 FLUX.1 checkpoint, against the file's size.

A FLUX.1-width transformer (D = 3072, 24 heads; 2 double + 4 single blocks by default) is written once in
BFL layout the way the published fp8 files are: every 2-D weight in float8_e4m3fn, biases and norm scales in
bf16; `--scaled` writes ComfyUI's scaled fp8 instead (a `scale_weight` per layer and the `scaled_fp8`
marker). Each measurement then runs in a fresh process, after its imports:

  ours    `runtime.models.load_transformer(path, weight_dtype="fp8_e4m3fn")`, what FluxBridge Load Transformer
          calls (standalone host, CPU: compute dtype float32), then every weight byte read once (all pages in)
  before  what that loader did before this change: `load_model(path, dtype=compute)` (every tensor cast to the
          compute dtype), then `enable_layerwise_casting(fp8, compute)`, then every weight byte read once
  forward `ours`, then one forward pass of the model (64 image + 32 text tokens): each layer upcast as it runs

Peak RSS above the level after imports (sampled every 5 ms, and the kernel's high-water mark); the reference
is the size of the fp8 file measured in the same run. Target: ours <= 1.1x the file.

    python bench/bench_fp8_load.py [--double 2] [--single 4] [--scaled] [--rounds 3] [--dir DIR]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import checkout  # noqa: E402,F401  (the pack as `fluxbridge`, installed or not)
from memory import PeakRSS, fresh_process, touch  # noqa: E402

E4M3 = torch.float8_e4m3fn


def write_file(path: Path, double: int, single: int, scaled: bool) -> int:
    """The fp8 checkpoint, tensor by tensor (never a whole model in memory); returns its size in bytes."""
    from bench_lora import skeleton

    from fluxbridge.convert.families import flux
    from fluxbridge.convert.quant import quantize_fp8
    from fluxbridge.convert.safetensors_io import write_safetensors
    from fluxbridge.convert.table import A, B

    shapes = {k: tuple(v.shape) for k, v in skeleton(double, single, fill=False).state_dict().items()}
    plan, _ = flux.TABLE.convert(shapes, B, A)
    entries = []
    for i, (name, step) in enumerate(sorted(plan.items())):
        def make(shape=step.shape, seed=i):
            g = torch.Generator().manual_seed(seed)
            return torch.randn(shape, generator=g).mul_(0.02)
        if len(step.shape) == 2:
            if scaled:
                entries.append((name, step.shape, E4M3, lambda make=make: quantize_fp8(make(), E4M3)[0]))
                entries.append((name[:-len("weight")] + "scale_weight", (), torch.float32,
                                lambda make=make: quantize_fp8(make(), E4M3)[1]))
            else:
                entries.append((name, step.shape, E4M3, lambda make=make: make().to(E4M3)))
        else:
            entries.append((name, step.shape, torch.bfloat16, lambda make=make: make().to(torch.bfloat16)))
    if scaled:
        entries.append(("scaled_fp8", (0,), E4M3, lambda: torch.zeros(0, dtype=E4M3)))
    write_safetensors(path, entries, {})
    return path.stat().st_size


def child(kind: str, path: Path) -> dict:
    from diffusers import FluxTransformer2DModel  # noqa: F401  (imports before the baseline)

    from fluxbridge.convert.load import load_model
    from fluxbridge.runtime import host, models
    compute = host.compute_dtype(host.torch_device())
    out = {"compute": str(compute).replace("torch.", "")}
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        if kind == "before":
            module = load_model(path, family="flux-transformer", dtype=compute).model
            module.enable_layerwise_casting(storage_dtype=E4M3, compute_dtype=compute)
        else:
            module = models.load_transformer(path, "fp8_e4m3fn")[0].module
        out["load_s"] = time.perf_counter() - t0
        touch(module)
        if kind == "forward":
            g = torch.Generator().manual_seed(0)
            cfg = module.config
            with torch.no_grad():
                module(hidden_states=torch.randn(1, 64, cfg.in_channels, generator=g),
                       encoder_hidden_states=torch.randn(1, 32, cfg.joint_attention_dim, generator=g),
                       pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g),
                       timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]),
                       img_ids=torch.zeros(64, 3), txt_ids=torch.zeros(32, 3))
    out["peak"] = mem.above
    out["fp8_params"] = sum(p.numel() for p in module.parameters() if p.dtype == E4M3)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--double", type=int, default=2, help="double blocks of the FLUX.1-width model (default 2)")
    ap.add_argument("--single", type=int, default=4, help="single blocks (default 4)")
    ap.add_argument("--scaled", action="store_true", help="ComfyUI's scaled fp8 (a scale per layer)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds, each measurement in a fresh process (default 3)")
    ap.add_argument("--dir", help="where the temporary checkpoint is written (default: the system's temp folder)")
    ap.add_argument("--child", choices=("ours", "before", "forward"), help=argparse.SUPPRESS)  # one measurement
    ap.add_argument("--file", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, Path(args.file))))
        return
    import psutil
    print(f"torch {torch.__version__}, {psutil.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / f"flux1-dev-{'scaled-' if args.scaled else ''}fp8.safetensors"
        size = write_file(path, args.double, args.single, args.scaled)
        print(f"file: D=3072, {args.double} double + {args.single} single blocks, "
              f"{'scaled fp8 (scale_weight)' if args.scaled else 'fp8 e4m3fn'}, {size / 2**30:.2f} GiB")
        got = {k: [] for k in ("ours", "before", "forward")}
        for r in range(args.rounds):
            order = ("ours", "before", "forward") if r % 2 == 0 else ("before", "forward", "ours")
            for kind in order:
                got[kind].append(fresh_process(__file__, "--child", kind, "--file", path))
            print(f"  round {r + 1}: " + ", ".join(f"{k} {got[k][-1]['peak'] / size:.3f}x" for k in got))
    med = statistics.median
    compute = got["ours"][0]["compute"]
    for kind, what in (("ours", "load_transformer(fp8) + all weights read"),
                       ("before", f"cast to {compute} + layerwise casting + all read"),
                       ("forward", "ours + one forward")):
        peaks = [x["peak"] for x in got[kind]]
        print(f"{kind:8s} {what:45s} peak RSS above imports {med(peaks) / 2**30:6.2f} GiB = "
              f"{med(peaks) / size:.3f}x the file (max {max(peaks) / size:.3f}x); load {med(x['load_s'] for x in got[kind]):.2f} s")
    print(f"ours / file: {med(x['peak'] for x in got['ours']) / size:.3f}x (target <= 1.1); compute dtype {compute}")


if __name__ == "__main__":
    sys.exit(main())
