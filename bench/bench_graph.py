"""The whole text-to-image graph against diffusers' FluxPipeline, on the same small models, in the same run.

Small random FLUX.1-structured models (transformer width 256 = 2 heads of 128, 2 double + 4 single blocks;
CLIP-L and T5 towers 64 wide; the tiny Flux VAE) are written once into a models folder in the layouts
users download (transformer and VAE in BFL layout, CLIP-L and T5 as ComfyUI's text_encoders files; the
tokenizers are the real ones the pack carries), then loaded once through our loaders. diffusers'
FluxPipeline is built from those very modules and tokenizers, so both sides run the same weights. Model
loading is outside every timed call. Same settings on both sides: prompt, 256x256, 28 steps, guidance 3.5,
seed, max_sequence_length 64, CPU, float32. Timed, interleaved (the order of the four rotates every round):

  nodes      our node classes executed directly, in graph order, each with the previous one's outputs:
             FluxBridgeTextEncode -> FluxBridgeEmptyLatent -> FluxBridgeSampler -> FluxBridgeVAEDecode
             (returns the native IMAGE tensor)
  diffusers  FluxPipeline(prompt, ..., output_type="np") (returns the float image array)
  runner     the headless runner on example_workflows/api/flux_dev_text_to_image.json with the settings
             above as overrides: validation, the three loader nodes (cache hits: the models stay loaded,
             as they do between runs in ComfyUI), the nodes above, SaveImage (a PNG with the workflow in it)
  diffusers+png  FluxPipeline(..., output_type="pil") and the image saved as PNG (same compression level)

The nodes' image is compared with diffusers' (largest difference). Targets: nodes / diffusers <= 1.0 and
runner / diffusers+png <= 1.0 (median of the per-round ratios).
Run: python bench/bench_graph.py [--runs 12] [--steps 28] [--size 256] [--max-sequence-length 64] [--threads 1]
     python bench/bench_graph.py --only nodes|diffusers|runner|diffusers+png [--runs 3]   (one side per process)
"""
from __future__ import annotations

import argparse
import gc
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import checkout  # noqa: E402,F401  (the pack as `fluxbridge`, installed or not)

from fluxbridge.headless import factory
from fluxbridge.runtime import host, models  # noqa: E402
from fluxbridge.nodes.conditioning import TextEncode  # noqa: E402
from fluxbridge.nodes.latent import EmptyLatent, VAEDecode  # noqa: E402
from fluxbridge.nodes.sampling import Sampler  # noqa: E402
from fluxbridge.headless.runner import run_workflow  # noqa: E402
from fluxbridge.headless.workflows import examples_dir  # noqa: E402

PROMPT = "a red fox in the snow, winter forest, morning mist, soft light, highly detailed"
GUIDANCE = 3.5
WORKFLOW = "flux_dev_text_to_image.json"  # nodes: 1-3 loaders, 4 text encode, 5 latent, 6 sampler, 7 decode, 8 save
FILES = {"transformer": ("diffusion_models/flux1-dev.safetensors", "bfl"),
         "vae": ("vae/ae.safetensors", "bfl"),
         "text_encoder": ("text_encoders/clip_l.safetensors", "comfy"),
         "text_encoder_2": ("text_encoders/t5xxl_fp16.safetensors", "comfy")}
PNG_COMPRESS_LEVEL = 4  # what SaveImage uses


# ------------------------------------------------------------------------------------------------ models

def write_models(root: Path, width: int, double: int, single: int, text_width: int) -> None:
    """Small random models in the usual files and layouts (the tokenizers are the pack's own)."""
    comps = factory.tiny_pipeline_components("dev", width=width, heads=width // 128, double=double, single=single,
                                             text_width=text_width)
    for part, (rel, layout) in FILES.items():
        factory.save_layout(comps[part], root / rel, layout)


def load_models(root: Path):
    """What the three loader nodes return (the same cached objects the runner's loaders get)."""
    host.set_models_dir(root)  # as inside the runner
    tr, _ = models.load_transformer(root / FILES["transformer"][0], name="flux1-dev.safetensors")
    enc, _ = models.load_text_encoders(root / FILES["text_encoder"][0], root / FILES["text_encoder_2"][0],
                                       clip_name="clip_l.safetensors", t5_name="t5xxl_fp16.safetensors")
    vae, _ = models.load_vae(root / FILES["vae"][0], name="ae.safetensors")
    return tr, enc, vae


def diffusers_pipeline(tr, enc, vae):
    from diffusers import FluxPipeline
    pipe = FluxPipeline(scheduler=factory.tiny_scheduler("dev"), vae=vae.module, text_encoder=enc.clip.module,
                        tokenizer=enc.tokenizers.clip, text_encoder_2=enc.t5.module, tokenizer_2=enc.tokenizers.t5,
                        transformer=tr.module)
    pipe.set_progress_bar_config(leave=False)  # the bar still runs, as our sampler's does
    return pipe


# ---------------------------------------------------------------------------------------------- the four

def run_nodes(tr, enc, vae, size, steps, seed, msl):
    cond = TextEncode.execute(enc, PROMPT, "", GUIDANCE, msl)[0]
    latent = EmptyLatent.execute(size, size, 1)[0]
    latent = Sampler.execute(tr, cond, latent, seed=seed, steps=steps, denoise=1.0, true_cfg=1.0)[0]
    return VAEDecode.execute(vae, latent, "auto")[0]


def run_diffusers(pipe, size, steps, seed, msl, output_type="np"):
    return pipe(prompt=PROMPT, height=size, width=size, num_inference_steps=steps, guidance_scale=GUIDANCE,
                generator=torch.Generator("cpu").manual_seed(seed), max_sequence_length=msl,
                output_type=output_type).images


def run_runner(root, out_dir, size, steps, seed, msl):
    overrides = {"4": {"clip_text": PROMPT, "t5_text": "", "guidance": GUIDANCE, "max_sequence_length": msl},
                 "5": {"width": size, "height": size, "batch_size": 1},
                 "6": {"seed": seed, "steps": steps, "denoise": 1.0, "true_cfg": 1.0}}
    report = run_workflow(examples_dir() / "api" / WORKFLOW, models_dir=root, output_dir=out_dir, progress=False,
                          overrides=overrides)
    assert len(report["outputs"]) == 1, report["outputs"]
    return report


def run_diffusers_png(pipe, out_dir, counter, size, steps, seed, msl):
    image = run_diffusers(pipe, size, steps, seed, msl, output_type="pil")[0]
    image.save(Path(out_dir) / f"diffusers_{next(counter):05}.png", compress_level=PNG_COMPRESS_LEVEL)


# ----------------------------------------------------------------------------------------------- timing

def timed(fn) -> float:
    gc.collect()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def mmm(values, fmt="{:.3f}") -> str:
    lo, med, hi = min(values), statistics.median(values), max(values)
    return " / ".join(fmt.format(v) for v in (lo, med, hi))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=12, help="interleaved rounds (one run of each of the four per round)")
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--max-sequence-length", type=int, default=64)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--width", type=int, default=256, help="transformer width (heads of 128)")
    ap.add_argument("--double", type=int, default=2)
    ap.add_argument("--single", type=int, default=4)
    ap.add_argument("--text-width", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (0: torch's default). 1 by default: on a shared machine, OpenMP threads "
                         "that wait for each other make times swing by 10x and more")
    ap.add_argument("--only", choices=("nodes", "diffusers", "runner", "diffusers+png"),
                    help="set up, run this one once to warm up, then --runs times, and print only its times: "
                         "for timing whole processes from outside (e.g. /usr/bin/time), one side per process")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffusers.utils import logging as dlog
    dlog.set_verbosity_error()
    logging.getLogger("fluxbridge").setLevel(logging.ERROR)
    import itertools

    with tempfile.TemporaryDirectory(prefix="fluxbridge-bench-graph-") as tmp:
        root, out_dir = Path(tmp) / "models", Path(tmp) / "output"
        t0 = time.perf_counter()
        write_models(root, args.width, args.double, args.single, args.text_width)
        tr, enc, vae = load_models(root)
        pipe = diffusers_pipeline(tr, enc, vae)
        n_params = sum(p.numel() for p in tr.module.parameters())
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; models written and loaded in "
              f"{time.perf_counter() - t0:.1f} s (not timed below)")
        print(f"transformer width {args.width}, {args.double} double + {args.single} single blocks, "
              f"{n_params / 1e6:.1f} M params, {tr.dtype}; text towers {args.text_width} wide; "
              f"{args.size}x{args.size}, {args.steps} steps, max_sequence_length {args.max_sequence_length}, "
              f"seed {args.seed}")

        s, st, sd, msl = args.size, args.steps, args.seed, args.max_sequence_length
        counter = itertools.count(1)
        runs = {
            "nodes": lambda: run_nodes(tr, enc, vae, s, st, sd, msl),
            "diffusers": lambda: run_diffusers(pipe, s, st, sd, msl),
            "runner": lambda: run_runner(root, out_dir, s, st, sd, msl),
            "diffusers+png": lambda: run_diffusers_png(pipe, out_dir, counter, s, st, sd, msl),
        }
        if args.only:
            runs[args.only]()
            times = [timed(runs[args.only]) for _ in range(args.runs)]
            print(f"{args.only}: seconds per image (min / median / max over {args.runs}): {mmm(times)}")
            return 0
        # warm-up (the runner's first run finds the models already cached by load_models) and the check
        ours_image = runs["nodes"]()
        theirs = torch.from_numpy(runs["diffusers"]())
        runs["runner"]()
        runs["diffusers+png"]()
        diff = float((ours_image - theirs).abs().max())
        hits = models.stats["hits"]
        print(f"nodes' image vs diffusers' image: shape {tuple(ours_image.shape)} vs {tuple(theirs.shape)}, "
              f"largest difference {diff:.3g}")

        names = list(runs)
        times = {n: [] for n in names}
        for r in range(args.runs):
            k = r % len(names)
            for n in names[k:] + names[:k]:  # rotate the order every round
                times[n].append(timed(runs[n]))
        print(f"runner loader cache hits during the timed runs: {models.stats['hits'] - hits} "
              f"(loads: {models.stats['loads']}, all before timing)")

    print(f"\nseconds per image (min / median / max over {args.runs} interleaved rounds):")
    for n in names:
        print(f"  {n:14s} {mmm(times[n])}")
    r1 = [a / b for a, b in zip(times["nodes"], times["diffusers"])]
    r2 = [a / b for a, b in zip(times["runner"], times["diffusers+png"])]
    print("\nratios (per round, min / median / max):")
    print(f"  nodes / diffusers           {mmm(r1)}   (target <= 1.0)")
    print(f"  runner / diffusers+png      {mmm(r2)}   (target <= 1.0)")
    print(f"  ratio of the medians: nodes / diffusers {statistics.median(times['nodes']) / statistics.median(times['diffusers']):.3f}, "
          f"runner / diffusers+png {statistics.median(times['runner']) / statistics.median(times['diffusers+png']):.3f}")


if __name__ == "__main__":
    sys.exit(main())
