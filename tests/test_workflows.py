"""Example workflows: each UI workflow and its API twin pass the workflow check; the check catches what it
should; the frontend extension's own tests (node --test web/tests/) pass."""
import copy
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from fluxbridge.runtime import host
from fluxbridge.headless.native_nodes import NATIVE_NODES
from fluxbridge.headless.runner import registry
from fluxbridge.runtime.node_specs import output_prefix_problem
from fluxbridge.headless.workflows import (example_pairs, examples_dir, ui_to_api,
                                  ui_widget_values, validate_api, workflow_check)

PACK = Path(__file__).resolve().parent.parent
EXPECTED = {
    "flux_dev_text_to_image", "flux_schnell_text_to_image", "flux_dev_img2img", "flux_fill_inpaint",
    "flux_dev_lora_stack", "flux_dev_custom_sampling", "flux_convert_and_save", "flux_dev_with_native_nodes",
    "flux_kontext_edit", "flux_depth", "flux_canny_lora", "flux_redux_variation",
    "flux_dev_native_lora", "flux_dev_native_diffusers_loader",
}
MODEL_NAMES = {  # every model file name the examples use, by folder
    "diffusion_models": ["flux1-dev.safetensors", "flux1-schnell.safetensors", "flux1-fill-dev.safetensors",
                         "flux1-kontext-dev.safetensors", "flux1-depth-dev.safetensors"],
    "vae": ["ae.safetensors"],
    "text_encoders": ["clip_l.safetensors", "t5xxl_fp16.safetensors"],
    "loras": ["flux_lora_style.safetensors", "flux_lora_detail.safetensors", "flux1-canny-dev-lora.safetensors"],
    "style_models": ["flux1-redux-dev.safetensors"],
    "clip_vision": ["sigclip_vision_patch14_384.safetensors"],
}
INPUT_IMAGES = ["example.png"]  # the one input image ComfyUI ships (input/example.png)
DIFFUSERS_FOLDERS = {"diffusion_models": ["FLUX.1-dev"]}  # diffusers pipeline folders the examples name


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    """Specs read with a models folder holding the usual file names (empty files: only names are listed)
    and an input folder holding the example images."""
    root = tmp_path_factory.mktemp("names")
    for folder, names in MODEL_NAMES.items():
        (root / "models" / folder).mkdir(parents=True)
        for name in names:
            (root / "models" / folder / name).write_bytes(b"")
    for folder, names in DIFFUSERS_FOLDERS.items():
        for name in names:
            (root / "models" / folder / name).mkdir()
            (root / "models" / folder / name / "model_index.json").write_text("{}")
    (root / "input").mkdir()
    for name in INPUT_IMAGES:
        (root / "input" / name).write_bytes(b"")
    previous = host.models_dir()
    host.set_models_dir(root / "models")
    try:
        yield registry(root / "input")
    finally:
        host.set_models_dir(previous)


def pairs():
    return [pytest.param(ui, api, id=ui.stem) for ui, api in example_pairs()]


def test_every_expected_example_is_shipped_with_an_api_twin():
    names = {ui.stem for ui, _ in example_pairs()}
    assert names == EXPECTED
    for ui, api in example_pairs():
        assert api.is_file(), f"{ui.name} has no API twin"
    assert sorted(p.name for p in (examples_dir() / "api").glob("*.json")) == sorted(f"{n}.json" for n in EXPECTED)


@pytest.mark.parametrize("ui_path,api_path", pairs())
def test_example_passes_the_workflow_check(ui_path, api_path, specs):
    assert workflow_check(ui_path, api_path, specs) == []


@pytest.mark.parametrize("ui_path,api_path", pairs())
def test_example_ui_format(ui_path, api_path, specs):
    ui = json.loads(ui_path.read_text())
    assert ui["version"] == 0.4
    types = set()
    for node in ui["nodes"]:
        types.add(node["type"])
        assert node["properties"]["Node name for S&R"] == node["type"]
        assert node["type"].startswith("FluxBridge") or node["type"] in NATIVE_NODES
        for key in ("id", "type", "pos", "size", "flags", "order", "mode", "inputs", "outputs", "widgets_values"):
            assert key in node, (node["id"], key)
        spec = specs[node["type"]]
        # every socket input is listed, in the frontend's order, so link slots mean what they say
        assert [i["name"] for i in node["inputs"]] == [i.name for i in spec.sockets()]
        # numbers: widgets_values inside each input's range, combo values among the choices
        named, problems = ui_widget_values(spec, node["widgets_values"])
        assert not problems
        for name, value in named.items():
            inp = spec.input(name)
            if inp.type in ("INT", "FLOAT"):
                assert (inp.min is None or value >= inp.min) and (inp.max is None or value <= inp.max), (name, value)
            if inp.type == "COMBO":
                assert value in inp.options, (name, value)
    orders = sorted(n["order"] for n in ui["nodes"])
    assert orders == list(range(len(ui["nodes"])))
    api = json.loads(api_path.read_text())
    assert all(n["_meta"]["title"] for n in api.values())
    assert any(t.startswith("FluxBridge") for t in types)


def test_examples_use_the_usual_file_names():
    text = {p.stem: p.read_text() for p, _ in example_pairs()}
    for name in ("flux1-dev.safetensors", "ae.safetensors", "clip_l.safetensors", "t5xxl_fp16.safetensors"):
        assert name in text["flux_dev_text_to_image"]
    assert "flux1-schnell.safetensors" in text["flux_schnell_text_to_image"]
    assert "flux1-fill-dev.safetensors" in text["flux_fill_inpaint"]
    schnell = json.loads((examples_dir() / "api" / "flux_schnell_text_to_image.json").read_text())
    sched = [n for n in schnell.values() if n["class_type"] == "FluxBridgeScheduler"]
    assert sched and sched[0]["inputs"]["steps"] == 4 and sched[0]["inputs"]["shift"] == "fixed"
    img2img = json.loads((examples_dir() / "api" / "flux_dev_img2img.json").read_text())
    assert [n["inputs"]["denoise"] for n in img2img.values() if n["class_type"] == "FluxBridgeSampler"] == [0.6]
    lora = json.loads((examples_dir() / "api" / "flux_dev_lora_stack.json").read_text())
    assert sum(n["class_type"] == "FluxBridgeLoadLoRA" for n in lora.values()) == 2
    custom = json.loads((examples_dir() / "api" / "flux_dev_custom_sampling.json").read_text())
    assert sum(n["class_type"] == "FluxBridgeSchedulerStep" for n in custom.values()) >= 3
    assert any(n["class_type"] == "FluxBridgeAddNoise" for n in custom.values())
    mixed = json.loads((examples_dir() / "api" / "flux_dev_with_native_nodes.json").read_text())
    kinds = {n["class_type"] for n in mixed.values()}
    assert {"EmptySD3LatentImage", "ImageScaleBy", "SaveImage", "FluxBridgeSampler", "FluxBridgeVAEDecode"} <= kinds
    convert = json.loads((examples_dir() / "api" / "flux_convert_and_save.json").read_text())
    assert {"FluxBridgeSaveTransformer", "FluxBridgeConvertLoRA"} <= {n["class_type"] for n in convert.values()}
    # the family: the file names BFL publishes them under, in ComfyUI's folders; input images ComfyUI ships
    family = {name: json.loads((examples_dir() / "api" / f"{name}.json").read_text())
              for name in ("flux_kontext_edit", "flux_depth", "flux_canny_lora", "flux_redux_variation")}
    kinds = {name: {n["class_type"] for n in api.values()} for name, api in family.items()}
    assert "flux1-kontext-dev.safetensors" in text["flux_kontext_edit"]
    assert {"FluxBridgeKontextImageScale", "FluxBridgeKontextReference"} <= kinds["flux_kontext_edit"]
    assert "flux1-depth-dev.safetensors" in text["flux_depth"] and "FluxBridgeControlConditioning" in kinds["flux_depth"]
    assert "flux1-dev.safetensors" in text["flux_canny_lora"] and "flux1-canny-dev-lora.safetensors" in text["flux_canny_lora"]
    assert {"Canny", "FluxBridgeLoadLoRA", "FluxBridgeControlConditioning"} <= kinds["flux_canny_lora"]
    assert "flux1-redux-dev.safetensors" in text["flux_redux_variation"]
    assert "sigclip_vision_patch14_384.safetensors" in text["flux_redux_variation"]
    assert {"FluxBridgeLoadRedux", "FluxBridgeReduxConditioning"} <= kinds["flux_redux_variation"]
    for api in family.values():
        assert [n["inputs"]["image"] for n in api.values() if n["class_type"] == "LoadImage"] == ["example.png"]
    for name in ("flux1-dev.safetensors", "clip_l.safetensors", "t5xxl_fp16.safetensors", "ae.safetensors"):
        assert name in text["flux_dev_native_lora"]
    native = json.loads((examples_dir() / "api" / "flux_dev_native_lora.json").read_text())
    kinds = {n["class_type"]: n for n in native.values()}
    assert {"UNETLoader", "DualCLIPLoader", "CLIPTextEncodeFlux", "KSampler", "VAELoader", "VAEDecode",
            "SaveImage", "FluxBridgeNativeLoRA"} <= set(kinds)
    assert kinds["KSampler"]["inputs"]["model"] == [next(i for i, n in native.items()
                                                         if n["class_type"] == "FluxBridgeNativeLoRA"), 0]
    loader = json.loads((examples_dir() / "api" / "flux_dev_native_diffusers_loader.json").read_text())
    kinds = {n["class_type"]: n for n in loader.values()}
    assert kinds["FluxBridgeLoadNativeModel"]["inputs"]["model_name"] == "FLUX.1-dev"  # a diffusers folder
    assert {"CLIPTextEncode", "FluxGuidance", "KSampler", "UNETLoader"} - set(kinds) == {"UNETLoader"}


# --------------------------------------------------------------------------------- the check catches

def _t2i():
    ui_path, api_path = next((u, a) for u, a in example_pairs() if u.stem == "flux_dev_text_to_image")
    return json.loads(ui_path.read_text()), json.loads(api_path.read_text())


def _node(api, cls):
    return next(n for n in api.values() if n["class_type"] == cls)


def test_check_catches_a_different_widget_value_in_the_api_twin(specs):
    ui, api = _t2i()
    _node(api, "FluxBridgeSampler")["inputs"]["steps"] = 27
    problems = workflow_check(ui, api, specs)
    assert any("steps is 28 in the UI, 27 in the API twin" in p for p in problems), problems


def test_check_catches_out_of_range_and_unknown_choices(specs):
    ui, api = _t2i()
    _node(api, "FluxBridgeSampler")["inputs"]["denoise"] = 1.5
    _node(api, "FluxBridgeLoadTransformer")["inputs"]["weight_dtype"] = "fp64"
    problems = workflow_check(ui, api, specs)
    assert any("denoise: 1.5 is above the maximum" in p for p in problems), problems
    assert any('weight_dtype: "fp64" is not one of the choices' in p for p in problems), problems
    ui2 = copy.deepcopy(ui)
    sampler = next(n for n in ui2["nodes"] if n["type"] == "FluxBridgeSampler")
    sampler["widgets_values"][0] = -1  # seed below 0
    assert any("seed: -1 is below the minimum" in p for p in workflow_check(ui2, api, specs))


def test_check_catches_mismatched_links(specs):
    ui, api = _t2i()
    bad = copy.deepcopy(ui)
    bad["links"][0][5] = "LATENT"  # the link's type no longer matches its ends
    problems = workflow_check(bad, api, specs)
    assert any("has type LATENT, joining" in p for p in problems), problems
    bad_api = copy.deepcopy(api)
    decode = _node(bad_api, "FluxBridgeVAEDecode")
    decode["inputs"]["vae"] = decode["inputs"]["latent"]  # LATENT into a VAE input
    problems = workflow_check(ui, bad_api, specs)
    assert any("vae: expects FLUXBRIDGE_VAE" in p for p in problems), problems
    assert any("vae is" in p and "in the API twin" in p for p in problems)


def test_check_catches_unknown_nodes_and_missing_inputs(specs):
    ui, api = _t2i()
    bad = copy.deepcopy(api)
    bad["99"] = {"class_type": "KSamplerAdvancedPlus", "inputs": {}}
    problems = workflow_check(ui, bad, specs)
    assert any("unknown node type 'KSamplerAdvancedPlus'" in p for p in problems)
    assert any("node ids differ" in p for p in problems)
    bad["99"] = {"class_type": "KSampler", "inputs": {}}  # declared (ComfyUI's signature): its inputs are checked
    assert any("99 (KSampler): required input 'latent_image' is missing" in p for p in workflow_check(ui, bad, specs))
    bad = copy.deepcopy(api)
    del _node(bad, "FluxBridgeSampler")["inputs"]["positive"]
    assert any("required input 'positive' is missing" in p for p in workflow_check(ui, bad, specs))


def test_check_catches_wrong_widgets_values_length(specs):
    ui, api = _t2i()
    bad = copy.deepcopy(ui)
    next(n for n in bad["nodes"] if n["type"] == "FluxBridgeEmptyLatent")["widgets_values"].append(3)
    assert any("too many" in p for p in workflow_check(bad, api, specs))


def test_validate_api_reports_bad_links_and_values(specs):
    api = {
        "1": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 1000.5, "height": 64, "batch_size": 1}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 3], "filename_prefix": "../x"}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["7", 0]}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": "not a link"}},
    }
    problems, outputs = validate_api(api, specs)
    text = "\n".join(f"{n} ({c}): {w}" for n, c, w in problems)
    assert "1 (EmptySD3LatentImage): width: 1000.5 is not an integer" in text
    assert "2 (SaveImage): images: node 1 (EmptySD3LatentImage) has no output 3" in text
    assert "2 (SaveImage): filename_prefix: a '..' part leads outside the output folder" in text
    assert "3 (PreviewImage): images: linked to node 7, which is not in the workflow" in text
    assert "4 (PreviewImage): images: expects a link to a IMAGE output" in text
    assert outputs == ["2", "3", "4"]


@pytest.mark.parametrize("prefix,ok", [
    ("ComfyUI", True), ("a/b/c", True), ("./x", True), ("~/x", True),  # "~" is a plain folder name here
    ("a/../b", False), ("../x", False), ("a/../../x", False), ("/abs/x", False), ("C:\\x", False),
    ("", False), ("a\x00b", False), ("..\\x", False),
])
def test_output_prefix_rules(prefix, ok):
    assert (output_prefix_problem(prefix) is None) is ok


def test_ui_to_api_matches_what_the_frontend_sends(specs):
    ui, api = _t2i()
    converted, problems = ui_to_api(ui, specs)
    assert problems == []
    assert {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in converted.items()} == \
        {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}


# ------------------------------------------------------------------------------------------------ web

def test_web_folder_holds_only_extension_modules():
    web = PACK / "web"
    served_js = sorted(p.relative_to(web).as_posix() for p in web.rglob("*.js"))
    assert served_js == ["fluxbridge.js", "fluxbridge_core.js"]  # the frontend imports every .js here
    tests = sorted(p.name for p in (web / "tests").iterdir())
    assert tests and all(name.endswith(".test.mjs") for name in tests)
    core = (web / "fluxbridge_core.js").read_text()
    assert "registerExtension" not in core.split("createExtension")[0]  # core registers nothing itself
    assert not any(line.startswith("import") for line in core.splitlines())  # self-contained
    main = (web / "fluxbridge.js").read_text()
    assert 'from "../../scripts/app.js"' in main and 'from "../../scripts/api.js"' in main


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")
def test_web_extension_node_tests():
    result = subprocess.run(["node", "--test", "web/tests/"], cwd=PACK, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "NODE_OPTIONS": ""})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_web_extension_names_our_node_ids(specs):
    import re
    core = (PACK / "web" / "fluxbridge_core.js").read_text()
    named = set()
    for const in ("LOADER_NODES", "LORA_NODES", "SCHEDULER_NODES"):
        block = re.search(rf"export const {const} = \[([^\]]*)\]", core)
        assert block, const
        named |= set(re.findall(r'"([^"]+)"', block.group(1)))
    assert named == {"FluxBridgeLoadTransformer", "FluxBridgeLoadTextEncoders", "FluxBridgeLoadVAE",
                     "FluxBridgeLoadLoRA", "FluxBridgeScheduler", "FluxBridgeLoadNativeModel",
                     "FluxBridgeNativeLoRA"}
    assert named <= set(specs)
