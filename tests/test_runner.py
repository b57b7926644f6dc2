"""The headless runner: every example's API twin runs on small random models and yields what it should;
bad workflows are refused before anything runs, with a clear message, and nothing is ever written outside
the output folder."""
import io
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fluxbridge.headless import demo
from fluxbridge.common.errors import BadInput
from fluxbridge.headless.native_nodes import (RunContext, empty_sd3_latent, image_scale_by, load_image, mask_composite,
                                              native_specs, solid_mask)
from fluxbridge.headless.runner import run_workflow
from fluxbridge.headless.workflows import example_pairs, examples_dir

SIZE = 64  # every example runs at 64x64 here (the files say 1024x1024)
API = {ui.stem: api for ui, api in example_pairs()}


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """dev, schnell, fill, kontext and depth transformers, VAE, CLIP-L, T5, two LoRAs, a Canny control LoRA,
    Redux and its SigLIP tower, in their usual layouts and names (built once per session)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # one build for all workers of this run (built atomically)
        base = base.parent
    return demo.demo_models(base / "fluxbridge-cache", variants=("dev", "schnell", "fill", "kontext", "depth"),
                            loras=True, family=True)


def _write_inputs(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    rgb = np.stack([x * 4, y * 4, (x + y) * 2], -1).astype(np.uint8)
    Image.fromarray(rgb).save(folder / "example.png")
    rgba = np.concatenate([rgb, np.full((SIZE, SIZE, 1), 255, np.uint8)], -1)
    rgba[16:48, 16:48, 3] = 0  # transparent square: the area to fill
    Image.fromarray(rgba).save(folder / "inpaint_example.png")
    return folder


@pytest.fixture
def work(tmp_path, monkeypatch, models):
    """A working folder: cwd, an input folder, an output folder (not yet there), and a snapshot of every
    file outside the output folder (tmp folder, models, inputs) to compare with afterwards."""
    inputs = _write_inputs(tmp_path / "input")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    roots = [tmp_path, models]
    before = _snapshot(roots, out)
    yield {"dir": tmp_path, "input": inputs, "out": out, "models": models}
    assert _snapshot(roots, out) == before, "something was written outside the output folder"


def _snapshot(roots, exclude: Path):
    seen = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            if Path(dirpath) == exclude or exclude in Path(dirpath).parents:
                dirnames[:] = []
                continue
            for name in filenames:
                p = Path(dirpath) / name
                st = p.lstat()
                seen[str(p)] = (st.st_size, st.st_mtime_ns)
    return seen


def small(api: dict) -> dict:
    """Overrides that keep the examples quick: 64x64 everywhere, 3 sampler steps, 32 T5 tokens (the custom
    loop keeps its 4 scheduler steps: it has one node per step). The Kontext reference takes the loaded image
    as it is: the preferred Kontext sizes are around a megapixel (the scale node is tested on its own). The
    Fill example's mask keeps its size (FluxBridgeFillConditioning scales a mask to the image)."""
    over = {}
    for nid, node in api.items():
        inputs, cls = node["inputs"], node["class_type"]
        if "width" in inputs and not isinstance(inputs["width"], list) and cls != "SolidMask":
            over[nid] = {"width": SIZE, "height": SIZE}
        if cls == "FluxBridgeSampler":
            over[nid] = {"steps": 3}
        if cls == "FluxBridgeTextEncode":
            over[nid] = {"max_sequence_length": 32}
        if cls == "FluxBridgeKontextReference":
            scale = api[str(inputs["image"][0])]
            over[nid] = {"image": scale["inputs"]["image"]}
    return over


def run(name, work, **kw):
    path = API[name]
    api = json.loads(path.read_text())
    return run_workflow(path, models_dir=work["models"], output_dir=work["out"], input_dir=work["input"],
                        progress=False, overrides=small(api), **kw)


def _pngs(report, out: Path):
    return [out / p for p in report["outputs"] if p.endswith(".png")]


def _mixed_checks(report, api, out):
    """Native and FluxBridge nodes joined through LATENT and IMAGE."""
    ids = {v["class_type"]: n for n, v in api.items()}
    assert report["nodes"][ids["EmptySD3LatentImage"]]["outputs"][0]["shape"] == [1, 16, SIZE // 8, SIZE // 8]
    assert report["nodes"][ids["ImageScaleBy"]]["outputs"][0]["shape"] == [1, SIZE // 2, SIZE // 2, 3]
    previews = [p for p in report["outputs"] if p.startswith("temp/")]
    assert len(previews) == 1  # PreviewImage writes into the output folder's temp/ subfolder
    with Image.open(out / previews[0]) as img:
        assert img.size == (SIZE, SIZE)
    assert report["nodes"][ids["PreviewImage"]]["ui"]["images"][0]["type"] == "temp"


def _lora_checks(report, api, out):
    loras = [n for n in report["nodes"].values() if n["class_type"] == "FluxBridgeLoadLoRA"]
    assert len(loras) == 2 and all(n["ui"] for n in loras)
    assert [n["outputs"][0]["type"] for n in loras] == ["FLUXBRIDGE_TRANSFORMER"] * 2


def _schedule_checks(report, api, out):
    sched = [n for n in report["nodes"].values() if n["class_type"] == "FluxBridgeScheduler"]
    assert sched and all(n["ui"] for n in sched)  # the sigmas for the curve


def _fill_checks(report, api, out):
    """The mask is built from native nodes (ComfyUI ships no inpainting image): 768x768, as example.png."""
    ids = {v["class_type"]: n for n, v in api.items()}
    assert report["nodes"][ids["MaskComposite"]]["outputs"][0]["shape"] == [1, 768, 768]
    assert api[ids["LoadImage"]]["inputs"]["image"] == "example.png"


def _kontext_checks(report, api, out):
    ref = next(n for n, v in api.items() if v["class_type"] == "FluxBridgeKontextReference")
    assert report["nodes"][ref]["outputs"][1]["shape"] == [1, 16, SIZE // 8, SIZE // 8]
    loader = next(n for n, v in api.items() if v["class_type"] == "FluxBridgeLoadTransformer")
    assert report["nodes"][loader]["ui"]["fluxbridge"][0]["variant"] == "kontext"


def _control_checks(report, api, out):
    cond = next(n for n, v in api.items() if v["class_type"] == "FluxBridgeControlConditioning")
    assert report["nodes"][cond]["outputs"][2]["shape"] == [1, 16, SIZE // 8, SIZE // 8]
    loras = [n for n in report["nodes"].values() if n["class_type"] == "FluxBridgeLoadLoRA"]
    assert all(n["ui"]["fluxbridge"][0]["format"] == "bfl-control" for n in loras)


def _redux_checks(report, api, out):
    node = next(n for n, v in api.items() if v["class_type"] == "FluxBridgeReduxConditioning")
    encode = next(n for n, v in api.items() if v["class_type"] == "FluxBridgeTextEncode")
    tokens = report["nodes"][encode]["outputs"][0]["shape"][1]
    assert report["nodes"][node]["outputs"][0]["shape"] == [1, tokens + 16, 32]  # 16 Redux tokens after the text


IMAGE_EXAMPLES = {  # example -> (SaveImage size, extra checks)
    "flux_dev_text_to_image": (SIZE, None),
    "flux_schnell_text_to_image": (SIZE, _schedule_checks),
    "flux_dev_img2img": (SIZE, None),
    "flux_fill_inpaint": (SIZE, _fill_checks),
    "flux_dev_lora_stack": (SIZE, _lora_checks),
    "flux_dev_custom_sampling": (SIZE, _schedule_checks),
    "flux_dev_with_native_nodes": (SIZE // 2, _mixed_checks),
    "flux_kontext_edit": (SIZE, _kontext_checks),
    "flux_depth": (SIZE, _control_checks),
    "flux_canny_lora": (SIZE, _control_checks),
    "flux_redux_variation": (SIZE, _redux_checks),
}


@pytest.mark.parametrize("name", sorted(IMAGE_EXAMPLES))
def test_example_runs_and_saves_its_image(name, work):
    report = run(name, work)
    api = json.loads(API[name].read_text())
    size, extra = IMAGE_EXAMPLES[name]
    skipped = sorted(n for n, v in api.items() if v["class_type"] == "FluxBridgeKontextImageScale")  # see small()
    assert report["skipped"] == skipped and sorted(report["executed"] + skipped) == sorted(api)
    saved = [p for p in _pngs(report, work["out"]) if "temp" not in p.parts]
    assert len(saved) == 1, report["outputs"]
    with Image.open(saved[0]) as img:
        assert img.size == (size, size) and img.mode == "RGB"
        pixels = np.asarray(img)
        # the PNG carries the API prompt and the UI workflow, as ComfyUI's SaveImage does
        assert json.loads(img.text["prompt"]).keys() == api.keys()
        assert json.loads(img.text["workflow"])["version"] == 0.4
    assert pixels.std() > 0  # not a flat image
    save_id = next(n for n, v in api.items() if v["class_type"] == "SaveImage")
    assert saved[0].parent.relative_to(work["out"]).as_posix() == "fluxbridge"
    assert saved[0].name.startswith(Path(api[save_id]["inputs"]["filename_prefix"]).name + "_00001_")
    images = report["nodes"][save_id]["ui"]["images"]
    assert images == [{"filename": saved[0].name, "subfolder": "fluxbridge", "type": "output"}]
    decode = next(n for n, v in api.items() if v["class_type"] == "FluxBridgeVAEDecode")
    assert report["nodes"][decode]["outputs"] == [{"type": "IMAGE", "shape": [1, SIZE, SIZE, 3], "dtype": "float32"}]
    for nid, node in report["nodes"].items():
        assert node["seconds"] >= 0
        if node["class_type"] in ("FluxBridgeLoadTransformer", "FluxBridgeLoadTextEncoders", "FluxBridgeLoadVAE"):
            assert node["ui"], f"loader {nid} sent no UI payload (what it detected)"
    if extra:
        extra(report, api, work["out"])
    json.dumps(report)  # JSON-able


@pytest.mark.parametrize("name", ["flux_dev_native_lora", "flux_dev_native_diffusers_loader"])
def test_native_model_examples_are_checked_then_refused_with_needs_comfyui(name, work):
    """Workflows on ComfyUI's own MODEL / CLIP validate here (the native nodes are declared with their
    ComfyUI signatures) but are not run: the runner has no ComfyUI sampler. Nothing is written."""
    api = json.loads(API[name].read_text())
    over = {nid: {"model_name": "flux1-dev.safetensors"} for nid, n in api.items()
            if n["class_type"] == "FluxBridgeLoadNativeModel"}  # the example names a diffusers folder
    with pytest.raises(BadInput, match=r"^.*: 1 \((UNETLoader|FluxBridgeLoadNativeModel)\): needs ComfyUI: .* "
                                       r"\(and \d+ more such node\(s\)\); run this workflow in ComfyUI$"):
        run_workflow(API[name], models_dir=work["models"], output_dir=work["out"], input_dir=work["input"],
                     progress=False, overrides=over)
    assert not work["out"].exists()
    bad = dict(over)
    bad["7"] = {"steps": 0}  # an invalid value is still reported first, as for any workflow
    with pytest.raises(BadInput, match=r"7 \(KSampler\): steps: 0 is below the minimum 1"):
        run_workflow(API[name], models_dir=work["models"], output_dir=work["out"], progress=False, overrides=bad)


def test_convert_example_writes_transformer_and_lora(work):
    report = run("flux_convert_and_save", work)
    written = report["outputs"]
    assert any(p.startswith("fluxbridge/flux1-dev-diffusers") for p in written), written
    assert any(p.startswith("fluxbridge/flux_lora_style-diffusers") for p in written), written
    assert all((work["out"] / p).stat().st_size > 0 for p in written)
    from safetensors import safe_open
    for p in written:
        if p.endswith(".safetensors") and "lora" not in p:
            with safe_open(work["out"] / p, "pt") as f:
                keys = list(f.keys())
            assert any(k.startswith("transformer_blocks.0.") for k in keys)  # diffusers names
            assert not any(k.startswith("double_blocks.") for k in keys)


def test_second_run_counts_up_and_ui_workflow_runs_too(work):
    first = run("flux_dev_text_to_image", work)
    assert first["warnings"] == []
    ui_path = examples_dir() / "flux_dev_text_to_image.json"
    api = json.loads(API["flux_dev_text_to_image"].read_text())
    second = run_workflow(ui_path, models_dir=work["models"], output_dir=work["out"], progress=False,
                          overrides=small(api))
    names = sorted(Path(p).name for p in first["outputs"] + second["outputs"])
    assert names == ["flux_dev_00001_.png", "flux_dev_00002_.png"]
    a, b = (np.asarray(Image.open(work["out"] / r["outputs"][0])) for r in (first, second))
    assert np.array_equal(a, b)  # same seed, same picture: the UI file is the same graph


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_models_dir_from_the_environment_and_the_progress_bar(work, monkeypatch, capsys):
    monkeypatch.setenv("FLUXBRIDGE_MODELS", str(work["models"]))
    path = API["flux_dev_text_to_image"]
    over = small(json.loads(path.read_text()))
    over["6"]["colour"] = "red"  # an input the sampler does not have: ignored, as ComfyUI does, with a warning
    report = run_workflow(path, output_dir=work["out"], progress=True, overrides=over)
    assert report["models_dir"] == str(work["models"]) and len(report["outputs"]) == 1
    assert report["warnings"] == ["6 (FluxBridgeSampler): input 'colour' is not an input of FluxBridgeSampler; ignored"]
    assert capsys.readouterr().err == ""  # stderr is not a terminal here: no bar, no frames
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    run_workflow(path, output_dir=work["out"], progress=True, overrides=over)
    err = terminal.getvalue()
    assert "fluxbridge run" in err and "8/8" in err and "\r" in err  # on a terminal: the bar over the nodes


# --------------------------------------------------------------------------------------- bad input

def _bad(work, api: dict, *expected: str):
    """Write `api`, run it, expect BadInput naming the workflow and all of `expected`; nothing written."""
    path = work["dir"] / "bad.json"
    path.write_text(json.dumps(api))
    with pytest.raises(BadInput) as info:
        run_workflow(path, models_dir=work["models"], output_dir=work["out"], input_dir=work["input"],
                     progress=False)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert "\n" not in message
    for text in expected:
        assert text in message, message
    assert not work["out"].exists() or not any(work["out"].rglob("*")), "files written despite refusal"
    path.unlink()
    return message


def _t2i():
    return json.loads(API["flux_dev_text_to_image"].read_text())


def test_model_outside_the_models_folder_is_refused(work):
    api = _t2i()
    api["1"]["inputs"]["model_name"] = "../flux1-dev.safetensors"
    _bad(work, api, "1 (FluxBridgeLoadTransformer): model_name", "../flux1-dev.safetensors")
    api["1"]["inputs"]["model_name"] = str(work["models"] / "diffusion_models" / "flux1-dev.safetensors")
    _bad(work, api, "1 (FluxBridgeLoadTransformer): model_name")
    api = _t2i()
    api["3"]["inputs"]["vae_name"] = "../../etc/passwd"
    _bad(work, api, "3 (FluxBridgeLoadVAE): vae_name")


def test_filename_prefix_escaping_the_output_folder_is_refused(work):
    api = _t2i()
    api["8"]["inputs"]["filename_prefix"] = "../escaped"
    _bad(work, api, "8 (SaveImage): filename_prefix", "leads outside the output folder")
    api["8"]["inputs"]["filename_prefix"] = str(work["dir"] / "abs" / "img")
    _bad(work, api, "8 (SaveImage): filename_prefix", "absolute path")
    convert = json.loads(API["flux_convert_and_save"].read_text())
    convert["2"]["inputs"]["filename_prefix"] = "fluxbridge/../../x"
    _bad(work, convert, "2 (FluxBridgeSaveTransformer): filename_prefix")
    convert = json.loads(API["flux_convert_and_save"].read_text())
    convert["3"]["inputs"]["filename_prefix"] = "/tmp/lora"
    _bad(work, convert, "3 (FluxBridgeConvertLoRA): filename_prefix")


def test_the_users_links_in_the_output_and_input_folders_are_followed(work, tmp_path_factory):
    """An output sub-folder and an input image that the user linked elsewhere are the user's: SaveImage
    writes through the link and LoadImage reads through one, as in ComfyUI."""
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    pictures = tmp_path_factory.mktemp("pictures")
    shutil.copy(work["input"] / "example.png", pictures / "kept.png")
    work["out"].mkdir(exist_ok=True)
    (work["out"] / "link").symlink_to(elsewhere, target_is_directory=True)
    (work["input"] / "kept.png").symlink_to(pictures / "kept.png")
    api = {"1": {"class_type": "LoadImage", "inputs": {"image": "kept.png"}},
           "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "link/img"}}}
    path = work["dir"] / "link.json"
    path.write_text(json.dumps(api))
    try:
        result = run_workflow(path, models_dir=work["models"], output_dir=work["out"], input_dir=work["input"],
                              progress=False)
        assert result["outputs"] == ["link/img_00001_.png"]
        assert [p.name for p in elsewhere.iterdir()] == ["img_00001_.png"]
    finally:
        path.unlink()
        (work["out"] / "link").unlink()
        (work["input"] / "kept.png").unlink()


def test_unknown_node_is_refused(work):
    api = _t2i()
    api["9"] = {"class_type": "KSamplerAdvancedPlus", "inputs": {}}
    _bad(work, api, "9 (KSamplerAdvancedPlus): unknown node type 'KSamplerAdvancedPlus'")


def test_wrong_link_type_is_refused(work):
    api = _t2i()
    api["7"]["inputs"]["vae"] = ["6", 0]  # a LATENT into the VAE input
    _bad(work, api, "7 (FluxBridgeVAEDecode): vae: expects FLUXBRIDGE_VAE but node 6 (FluxBridgeSampler) "
                    "output 0 gives LATENT")


def test_cycle_is_refused(work):
    api = json.loads(API["flux_dev_with_native_nodes"].read_text())
    api["5"] = {"class_type": "FluxBridgeVAEEncode", "inputs": {"vae": ["3", 0], "image": ["8", 0]}}
    _bad(work, api, "the workflow has a cycle", "->")


@pytest.mark.parametrize("change,expected", [
    (lambda a: a["6"]["inputs"].pop("positive"), "6 (FluxBridgeSampler): required input 'positive' is missing"),
    (lambda a: a["6"]["inputs"].update(steps=0), "6 (FluxBridgeSampler): steps: 0 is below the minimum"),
    (lambda a: a["6"]["inputs"].update(denoise=2.0), "denoise: 2.0 is above the maximum"),
    (lambda a: a["7"]["inputs"].update(tiled="sometimes"), "7 (FluxBridgeVAEDecode): tiled: \"sometimes\" is not one"),
    (lambda a: a["7"]["inputs"].update(latent=["42", 0]), "latent: linked to node 42, which is not in the workflow"),
    (lambda a: a["7"]["inputs"].update(latent=["6", 5]), "latent: node 6 (FluxBridgeSampler) has no output 5"),
    (lambda a: a["6"]["inputs"].update(positive="a fox"), "positive: expects a link to a CONDITIONING output"),
    (lambda a: a.pop("8"), "no output node"),
])
def test_invalid_workflows_are_refused_before_running(work, change, expected):
    api = _t2i()
    change(api)
    _bad(work, api, expected)


def test_image_outside_the_input_folder_is_refused(work):
    api = json.loads(API["flux_dev_img2img"].read_text())
    api["5"]["inputs"]["image"] = "../secret.png"
    (work["dir"] / "secret.png").write_bytes(b"")
    _bad(work, api, "5 (LoadImage): image", "../secret.png")
    (work["dir"] / "secret.png").unlink()


def test_unreadable_workflow_files_are_bad_input(work):
    with pytest.raises(BadInput, match="cannot read the workflow"):
        run_workflow(work["dir"] / "missing.json", models_dir=work["models"], output_dir=work["out"])
    (work["dir"] / "broken.json").write_text("{not json")
    with pytest.raises(BadInput, match="not valid JSON"):
        run_workflow(work["dir"] / "broken.json", models_dir=work["models"], output_dir=work["out"])
    (work["dir"] / "broken.json").unlink()
    with pytest.raises(BadInput, match="models folder"):
        run_workflow(API["flux_dev_text_to_image"], models_dir=work["dir"] / "nope", output_dir=work["out"])


# The command line itself (`python -m fluxbridge run`, stderr into a file) is run in
# test_security_corpus.test_cli_subprocess_corpus: a workflow refused at validation and one that fails while it
# runs (a cut-down transformer) each leave exactly one line; a good run's stderr in a file has no progress
# frames in test_demo.test_cli_demo (the demo runs its workflow through the same runner and sampler bars).


# ------------------------------------------------------------------------------------- native nodes

def test_load_image_gives_image_and_mask_from_alpha(tmp_path):
    _write_inputs(tmp_path)
    ctx = RunContext(output_dir=tmp_path / "out", input_dir=tmp_path)
    (image, mask), _ = load_image(ctx, "inpaint_example.png")
    assert image.shape == (1, SIZE, SIZE, 3) and image.dtype == torch.float32
    assert mask.shape == (1, SIZE, SIZE)
    assert mask[0, 32, 32] == 1.0 and mask[0, 0, 0] == 0.0  # MASK = 1 - alpha
    (image, mask), _ = load_image(ctx, "example.png")
    assert mask.shape == (1, 64, 64) and mask.abs().sum() == 0  # no alpha: an empty 64x64 mask
    assert float(image[0, 0, 1, 0]) == pytest.approx(4 / 255)
    with pytest.raises(BadInput, match="inside the input folder"):
        load_image(ctx, "../x.png")
    with pytest.raises(BadInput, match="inside the input folder"):
        load_image(ctx, str(tmp_path / "example.png"))
    assert native_specs(tmp_path)["LoadImage"].input("image").options == ["example.png", "inpaint_example.png"]


def test_empty_latent_and_scale_by_follow_native_conventions():
    ctx = RunContext(output_dir=Path("unused"))
    (latent,), _ = empty_sd3_latent(ctx, width=96, height=64, batch_size=2)
    assert latent["samples"].shape == (2, 16, 8, 12) and latent["samples"].abs().sum() == 0
    image = torch.rand(2, 20, 30, 3)
    for method in ("nearest-exact", "bilinear", "area", "bicubic", "lanczos"):
        (out,), _ = image_scale_by(ctx, image, method, 1.5)
        assert out.shape == (2, 30, 45, 3)
        if method == "lanczos":  # ComfyUI's lanczos: PIL on 8-bit images, so within 0..1 in steps of 1/255
            assert out.min() >= 0 and out.max() <= 1 and torch.equal((out * 255).round() / 255, out)
        else:  # ComfyUI's common_upscale: torch's interpolate, unclamped (bicubic overshoots random pixels)
            reference = torch.nn.functional.interpolate(image.movedim(-1, 1), size=(30, 45), mode=method)
            assert torch.equal(out, reference.movedim(1, -1))
    assert image_scale_by(ctx, image, "bicubic", 1.5)[0][0].max() > 1  # as in ComfyUI: not clamped


def test_solid_mask_and_mask_composite_follow_native_conventions():
    """ComfyUI's SolidMask ([1, H, W] of one value) and MaskComposite (source placed at x, y into a copy of
    destination, combined, clamped to 0..1, the overhang left out), on values worked out by hand."""
    ctx = RunContext(output_dir=Path("unused"))
    (zeros,), _ = solid_mask(ctx, 0.0, width=6, height=4)
    (ones,), _ = solid_mask(ctx, 1.0, width=3, height=2)
    assert zeros.shape == (1, 4, 6) and ones.shape == (1, 2, 3) and ones.dtype == torch.float32
    (square,), _ = mask_composite(ctx, zeros, ones, x=2, y=1, operation="add")
    expected = torch.zeros(1, 4, 6)
    expected[:, 1:3, 2:5] = 1.0
    assert torch.equal(square, expected) and zeros.abs().sum() == 0  # the destination is not changed
    (edge,), _ = mask_composite(ctx, zeros, ones, x=4, y=3, operation="add")  # only 2x1 of it lands
    assert edge.sum() == 2 and torch.equal(edge[0, 3, 4:], torch.ones(2))
    (outside,), _ = mask_composite(ctx, zeros, ones, x=6, y=0, operation="add")
    assert torch.equal(outside, zeros)
    half = torch.full((1, 2, 3), 0.5)
    results = {op: mask_composite(ctx, square, half, x=1, y=1, operation=op)[0][0][0, 1:3, 1:4]
               for op in ("multiply", "add", "subtract", "and", "or", "xor")}
    # the window at (1, 1): first column outside the square (0), the other two inside (1)
    assert results["multiply"].tolist() == [[0.0, 0.5, 0.5]] * 2
    assert results["add"].tolist() == [[0.5, 1.0, 1.0]] * 2  # 1.5 clamped
    assert results["subtract"].tolist() == [[0.0, 0.5, 0.5]] * 2  # -0.5 clamped
    # the logic ones round first: 0.5 rounds to 0 (round half to even)
    assert results["and"].tolist() == [[0.0, 0.0, 0.0]] * 2
    assert results["or"].tolist() == [[0.0, 1.0, 1.0]] * 2
    assert results["xor"].tolist() == [[0.0, 1.0, 1.0]] * 2


def test_canny_and_reference_latent_follow_native_conventions():
    ctx = RunContext(output_dir=Path("unused"))
    image = torch.zeros(1, 48, 64, 3)
    image[:, 12:36, 16:48] = 1.0  # a white box
    (edges,), _ = native_specs()["Canny"].run(ctx, image, 0.4, 0.8)
    assert edges.shape == (1, 48, 64, 3) and set(edges.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(edges[..., 0], edges[..., 2])  # grey, in three channels
    rows, cols = edges[0, ..., 0].nonzero().unbind(1)
    assert rows.min() >= 10 and rows.max() <= 37 and cols.min() >= 14 and cols.max() <= 49  # around the box
    assert edges[0, 24, 32, 0] == 0 and edges[0, 2, 2, 0] == 0  # nothing inside or far outside
    with pytest.raises(BadInput, match="above high_threshold"):
        native_specs()["Canny"].run(ctx, image, 0.8, 0.4)
    cond = [[torch.zeros(1, 4, 8), {"pooled_output": torch.zeros(1, 8)}]]
    latent = {"samples": torch.ones(1, 16, 6, 8)}
    (once,), _ = native_specs()["ReferenceLatent"].run(ctx, cond, latent)
    (twice,), _ = native_specs()["ReferenceLatent"].run(ctx, once, latent)
    assert [r.shape for r in twice[0][1]["reference_latents"]] == [(1, 16, 6, 8)] * 2
    assert "reference_latents" not in cond[0][1] and len(once[0][1]["reference_latents"]) == 1  # copies
    assert native_specs()["ReferenceLatent"].run(ctx, cond)[0][0] is cond  # no latent: unchanged, as ComfyUI
