"""LoRA apply / unpatch against diffusers, at FLUX.1's real width.

A full-width FluxTransformer2DModel skeleton (D = 3072, 24 heads; 2 double and 4 single blocks; bf16,
random weights) and a rank-32 LoRA over every block linear, each written once as a file. Every measurement
runs in a fresh process that loads the model with `convert.load.load_model` (bf16, no cast: the weights are
views of the file) and, except for `views`, makes each weight a private copy, as a model on a GPU or cast on
load holds them (the copies stay re-readable from the file: `convert.origins`):

  ours      load_lora(file) + apply_loras(model, origins=...)   then remove(): the originals were not kept,
            they are read again from the model file, bitwise
  kept      the same without origins: the originals are kept until removal (what every apply did before)
  views     ours on the model as loaded (views of the file): the originals are kept, as the file's own pages
            (they stay in RSS while mapped, as clean page cache the kernel can drop and read again)
  diffusers FluxPipeline.load_lora_weights(file) + fuse_lora()   then unfuse_lora() + unload_lora_weights()

Fresh processes, so no side inherits another's allocator state (memory one side freed is memory the next need
not fault in: in one process, whichever runs second looked up to 2x faster); several rounds, the order rotated.
Prints per round the apply ratio ours / diffusers and its median (the figure to quote on a noisy machine),
median times, peak resident memory above the model's own while applying (psutil every 5 ms, and the kernel's
high-water mark) and while removing, whether every weight equals the file's again after each removal (bitwise,
every round, every variant of ours), and the largest difference between our fused model and diffusers'.

Every process runs with `--threads` torch threads (1 by default, as in the other scripts: on the shared
2-core machine, two OpenMP threads contending with other work made the same apply take 1.5 s or 16 s).

    python bench/bench_lora.py [--format diffusers|kohya] [--rank 32] [--double 2] [--single 4] [--rounds 5]
                               [--threads 1]
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

from fluxbridge.convert.lora import apply_loras, load_lora  # noqa: E402
from fluxbridge.convert.lora.synth import Entry, write_keys  # noqa: E402

SIDES = ("ours", "kept", "views", "diffusers")
WATCHED = "transformer_blocks.0.attn."  # the fused weights compared between the two


def skeleton(double: int, single: int, dtype=torch.bfloat16, seed: int = 0, fill: bool = True):
    """FLUX.1-width transformer with few blocks: built on meta, filled with N(0, 0.02) in `dtype` (or left
    on the meta device for `load_skeleton`)."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel
    with init_empty_weights():
        model = FluxTransformer2DModel(in_channels=64, num_layers=double, num_single_layers=single,
                                       attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                       pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    if not fill:
        return model
    model = model.to_empty(device="cpu").to(dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).mul_(0.02).to(dtype))
    return model.eval().requires_grad_(False)


def block_linears(model, naming: str) -> dict[str, tuple[int, int]]:
    """Every Linear inside the blocks: diffusers names, or the BFL (fused) modules for kohya."""
    lin = {n: (m.out_features, m.in_features) for n, m in model.named_modules()
           if isinstance(m, torch.nn.Linear) and "transformer_blocks." in n}
    if naming == "diffusers":
        return lin
    out = {}
    D = model.config.num_attention_heads * model.config.attention_head_dim
    for i in range(model.config.num_layers):
        d = f"double_blocks.{i}."
        for s in ("img", "txt"):
            out.update({d + f"{s}_mod.lin": (6 * D, D), d + f"{s}_attn.qkv": (3 * D, D), d + f"{s}_attn.proj": (D, D),
                        d + f"{s}_mlp.0": (4 * D, D), d + f"{s}_mlp.2": (D, 4 * D)})
    for i in range(model.config.num_single_layers):
        s = f"single_blocks.{i}."
        out.update({s + "linear1": (7 * D, D), s + "linear2": (D, 5 * D), s + "modulation.lin": (3 * D, D)})
    return out


def make_lora(path: Path, model, fmt: str, rank: int, dtype=torch.bfloat16) -> int:
    g = torch.Generator().manual_seed(1)
    entries = [Entry(n, "lora", {"down": (torch.randn(rank, i, generator=g) * 0.01).to(dtype),
                                 "up": (torch.randn(o, rank, generator=g) * 0.01).to(dtype)},
                     alpha=float(rank) if fmt == "kohya" else None)
               for n, (o, i) in block_linears(model, "diffusers" if fmt == "diffusers" else "bfl").items()]
    sd, meta = write_keys(entries, fmt)
    from safetensors.torch import save_file
    save_file(sd, str(path), metadata=meta or None)
    return len(entries)


def load(path: Path, copies: bool):
    """The model as `load_model` leaves it (views of the file), or with every weight a private copy."""
    from fluxbridge.convert.load import load_model
    loaded = load_model(path, family="flux-transformer", dtype=torch.bfloat16)
    if copies:
        for p in loaded.model.parameters():
            p.data = p.data.clone()
    return loaded


def restored(model, path: Path) -> bool:
    """Every weight equals the file's, bitwise (compared with the file's own pages: no snapshot in memory)."""
    from safetensors.torch import load_file
    file = load_file(str(path))
    return all(torch.equal(p, file[n.replace(".base_layer", "")]) for n, p in model.named_parameters()
               if ".lora_" not in n)


def child(side: str, model_path: Path, lora_path: Path, fused_path: Path) -> dict:
    """One measurement in this (fresh) process: apply and remove, one of ours or diffusers'."""
    from safetensors.torch import save_file
    loaded = load(model_path, copies=side != "views")
    model = loaded.model
    touch(model)  # every page resident before the baseline

    def watched():  # block 0's attention weights, under their plain names (PEFT adds ".base_layer")
        return {n.replace(".base_layer", ""): p.detach().clone() for n, p in model.named_parameters()
                if n.startswith(WATCHED) and ".lora_" not in n}

    out = {}
    if side != "diffusers":
        origins = None if side == "kept" else loaded.origins
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            handle = apply_loras(model, "flux-transformer", [(load_lora(lora_path), 1.0)], origins=origins)
            out["apply"] = time.perf_counter() - t0
        if side == "ours":
            save_file(watched(), str(fused_path))
        with PeakRSS() as mem_remove:
            t0 = time.perf_counter()
            handle.remove()
            out["remove"] = time.perf_counter() - t0
        out.update(mem=mem.above, mem_remove=mem_remove.above, patched=len(handle.reports[0]["applied"]["patched"]),
                   originals=handle.reports[0]["applied"]["originals"], restored=restored(model, model_path))
    else:
        from diffusers import FluxPipeline
        from diffusers.utils import logging as dlog
        from fluxbridge.headless.factory import tiny_clip_l, tiny_scheduler
        dlog.set_verbosity_error()
        pipe = FluxPipeline(scheduler=tiny_scheduler(), vae=None, text_encoder=tiny_clip_l(), tokenizer=None,
                            text_encoder_2=None, tokenizer_2=None, transformer=model)
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            pipe.load_lora_weights(str(lora_path))
            pipe.fuse_lora(components=["transformer"])
            out["apply"] = time.perf_counter() - t0
        save_file(watched(), str(fused_path))
        with PeakRSS() as mem_remove:
            t0 = time.perf_counter()
            pipe.unfuse_lora(components=["transformer"])
            pipe.unload_lora_weights()
            out["remove"] = time.perf_counter() - t0
        out.update(mem=mem.above, mem_remove=mem_remove.above)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--format", default="diffusers", choices=("diffusers", "kohya"), help="the LoRA file's format")
    ap.add_argument("--rank", type=int, default=32, help="LoRA rank (default 32)")
    ap.add_argument("--double", type=int, default=2, help="double blocks of the FLUX.1-width model (default 2)")
    ap.add_argument("--single", type=int, default=4, help="single blocks (default 4)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds, each side in a fresh process (default 5)")
    ap.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)  # one side, in a fresh process
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    ap.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help="torch threads in every process (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        tmp = Path(args.dir)
        print(json.dumps(child(args.child, tmp / "model.safetensors", tmp / f"lora_{args.format}.safetensors",
                               tmp / f"fused_{args.child}_{args.round}.safetensors")))
        return
    import psutil
    from safetensors.torch import load_file, save_file

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {psutil.cpu_count()} CPUs")
    t = time.perf_counter()
    model = skeleton(args.double, args.single)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: D=3072, {args.double} double + {args.single} single blocks, bf16, "
          f"{n_params / 1e9:.2f} B params ({n_params * 2 / 2**30:.2f} GiB), built in {time.perf_counter() - t:.1f} s")
    got = {side: [] for side in SIDES}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        lora_path = tmp / f"lora_{args.format}.safetensors"
        modules = make_lora(lora_path, model, args.format, args.rank)
        save_file(model.state_dict(), str(tmp / "model.safetensors"))
        del model
        print(f"LoRA: {args.format}, rank {args.rank}, {modules} modules, {lora_path.stat().st_size / 2**20:.0f} MiB; "
              f"{args.rounds} rounds of {len(SIDES)} fresh processes ({', '.join(SIDES)}), the order rotated")
        for r in range(args.rounds):
            for side in SIDES[r % len(SIDES):] + SIDES[:r % len(SIDES)]:
                got[side].append(fresh_process(__file__, "--child", side, "--dir", tmp, "--round", r,
                                                "--format", args.format, "--threads", args.threads))
            a, b = got["ours"][-1], got["diffusers"][-1]
            print(f"  round {r + 1}: apply ours {a['apply']:5.2f} s, diffusers {b['apply']:5.2f} s, "
                  f"ours / diffusers {a['apply'] / b['apply']:.2f}x; peak RSS above the model ours "
                  f"+{a['mem'] / 2**30:.2f} GiB, kept +{got['kept'][-1]['mem'] / 2**30:.2f} GiB, "
                  f"diffusers +{b['mem'] / 2**30:.2f} GiB")
        ours_w, diff_w = load_file(str(tmp / "fused_ours_0.safetensors")), load_file(str(tmp / "fused_diffusers_0.safetensors"))
        worst = max(float((ours_w[n].float() - diff_w[n].float()).abs().max()) for n in ours_w)
    med = statistics.median
    gib = 2 ** 30

    def line(side, what):
        xs = got[side]
        extra = ""
        if side != "diffusers":
            extra = (f"   restored bitwise every round: {all(x['restored'] for x in xs)}   originals "
                     f"{ {k: v for k, v in xs[0]['originals'].items() if v} }")
        print(f"{side:9s} {what:40s} apply {med([x['apply'] for x in xs]):6.2f} s   peak RSS "
              f"+{max(x['mem'] for x in xs) / gib:.2f} GiB   remove {med([x['remove'] for x in xs]):6.3f} s "
              f"(peak +{max(x['mem_remove'] for x in xs) / gib:.2f} GiB){extra}")

    line("ours", "copies, originals read again")
    line("kept", "copies, originals kept")
    line("views", "file views, originals kept (free)")
    line("diffusers", "load_lora_weights + fuse_lora")
    ratios = sorted(a["apply"] / b["apply"] for a, b in zip(got["ours"], got["diffusers"]))
    print(f"apply, ours / diffusers per round: median {med(ratios):.2f}x  (min {ratios[0]:.2f}, "
          f"max {ratios[-1]:.2f}; target <= 0.5)")
    ours_mem, diff_mem = max(x["mem"] for x in got["ours"]), max(x["mem"] for x in got["diffusers"])
    print(f"peak RSS above the model while applying: ours +{ours_mem / gib:.2f} GiB, diffusers +{diff_mem / gib:.2f} "
          f"GiB (target: ours <= diffusers)")
    kept_mem = max(x["mem"] for x in got["kept"])
    print(f"read-again removal against kept originals: {(kept_mem - ours_mem) / gib:.2f} GiB less held while "
          f"applied; removal {med([x['remove'] for x in got['ours']]):.3f} s vs "
          f"{med([x['remove'] for x in got['kept']]):.3f} s")
    print(f"largest |ours - diffusers| on block 0 attention weights, round 1 (bf16): {worst:.3g}")


if __name__ == "__main__":
    sys.exit(main())
