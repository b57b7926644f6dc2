"""The `fluxbridge` command: help, dispatch to the library, output, and exit codes (0 / 2 / 1)."""
import json
import subprocess
import sys
import types

import pytest

from fluxbridge.headless import cli
from fluxbridge.common.errors import BadInput
from checkout_env import checkout_env  # tests/helpers


HELP = {  # sub-command -> words its --help must say
    ("inspect",): ["family", "layout", "variant", "--json"],
    ("convert",): ["--to", "{bfl,comfy,diffusers}", "--dtype", "--lora", "FILE[:STRENGTH]", "report"],
    ("lora",): ["inspect", "convert"],
    ("lora", "inspect"): ["format", "ranks", "--json"],
    ("lora", "convert"): ["{diffusers,bfl,kohya,comfy}", "same weight deltas"],
    ("run",): ["WORKFLOW.json", "--models", "--output", "API-format", "--lowvram"],
    ("demo",): ["--output", "random"],
}


def fake_library(monkeypatch, module, **functions):
    """Put a stand-in for the pack module `module` (e.g. "convert.inspect") in sys.modules."""
    fake = types.ModuleType(f"fluxbridge.{module}")
    for name, fn in functions.items():
        setattr(fake, name, fn)
    monkeypatch.setitem(sys.modules, f"fluxbridge.{module}", fake)
    return fake


@pytest.mark.parametrize("command", list(HELP), ids=" ".join)
def test_help_explains_each_command(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([*command, "--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for word in HELP[command]:
        assert word in out, (command, word)


def test_the_choices_are_the_librarys():
    """The CLI spells its choices out so that `--help` needs no torch; they must stay the library's own."""
    from fluxbridge.convert import write
    from fluxbridge.convert.lora import write as lora_write
    assert cli.WEIGHT_LAYOUTS == write.LAYOUTS
    assert cli.DTYPES == tuple(write.DTYPES)
    assert cli.LORA_FORMATS == lora_write.TARGETS


def test_no_command_prints_usage_and_fails(capsys):
    assert cli.main([]) == 2
    assert "inspect" in capsys.readouterr().err
    assert cli.main(["lora"]) == 2


def test_bad_input_is_one_line_and_exit_2(monkeypatch, capsys):
    def inspect_path(path):
        raise BadInput(path, "the header says 900 bytes,\nthe file has 12")
    fake_library(monkeypatch, "convert.inspect", inspect_path=inspect_path)
    assert cli.main(["inspect", "broken.safetensors"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "fluxbridge: broken.safetensors: the header says 900 bytes, the file has 12\n"


def test_a_missing_dependency_is_an_internal_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "fluxbridge.headless.runner", None)  # its import fails
    assert cli.main(["run", "w.json"]) == 1
    assert "fluxbridge: internal error: ModuleNotFoundError" in capsys.readouterr().err


def test_internal_error_is_exit_1_with_traceback(monkeypatch, capsys):
    def convert_lora(src, dst, to):
        raise ValueError("boom")
    fake_library(monkeypatch, "convert.lora.write", convert_lora=convert_lora)
    assert cli.main(["lora", "convert", "a", "b", "--to", "bfl"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fluxbridge: internal error: ValueError: boom\n") and "Traceback" in err


def test_arguments_reach_the_library(monkeypatch, capsys):
    seen = {}

    def convert_file(src, dst, to, dtype, loras):
        seen["convert"] = (src, dst, to, dtype, loras)
        return {"renamed": 3, "written": {dst}}

    def run_workflow(path, models_dir=None, output_dir=None, input_dir=None, lowvram=False):
        seen["run"] = (path, models_dir, output_dir, input_dir, lowvram)
        return {"outputs": []}

    fake_library(monkeypatch, "convert.write", convert_file=convert_file)
    fake_library(monkeypatch, "headless.runner", run_workflow=run_workflow)
    fake_library(monkeypatch, "headless.demo", run_demo=lambda output_dir: seen.setdefault("demo", output_dir) and {},
                 summary=lambda report: "the summary")
    fake_library(monkeypatch, "convert.lora.write",
                 convert_lora=lambda src, dst, to: seen.setdefault("lora", (src, dst, to)) and {"format": to})

    assert cli.main(["convert", "a.safetensors", "b.safetensors", "--to", "comfy", "--dtype", "bf16",
                     "--lora", "s.safetensors:0.5", "--lora", "t.safetensors", "--lora", "C:\\l.safetensors"]) == 0
    assert seen["convert"] == ("a.safetensors", "b.safetensors", "comfy", "bf16",
                               [("s.safetensors", 0.5), ("t.safetensors", 1.0), ("C:\\l.safetensors", 1.0)])
    assert json.loads(capsys.readouterr().out) == {"renamed": 3, "written": ["b.safetensors"]}

    assert cli.main(["run", "w.json", "--models", "m", "--output", "o", "--input", "i"]) == 0
    assert seen["run"] == ("w.json", "m", "o", "i", False)
    assert cli.main(["run", "w.json", "--lowvram"]) == 0 and seen["run"][-1] is True
    capsys.readouterr()
    assert cli.main(["demo", "--output", "out"]) == 0 and seen["demo"] == "out"
    assert capsys.readouterr().out == "the summary\n"
    assert cli.main(["demo", "--output", "out", "--json"]) == 0 and json.loads(capsys.readouterr().out) == {}
    assert cli.main(["lora", "convert", "x", "y", "--to", "kohya"]) == 0 and seen["lora"] == ("x", "y", "kohya")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli.main(["convert", "a", "b", "--to", "nonsense"])


def test_inspect_prints_text_or_json(monkeypatch, capsys):
    info = {"path": "f.safetensors", "family": "flux-transformer", "layout": "bfl", "variant": "dev",
            "dtypes": {"bf16": 778, "f32": 2}, "config": {"num_layers": 2, "guidance_embeds": True},
            "tensor_count": 780, "warnings": ["one", "two"]}
    fake_library(monkeypatch, "convert.inspect", inspect_path=lambda path: info)
    assert cli.main(["inspect", "f.safetensors"]) == 0
    text = capsys.readouterr().out.splitlines()
    for line in ("family: flux-transformer", "layout: bfl", "variant: dev", "dtypes:", "  bf16: 778",
                 "config:", "  num_layers: 2", "tensor_count: 780", "warnings:", "  - two"):
        assert line in text
    assert text.index("family: flux-transformer") < text.index("tensor_count: 780")
    assert cli.main(["inspect", "f.safetensors", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == info

    fake_library(monkeypatch, "convert.lora.inspect",
                 inspect_lora=lambda path: {"format": "kohya", "ranks": {"16": 10}, "not_placed": []})
    assert cli.main(["lora", "inspect", "l.safetensors"]) == 0
    assert "format: kohya" in capsys.readouterr().out.splitlines()


def test_python_dash_m(tmp_path):
    """`python -m fluxbridge` runs the same main (the checkout linked as `fluxbridge` on PYTHONPATH)."""
    env = checkout_env(tmp_path)
    done = subprocess.run([sys.executable, "-m", "fluxbridge", "--version"], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("fluxbridge 0.1.0"), done.stderr
    done = subprocess.run([sys.executable, "-m", "fluxbridge", "lora", "convert", "a", "b", "--to", "nonsense"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert done.returncode == 2 and "invalid choice: 'nonsense'" in done.stderr


def test_inspect_text_leaves_out_empty_sections(monkeypatch, capsys, tmp_path):
    """A plain model file: no quantization block, no empty prefix, one tensor count; --json keeps every key.
    What is there to say (a quantized file, a bundle holding more tensors) is still said."""
    from fluxbridge.headless import factory

    path = factory.save_layout(factory.tiny_flux_transformer(width=32, heads=2, double=1, single=1),
                               tmp_path / "flux.safetensors", "bfl")
    assert cli.main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "family: flux-transformer" in text and "tensor_count: 52" in text
    for absent in ("quantization", "prefix", "total_tensors", "scheme", "warnings", ": -"):
        assert absent not in text, (absent, text)
    assert cli.main(["inspect", str(path), "--json"]) == 0
    full = json.loads(capsys.readouterr().out)
    assert full["prefix"] == "" and full["total_tensors"] == 52 and full["quantization"]["scheme"] == "none"

    info = dict(full, total_tensors=60, quantization={"scheme": "scaled_fp8", "dequantized": 40})
    fake_library(monkeypatch, "convert.inspect", inspect_path=lambda p: info)
    assert cli.main(["inspect", "f.safetensors"]) == 0
    text = capsys.readouterr().out.splitlines()
    assert "total_tensors: 60" in text and "quantization:" in text and "  scheme: scaled_fp8" in text

