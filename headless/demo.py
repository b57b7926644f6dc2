"""`fluxbridge demo`: the text-to-image example workflow on small random Flux models.

The real FLUX.1 weights are not part of the pack, so the demo makes its own: tiny random models with
FLUX.1's structure (`factory`), written in the layouts users download (the transformer in BFL layout as
`diffusion_models/flux1-dev.safetensors`, the VAE as `vae/ae.safetensors`, CLIP-L and T5 as ComfyUI's
`text_encoders/clip_l.safetensors` / `t5xxl_fp16.safetensors`) through the converter. Like a user's
ComfyUI `models` folder it has no `tokenizers/`, so the real tokenizers the pack carries are used. The
models are built once and cached (a user cache folder, keyed by a hash of the code that makes them), then
`example_workflows/api/flux_dev_text_to_image.json` runs through the headless runner. The image and a
JSON report land in the output folder; the command prints a short summary (`summary`), or the report with
`--json`.

Needs nothing but the installed pack (no network, no downloads).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from ..common.errors import BadInput

DEMO_WORKFLOW = "flux_dev_text_to_image.json"
REPORT_NAME = "fluxbridge_demo_report.json"
CACHE_ENV = "FLUXBRIDGE_CACHE"
# The demo renders smaller than the example's 1024x1024: the models are random, so the picture is noise
# whatever its size; this keeps the demo at a few seconds on two CPU cores.
DEMO_OVERRIDES = {"5": {"width": 256, "height": 256}, "6": {"steps": 8}}
# Files whose code decides what the cached models look like: a change to any of them rebuilds the cache.
_KEY_SOURCES = ("headless/factory.py", "headless/demo.py", "convert/write.py", "convert/table.py", "convert/families/flux.py",
                "convert/families/vae.py", "convert/families/clip.py", "convert/families/t5.py",
                "convert/families/redux.py", "convert/families/siglip.py", "convert/lora/synth.py")
MODEL_FILES = {
    "dev": "diffusion_models/flux1-dev.safetensors",
    "schnell": "diffusion_models/flux1-schnell.safetensors",
    "fill": "diffusion_models/flux1-fill-dev.safetensors",
    "kontext": "diffusion_models/flux1-kontext-dev.safetensors",
    "depth": "diffusion_models/flux1-depth-dev.safetensors",
    "vae": "vae/ae.safetensors",
    "clip": "text_encoders/clip_l.safetensors",
    "t5": "text_encoders/t5xxl_fp16.safetensors",
    "redux": "style_models/flux1-redux-dev.safetensors",
    "siglip": "clip_vision/sigclip_vision_patch14_384.safetensors",
}
LORA_FILES = ("loras/flux_lora_style.safetensors", "loras/flux_lora_detail.safetensors")
CONTROL_LORA_FILE = "loras/flux1-canny-dev-lora.safetensors"


def cache_root() -> Path:
    """`$FLUXBRIDGE_CACHE`, else `$XDG_CACHE_HOME/fluxbridge`, else `~/.cache/fluxbridge`."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fluxbridge"


def models_key(variants=("dev",), loras: bool = False, family: bool = False) -> str:
    """A short hash of the code that builds the models and of what is asked for."""
    here = Path(__file__).resolve().parents[1]  # the pack
    h = hashlib.sha256(repr((sorted(variants), loras, family)).encode())
    for rel in _KEY_SOURCES:
        p = here / rel
        h.update(rel.encode())
        h.update(p.read_bytes() if p.is_file() else b"-")
    return h.hexdigest()[:16]


def demo_models(cache_dir=None, variants=("dev",), loras: bool = False, family: bool = False) -> Path:
    """A models folder with the small random models, built once: `<cache>/demo-models/<key>/`.

    variants: which transformers ("dev", "schnell", "fill", "kontext", "depth"); loras: also two small LoRAs
    (one kohya, one diffusers/PEFT format) for the dev transformer; family: also a Canny control LoRA for
    dev (BFL layout), the Redux encoder and its SigLIP vision tower. Built in a temporary folder beside the
    target and renamed into place, so an interrupted build never leaves a half-written cache behind.
    """
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    target = root / "demo-models" / models_key(variants, loras, family)
    if (target / "READY").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        build_models(work, variants=variants, loras=loras, family=family)
        (work / "READY").write_text(json.dumps({"variants": list(variants), "loras": loras, "family": family}))
        try:
            work.rename(target)
        except OSError:  # built meanwhile by someone else
            if not (target / "READY").is_file():
                raise
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return target


def build_models(root, variants=("dev",), loras: bool = False, seed: int = 0, family: bool = False) -> dict:
    """Write the small random models into the models folder `root` in their usual layouts and names.
    Returns {part: path}."""
    from safetensors.torch import save_file

    from . import factory

    root = Path(root)
    written = {}

    def write(model, part: str, layout: str):
        written[part] = factory.save_layout(model, root / MODEL_FILES[part], layout)

    # the VAE and the text encoders are the same for every variant: built once, with the first transformer
    first = variants[0] if variants else "dev"
    parts = factory.tiny_pipeline_components(first, seed=seed)
    transformers = {first: parts["transformer"]}

    def transformer(variant):
        if variant not in transformers:
            transformers[variant] = factory.tiny_variant_transformer(variant, seed=seed)
        return transformers[variant]

    for variant in variants:
        write(transformer(variant), variant, "bfl")
        if variant == "dev" and loras:
            for k, (path, fmt) in enumerate(zip(LORA_FILES, ("kohya", "peft"))):
                dst = root / path
                dst.parent.mkdir(parents=True, exist_ok=True)
                save_file(tiny_lora(transformer("dev"), fmt, seed=seed + 10 + k), str(dst))
                written[Path(path).stem] = dst
    write(parts["vae"], "vae", "bfl")
    write(parts["text_encoder"], "clip", "comfy")
    write(parts["text_encoder_2"], "t5", "comfy")
    if family:
        dst = root / CONTROL_LORA_FILE
        dst.parent.mkdir(parents=True, exist_ok=True)
        save_file(tiny_control_lora(transformer("dev"), seed=seed + 20), str(dst))
        written[Path(CONTROL_LORA_FILE).stem] = dst
        text_width = parts["transformer"].config.joint_attention_dim
        siglip = factory.tiny_siglip(seed=seed + 21)
        write(siglip, "siglip", "bfl")
        write(factory.tiny_redux(redux_dim=siglip.config.hidden_size, text_width=text_width, seed=seed + 22),
              "redux", "bfl")
    return written


# A control LoRA's modules beside `img_in`, named as BFL writes them, with the diffusers names of the same
# modules: the ones a layout renames without splitting or swapping (the split and swap of LoRA rows are
# tested on their own), so a test can hand diffusers the same file in its own layout.
CONTROL_LORA_MODULES = {
    "img_in": "x_embedder",
    "double_blocks.{i}.img_mlp.0": "transformer_blocks.{i}.ff.net.0.proj",
    "double_blocks.{i}.txt_attn.proj": "transformer_blocks.{i}.attn.to_add_out",
    "single_blocks.{i}.linear2": "single_transformer_blocks.{i}.proj_out",
    "final_layer.linear": "proj_out",
}
CONTROL_LORA_NORMS = {  # set (replaced) by a control LoRA
    "double_blocks.{i}.img_attn.norm.query_norm.scale": "transformer_blocks.{i}.attn.norm_q.weight",
    "double_blocks.{i}.txt_attn.norm.key_norm.scale": "transformer_blocks.{i}.attn.norm_added_k.weight",
    "single_blocks.{i}.norm.key_norm.scale": "single_transformer_blocks.{i}.attn.norm_k.weight",
}


def tiny_control_lora(transformer, rank: int = 4, seed: int = 0, layout: str = "bfl-control") -> dict:
    """A small random Depth/Canny control LoRA for the diffusers `transformer` (dev, `img_in` 4C wide): `img_in`
    widened to twice its input (the control latent's channels after the latent's), LoRA pairs with
    `lora_B.bias` on the modules of `CONTROL_LORA_MODULES` of every block, and new q/k norm scales, as BFL's
    FLUX.1-Canny/Depth-dev-lora files hold them (`layout="bfl-control"`), or the same tensors under diffusers'
    names (`layout="diffusers"`: `transformer.<module>.lora_A.weight`, norms `transformer.<param>`)."""
    import torch

    from ..convert.lora.synth import Entry, write_keys

    if layout not in ("bfl-control", "diffusers"):
        raise ValueError(f"unknown control LoRA layout {layout!r}")
    gen = torch.Generator().manual_seed(seed)
    modules = dict(transformer.named_modules())
    params = dict(transformer.named_parameters())
    blocks = {"double_blocks.{i}": len(transformer.transformer_blocks),
              "single_blocks.{i}": len(transformer.single_transformer_blocks)}

    def expand(table):
        for a, b in table.items():
            kind = next((k for k in blocks if a.startswith(k)), None)
            for i in range(blocks[kind] if kind else 1):
                yield a.format(i=i), b.format(i=i)

    entries, norms = [], {}
    for a, b in expand(CONTROL_LORA_MODULES):
        mod = modules[b]
        width = mod.in_features * (2 if a == "img_in" else 1)
        tensors = {"down": torch.randn(rank, width, generator=gen) * 0.1,
                   "up": torch.randn(mod.out_features, rank, generator=gen) * 0.1,
                   "up_bias": torch.randn(mod.out_features, generator=gen) * 0.05}
        entries.append(Entry(a if layout == "bfl-control" else b, "lora", tensors))
    for a, b in expand(CONTROL_LORA_NORMS):
        value = params[b].detach() * (1 + 0.2 * torch.randn(params[b].shape, generator=gen))
        norms[a if layout == "bfl-control" else b] = value
    if layout == "bfl-control":
        sd, _ = write_keys(entries + [Entry(n, "set", {"value": v}) for n, v in norms.items()], layout)
    else:
        sd, _ = write_keys(entries, "diffusers")
        sd.update({f"transformer.{n}": v for n, v in norms.items()})
    return {k: v.contiguous() for k, v in sd.items()}


def tiny_lora(transformer, fmt: str = "peft", rank: int = 4, seed: int = 0) -> dict:
    """A small random LoRA for the diffusers `transformer` (attention projections of every block):
    `fmt="peft"` (diffusers / PEFT names: `transformer.<module>.lora_A.weight`) or `fmt="kohya"`
    (`lora_unet_<bfl_module>.lora_down.weight` + `.alpha`; qkv fused as in BFL)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = {}

    def pair(in_f, out_f):
        down = torch.randn(rank, in_f, generator=gen) * 0.05
        up = torch.randn(out_f, rank, generator=gen) * 0.05
        return down, up

    n_double = len(transformer.transformer_blocks)
    n_single = len(transformer.single_transformer_blocks)
    width = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    if fmt == "peft":
        for i in range(n_double):
            for proj in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
                down, up = pair(width, width)
                base = f"transformer.transformer_blocks.{i}.attn.{proj}"
                out[base + ".lora_A.weight"], out[base + ".lora_B.weight"] = down, up
        for i in range(n_single):
            for proj in ("attn.to_q", "attn.to_k", "attn.to_v"):
                down, up = pair(width, width)
                base = f"transformer.single_transformer_blocks.{i}.{proj}"
                out[base + ".lora_A.weight"], out[base + ".lora_B.weight"] = down, up
    elif fmt == "kohya":
        mlp = transformer.single_transformer_blocks[0].proj_mlp.out_features if n_single else 4 * width
        for i in range(n_double):
            for part in ("img_attn_qkv", "txt_attn_qkv"):
                down, up = pair(width, 3 * width)
                base = f"lora_unet_double_blocks_{i}_{part}"
                out[base + ".lora_down.weight"], out[base + ".lora_up.weight"] = down, up
                out[base + ".alpha"] = torch.tensor(float(rank))
        for i in range(n_single):
            down, up = pair(width, 3 * width + mlp)
            base = f"lora_unet_single_blocks_{i}_linear1"
            out[base + ".lora_down.weight"], out[base + ".lora_up.weight"] = down, up
            out[base + ".alpha"] = torch.tensor(float(rank))
    else:
        raise ValueError(f"unknown LoRA format {fmt!r}")
    return {k: v.contiguous() for k, v in out.items()}


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        return True
    except OSError:
        return False


def run_demo(output_dir="out", progress=True, cache_dir=None, overrides=None) -> dict:
    """Build (or reuse) the small models, run the text-to-image example on them, and write the image and
    `fluxbridge_demo_report.json` into `output_dir`. Returns the report."""
    from .runner import run_workflow
    from .workflows import examples_dir

    t0 = time.perf_counter()
    workflow = examples_dir() / "api" / DEMO_WORKFLOW
    if not workflow.is_file():
        raise FileNotFoundError(f"{workflow}: the example workflows are missing from the installed pack")
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise BadInput(out, "the output folder is a file")
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    if cache_dir is None and not _writable(root):  # no user cache folder: keep the models with the output
        root = out / ".fluxbridge-cache"
    cached = (root / "demo-models" / models_key() / "READY").is_file()
    models = demo_models(root)
    t1 = time.perf_counter()
    run = run_workflow(workflow, models_dir=models, output_dir=out, progress=progress,
                       overrides=DEMO_OVERRIDES if overrides is None else overrides)
    t2 = time.perf_counter()

    detections, loras, sigmas = {}, {}, {}
    for nid, node in run["nodes"].items():
        ui = node.get("ui") or {}
        if node["class_type"].startswith("FluxBridgeLoad"):
            (loras if node["class_type"] == "FluxBridgeLoadLoRA" else detections)[nid] = {
                "class_type": node["class_type"], **ui}
        if node["class_type"] == "FluxBridgeScheduler":
            sigmas[nid] = ui
    images = [p for p in run["outputs"] if p.lower().endswith(".png")]
    report = {
        "workflow": str(workflow),
        "models_dir": str(models),
        "models_cached": cached,
        "output_dir": str(out),
        "images": images,
        "loaders": detections,
        "loras": loras,
        "schedulers": sigmas,
        "overrides": DEMO_OVERRIDES if overrides is None else overrides,
        "timings": {"models_seconds": round(t1 - t0, 3), "workflow_seconds": round(t2 - t1, 3),
                    "total_seconds": round(time.perf_counter() - t0, 3),
                    "nodes": {nid: n["seconds"] for nid, n in run["nodes"].items()}},
        "run": run,
    }
    (out / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    report["report"] = str(out / REPORT_NAME)
    return report


def summary(report: dict) -> str:
    """What `fluxbridge demo` prints: what ran, where the image is, how long it took, where the report is."""
    settings = {k: v for node in (report.get("overrides") or {}).values() for k, v in node.items()}
    how = []
    if {"width", "height"} <= settings.keys():
        how.append(f"{settings['width']}x{settings['height']}")
    if "steps" in settings:
        how.append(f"{settings['steps']} steps")
    how = f" ({', '.join(how)})" if how else ""
    t = report["timings"]
    out = Path(report["output_dir"])
    images = [str(out / p) for p in report["images"]] or ["none written"]
    return "\n".join([
        f"Ran the example workflow {Path(report['workflow']).name}{how} on small random "
        "FLUX.1 models (random weights: the image is noise).",
        f"Models: {report['models_dir']} ({'reused from the cache' if report['models_cached'] else 'built now'})",
        *(f"Image:  {p}" for p in images),
        f"Time:   {t['total_seconds']:.1f} s (models {t['models_seconds']:.1f} s, "
        f"workflow {t['workflow_seconds']:.1f} s)",
        f"Report: {report['report']} (`fluxbridge demo --json` prints it)",
    ])
