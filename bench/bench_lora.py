"""LoRA apply / unpatch against diffusers, at FLUX.1's real width.

A full-width FluxTransformer2DModel skeleton (D = 3072, 24 heads; 2 double and 4 single blocks; bf16,
random weights) and a rank-32 LoRA over every block linear, written once as a file. Measured in the
same run, on the same model:

  ours      load_lora(file) + apply_loras(model)          then handle.remove() (bitwise restore)
  diffusers FluxPipeline.load_lora_weights(file) + fuse_lora()   then unfuse_lora() + unload_lora_weights()

Prints times, the ratio diffusers / ours, the largest difference between the two fused models, and the
peak resident memory above the model's own during each phase (psutil, sampled every 5 ms).

    python bench/bench_lora.py [--format diffusers|kohya] [--rank 32] [--double 2] [--single 4]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

import checkout  # noqa: E402,F401  (the pack as `fluxbridge`, installed or not)

from fluxbridge.convert.lora import apply_loras, load_lora  # noqa: E402
from fluxbridge.convert.lora.synth import Entry, write_keys  # noqa: E402


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


def skeleton(double: int, single: int, dtype=torch.bfloat16, seed: int = 0):
    """FLUX.1-width transformer with few blocks: built on meta, filled with N(0, 0.02) in `dtype`."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel
    with init_empty_weights():
        model = FluxTransformer2DModel(in_channels=64, num_layers=double, num_single_layers=single,
                                       attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                       pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--format", default="diffusers", choices=("diffusers", "kohya"))
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--double", type=int, default=2)
    ap.add_argument("--single", type=int, default=4)
    args = ap.parse_args(argv)
    import psutil
    from diffusers import FluxPipeline
    from diffusers.utils import logging as dlog
    from fluxbridge.factory import tiny_clip_l, tiny_scheduler
    dlog.set_verbosity_error()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {psutil.cpu_count()} CPUs")
    t = time.perf_counter()
    model = skeleton(args.double, args.single)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: D=3072, {args.double} double + {args.single} single blocks, bf16, "
          f"{n_params / 1e9:.2f} B params, built in {time.perf_counter() - t:.1f} s")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"lora_{args.format}.safetensors"
        modules = make_lora(path, model, args.format, args.rank)
        print(f"LoRA: {args.format}, rank {args.rank}, {modules} modules, {path.stat().st_size / 2**20:.0f} MiB")
        names = [n for n, _ in model.named_parameters()]
        before = {n: p.detach().clone() for n, p in model.named_parameters() if "transformer_blocks.0.attn" in n}

        # ours
        with PeakRSS() as mem_ours:
            t0 = time.perf_counter()
            handle = apply_loras(model, "flux-transformer", [(load_lora(path), 1.0)])
            t_ours = time.perf_counter() - t0
        patched = len(handle.reports[0]["applied"]["patched"])
        ours_w = {n: p.detach().clone() for n, p in model.named_parameters() if n in before}
        with PeakRSS() as mem_remove:
            t0 = time.perf_counter()
            handle.remove()
            t_remove = time.perf_counter() - t0
        restored = all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)

        # diffusers, same model, same file
        pipe = FluxPipeline(scheduler=tiny_scheduler(), vae=None, text_encoder=tiny_clip_l(), tokenizer=None,
                            text_encoder_2=None, tokenizer_2=None, transformer=model)
        with PeakRSS() as mem_diff:
            t0 = time.perf_counter()
            pipe.load_lora_weights(str(path))
            pipe.fuse_lora(components=["transformer"])
            t_diff = time.perf_counter() - t0
        diff_w = {n.replace(".base_layer", ""): p.detach().clone() for n, p in model.named_parameters()
                  if n.replace(".base_layer", "") in before}
        t0 = time.perf_counter()
        pipe.unfuse_lora(components=["transformer"])
        pipe.unload_lora_weights()
        t_diff_remove = time.perf_counter() - t0
        worst = max(float((ours_w[n].float() - diff_w[n].float()).abs().max()) for n in before)
        del names

    print(f"ours:      apply {t_ours:6.2f} s  ({patched} modules)   peak RSS +{mem_ours.above:.2f} GiB")
    print(f"           remove {t_remove:5.3f} s  bitwise restored: {restored}   peak RSS +{mem_remove.above:.2f} GiB")
    print(f"diffusers: load_lora_weights + fuse_lora {t_diff:6.2f} s   peak RSS +{mem_diff.above:.2f} GiB")
    print(f"           unfuse_lora + unload_lora_weights {t_diff_remove:5.2f} s")
    print(f"ratio diffusers / ours (apply): {t_diff / t_ours:.2f}x")
    print(f"largest |ours - diffusers| on block 0 attention weights (bf16): {worst:.3g}")


if __name__ == "__main__":
    sys.exit(main())
