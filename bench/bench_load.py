"""Loading and converting a full-width Flux checkpoint, as ratios against references in the same run.

Checkpoint: real BFL key names and shapes at D = 3072 with 2 double + 4 single blocks, bf16 (~2.6 GB).
Each measurement runs in a fresh process (peak RSS is per process), warm page cache; N rounds, the task order
rotated every round; ratios are taken pair by pair within a round and the median is printed:

  load   ours: `load_model` to a ready model (then every parameter page read)  vs
         diffusers: `FluxTransformer2DModel.from_single_file(config=local)` (+ the same page read)
         plain read: the file read into memory
  convert ours: `convert_file` BFL -> diffusers                                vs  plain copy (shutil + fsync)

Targets: load <= 0.5x diffusers and <= 1.3x plain read; load peak RSS <= 1.15x file;
convert <= 1.3x copy with peak RSS < 25 % of the file.
Run: python bench/bench_load.py [--runs 5] [--dir /tmp/fluxbridge-bench]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import time
from pathlib import Path

import checkout  # noqa: F401  (the pack as `fluxbridge`, installed or not)
from memory import fresh_process, touch

D, DOUBLE, SINGLE = 3072, 2, 4


def bfl_shapes(d=D, double=DOUBLE, single=SINGLE, guidance=True):
    m = 4 * d
    shapes = {"img_in": (d, 64), "txt_in": (d, 4096), "time_in.in_layer": (d, 256), "time_in.out_layer": (d, d),
              "vector_in.in_layer": (d, 768), "vector_in.out_layer": (d, d),
              "final_layer.linear": (64, d), "final_layer.adaLN_modulation.1": (2 * d, d)}
    if guidance:
        shapes.update({"guidance_in.in_layer": (d, 256), "guidance_in.out_layer": (d, d)})
    for i in range(double):
        for s in ("img", "txt"):
            p = f"double_blocks.{i}.{s}_"
            shapes.update({p + "mod.lin": (6 * d, d), p + "attn.qkv": (3 * d, d), p + "attn.proj": (d, d),
                           p + "mlp.0": (m, d), p + "mlp.2": (d, m)})
    for i in range(single):
        p = f"single_blocks.{i}."
        shapes.update({p + "linear1": (3 * d + m, d), p + "linear2": (d, d + m), p + "modulation.lin": (3 * d, d)})
    out = {}
    for name, shape in shapes.items():
        out[name + ".weight"], out[name + ".bias"] = shape, shape[:1]
    for i in range(double):
        for s in ("img", "txt"):
            for n in ("query_norm", "key_norm"):
                out[f"double_blocks.{i}.{s}_attn.norm.{n}.scale"] = (128,)
    for i in range(single):
        for n in ("query_norm", "key_norm"):
            out[f"single_blocks.{i}.norm.{n}.scale"] = (128,)
    return out


def make_checkpoint(path: Path):
    import torch
    from safetensors.torch import save_file
    if path.exists():
        return
    g = torch.Generator().manual_seed(0)
    tensors = {k: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for k, s in bfl_shapes().items()}
    save_file(tensors, str(path))


def make_config(folder: Path):
    from fluxbridge.convert.families import flux
    folder.mkdir(parents=True, exist_ok=True)
    cfg = dict(_class_name="FluxTransformer2DModel", patch_size=1, in_channels=64, out_channels=64,
               num_layers=DOUBLE, num_single_layers=SINGLE, attention_head_dim=128,
               num_attention_heads=D // 128, joint_attention_dim=4096, pooled_projection_dim=768,
               guidance_embeds=True, axes_dims_rope=list(flux.default_axes(128)))
    (folder / "config.json").write_text(json.dumps(cfg))


# ----------------------------------------------------------------------------------- child tasks

def peak_rss() -> int:
    """This process's peak resident set (VmHWM; unlike ru_maxrss it is not inherited across exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(task: str, ckpt: str, work: str) -> dict:
    # Libraries are imported before the clock starts: we time loading, not Python start-up.
    import torch
    from diffusers import FluxTransformer2DModel
    from fluxbridge.convert.load import load_model
    from fluxbridge.convert.write import convert_file
    base_rss = peak_rss()
    t0 = time.perf_counter()
    if task == "read":
        with open(ckpt, "rb") as f:
            data = f.read()
        assert len(data) > 0
    elif task == "ours":
        model = load_model(ckpt, dtype=torch.bfloat16).model
        touch(model)
    elif task == "diffusers":
        model = FluxTransformer2DModel.from_single_file(ckpt, config=str(Path(work) / "config"),
                                                        torch_dtype=torch.bfloat16)
        touch(model)
    elif task == "copy":  # durable, as `convert` is (it fsyncs before renaming into place)
        dst = Path(work) / "copy.safetensors"
        shutil.copyfile(ckpt, dst)
        fd = os.open(dst, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    elif task == "convert":
        convert_file(ckpt, Path(work) / "converted.safetensors", "diffusers")
    else:
        raise SystemExit(f"unknown task {task}")
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_rss": peak_rss() - base_rss}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="rounds, the task order rotated every round (default 5)")
    ap.add_argument("--dir", default="/tmp/fluxbridge-bench",
                    help="where the checkpoint and the outputs are written (default /tmp/fluxbridge-bench)")
    ap.add_argument("--child", help=argparse.SUPPRESS)  # one task, in a fresh process (set by the parent)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.ckpt, args.dir)))
        return
    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / "flux-d3072-2x4-bf16.safetensors"
    make_checkpoint(ckpt)
    make_config(work / "config")
    size = ckpt.stat().st_size
    tasks = ("read", "ours", "diffusers", "copy", "convert")
    outputs = {"copy": work / "copy.safetensors", "convert": work / "converted.safetensors"}
    results = {t: [] for t in tasks}
    fresh_process(__file__, "--child", "read", "--ckpt", ckpt, "--dir", work)  # warm the page cache
    for r in range(args.runs):
        order = tasks[r % len(tasks):] + tasks[:r % len(tasks)]  # rotated each round: no task always follows another
        for t in order:  # interleaved, so drift hits every task alike
            if t in outputs:  # both write a new file: neither pays for freeing the last run's 2.6 GB
                outputs[t].unlink(missing_ok=True)
                os.sync()
            results[t].append(fresh_process(__file__, "--child", t, "--ckpt", ckpt, "--dir", work))
    for out in outputs.values():
        out.unlink(missing_ok=True)
    med = {t: statistics.median(r["seconds"] for r in results[t]) for t in tasks}
    rss = {t: max(r["peak_rss"] for r in results[t]) for t in tasks}  # growth over the imports
    print(f"checkpoint: {size / 1e9:.2f} GB, D={D}, {DOUBLE} double + {SINGLE} single blocks, bf16; "
          f"{args.runs} rounds, warm page cache")
    for t in tasks:
        print(f"  {t:10s} median {med[t]:7.3f} s  (min {min(r['seconds'] for r in results[t]):.3f}, max "
              f"{max(r['seconds'] for r in results[t]):.3f})   peak RSS growth {rss[t] / 1e9:6.2f} GB")

    def ratio(a, b, label, target):  # pair by pair within a round, so drift between rounds cancels
        rs = sorted(x["seconds"] / y["seconds"] for x, y in zip(results[a], results[b]))
        print(f"  {label:35s}: {statistics.median(rs):.2f}x   (min {rs[0]:.2f}, max {rs[-1]:.2f}; "
              f"target <= {target})")

    print("ratios, per round, median:")
    ratio("ours", "diffusers", "load vs diffusers from_single_file", 0.5)
    ratio("ours", "read", "load vs plain read", 1.3)
    ratio("convert", "copy", "convert vs plain copy", 1.3)
    print(f"  {'load peak RSS vs file size':35s}: {rss['ours'] / size:.2f}x   (target <= 1.15)")
    print(f"  {'convert peak RSS vs file size':35s}: {rss['convert'] / size:.2f}x   (target < 0.25)")


if __name__ == "__main__":
    main()
