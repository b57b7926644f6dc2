"""`fluxbridge demo`: small random models built once, the text-to-image example run on them, the image and
its report written; the command line does the same."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fluxbridge
from fluxbridge.headless import demo
from fluxbridge.headless.demo import REPORT_NAME, models_key, run_demo
from checkout_env import checkout_env  # tests/helpers


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("demo-cache")


def test_run_demo_writes_an_image_and_its_report(tmp_path, cache):
    report = run_demo(tmp_path / "out", progress=False, cache_dir=cache)
    print(f"\nrun_demo (models built, cold): models {report['timings']['models_seconds']} s, "
          f"workflow {report['timings']['workflow_seconds']} s")
    out = tmp_path / "out"
    assert len(report["images"]) == 1
    png = out / report["images"][0]
    with Image.open(png) as img:
        w, h = demo.DEMO_OVERRIDES["5"]["width"], demo.DEMO_OVERRIDES["5"]["height"]
        assert img.size == (w, h)
        assert np.asarray(img).std() > 0
        assert "workflow" in img.text and "prompt" in img.text
    saved = json.loads((out / REPORT_NAME).read_text())
    assert saved["images"] == report["images"]
    assert set(saved["timings"]) >= {"models_seconds", "workflow_seconds", "total_seconds", "nodes"}
    assert saved["models_cached"] is False
    kinds = {v["class_type"] for v in saved["loaders"].values()}
    assert kinds == {"FluxBridgeLoadTransformer", "FluxBridgeLoadTextEncoders", "FluxBridgeLoadVAE"}
    assert all(len(v) > 1 for v in saved["loaders"].values()), "the loaders' UI payloads are in the report"
    # the cached models: the usual names, built once; no tokenizers/ (as in a user's ComfyUI models folder),
    # so the pack's own tokenizers were used
    models = Path(saved["models_dir"])
    for rel in ("diffusion_models/flux1-dev.safetensors", "vae/ae.safetensors", "text_encoders/clip_l.safetensors",
                "text_encoders/t5xxl_fp16.safetensors", "READY"):
        assert (models / rel).is_file(), rel
    assert not (models / "tokenizers").exists()
    (text_encoders,) = [v for v in saved["loaders"].values() if v["class_type"] == "FluxBridgeLoadTextEncoders"]
    assert all(c["tokenizer"].startswith("the pack's own copy") for c in text_encoders["fluxbridge"][0]["components"])
    assert models == cache / "demo-models" / models_key()
    # nothing but the image, its report (and nothing else) in the output folder
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == \
        sorted(report["images"] + [REPORT_NAME])


def test_second_demo_reuses_the_cached_models(tmp_path, cache, monkeypatch):
    models = demo.demo_models(cache)  # built already by the test above (or now, when this test runs alone)
    stamps = {p: p.stat().st_mtime_ns for p in models.rglob("*")}

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cached models were built again")
    monkeypatch.setattr(demo, "build_models", no_rebuild)
    report = run_demo(tmp_path / "out", progress=False, cache_dir=cache)
    assert report["models_cached"] is True and report["models_dir"] == str(models)
    assert {p: p.stat().st_mtime_ns for p in models.rglob("*")} == stamps  # read, not rewritten
    assert len(report["images"]) == 1


def test_demo_finds_the_example_through_the_package():
    path = Path(fluxbridge.__file__).resolve().parent / "example_workflows" / "api" / demo.DEMO_WORKFLOW
    assert path.is_file()


def test_cli_demo(tmp_path, cache):
    pypath = tmp_path.parent / f"{tmp_path.name}-pypath"  # this checkout linked as `fluxbridge`
    pypath.mkdir()
    env = checkout_env(pypath, FLUXBRIDGE_CACHE=str(cache))
    err_file = tmp_path.parent / f"{tmp_path.name}-err.txt"  # stderr into a file, as in `2>err.txt`
    with open(err_file, "wb") as err:
        result = subprocess.run([sys.executable, "-m", "fluxbridge", "demo", "--output", str(tmp_path / "cli-out")],
                                stdout=subprocess.PIPE, stderr=err, text=True, env=env, timeout=300, cwd=tmp_path)
    stderr = err_file.read_text()
    assert result.returncode == 0, stderr[-3000:]
    assert "\r" not in stderr and "%|" not in stderr, repr(stderr[:500])  # no progress frames in a file
    # a short summary: what ran, where the image is, the seconds, where the full report is
    lines = result.stdout.splitlines()
    report = json.loads((tmp_path / "cli-out" / REPORT_NAME).read_text())
    image = tmp_path / "cli-out" / report["images"][0]
    assert image.is_file() and len(lines) <= 8
    size, steps = demo.DEMO_OVERRIDES["5"], demo.DEMO_OVERRIDES["6"]["steps"]
    assert demo.DEMO_WORKFLOW in lines[0] and "random" in lines[0]
    assert f"({size['width']}x{size['height']}, {steps} steps)" in lines[0], lines[0]
    assert f"Image:  {image}" in lines
    assert any(line.startswith("Time:   ") and line.endswith(" s)") for line in lines)
    assert f"Report: {tmp_path / 'cli-out' / REPORT_NAME} (`fluxbridge demo --json` prints it)" in lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli-out"]  # nothing else written in cwd


def test_cli_demo_json_prints_the_report(tmp_path, cache, monkeypatch, capsys):
    from fluxbridge.headless import cli
    monkeypatch.setenv("FLUXBRIDGE_CACHE", str(cache))
    assert cli.main(["demo", "--json", "--output", str(tmp_path / "out")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["report"] == str(tmp_path / "out" / REPORT_NAME) and len(report["images"]) == 1
    assert json.loads((tmp_path / "out" / REPORT_NAME).read_text())["images"] == report["images"]
