"""LoRA apply / unpatch against diffusers, at FLUX.1's real width.

A full-width FluxTransformer2DModel skeleton (D = 3072, 24 heads; 2 double and 4 single blocks; bf16,
random weights) and a rank-32 LoRA over every block linear, each written once as a file. Measured in the
same run, on the same weights:

  ours      load_lora(file) + apply_loras(model)          then handle.remove() (bitwise restore)
  diffusers FluxPipeline.load_lora_weights(file) + fuse_lora()   then unfuse_lora() + unload_lora_weights()

Each measurement runs in a fresh process that first reads the model file into memory, so neither side
inherits the other's allocator state (memory one side freed is memory the other need not fault in: in one
process, whichever runs second looked up to 2x faster). Several rounds, the order alternating. Prints each
round's ratio ours / diffusers and their median (the figure to quote on a noisy machine), median times,
the largest difference between the two fused models, and the peak resident memory above the model's own
during each phase (psutil, sampled every 5 ms; the largest over the rounds).

    python bench/bench_lora.py [--format diffusers|kohya] [--rank 32] [--double 2] [--single 4] [--rounds 5]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

import checkout  # noqa: E402,F401  (the pack as `fluxbridge`, installed or not)

from fluxbridge.convert.lora import apply_loras, load_lora  # noqa: E402
from fluxbridge.convert.lora.synth import Entry, write_keys  # noqa: E402

WATCHED = "transformer_blocks.0.attn."  # the fused weights compared between the two


class PeakRSS:
    """Peak RSS above the level at entry, sampled in a thread."""

    def __init__(self):
        import psutil
        self.proc = psutil.Process()
        self.peak = 0

    def __enter__(self):
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def above(self) -> float:
        return (self.peak - self.base) / 2**30


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


def load_skeleton(path: Path, double: int, single: int):
    """The skeleton with the weights of `path` read into (anonymous) memory, as a loader leaves them."""
    from safetensors.torch import load_file
    model = skeleton(double, single, fill=False)
    weights = {n: t.clone() for n, t in load_file(str(path)).items()}  # private copies, never the file's pages
    model.load_state_dict(weights, assign=True)
    return model.eval().requires_grad_(False)


def child(side: str, model_path: Path, lora_path: Path, fused_path: Path, double: int, single: int) -> dict:
    """One measurement in this (fresh) process: apply and remove, ours or diffusers'."""
    from safetensors.torch import save_file
    model = load_skeleton(model_path, double, single)

    def watched():  # block 0's attention weights, under their plain names (PEFT adds ".base_layer")
        return {n.replace(".base_layer", ""): p.detach().clone() for n, p in model.named_parameters()
                if n.startswith(WATCHED) and ".lora_" not in n}

    out = {}
    if side == "ours":
        before = watched()
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            handle = apply_loras(model, "flux-transformer", [(load_lora(lora_path), 1.0)])
            out["apply"] = time.perf_counter() - t0
        save_file(watched(), str(fused_path))
        with PeakRSS() as mem_remove:
            t0 = time.perf_counter()
            handle.remove()
            out["remove"] = time.perf_counter() - t0
        out.update(mem=mem.above, mem_remove=mem_remove.above, patched=len(handle.reports[0]["applied"]["patched"]),
                   restored=all(torch.equal(w, before[n]) for n, w in watched().items()))
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
        t0 = time.perf_counter()
        pipe.unfuse_lora(components=["transformer"])
        pipe.unload_lora_weights()
        out.update(remove=time.perf_counter() - t0, mem=mem.above)
    return out


def run_child(side: str, args, tmp: Path, r: int) -> dict:
    cmd = [sys.executable, __file__, "--child", side, "--dir", str(tmp), "--round", str(r),
           "--format", args.format, "--double", str(args.double), "--single", str(args.single)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--format", default="diffusers", choices=("diffusers", "kohya"))
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--double", type=int, default=2)
    ap.add_argument("--single", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--child", choices=("ours", "diffusers"))
    ap.add_argument("--dir")
    ap.add_argument("--round", type=int, default=0)
    args = ap.parse_args(argv)
    if args.child:
        tmp = Path(args.dir)
        print(json.dumps(child(args.child, tmp / "model.safetensors", tmp / f"lora_{args.format}.safetensors",
                               tmp / f"fused_{args.child}_{args.round}.safetensors", args.double, args.single)))
        return
    import psutil
    from safetensors.torch import load_file, save_file

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {psutil.cpu_count()} CPUs")
    t = time.perf_counter()
    model = skeleton(args.double, args.single)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: D=3072, {args.double} double + {args.single} single blocks, bf16, "
          f"{n_params / 1e9:.2f} B params, built in {time.perf_counter() - t:.1f} s")
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        lora_path = tmp / f"lora_{args.format}.safetensors"
        modules = make_lora(lora_path, model, args.format, args.rank)
        save_file(model.state_dict(), str(tmp / "model.safetensors"))
        del model
        print(f"LoRA: {args.format}, rank {args.rank}, {modules} modules, {lora_path.stat().st_size / 2**20:.0f} MiB; "
              f"{args.rounds} rounds of two fresh processes, the order alternating")
        for r in range(args.rounds):
            first, second = ("ours", "diffusers") if r % 2 == 0 else ("diffusers", "ours")
            got = {first: run_child(first, args, tmp, r)}
            got[second] = run_child(second, args, tmp, r)
            a, b = got["ours"], got["diffusers"]
            rounds.append((a, b))
            print(f"  round {r + 1}: ours {a['apply']:5.2f} s, diffusers {b['apply']:5.2f} s, "
                  f"ours / diffusers {a['apply'] / b['apply']:.2f}x")
        ours_w, diff_w = load_file(str(tmp / "fused_ours_0.safetensors")), load_file(str(tmp / "fused_diffusers_0.safetensors"))
        worst = max(float((ours_w[n].float() - diff_w[n].float()).abs().max()) for n in ours_w)
    a0 = rounds[0][0]
    ratios = sorted(a["apply"] / b["apply"] for a, b in rounds)
    med = statistics.median
    print(f"ours:      apply {med([a['apply'] for a, _ in rounds]):6.2f} s ({a0['patched']} modules)   "
          f"peak RSS +{max(a['mem'] for a, _ in rounds):.2f} GiB")
    print(f"           remove {med([a['remove'] for a, _ in rounds]):5.3f} s   bitwise restored every round: "
          f"{all(a['restored'] for a, _ in rounds)}   peak RSS +{max(a['mem_remove'] for a, _ in rounds):.2f} GiB")
    print(f"diffusers: load_lora_weights + fuse_lora {med([b['apply'] for _, b in rounds]):6.2f} s   "
          f"peak RSS +{max(b['mem'] for _, b in rounds):.2f} GiB")
    print(f"           unfuse_lora + unload_lora_weights {med([b['remove'] for _, b in rounds]):5.2f} s")
    print(f"apply, ours / diffusers per round: median {med(ratios):.2f}x  (min {ratios[0]:.2f}, "
          f"max {ratios[-1]:.2f}; target <= 0.5)")
    print(f"largest |ours - diffusers| on block 0 attention weights, round 1 (bf16): {worst:.3g}")


if __name__ == "__main__":
    sys.exit(main())
