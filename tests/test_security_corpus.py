"""A corpus of hostile and broken inputs, generated here (no binaries are stored), run end to end.

Every case is refused the same way on both roads into the pack:

* the command line (`fluxbridge inspect | convert | lora inspect | lora convert | run`, in-process through
  `cli.main`) exits 2 with ONE line on stderr that names the file and the cause, and no traceback (and a
  subset again as real subprocesses, stderr into a file and stdout into closed pipes:
  `test_cli_subprocess_corpus`);
* the node path (the node's `execute`, called directly, which also bypasses ComfyUI's and the runner's
  validation; or `run_workflow` for whole workflows) raises `BadInput` with the same cause.

And after each case: no pickle payload ran (its marker file does not exist), nothing was written outside
the output folder (the whole temporary tree is compared with a snapshot; inside the output folder no file
appeared), and the same process still serves a good request. See docs/SECURITY.md for the threat model.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import struct
import subprocess
import sys
import textwrap
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load as safetensors_load, save_file

import fluxbridge
from fluxbridge.headless import cli, demo, factory, native_nodes, runner
from fluxbridge.runtime import host
from fluxbridge.common.errors import BadInput
from fluxbridge.nodes import conditioning, convert, latent, loaders, sampling
from checkout_env import checkout_env  # tests/helpers
from gguf_bytes import ARCH, gguf_bytes, gguf_string  # tests/helpers

GOOD = "flux-good.safetensors"  # the tiny transformer every "good request" uses
GOOD_LORA = "good-lora.safetensors"
NOT_LISTED = "config-bomb/diffusion_pytorch_model.safetensors"  # on disk, but inside a diffusers folder: not listed
# A model folder lists .safetensors, .sft and .gguf files (and diffusers folders): a workflow cannot name a
# pickle there; the command line, given the path, refuses it by name.
UNLISTED = r"not found in the (diffusion_models|loras) folder .*it lists \.safetensors, \.sft, \.gguf"


# ------------------------------------------------------------------------------------- hostile bytes

class Payload:
    """Unpickling this creates the marker folder: proof that a reader ran a pickle."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def st_file(header: dict | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def split_st(blob: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def flip_bit(blob: bytes, pos: int, bit: int) -> bytes:
    out = bytearray(blob)
    out[pos] ^= 1 << bit
    return bytes(out)


def lying(good: bytes, change: Callable[[dict, bytes], tuple[dict, bytes]]) -> bytes:
    header, data = split_st(good)
    return st_file(*change(header, data))


def _past_end(header, data):
    name = next(k for k in header if k != "__metadata__" and header[k]["data_offsets"][1] > 0)
    b, e = header[name]["data_offsets"]
    header[name]["data_offsets"] = [b + len(data), e + len(data)]
    return header, data


def _overlap(header, data):
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    a, b = [n for n in names if header[n]["data_offsets"][1] > header[n]["data_offsets"][0]][:2]
    size = header[b]["data_offsets"][1] - header[b]["data_offsets"][0]
    start = header[a]["data_offsets"][0]
    header[b] = dict(header[b], dtype="U8", shape=[size], data_offsets=[start, start + size])
    return header, data


GOOD_GGUF = gguf_bytes([ARCH], [("img_in.weight", (64, 32), 0, 0), ("img_in.bias", (32,), 0, 64 * 32 * 4)],
                      b"\0" * (64 * 32 * 4 + 32 * 4))


def png(width: int, height: int, rows: bytes = b"") -> bytes:
    """A PNG whose header says width x height (RGB) and whose data is `rows` (compressed)."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def good_png(size: int = 32) -> bytes:
    row = b"\0" + bytes(range(3 * size))[: 3 * size]
    return png(size, size, row * size)


def lora_pair(stem: str, out: int, inp: int, rank: int = 2) -> dict:
    g = torch.Generator().manual_seed(len(stem))
    return {f"{stem}.lora_down.weight": torch.randn(rank, inp, generator=g) * 0.1,
            f"{stem}.lora_up.weight": torch.randn(out, rank, generator=g) * 0.1}


def st_bytes(tensors: dict, metadata: dict | None = None) -> bytes:
    from safetensors.torch import save
    return save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)


# --------------------------------------------------------------------------------------- the world

@dataclass
class World:
    root: Path
    models: Path
    output: Path
    input: Path
    outside: Path
    marker: Path
    good_bytes: bytes
    workflows: Path
    converted: Path


def _save(model, path: Path, layout="bfl") -> bytes:
    factory.save_layout(model, path, layout)
    return path.read_bytes() if path.is_file() else b""


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("corpus")
    w = World(root=root, models=root / "models", output=root / "output", input=root / "input",
              outside=root / "outside", marker=root / "PAYLOAD-RAN", good_bytes=b"",
              workflows=root / "workflows", converted=root / "converted")
    for sub in ("diffusion_models", "text_encoders", "vae", "loras"):
        (w.models / sub).mkdir(parents=True)
    for d in (w.output, w.input, w.outside, w.workflows, w.converted):
        d.mkdir()
    dm, loras = w.models / "diffusion_models", w.models / "loras"

    # good files
    flux = factory.tiny_flux_transformer(width=32, heads=2, double=1, single=1, seed=1)
    w.good_bytes = _save(flux, dm / GOOD)
    save_file(demo.tiny_lora(flux, "peft", seed=2), str(loras / GOOD_LORA))
    _save(factory.tiny_flux_vae(seed=3), w.models / "vae" / "ae.safetensors")
    _save(factory.tiny_clip_l(hidden_size=32, seed=4), w.models / "text_encoders" / "clip_l.safetensors", "comfy")
    _save(factory.tiny_t5(d_model=32, seed=5), w.models / "text_encoders" / "t5xxl.safetensors", "comfy")
    (w.input / "ok.png").write_bytes(good_png())
    (w.input / "strip.png").write_bytes(png(2100, 1, b"\0" + b"\x80" * 6300))
    (w.outside / "secret.png").write_bytes(good_png())
    (w.outside / "secret.safetensors").write_bytes(w.good_bytes)

    # wrong architectures, in the transformer folder
    (dm / "vae-as-transformer.safetensors").write_bytes((w.models / "vae" / "ae.safetensors").read_bytes())
    _save(factory.tiny_sd15_unet(seed=6), dm / "sd15-unet.safetensors")
    (dm / "lora-as-transformer.safetensors").write_bytes((loras / GOOD_LORA).read_bytes())
    # a diffusers folder whose config.json asks for a million layers; a sharded one whose index leaves it
    folder = dm / "config-bomb"
    flux.save_pretrained(str(folder))
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(cfg, num_layers=10 ** 6)))
    shards = dm / "index-escape"
    shards.mkdir()
    (shards / "config.json").write_text(json.dumps(cfg))  # a diffusers folder: listed, so a workflow may name it
    (shards / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"x_embedder.weight": "../../../outside/secret.safetensors"}}))

    # hostile safetensors / GGUF bytes, in the transformer folder
    good = w.good_bytes
    (n,) = struct.unpack("<Q", good[:8])
    hostile = {
        "truncated.safetensors": good[: len(good) // 2],
        "bitflip-json.safetensors": flip_bit(good, good.index(b":", 8), 0),  # ':' -> ';'
        "bitflip-length.safetensors": flip_bit(good, 5, 2),  # the header length now runs past the file
        "past-end.safetensors": lying(good, _past_end),
        "overlap.safetensors": lying(good, _overlap),
        "terabyte-tensor.safetensors": st_file({"w": {"dtype": "F32", "shape": [2 ** 20, 2 ** 20],
                                                      "data_offsets": [0, 2 ** 42]}}, b"\0" * 64),
        "terabyte-header.safetensors": st_file(b'{"w":', length=2 ** 40),
        "absurd-empty-shape.safetensors": st_file({"w": {"dtype": "F32", "shape": [0, 2 ** 63],
                                                         "data_offsets": [0, 0]}}),
        "empty.safetensors": b"",
        "text.safetensors": b"hello, I am not a weights file\n" * 4,
        "truncated.gguf": GOOD_GGUF[: len(GOOD_GGUF) - 100],
        "bitflip-version.gguf": flip_bit(GOOD_GGUF, 4, 3),
        "tensor-count.gguf": gguf_bytes([ARCH], n_tensors=2 ** 40),
        "terabyte-tensor.gguf": gguf_bytes([ARCH], [("img_in.weight", (2 ** 20, 2 ** 20), 0, 0)], b"\0" * 64),
        "string-length.gguf": gguf_bytes([("general.name", struct.pack("<I", 8) + struct.pack("<Q", 2 ** 60))]),
    }
    for name, blob in hostile.items():
        (dm / name).write_bytes(blob)

    # pickles: each would create the marker if anything unpickled it
    payload = Payload(w.marker)
    proto2 = pickle.dumps({"state_dict": payload}, protocol=2)
    zipped = dm / "zip.pt"
    torch.save({"w": payload}, str(zipped))
    for name, blob in {"model.ckpt": proto2, "model.bin": pickle.dumps(payload, protocol=4),
                       "model.pth": pickle.dumps(payload, protocol=5),
                       "pickle-inside.safetensors": proto2, "zip-inside.safetensors": zipped.read_bytes(),
                       "protocol0-inside.safetensors": pickle.dumps(payload, protocol=0),
                       "pickle-inside.gguf": proto2}.items():
        (dm / name).write_bytes(blob)
    (loras / "lora.pt").write_bytes(zipped.read_bytes())

    # hostile LoRAs
    sd15 = {**lora_pair("lora_unet_down_blocks_0_attentions_0_proj_in", 32, 32),
            **lora_pair("lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q", 32, 32)}
    sdxl = {**lora_pair("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", 64, 64),
            **lora_pair("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", 64, 64)}
    nan = demo.tiny_lora(flux, "peft", seed=3)
    nan[next(iter(nan))][0, 0] = float("nan")
    peft_q = "transformer.transformer_blocks.0.attn.to_q"
    q = {f"{peft_q}.lora_A.weight": torch.ones(2, 32) * 0.01, f"{peft_q}.lora_B.weight": torch.ones(32, 2) * 0.01}
    redos = {"lora_adapter_metadata": json.dumps({"transformer.lora_alpha": 2,
                                                  "transformer.alpha_pattern": {"([a-z_0-9.]*)*X": 4}})}
    junk_alpha = {"lora_adapter_metadata": json.dumps({"transformer.lora_alpha": "lots"})}
    n_big = 4096  # four 16 kB vectors whose Kronecker product would be 2**48 elements
    kron = {f"transformer.norm_out.linear.{k}": v for k, v in {
        "lokr_w1_a": torch.ones(n_big, 1), "lokr_w1_b": torch.ones(1, n_big),
        "lokr_w2_a": torch.ones(n_big, 1), "lokr_w2_b": torch.ones(1, n_big)}.items()}
    expand = {"diffusion_model.img_in.reshape_weight": torch.tensor([32, 2 ** 40])}
    good_lora = (loras / GOOD_LORA).read_bytes()
    for name, blob in {"sd15-lora.safetensors": st_bytes(sd15), "sdxl-lora.safetensors": st_bytes(sdxl),
                       "truncated-lora.safetensors": good_lora[: len(good_lora) * 2 // 3],
                       "nan-lora.safetensors": st_bytes(nan), "redos-lora.safetensors": st_bytes(q, redos),
                       "junk-alpha-lora.safetensors": st_bytes(q, junk_alpha),
                       "kron-bomb-lora.safetensors": st_bytes(kron),
                       "expand-bomb-lora.safetensors": st_bytes(expand),
                       "model-as-lora.safetensors": good}.items():
        (loras / name).write_bytes(blob)

    # cut down, misplaced, mislabelled (the message must say what the file is): a transformer cut to a few
    # tensors (a half-downloaded or hand-cut file), a T5 cut below detection, a GGUF of another architecture,
    # an empty folder, model weights where a LoRA belongs, a LoRA whose only module has mismatched ranks,
    # a LoRA made for another width
    flux_tensors = safetensors_load(good)
    save_file({k: flux_tensors[k] for k in sorted(flux_tensors)[:6]}, str(dm / "flux-cut.safetensors"))
    t5_tensors = safetensors_load((w.models / "text_encoders" / "t5xxl.safetensors").read_bytes())
    save_file({k: t5_tensors[k] for k in sorted(t5_tensors)[:3]}, str(dm / "t5-cut.safetensors"))
    (dm / "llama.gguf").write_bytes(gguf_bytes(
        [("general.architecture", struct.pack("<I", 8) + gguf_string("llama"))],
        [("token_embd.weight", (8, 16), 0, 0), ("blk.0.attn_q.weight", (8, 8), 0, 8 * 16 * 4)],
        b"\0" * (8 * 16 * 4 + 8 * 8 * 4)))
    (dm / "empty-folder").mkdir()
    (w.models / "vae" / "transformer-as-vae.safetensors").write_bytes(good)
    (loras / "vae-as-lora.safetensors").write_bytes((w.models / "vae" / "ae.safetensors").read_bytes())
    (loras / "t5-as-lora.safetensors").write_bytes((w.models / "text_encoders" / "t5xxl.safetensors").read_bytes())
    q_badrank = {f"{peft_q}.lora_A.weight": torch.ones(4, 32) * 0.01,  # rank 4 down, rank 2 up
                 f"{peft_q}.lora_B.weight": torch.ones(32, 2) * 0.01}
    q_wide = {f"{peft_q}.lora_A.weight": torch.ones(4, 48) * 0.01,  # made for width 48, the model is 32 wide
              f"{peft_q}.lora_B.weight": torch.ones(48, 4) * 0.01}
    (loras / "badrank-lora.safetensors").write_bytes(st_bytes(q_badrank))
    (loras / "wrongwidth-lora.safetensors").write_bytes(st_bytes(q_wide))

    # hostile images
    (w.input / "bomb.png").write_bytes(png(100_000, 100_000))
    (w.input / "wide.png").write_bytes(png(20_000, 1))
    (w.input / "truncated.png").write_bytes(good_png()[:60])
    return w


@pytest.fixture
def on_host(world, monkeypatch):
    """The standalone host pointed at the corpus folders; runs without progress bars on stderr."""
    for var in ("FLUXBRIDGE_MODELS", "FLUXBRIDGE_OUTPUT", "FLUXBRIDGE_DEVICE", "FLUXBRIDGE_INPUT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(host, "_models_dir", None)
    monkeypatch.setattr(host, "_output_dir", None)
    assert not host.detect_host()
    host.set_models_dir(world.models)
    host.set_output_dir(world.output)
    host.clear_interrupt()
    monkeypatch.setattr(runner, "_progress_bar", lambda order, progress: None)
    monkeypatch.chdir(world.root)
    yield world
    host.clear_interrupt()


# ------------------------------------------------------------------------------------------ workflows

def _graph(*nodes: dict) -> dict:
    """An API workflow: LoadImage(ok.png) -> SaveImage, plus the given nodes as "3", "4", ..."""
    api = {"1": {"class_type": "LoadImage", "inputs": {"image": "ok.png"}},
           "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "corpus/img"}}}
    for i, node in enumerate(nodes, start=3):
        api[str(i)] = node
    return api


def _node(cls: str, **inputs) -> dict:
    return {"class_type": cls, "inputs": inputs}


LOAD_GOOD = _node("FluxBridgeLoadTransformer", model_name=GOOD, weight_dtype="default", quantize="none")


def _save_transformer(model_name: str, prefix="corpus/t") -> dict:
    return {"1": _node("FluxBridgeLoadTransformer", model_name=model_name, weight_dtype="default", quantize="none"),
            "2": _node("FluxBridgeSaveTransformer", transformer=["1", 0], layout="bfl", dtype="keep",
                       filename_prefix=prefix)}


def _with_lora(lora_name: str, **strengths) -> dict:
    api = _save_transformer(GOOD)
    api["3"] = _node("FluxBridgeLoadLoRA", transformer=["1", 0], lora_name=lora_name,
                     strength_model=strengths.get("model", 1.0), strength_text=strengths.get("text", 1.0))
    api["2"]["inputs"]["transformer"] = ["3", 0]
    return api


def _empty_latent(**v) -> dict:
    return _node("FluxBridgeEmptyLatent", **{"width": 64, "height": 64, "batch_size": 1, **v})


def _scheduler(**v) -> dict:
    return _node("FluxBridgeScheduler", **{"steps": 4, "width": 64, "height": 64, "denoise": 1.0, "shift": "auto",
                                            **v})


# ------------------------------------------------------------------------------------------- the cases

@dataclass
class Case:
    id: str
    clis: list  # argv lists; "{dm}" (transformer folder), "{loras}", "{models}", "{out}", "{conv}", "{wf}", "{in}"
    name: str  # what the error line must name: a file name, or the workflow's
    cause: str  # regex for the cause, on the command line and on the node path
    node: Callable | None = None  # the node path: called with the world, must raise BadInput matching node_cause
    node_cause: str | None = None
    workflow: dict | bytes | None = None  # written to {wf}/<id>.json
    marker: bool = False  # a pickle case: the payload must not run


def weights(name: str, cause: str, node_cause: str | None = None, cli=("inspect", "convert")) -> Case:
    clis = []
    if "inspect" in cli:
        clis.append(["inspect", "{dm}/" + name])
    if "convert" in cli:
        clis.append(["convert", "{dm}/" + name, "{conv}/" + name.replace("/", "_") + ".out.safetensors",
                     "--to", "comfy"])
    return Case("weights:" + name, clis, name, cause, node=lambda w: load_transformer(name),
                node_cause=node_cause, marker="pickle" in cause)


def as_transformer(name: str, cause: str) -> Case:
    """A file of another kind named by the transformer loader: `run` with it, and the node itself."""
    return Case("transformer:" + name, [["run", "{wf}/transformer-" + name + ".json", "--models", "{models}",
                                         "--output", "{out}", "--input", "{in}"]],
                name, cause, node=lambda w: load_transformer(name), workflow=_save_transformer(name))


def lora(name: str, cause: str, cli=("lora inspect", "lora convert", "run"), node_cause=None) -> Case:
    clis = []
    if "lora inspect" in cli:
        clis.append(["lora", "inspect", "{loras}/" + name])
    if "lora convert" in cli:
        clis.append(["lora", "convert", "{loras}/" + name, "{conv}/" + name + ".out.safetensors", "--to", "kohya"])
    if "run" in cli:
        clis.append(["run", "{wf}/lora-" + name + ".json", "--models", "{models}", "--output", "{out}"])
    return Case("lora:" + name, clis, name, cause, node=lambda w: load_lora_node(name), node_cause=node_cause,
                workflow=_with_lora(name), marker=name.endswith(".pt"))


def workflow(id: str, api, cause: str, node=None, node_cause=None, name=None) -> Case:
    return Case("workflow:" + id, [["run", "{wf}/" + id + ".json", "--models", "{models}", "--output", "{out}",
                                    "--input", "{in}"]],
                name or id + ".json", cause, node=node or (lambda w: run_api(w, id)), node_cause=node_cause,
                workflow=api)


# node paths ---------------------------------------------------------------------------------------

def load_transformer(name: str):
    return loaders.LoadTransformer.execute(model_name=name, weight_dtype="default", quantize="none")


def good_transformer():
    return load_transformer(GOOD).args[0]


def load_lora_node(name: str):
    try:
        loaders.LoadLoRA.execute(transformer=good_transformer(), lora_name=name, strength_model=1.0,
                                 strength_text=1.0)
    except BadInput as exc:
        first = exc
    else:
        first = None
    # and converting it with the node refuses it the same way (when the file itself is the problem)
    try:
        convert.ConvertLoRA.execute(lora_name=name, to="kohya", filename_prefix="corpus/lora")
    except BadInput:
        pass
    if first is not None:
        raise first


def run_api(w: World, id: str):
    return runner.run_workflow(w.workflows / (id + ".json"), models_dir=w.models, output_dir=w.output,
                               input_dir=w.input, progress=False)


def ctx(w: World):
    return native_nodes.RunContext(output_dir=w.output, input_dir=w.input)


NAN = float("nan")

CASES = [
    # --- weights files that lie or are broken (safetensors, GGUF) ---------------------------------------
    weights("truncated.safetensors", r"truncated"),
    weights("bitflip-json.safetensors", r"corrupt header: not valid JSON"),
    weights("bitflip-length.safetensors", r"truncated: the header says"),
    weights("past-end.safetensors", r"truncated: tensor .* ends at byte"),
    weights("overlap.safetensors", r"overlap"),
    weights("terabyte-tensor.safetensors", r"truncated: tensor 'w' ends at byte 4398046511104"),
    weights("terabyte-header.safetensors", r"truncated: the header says it is 1099511627776 bytes"),
    weights("absurd-empty-shape.safetensors", r"over the limit of \d+ elements"),
    weights("empty.safetensors", r"the file is empty"),
    weights("text.safetensors", r"not a safetensors file"),
    weights("truncated.gguf", r"truncated"),
    weights("bitflip-version.gguf", r"GGUF version \d+ is not supported"),
    weights("tensor-count.gguf", r"corrupt header: 1099511627776 tensors"),
    weights("terabyte-tensor.gguf", r"truncated: tensor 'img_in.weight' ends at byte"),
    weights("string-length.gguf", r"truncated: value of 'general.name'"),
    weights("config-bomb", r"config.json says num_layers is 1000000, the tensors say 1"),
    weights("index-escape", r"not a file inside the folder"),
    # --- pickles, by name and by content: refused, never unpickled -----------------------------------------
    weights("model.ckpt", r"pickle-based checkpoint refused", node_cause=UNLISTED),
    weights("model.bin", r"pickle-based checkpoint refused", node_cause=UNLISTED),
    weights("model.pth", r"pickle-based checkpoint refused", node_cause=UNLISTED),
    weights("zip.pt", r"pickle-based checkpoint refused", node_cause=UNLISTED),
    weights("pickle-inside.safetensors", r"pickle-based checkpoint refused"),
    weights("zip-inside.safetensors", r"pickle-based checkpoint refused"),
    weights("protocol0-inside.safetensors", r"not a safetensors file"),
    weights("pickle-inside.gguf", r"not a GGUF file"),
    lora("lora.pt", r"pickle-based checkpoint refused", cli=("lora inspect", "lora convert"), node_cause=UNLISTED),
    # --- the wrong kind of model where a Flux transformer is expected ---------------------------------
    as_transformer("sd15-unet.safetensors", r"not flux-transformer: found sd15-unet"),
    as_transformer("vae-as-transformer.safetensors", r"not flux-transformer: found flux-vae"),
    as_transformer("lora-as-transformer.safetensors", r"this is a LoRA, not model weights"),
    # --- LoRAs: other architectures, broken, hostile metadata, memory bombs -------------------------------
    lora("sd15-lora.safetensors", r"not a Flux LoRA: .*down_blocks"),
    lora("sdxl-lora.safetensors", r"not a Flux LoRA: .*(input_blocks|lora_te2)"),
    lora("truncated-lora.safetensors", r"truncated"),
    lora("nan-lora.safetensors", r"holds NaN or infinite values"),
    lora("redos-lora.safetensors", r"alpha_pattern key .*: a repeated group"),
    lora("junk-alpha-lora.safetensors", r"lora_alpha is 'lots', not a number"),
    lora("kron-bomb-lora.safetensors", r"too large: its weight delta would be \[16777216, 16777216\]"),
    lora("expand-bomb-lora.safetensors", r"cannot reshape x_embedder from \[32, 64\] to \[32, 1099511627776\]",
         cli=("run",)),
    lora("model-as-lora.safetensors", r"not a LoRA but model weights"),
    # --- workflows: names that leave their folders ------------------------------------------------------
    workflow("model-dotdot", _save_transformer("../models/diffusion_models/" + GOOD),
             r"1 \(FluxBridgeLoadTransformer\): model_name: .*'\.\.'",
             node=lambda w: load_transformer("../diffusion_models/" + GOOD), node_cause=r"'\.\.' part"),
    workflow("model-absolute", None, r"1 \(FluxBridgeLoadTransformer\): model_name: .*absolute",
             node=lambda w: load_transformer(str(w.models / "diffusion_models" / GOOD)), node_cause=r"absolute"),
    workflow("model-not-listed", _save_transformer(NOT_LISTED),
             r"model_name: \"config-bomb/diffusion_pytorch_model.safetensors\" is not one of the choices",
             node=lambda w: load_transformer(NOT_LISTED), node_cause=r"not found in the diffusion_models folder"),
    workflow("model-nul", _save_transformer(GOOD + "\0.txt"), r"model_name: .*not a usable file name",
             node=lambda w: load_transformer(GOOD + "\0.txt"), node_cause=r"not a usable file name"),
    workflow("prefix-dotdot", _save_transformer(GOOD, "../escaped"), r"filename_prefix: .*'\.\.'",
             node=lambda w: convert.SaveTransformer.execute(transformer=good_transformer(),
                                                            filename_prefix="corpus/../../escaped"),
             node_cause=r"'\.\.' part leads outside the output folder"),
    workflow("prefix-absolute", None, r"filename_prefix: .*absolute",
             node=lambda w: convert.SaveVAE.execute(vae=None, filename_prefix=str(w.outside / "x")),
             node_cause=r"absolute path"),
    workflow("prefix-nul", _graph() | {"2": _node("SaveImage", images=["1", 0], filename_prefix="corpus/img\0")},
             r"filename_prefix: .*not a usable file name in the output folder",
             node=lambda w: convert.SaveTransformer.execute(transformer=good_transformer(),
                                                            filename_prefix="corpus/t\0"),
             node_cause=r"not a usable file name in the output folder"),
    workflow("image-dotdot", _graph() | {"1": _node("LoadImage", image="../outside/secret.png")},
             r"1 \(LoadImage\): image: .*'\.\.'",
             node=lambda w: native_nodes.load_image(ctx(w), "../outside/secret.png"),
             node_cause=r"must stay inside the input folder \(a '\.\.' part"),
    # --- hostile images -----------------------------------------------------------------------------------
    workflow("image-bomb", _graph() | {"1": _node("LoadImage", image="bomb.png")},
             r"bomb.png: cannot read the image: .*exceeds limit", name="bomb.png",
             node=lambda w: native_nodes.load_image(ctx(w), "bomb.png")),
    workflow("image-too-wide", _graph() | {"1": _node("LoadImage", image="wide.png")},
             r"wide.png: the image is too large: 20000x1", name="wide.png",
             node=lambda w: native_nodes.load_image(ctx(w), "wide.png")),
    workflow("image-truncated", _graph() | {"1": _node("LoadImage", image="truncated.png")},
             r"truncated.png: cannot read the image", name="truncated.png",
             node=lambda w: native_nodes.load_image(ctx(w), "truncated.png")),
    workflow("upscale-chain", {"1": _node("LoadImage", image="strip.png"),
                               **{str(i): _node("ImageScaleBy", image=[str(i - 1), 0], upscale_method="nearest-exact",
                                                scale_by=4.0) for i in (2, 3)},
                               "4": _node("PreviewImage", images=["3", 0])},
             r"8400x4 scaled by 4.0 is 33600x16, over 16384 pixels a side", name="scale_by",
             node=lambda w: native_nodes.image_scale_by(ctx(w), torch.zeros(1, 1, 1, 3).expand(1, 4096, 4096, 3),
                                                        scale_by=8.0),
             node_cause=r"over 16384 pixels a side"),
    # --- absurd numbers: refused by validation, and by the node itself when validation is bypassed --------
    workflow("width-1e9", _graph(_empty_latent(width=10 ** 9)), r"width: 1000000000 is above the maximum 16384",
             node=lambda w: latent.EmptyLatent.execute(width=10 ** 9, height=64, batch_size=1)),
    workflow("batch-1e6", _graph(_empty_latent(batch_size=10 ** 6)), r"batch_size: 1000000 is above the maximum 64",
             node=lambda w: latent.EmptyLatent.execute(width=64, height=64, batch_size=10 ** 6)),
    workflow("width-negative", _graph(_empty_latent(height=-16)), r"height: -16 is below the minimum 16",
             node=lambda w: latent.EmptyLatent.execute(width=64, height=-16, batch_size=1)),
    workflow("steps-1e9", _graph(_scheduler(steps=10 ** 9)), r"steps: 1000000000 is above the maximum 1000",
             node=lambda w: sampling.Sampler.execute(transformer=None, positive=None, latent=None, seed=0,
                                                     steps=10 ** 9)),
    workflow("scheduler-steps-negative", _graph(_scheduler(steps=-5)), r"steps: -5 is below the minimum 1",
             node=lambda w: sampling.Scheduler.execute(steps=-5, width=64, height=64)),
    workflow("seed-negative", _graph(_empty_latent(), _scheduler(),
                                     _node("FluxBridgeAddNoise", latent=["3", 0], sigmas=["4", 0], seed=-1)),
             r"seed: -1 is below the minimum 0",
             node=lambda w: sampling.AddNoise.execute(latent=None, sigmas=None, seed=-1)),
    workflow("seed-2**64", None, r"seed: 18446744073709551616 is above the maximum",
             node=lambda w: sampling.Sampler.execute(transformer=None, positive=None, latent=None, seed=2 ** 64)),
    workflow("strength-nan", _with_lora(GOOD_LORA, model=NAN), r"strength_model: nan is not a number",
             node=lambda w: loaders.LoadLoRA.execute(transformer=good_transformer(), lora_name=GOOD_LORA,
                                                     strength_model=NAN)),
    workflow("guidance-1e9", _graph(_node("FluxBridgeLoadTextEncoders", clip_name="clip_l.safetensors",
                                          t5_name="t5xxl.safetensors", weight_dtype="default"),
                                    _node("FluxBridgeTextEncode", text_encoders=["3", 0], clip_text="a cat",
                                          t5_text="", guidance=1e9, max_sequence_length=64)),
             r"guidance: 1000000000.0 is above the maximum 100",
             node=lambda w: conditioning.TextEncode.execute(text_encoders=None, clip_text="a cat",
                                                            max_sequence_length=10 ** 9),
             node_cause=r"max_sequence_length: 1000000000 is above the maximum 512"),
    workflow("step-true-cfg", None, r"true_cfg: 1000000.0 is above the maximum 30",
             node=lambda w: sampling.SchedulerStep.execute(transformer=None, positive=None, latent=None,
                                                           sigmas=None, step=0, true_cfg=1e6)),
    # --- graphs that are not what they claim -----------------------------------------------------------------
    workflow("unknown-node", _graph(_node("os.system", command="touch PAYLOAD-RAN")),
             r"3 \(os.system\): unknown node type 'os.system'"),
    workflow("wrong-link-type", _graph(_empty_latent(), _node("FluxBridgeVAEDecode", vae=["3", 0], latent=["3", 0],
                                                              tiled="auto")),
             r"4 \(FluxBridgeVAEDecode\): vae: expects FLUXBRIDGE_VAE but node 3 \(FluxBridgeEmptyLatent\) output 0 "
             r"gives LATENT"),
    workflow("json-depth-bomb", b"[" * 200_000 + b"]" * 200_000, r"not valid JSON: nested too deeply"),
    workflow("json-size-bomb", b"", r"over the limit of 64 MB"),  # a sparse file, see _write_workflows
    workflow("not-utf8", b"\xff\xfe{\x00}", r"not valid JSON"),
    workflow("ui-malformed", {"nodes": [1, "two", None], "links": 3}, r"not a valid UI-format workflow"),
    # --- cut down, misplaced, mislabelled: exit 2 with what the file is, never a traceback or a wrong name ------
    weights("flux-cut.safetensors", r"flux-transformer \(6 tensors\): not a complete Flux transformer: no "),
    as_transformer("flux-cut.safetensors", r"flux-transformer \(6 tensors\): not a complete Flux transformer"),
    weights("t5-cut.safetensors", r"only 3 tensor\(s\) of t5-xxl weights, too few for a whole model"),
    weights("llama.gguf", r"a GGUF file for the 'llama' architecture"),
    weights("empty-folder", r"no weights found", node_cause=UNLISTED),  # no weights, no config.json: not listed
    lora("vae-as-lora.safetensors", r"not a LoRA but model weights: flux-vae weights \(bfl layout, \d+ tensors\); "
                                    r"load it with a model loader"),
    lora("t5-as-lora.safetensors", r"not a LoRA but model weights: t5-xxl weights \(comfy layout, \d+ tensors\)"),
    lora("badrank-lora.safetensors", r"a broken LoRA: none of its adapters can be used: .*lora_down \[4, 32\] and "
                                     r"lora_up \[32, 2\] have different ranks"),
    Case("bake:wrongwidth-lora.safetensors",
         [["convert", "{dm}/" + GOOD, "{conv}/baked.safetensors", "--to", "comfy", "--lora",
           "{loras}/wrongwidth-lora.safetensors"]], "wrongwidth-lora.safetensors",
         r"none of (its flux-transformer|the LoRA's 1 transformer) part.* fits.*gives \[48, 48\]",
         node=lambda w: loaders.LoadLoRA.execute(transformer=good_transformer(),
                                                 lora_name="wrongwidth-lora.safetensors")),
    Case("text-encoders:t5-in-the-clip-slot", [], "t5xxl.safetensors", r"not clip-l: found t5-xxl weights",
         node=lambda w: loaders.LoadTextEncoders.execute(clip_name="t5xxl.safetensors", t5_name="t5xxl.safetensors")),
    # --- destinations the system refuses: the user's choice of place, exit 2 (not an internal error) --------
    Case("destination:a-folder", [["convert", "{dm}/" + GOOD, "{conv}", "--to", "comfy"],
                                  ["lora", "convert", "{loras}/" + GOOD_LORA, "{conv}", "--to", "bfl"]],
         "converted", r"cannot write there: Is a directory"),
    Case("destination:under-a-file",
         [["convert", "{dm}/" + GOOD, "{dm}/empty.safetensors/x.safetensors", "--to", "bfl"],
          ["convert", "{dm}/" + GOOD, "{dm}/empty.safetensors/folder", "--to", "diffusers"],
          ["lora", "convert", "{loras}/" + GOOD_LORA, "{dm}/empty.safetensors/l.safetensors", "--to", "kohya"]],
         "empty.safetensors", r"a file is where this folder \(or one above it\) would go"),
    Case("vae:transformer-as-vae.safetensors", [], "transformer-as-vae.safetensors",
         r"not flux-vae: found flux-transformer weights \(bfl layout, 52 tensors\)",
         node=lambda w: loaders.LoadVAE.execute(vae_name="transformer-as-vae.safetensors")),
]
N_CASES = 79


def _absolute_workflows(w: World) -> dict:
    return {"model-absolute": _save_transformer(str(w.models / "diffusion_models" / GOOD)),
            "prefix-absolute": _save_transformer(GOOD, str(w.outside / "escaped"))}


def _write_workflows(w: World):
    absolute = _absolute_workflows(w)
    for case in CASES:
        runs = [argv for argv in case.clis if argv[0] == "run"]
        if not runs:
            continue
        path = Path(_fill(runs[0][1], w))
        api = absolute.get(case.id.partition(":")[2], case.workflow)
        if case.id == "workflow:json-size-bomb":
            with open(path, "wb") as f:
                f.truncate(runner.MAX_WORKFLOW_BYTES + 1)
        elif case.id == "workflow:seed-2**64":
            path.write_text(json.dumps(_graph(_empty_latent(), _scheduler(), _node(
                "FluxBridgeAddNoise", latent=["3", 0], sigmas=["4", 0], seed=2 ** 64))))
        elif case.id == "workflow:step-true-cfg":
            path.write_text(json.dumps(_graph(
                _node("FluxBridgeLoadTextEncoders", clip_name="clip_l.safetensors", t5_name="t5xxl.safetensors",
                      weight_dtype="default"),
                _node("FluxBridgeTextEncode", text_encoders=["3", 0], clip_text="a cat", t5_text="", guidance=3.5,
                      max_sequence_length=64),
                _empty_latent(), _scheduler(), LOAD_GOOD,
                _node("FluxBridgeSchedulerStep", transformer=["7", 0], positive=["4", 0], latent=["5", 0],
                      sigmas=["6", 0], step=0, true_cfg=1e6))))
        elif isinstance(api, bytes):
            path.write_bytes(api)
        else:
            path.write_text(json.dumps(api))


def _fill(arg: str, w: World) -> str:
    return (arg.replace("{dm}", str(w.models / "diffusion_models")).replace("{loras}", str(w.models / "loras"))
            .replace("{models}", str(w.models)).replace("{out}", str(w.output)).replace("{conv}", str(w.converted))
            .replace("{wf}", str(w.workflows)).replace("{in}", str(w.input)))


# --------------------------------------------------------------------------------------------- checks

def snapshot(w: World) -> dict:
    """Every file and folder under the corpus root, outside the output folder (links not followed)."""
    seen = {}
    for dirpath, dirnames, filenames in os.walk(w.root):
        if Path(dirpath) == w.output:
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p == w.output:  # (its own time stamp changes with what is made inside it)
                continue
            st = p.lstat()
            seen[str(p)] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return seen


def output_files(w: World) -> list:
    return sorted(str(p) for p in w.output.rglob("*") if p.is_file() and not p.is_symlink())


def run_cli(argv, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def serves_a_good_request(w: World, capsys) -> None:
    code, out, err = run_cli(["inspect", w.models / "diffusion_models" / GOOD, "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["family"] == "flux-transformer"


@pytest.fixture(scope="module")
def workflows_written(world):
    _write_workflows(world)
    return world


def test_corpus_size():
    print(f"security corpus: {len(CASES)} cases")
    assert len(CASES) == N_CASES
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_hostile_input_is_refused_everywhere(case: Case, workflows_written, on_host, capsys):
    w = workflows_written
    before = snapshot(w)
    written_before = output_files(w)
    for argv in case.clis:
        code, out, err = run_cli([_fill(a, w) for a in argv], capsys)
        lines = err.strip().splitlines()
        assert code == 2, f"{argv[0]}: exit {code}\n{err}"
        assert len(lines) == 1 and lines[0].startswith("fluxbridge: "), err
        assert case.name in lines[0], f"the line does not name {case.name}: {lines[0]}"
        assert re.search(case.cause, lines[0]), f"{lines[0]!r} does not say {case.cause!r}"
        assert "Traceback" not in err and out == ""
        serves_a_good_request(w, capsys)
    if case.node is not None:
        with pytest.raises(BadInput) as exc:
            case.node(w)
        assert re.search(case.node_cause or case.cause, str(exc.value)), str(exc.value)
        assert "\n" not in str(exc.value)
        # and the node path still works afterwards
        assert good_transformer().family == "flux-transformer"
    assert not w.marker.exists(), "a pickle payload ran"
    assert snapshot(w) == before, "something was written outside the output folder"
    assert output_files(w) == written_before, "a failed request left a file in the output folder"


def test_the_users_links_are_followed(workflows_written, on_host, capsys, tmp_path):
    """Not hostile: links the user made (a model kept in another store, an output sub-folder on another disk)
    are followed on both roads, as ComfyUI follows them. A workflow cannot make a link, and the hostile
    spellings of the same targets (absolute, '..', NUL, not listed) are refused by the cases above."""
    w = workflows_written
    store, saved = tmp_path / "store", tmp_path / "saved"
    store.mkdir()
    saved.mkdir()
    (store / "kept.safetensors").write_bytes(w.good_bytes)
    model_link = w.models / "diffusion_models" / "linked.safetensors"
    output_link = w.output / "elsewhere"
    model_link.symlink_to(store / "kept.safetensors")
    output_link.symlink_to(saved, target_is_directory=True)
    try:
        path = tmp_path / "linked.json"
        path.write_text(json.dumps(_save_transformer("linked.safetensors", "elsewhere/t")))
        code, out, err = run_cli(["run", path, "--models", w.models, "--output", w.output], capsys)
        assert code == 0, err
        assert [p.name for p in saved.iterdir()] == ["t_00001_.safetensors"]
        assert load_transformer("linked.safetensors").args[0].family == "flux-transformer"
    finally:
        model_link.unlink()
        output_link.unlink()


def test_the_pickle_payloads_are_live(world, tmp_path):
    """The corpus' pickles really execute code when unpickled (so the marker checks above mean something)."""
    marker = tmp_path / "ran"
    blob = pickle.dumps({"state_dict": Payload(marker)}, protocol=2)
    code = f"import pickle, sys; pickle.loads({blob!r})"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert marker.exists()
    zipped = tmp_path / "p.pt"
    torch.save({"w": Payload(tmp_path / "ran-too")}, str(zipped))
    subprocess.run([sys.executable, "-c", f"import torch; torch.load({str(zipped)!r}, weights_only=False)"],
                   check=True, timeout=120)
    assert (tmp_path / "ran-too").exists()


def test_no_unpickling_anywhere_in_the_pack():
    """No code path can unpickle: no torch.load / pickle.load / numpy allow_pickle / remote code, anywhere in
    the pack's sources (tests excluded)."""
    root = Path(fluxbridge.__file__).resolve().parent
    banned = re.compile(r"torch\.load\(|pickle\.loads?\(|allow_pickle\s*=\s*True|trust_remote_code\s*=\s*True"
                        r"|(?<![\w.])(eval|exec)\(|use_safetensors\s*=\s*False")
    hits = []
    # the pack's modules: the root's own .py files and its sub-packages (not a .venv or build folder in it)
    sources = [*root.glob("*.py"), *(p for d in ("convert", "pipeline", "nodes") for p in (root / d).rglob("*.py"))]
    assert len(sources) > 40
    for path in sources:
        rel = path.relative_to(root)
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if banned.search(line):
                hits.append(f"{rel}:{n}: {line.strip()}")
    assert not hits, "\n".join(hits)


# The real command in a subprocess, stderr into a real file (as `2>err.txt`), stdout a pipe: the exit status
# and the streams as a user or a script sees them. "{pipe}" runs it with the reader of stdout already gone
# (as `| head` does). Each entry: (argv, expected exit, the file its one error line names, what it says).
SUBPROCESS_CORPUS = [
    (["inspect", "{dm}/zip-inside.safetensors"], 2, "zip-inside.safetensors",  # a pickle: never unpickled
     "pickle-based checkpoint refused"),
    (["inspect", "{dm}/terabyte-tensor.safetensors"], 2, "terabyte-tensor.safetensors", "truncated"),
    (["inspect", "{dm}/flux-cut.safetensors"], 2, "flux-cut.safetensors", "not a complete Flux transformer"),
    (["convert", "{dm}/flux-cut.safetensors", "{conv}/sub-cut.safetensors", "--to", "diffusers"], 2,
     "flux-cut.safetensors", "not a complete Flux transformer"),
    (["inspect", "{dm}/t5-cut.safetensors"], 2, "t5-cut.safetensors", "too few for a whole model"),
    (["inspect", "{dm}/llama.gguf", "--json"], 2, "llama.gguf", "a GGUF file for the 'llama' architecture"),
    (["inspect", "{dm}/empty-folder"], 2, "empty-folder", "no weights found"),
    (["lora", "inspect", "{loras}/vae-as-lora.safetensors"], 2, "vae-as-lora.safetensors",
     "not a LoRA but model weights: flux-vae"),
    (["lora", "convert", "{loras}/badrank-lora.safetensors", "{conv}/sub-l.safetensors", "--to", "bfl"], 2,
     "badrank-lora.safetensors", "a broken LoRA"),
    (["convert", "{dm}/" + GOOD, "{conv}/sub-baked.safetensors", "--to", "bfl", "--lora",
      "{loras}/wrongwidth-lora.safetensors:0.5"], 2, "wrongwidth-lora.safetensors",
     "none of its flux-transformer parts fits"),
    (["run", "{wf}/transformer-flux-cut.safetensors.json", "--models", "{models}", "--output", "{out}"], 2,
     "flux-cut.safetensors", "not a complete Flux transformer"),  # fails while running, in the loader
    (["run", "{wf}/model-dotdot.json", "--models", "{models}", "--output", "{out}"], 2, "model-dotdot.json",
     "'..' part"),
    (["inspect", "{dm}/" + GOOD], 0, None, None),
    (["{pipe}", "inspect", "{dm}/" + GOOD, "--json"], 0, None, None),
    (["{pipe}", "lora", "inspect", "{loras}/" + GOOD_LORA], 0, None, None),
    (["{pipe}", "convert", "{dm}/" + GOOD, "{conv}/sub-piped.safetensors", "--to", "comfy"], 0, None, None),
]


def test_cli_subprocess_corpus(workflows_written, tmp_path):
    """Every entry ends in exit 0, or 2 with exactly one line on stderr that names the file (no traceback, no
    progress frame); exit 1 (a fault of ours) is never the answer to a bad file. A closed stdout pipe ends
    the command quietly with 0, its work done. No pickle payload runs."""
    from concurrent.futures import ThreadPoolExecutor

    w = workflows_written
    env = checkout_env(tmp_path)
    env.pop("TQDM_DISABLE", None)

    def run(i):
        argv = [_fill(a, w) for a in SUBPROCESS_CORPUS[i][0]]
        piped = argv[0] == "{pipe}"
        argv = argv[1:] if piped else argv
        err_path = tmp_path / f"err-{i}.txt"
        read, write = os.pipe()
        if piped:
            os.close(read)  # the reader has gone before anything is written
        try:
            with open(err_path, "wb") as err:
                done = subprocess.run([sys.executable, "-m", "fluxbridge", *argv], stdout=write, stderr=err,
                                      env=env, timeout=300)
        finally:
            os.close(write)
        out = b""
        if not piped:
            with os.fdopen(read, "rb") as r:
                out = r.read()
        return argv, done.returncode, err_path.read_bytes().decode(), out

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(run, range(len(SUBPROCESS_CORPUS))))
    counts = {0: 0, 2: 0}
    for (_, expected, name, cause), (argv, code, err, out) in zip(SUBPROCESS_CORPUS, results):
        assert code == expected, (argv, code, err)
        counts[code] += 1
        assert "\r" not in err and "Traceback" not in err and "Exception ignored" not in err, (argv, err)
        if code == 2:
            assert err.count("\n") == 1 and err.startswith("fluxbridge: ") and name in err, (argv, err)
            assert cause in err, (argv, cause, err)
            assert out == b"", (argv, out)
        else:
            assert err == "", (argv, err)
    assert (w.converted / "sub-piped.safetensors").is_file()  # the piped convert did its work
    assert not (w.converted / "sub-baked.safetensors").exists() and not (w.converted / "sub-cut.safetensors").exists()
    assert not w.marker.exists()
    print(f"CLI subprocess corpus: {len(results)} runs, exit 2 (one line): {counts[2]}, exit 0: {counts[0]}")


# ----------------------------------------------------------------------------------------------- memory

MEMORY_PROBE = textwrap.dedent("""
    import json, sys
    from pathlib import Path

    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmHWM")

    from fluxbridge.runtime import host
    from fluxbridge.convert.safetensors_io import open_weights
    from fluxbridge.common.errors import BadInput
    from fluxbridge.nodes import loaders

    dm, loras = Path(sys.argv[1]), Path(sys.argv[2])
    host.set_models_dir(dm.parent)
    good = loaders.LoadTransformer.execute(model_name=sys.argv[3]).args[0]  # warm: imports, the good model
    try:
        loaders.LoadLoRA.execute(transformer=good, lora_name="expand-bomb-lora.safetensors")
    except BadInput:
        pass
    before = hwm()
    refused = []
    for name in sys.argv[4].split(","):
        try:
            open_weights(dm / name)
        except BadInput:
            refused.append(name)
    for name in ("kron-bomb-lora.safetensors", "expand-bomb-lora.safetensors", "redos-lora.safetensors"):
        try:
            loaders.LoadLoRA.execute(transformer=good, lora_name=name)
        except BadInput:
            refused.append(name)
    try:
        loaders.LoadTransformer.execute(model_name="config-bomb")
    except BadInput:
        refused.append("config-bomb")
    print(json.dumps({"before": before, "after": hwm(), "refused": refused}))
""")

TERABYTE_FILES = ("terabyte-tensor.safetensors", "terabyte-header.safetensors", "absurd-empty-shape.safetensors",
                  "tensor-count.gguf", "terabyte-tensor.gguf", "string-length.gguf")


def test_terabyte_claims_are_refused_before_allocating(world, tmp_path):
    """Peak RSS (VmHWM of a fresh process: ru_maxrss would include the parent's) grows by less than 200 MB
    while files claiming terabytes, LoRAs whose products would be terabytes, and a config.json asking for a
    million layers are all refused."""
    env = checkout_env(tmp_path, TQDM_DISABLE="1")
    r = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(world.models / "diffusion_models"),
                        str(world.models / "loras"), GOOD, ",".join(TERABYTE_FILES)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    growth = (result["after"] - result["before"]) / 2 ** 20
    print(f"peak RSS growth while refusing {len(result['refused'])} terabyte claims: {growth:.1f} MB "
          f"(VmHWM {result['before'] / 2 ** 20:.0f} -> {result['after'] / 2 ** 20:.0f} MB)")
    assert len(result["refused"]) == len(TERABYTE_FILES) + 4, result["refused"]
    assert growth < 200
