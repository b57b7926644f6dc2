"""Fuzzing the readers and the workflow runner: for any input, the answer is a result or `BadInput`, never
another exception (which the command line would report as an internal error, exit 1).

* safetensors headers (JSON of any shape, lying sizes and offsets) through `open_weights`, the tensors,
  `fluxbridge inspect` and `lora inspect`;
* GGUF headers (structured: counts, key/value types, dims, ggml types, offsets; and bit flips of a valid file);
* the LoRA key parser on random state dicts (names built from the layout tables' own templates, every
  prefix and suffix, random shapes and dtypes, random PEFT metadata), then planned, applied to tiny
  models and removed (bitwise), and rewritten in every format;
* API- and UI-format workflows (random node types, links, values) through `run_workflow`.

Each test is bounded (150 examples, no deadline; `FLUXBRIDGE_FUZZ_EXAMPLES` raises it for a longer campaign);
the three security test files together run in well under 90 s on two cores.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fluxbridge.headless import cli, factory, runner
from fluxbridge.convert.families import FAMILIES
from fluxbridge.convert.lora import apply_loras, load_lora
from fluxbridge.convert.lora.patch import Plan
from fluxbridge.convert.lora.write import TARGETS, render_lora
from fluxbridge.convert.safetensors_io import DTYPES, open_weights
from fluxbridge.common.errors import BadInput
from gguf_bytes import ARCH, gguf_bytes, gguf_string  # tests/helpers
from model_state import assert_same_state, shapes_of, snapshot  # tests/helpers

# FLUXBRIDGE_FUZZ_EXAMPLES=20000 runs a longer campaign locally
FUZZ = settings(max_examples=int(os.environ.get("FLUXBRIDGE_FUZZ_EXAMPLES", "150")), deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])
SCRATCH = Path(tempfile.mkdtemp(prefix="fluxbridge-fuzz-"))


@pytest.fixture(scope="module", autouse=True)
def _scratch_removed():
    yield
    shutil.rmtree(SCRATCH, ignore_errors=True)


def quiet_cli(argv) -> int:
    """`cli.main(argv)` with its output swallowed; returns the exit status."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return cli.main([str(a) for a in argv])


# ----------------------------------------------------------------------------------------- safetensors

NAMES = st.one_of(st.sampled_from(["img_in.weight", "img_in.bias", "double_blocks.0.img_attn.qkv.weight",
                                   "x_embedder.weight", "a", "", "__metadata__ ", "lora_unet_x.alpha",
                                   "transformer.proj_out.lora_A.weight"]),
                  st.text(max_size=12))
HUGE = st.sampled_from([0, 1, 2, 3, 7, 8, 64, 2 ** 31, 2 ** 32 - 1, 2 ** 50, 2 ** 63, 2 ** 64, 10 ** 30])
SMALL_INT = st.integers(-3, 40)
JSONISH = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats() | st.text(max_size=8),
                       lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                    max_size=3), max_leaves=8)


@st.composite
def st_entry(draw):
    """A tensor entry: mostly well-formed, with any field possibly wrong."""
    if draw(st.integers(0, 9)) == 0:
        return draw(JSONISH)
    entry = {"dtype": draw(st.sampled_from(list(DTYPES)) | st.sampled_from(["F4", "f32", "", "I128"]) | JSONISH),
             "shape": draw(st.lists(SMALL_INT | HUGE, max_size=4) | JSONISH),
             "data_offsets": draw(st.lists(SMALL_INT | HUGE | st.integers(0, 512), min_size=2, max_size=2)
                                  | JSONISH)}
    for key in draw(st.lists(st.sampled_from(["dtype", "shape", "data_offsets"]), max_size=1)):
        entry.pop(key, None)
    return entry


@st.composite
def st_safetensors(draw) -> bytes:
    header = draw(st.dictionaries(NAMES, st_entry(), max_size=5))
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=6), st.text(max_size=6) | JSONISH,
                                                      max_size=3) | JSONISH)
    raw = json.dumps(header).encode() if draw(st.integers(0, 7)) else draw(st.binary(max_size=40))
    raw += b" " * draw(st.integers(0, 7))
    length = len(raw) if draw(st.integers(0, 5)) else draw(HUGE | st.integers(0, 200))
    data = draw(st.binary(max_size=300))
    return struct.pack("<Q", length % 2 ** 64) + raw + data


def _touch_all(weights) -> None:
    for name in weights:
        t = weights[name]
        if hasattr(t, "dequantize") and not isinstance(t, torch.Tensor):
            t = t.dequantize()
        t.float().sum() if t.is_floating_point() else t.sum()
        weights.shape(name)


def _check_reader(blob: bytes, name: str):
    """The reader opens `blob` (and every tensor reads) or refuses it with BadInput; `inspect` exits 0 or 2."""
    path = SCRATCH / name
    path.write_bytes(blob)
    try:
        weights = open_weights(path)
    except BadInput as exc:
        event(f"refused: {exc.cause.split(':')[0][:30]}")
    else:
        event("opened")
        _touch_all(weights)
        weights.close()
    assert quiet_cli(["inspect", path]) in (0, 2)
    return path


@FUZZ
@given(blob=st_safetensors())
def test_fuzz_safetensors_headers(blob):
    path = _check_reader(blob, "fuzz.safetensors")
    try:
        load_lora(path)
    except BadInput:
        pass


# ------------------------------------------------------------------------------------------------ GGUF

VALUE_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


@st.composite
def st_gguf_value(draw, depth=0) -> bytes:
    vtype = draw(st.sampled_from([0, 4, 5, 6, 7, 8, 8, 9, 10, 12, 13, 77]))
    blob = struct.pack("<I", vtype)
    if vtype in VALUE_SIZES:
        return blob + draw(st.binary(min_size=VALUE_SIZES[vtype], max_size=VALUE_SIZES[vtype]))
    if vtype == 8:
        text = draw(st.binary(max_size=10))
        n = len(text) if draw(st.integers(0, 5)) else draw(HUGE)
        return blob + struct.pack("<Q", n % 2 ** 64) + text
    if vtype == 9:
        itype = draw(st.sampled_from([0, 4, 6, 8, 9, 55]))
        count = draw(st.integers(0, 4) | HUGE)
        items = b""
        for _ in range(min(count, 4)):
            if itype in VALUE_SIZES:
                items += draw(st.binary(min_size=VALUE_SIZES[itype], max_size=VALUE_SIZES[itype]))
            elif itype == 8:
                items += gguf_string(draw(st.binary(max_size=6)))
            elif itype == 9 and depth == 0:
                items += draw(st_gguf_value(depth=1))[4:]
        return blob + struct.pack("<IQ", itype, count % 2 ** 64) + items
    return blob + draw(st.binary(max_size=8))


GGML_TYPES = st.sampled_from([0, 1, 2, 8, 10, 12, 14, 24, 26, 28, 30, 9, 39, 99, 2 ** 31])


@st.composite
def st_gguf(draw) -> bytes:
    version = draw(st.sampled_from([3, 3, 3, 2, 1, 4, 3 << 24]))
    kv = [(draw(st.sampled_from(["general.architecture", "general.alignment", "general.name"]) | st.text(max_size=8)),
           draw(st_gguf_value())) for _ in range(draw(st.integers(0, 3)))]
    tensors = []
    for _ in range(draw(st.integers(0, 3))):
        dims = draw(st.lists(st.sampled_from([0, 1, 2, 4, 32, 64, 256]) | HUGE, max_size=4))
        tensors.append((draw(NAMES).encode(), dims, draw(GGML_TYPES), draw(st.integers(0, 128) | HUGE)))
    n_tensors = len(tensors) if draw(st.integers(0, 5)) else draw(HUGE)
    n_kv = len(kv) if draw(st.integers(0, 5)) else draw(HUGE)
    tensors = [(name, [d % 2 ** 64 for d in dims], qtype % 2 ** 32, offset % 2 ** 64)
               for name, dims, qtype, offset in tensors]
    return gguf_bytes(kv, tensors, draw(st.binary(max_size=600)), version, n_tensors % 2 ** 64, n_kv % 2 ** 64)


VALID_GGUF = gguf_bytes([ARCH], [("img_in.weight", (32, 2), 8, 0), ("img_in.bias", (2,), 0, 96)], b"\0" * 104)


def _check_gguf(blob: bytes) -> None:
    _check_reader(blob, "fuzz.gguf")


@FUZZ
@given(blob=st_gguf())
def test_fuzz_gguf_headers(blob):
    _check_gguf(blob)


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, len(VALID_GGUF) - 1), st.integers(0, 7)), min_size=1, max_size=6),
       cut=st.integers(0, 40))
def test_fuzz_gguf_bit_flips_and_cuts(flips, cut):
    blob = bytearray(VALID_GGUF)
    for pos, bit in flips:
        blob[pos] ^= 1 << bit
    _check_gguf(bytes(blob[: len(blob) - cut]))


def test_the_valid_gguf_is_valid():
    path = SCRATCH / "valid.gguf"
    path.write_bytes(VALID_GGUF)
    with open_weights(path) as g:
        assert sorted(g) == ["img_in.bias", "img_in.weight"] and g.shape("img_in.weight") == (2, 32)


# ------------------------------------------------------------------------------------------------ LoRA

def _module_names(family: str, side: str) -> list[str]:
    out = []
    for rule in FAMILIES[family].TABLE.rules:
        for template in rule.templates(side):
            out.append(re.sub(r"\{\w+\}", "0", template))
    return sorted(set(out))


FLUX_A, FLUX_B = _module_names("flux-transformer", "a"), _module_names("flux-transformer", "b")
CLIP_A, T5_A = _module_names("clip-l", "a"), _module_names("t5-xxl", "a")
PREFIXES = ["", "lora_unet_", "lora_transformer_", "lycoris_", "lora_te1_", "lora_te2_", "transformer.",
            "diffusion_model.", "model.diffusion_model.", "base_model.model.", "text_encoder.", "text_encoder_2.",
            "text_encoders.clip_l.transformer.", "text_encoders.t5xxl.transformer.", "clip_l.", "t5."]
SUFFIXES = [".lora_down.weight", ".lora_up.weight", ".lora_A.weight", ".lora_B.weight", ".lora_B.bias", ".alpha",
            ".lora_A.default.weight", ".dora_scale", ".lora_magnitude_vector", ".hada_w1_a", ".hada_w1_b",
            ".hada_w2_a", ".hada_w2_b", ".lokr_w1", ".lokr_w2", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2_a",
            ".lokr_w2_b", ".diff", ".diff_b", ".set_weight", ".reshape_weight", ".lora_mid.weight", ".oft_blocks",
            ".weight", ".bias", ".scale", ".down.weight", ".up.weight", ""]
DIMS = st.sampled_from([0, 1, 2, 3, 4, 8, 16, 32, 64, 96, 128])
DTYPES_LORA = st.sampled_from([torch.float32, torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.bool,
                               torch.int64])


@st.composite
def st_lora_key(draw) -> str:
    prefix = draw(st.sampled_from(PREFIXES))
    module = draw(st.sampled_from(FLUX_A + FLUX_B + CLIP_A + T5_A) | st.text(max_size=10))
    if prefix.endswith("_") and draw(st.booleans()):
        module = module.replace(".", "_")
    return prefix + module + draw(st.sampled_from(SUFFIXES))


@st.composite
def st_tensor(draw) -> torch.Tensor:
    shape = draw(st.lists(DIMS, max_size=3))
    dtype = draw(DTYPES_LORA)
    g = torch.Generator().manual_seed(draw(st.integers(0, 1000)))
    t = torch.randn(shape, generator=g) * 0.1
    if dtype == torch.bool:
        return t > 0
    if dtype in (torch.int8, torch.int64):
        return (t * 20).to(dtype)
    return t.to(dtype)


@st.composite
def st_metadata(draw) -> dict:
    meta = {}
    if draw(st.booleans()):
        cfg = {"transformer.lora_alpha": draw(st.integers(-4, 64) | st.floats(allow_nan=False) | JSONISH),
               "transformer.alpha_pattern": draw(st.dictionaries(
                   st.sampled_from(["^transformer_blocks\\.0\\.attn\\.to_q", ".*to_q", "(a|aa)+", "(.*)*x", "[",
                                    "proj_out"]) | st.text(max_size=10), st.integers(1, 16) | JSONISH, max_size=3)
                   | JSONISH),
               "transformer.use_rslora": draw(st.booleans() | JSONISH)}
        meta["lora_adapter_metadata"] = json.dumps(cfg) if draw(st.integers(0, 5)) else draw(st.text(max_size=20))
    if draw(st.booleans()):
        meta["software"] = draw(st.sampled_from(['{"name": "ai-toolkit"}', "kohya", "[1]", "{"]))
    return meta


@pytest.fixture(scope="module")
def tiny_models():
    return {"flux-transformer": factory.tiny_flux_transformer(width=32, heads=2, double=1, single=1, seed=1),
            "clip-l": factory.tiny_clip_l(hidden_size=32, layers=1, seed=2),
            "t5-xxl": factory.tiny_t5(d_model=32, layers=1, seed=3)}


@FUZZ
@given(tensors=st.dictionaries(st_lora_key(), st_tensor(), max_size=6), metadata=st_metadata(),
       strength=st.sampled_from([1.0, -0.5, 0.0, 3.0]))
def test_fuzz_lora_parser_planner_and_writers(tiny_models, tensors, metadata, strength):
    try:
        lora = load_lora(tensors, metadata=metadata, name="fuzz")
    except BadInput as exc:
        event(f"refused: {exc.cause[:20]}")
        return
    event(f"parsed: {len(lora.parts)} part(s)")
    json.dumps(lora.report)
    for family, model in tiny_models.items():
        Plan(family, [(lora, strength)], shapes_of(model.state_dict()))
        if not lora.family_parts(family):
            continue
        before = snapshot(model)
        try:
            handle = apply_loras(model, family, [(lora, strength)])
        except BadInput:
            handle = None
        if handle is not None:
            event(f"applied to {family}: {sum(len(r['applied']['patched']) for r in handle.reports)} module(s)")
            handle.remove()
        assert_same_state(model, before)
    for to in TARGETS:
        try:
            render_lora(lora, to)
        except BadInput:
            pass


# ------------------------------------------------------------------------------------------- workflows

@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-workflows")
    for sub in ("models/diffusion_models", "models/loras", "models/vae", "models/text_encoders", "input", "out"):
        (root / sub).mkdir(parents=True)
    return root


def _specs():
    from fluxbridge.headless.runner import registry
    return registry()


SPECS = None
NODE_TYPES = ["SaveImage", "PreviewImage", "LoadImage", "ImageScaleBy", "EmptySD3LatentImage", "SolidMask",
              "MaskComposite", "FluxBridgeEmptyLatent", "FluxBridgeScheduler", "FluxBridgeAddNoise", "FluxBridgeVAEDecode",
              "FluxBridgeSampler", "FluxBridgeLoadTransformer", "FluxBridgeSaveTransformer", "FluxBridgeLoadLoRA",
              "FluxBridgeConvertLoRA", "KSampler", "", "os.system"]
ODD_VALUES = st.sampled_from([None, True, -1, 0, 2 ** 64, 10 ** 30, -10 ** 30, 1e308, math.inf, -math.inf, math.nan,
                              "", "../../etc/passwd", "/abs/path", "C:\\x", "a\x00b", "\ud800", "x" * 300, [],
                              ["1"], ["1", 0, 0], [1, 2], {}, {"a": 1}, [["1", 0]], ["1", True], ["1", -1],
                              ["1", 10 ** 20], "nearest-exact", "fluxbridge/out", 1.5, 8.0, 64])


@st.composite
def st_api_workflow(draw):
    global SPECS
    if SPECS is None:
        SPECS = _specs()
    ids = draw(st.lists(st.sampled_from(["1", "2", "3", "4", "5", "x", "10"]), min_size=1, max_size=5, unique=True))
    api = {}
    for nid in ids:
        cls = draw(st.sampled_from(NODE_TYPES))
        spec = SPECS.get(cls)
        inputs = {}
        for inp in (spec.inputs if spec else []):
            choice = draw(st.integers(0, 5))
            if choice == 0:
                continue  # missing
            if choice == 1:
                inputs[inp.name] = draw(ODD_VALUES)
            elif not inp.is_widget or choice == 2:
                inputs[inp.name] = [draw(st.sampled_from(ids + ["99"])), draw(st.integers(-1, 2))]
            elif inp.options:
                inputs[inp.name] = draw(st.sampled_from(inp.options))
            else:
                inputs[inp.name] = inp.default if inp.default is not None else draw(ODD_VALUES)
        if draw(st.integers(0, 6)) == 0:
            inputs[draw(st.text(max_size=5))] = draw(ODD_VALUES)
        node = {"class_type": cls, "inputs": inputs}
        if draw(st.integers(0, 9)) == 0:
            node = draw(JSONISH)
        api[nid] = node
    if draw(st.integers(0, 12)) == 0:
        return draw(JSONISH)
    return api


@st.composite
def st_ui_workflow(draw):
    nodes = []
    for nid in range(draw(st.integers(0, 4))):
        if draw(st.integers(0, 8)) == 0:
            nodes.append(draw(JSONISH))
            continue
        node = {"id": draw(st.integers(0, 5) | st.text(max_size=2)), "type": draw(st.sampled_from(NODE_TYPES)),
                "inputs": draw(st.lists(st.fixed_dictionaries(
                    {"name": st.sampled_from(["images", "image", "latent", "vae", "x"]) | JSONISH,
                     "type": st.sampled_from(["IMAGE", "LATENT", "FLUXBRIDGE_VAE"]) | JSONISH,
                     "link": st.integers(0, 5) | st.none() | JSONISH}), max_size=2) | JSONISH),
                "outputs": draw(st.lists(st.fixed_dictionaries(
                    {"type": st.sampled_from(["IMAGE", "LATENT"]) | JSONISH,
                     "links": st.lists(st.integers(0, 5), max_size=2) | st.none() | JSONISH}), max_size=2) | JSONISH),
                "widgets_values": draw(st.lists(ODD_VALUES, max_size=4) | JSONISH),
                "mode": draw(st.sampled_from([0, 2, 4]) | JSONISH)}
        nodes.append(node)
    links = draw(st.lists(st.lists(st.integers(0, 5) | st.sampled_from(["IMAGE", "LATENT"]) | JSONISH,
                                   min_size=6, max_size=6) | JSONISH, max_size=4) | JSONISH)
    return {"nodes": nodes, "links": links, "version": 0.4}


def _run(folders, document) -> None:
    path = folders / "workflow.json"
    path.write_text(json.dumps(document), encoding="utf-8", errors="surrogatepass")
    try:
        runner.run_workflow(path, models_dir=folders / "models", output_dir=folders / "out",
                            input_dir=folders / "input", progress=False)
    except BadInput as exc:
        cause = str(exc.cause)
        event("refused: " + next((k for k in ("JSON", "unknown node type", "not one of the choices", "expects",
                                               "missing", "no output node", "cycle", "not a valid UI", "link",
                                               "is not", "above", "below") if k in cause), "other"))
    else:
        event("ran")


@FUZZ
@given(api=st_api_workflow())
def test_fuzz_api_workflows(folders, api):
    _run(folders, api)


@FUZZ
@given(ui=st_ui_workflow())
def test_fuzz_ui_workflows(folders, ui):
    _run(folders, ui)


def test_a_graph_that_validates_reaches_the_cycle_check(folders):
    """The fuzzed graphs can pass validation: two upscales feeding each other are valid node by node."""
    api = {"1": {"class_type": "ImageScaleBy", "inputs": {"image": ["2", 0], "upscale_method": "area",
                                                          "scale_by": 1.0}},
           "2": {"class_type": "ImageScaleBy", "inputs": {"image": ["1", 0], "upscale_method": "area",
                                                          "scale_by": 1.0}},
           "3": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}}
    with pytest.raises(BadInput, match="cycle"):
        _run_raising(folders, api)


def _run_raising(folders, document):
    path = folders / "workflow.json"
    path.write_text(json.dumps(document))
    runner.run_workflow(path, models_dir=folders / "models", output_dir=folders / "out",
                        input_dir=folders / "input", progress=False)
