"""`fluxbridge run`: execute an API-format workflow headless, without ComfyUI.

    report = run_workflow("example_workflows/api/flux_dev_text_to_image.json", models_dir="models",
                          output_dir="out")

Order of work: read the file → apply overrides → read the node specs (our V3 schemas, with the models
folder set, and the native allow-list) → validate everything (unknown node types, links to missing nodes
or outputs, link types, missing required inputs, numbers out of range, combo values, file name prefixes
that would leave the output folder, cycles) → refuse a workflow that needs ComfyUI's own models (UNETLoader,
KSampler, our native-model nodes: "needs ComfyUI") → only then run, in dependency order, just the nodes that
the output nodes need. Every problem with the workflow is an `errors.BadInput(workflow, "<node id> (<class>):
<cause>")` raised before anything runs. Model names resolve only inside the models folder (through
`host`), images only inside the input folder, and files are written only inside the output folder.

The returned report is JSON-able: files written, per-node UI payloads (loader detections, LoRA reports,
sigmas), per-node output shapes and timings.
"""
from __future__ import annotations

import asyncio
import copy
import inspect
import json
import os
import time
from pathlib import Path

from ..runtime import host
from ..common.errors import BadInput
from ..common.jsonable import jsonable
from ..convert.safetensors_io import make_folder
from ..runtime.node_specs import NodeSpec, spec_from_schema
from .native_nodes import RunContext, native_specs
from .workflows import _id_key, _is_link, execution_order, find_cycle, ui_to_api, unknown_inputs, validate_api

MODELS_ENV = "FLUXBRIDGE_MODELS"
MAX_WORKFLOW_BYTES = 64 * 2 ** 20  # a workflow file larger than this is refused unread (real ones: kB to a few MB)
INPUT_ENV = "FLUXBRIDGE_INPUT"


def run_workflow(path, models_dir=None, output_dir=None, progress=True, input_dir=None, overrides=None,
                 ui_workflow=None, lowvram=False) -> dict:
    """Validate, then execute the API-format workflow at `path`; returns the report.

    models_dir: the models folder (`diffusion_models/`, `text_encoders/`, `vae/`, `loras/`, `style_models/`,
        `clip_vision/`, optionally `tokenizers/`); default: env FLUXBRIDGE_MODELS.
    output_dir: where files go (default `./output`); nothing is written anywhere else.
    input_dir: where LoadImage finds images (default: env FLUXBRIDGE_INPUT, else `./input`).
    overrides: {node id: {input: value}} applied before validation (e.g. a smaller size or fewer steps).
    ui_workflow: the UI-format twin to embed in saved PNGs; by default `../<name>.json` next to an `api/`
        folder when it exists (the layout of `example_workflows/`).
    lowvram: on a CUDA GPU, group-offload every model (`host.set_lowvram`); without it only the models that
        do not fit are.
    A UI-format file is accepted too: it is converted as the frontend would, and embedded in saved PNGs.
    """
    path = Path(path)
    prompt = _read_json(path)
    if isinstance(prompt, dict) and isinstance(prompt.get("nodes"), list) and "links" in prompt:
        ui_workflow = prompt
    elif ui_workflow is None:
        twin = path.parent.parent / path.name
        if path.parent.name == "api" and twin.is_file():
            try:
                ui_workflow = _read_json(twin)
            except BadInput:  # only embedded in saved PNGs: a bad twin is left out
                ui_workflow = None
    elif isinstance(ui_workflow, (str, Path)):
        ui_workflow = _read_json(Path(ui_workflow))

    models = _models_dir(path, models_dir)
    out_dir = Path(output_dir if output_dir is not None else "output")
    if out_dir.exists() and not out_dir.is_dir():
        raise BadInput(out_dir, "the output folder is a file")
    in_dir = input_dir if input_dir is not None else os.environ.get(INPUT_ENV) or "input"
    in_dir = Path(in_dir)
    if input_dir is not None and not in_dir.is_dir():
        raise BadInput(in_dir, "the input folder does not exist")

    # point the host at the run's folders (standalone), and leave its folders and offloading as they were
    saved_models = host.set_models_dir(models) if models is not None else None
    saved_output = host.set_output_dir(out_dir)
    saved_lowvram = host.set_lowvram(lowvram)
    try:
        return _run(path, prompt, ui_workflow, models, out_dir, in_dir, overrides, progress)
    finally:
        if models is not None:  # a folder removed meanwhile: back to FLUXBRIDGE_MODELS
            host.set_models_dir(saved_models if saved_models and os.path.isdir(saved_models) else None)
        host.set_output_dir(saved_output)
        host.set_lowvram(saved_lowvram)


def _run(path, prompt, ui_workflow, models, out_dir, in_dir, overrides, progress) -> dict:
    specs = registry(in_dir if in_dir.is_dir() else None)
    if prompt is ui_workflow:
        try:
            prompt, problems = ui_to_api(ui_workflow, specs)
        except (TypeError, KeyError, AttributeError, ValueError, IndexError) as exc:  # its parts are not shaped
            raise BadInput(path, f"not a valid UI-format workflow ({type(exc).__name__}: {exc})") from None
        if problems:
            raise BadInput(path, _problem_line(problems))
        for node in prompt.values():
            node.pop("_meta", None)
    prompt = _apply_overrides(path, prompt, overrides)

    problems, outputs = validate_api(prompt, specs, strict=False)
    if problems:
        line = _problem_line(problems)
        if host.models_dir() is None and "none available" in line:
            line += f" (no models folder: pass --models DIR or set {MODELS_ENV})"
        raise BadInput(path, line)
    cycle = find_cycle(prompt)
    if cycle:
        nid = cycle[0]
        raise BadInput(path, f"{nid} ({prompt[nid]['class_type']}): the workflow has a cycle "
                             f"({' -> '.join(cycle)})")
    order, _ = execution_order(prompt, sorted(outputs, key=_id_key))
    comfy_only = [nid for nid in order if specs[prompt[nid]["class_type"]].needs_comfy]
    if comfy_only:  # refused before anything runs: the runner has no ComfyUI model, sampler or CLIP
        nid = comfy_only[0]
        more = f" (and {len(comfy_only) - 1} more such node(s))" if len(comfy_only) > 1 else ""
        raise BadInput(path, f"{nid} ({prompt[nid]['class_type']}): needs ComfyUI: it works on ComfyUI's own "
                             f"models, which the headless runner does not have{more}; run this workflow in ComfyUI")

    make_folder(out_dir)
    before = _files(out_dir)
    ctx = RunContext(output_dir=out_dir, input_dir=in_dir if in_dir.is_dir() else None,
                     prompt=prompt, workflow=ui_workflow)
    report = {"workflow": str(path), "models_dir": str(models) if models else None,
              "output_dir": str(out_dir), "executed": [], "skipped": sorted(set(prompt) - set(order), key=_id_key),
              "nodes": {}, "outputs": [],
              "warnings": [f"{n} ({c}): input {name!r} is not an input of {c}; ignored"
                           for n, c, name in unknown_inputs(prompt, specs)]}
    # drop each output as soon as its last consumer has run
    consumers = {nid: 0 for nid in order}
    for nid in order:
        for value in prompt[nid].get("inputs", {}).values():
            if _is_link(value):
                consumers[str(value[0])] += 1

    values: dict[str, tuple] = {}
    start = time.perf_counter()
    bar = _progress_bar(order, progress)
    try:
        for nid in order:
            node = prompt[nid]
            cls = node["class_type"]
            spec = specs[cls]
            if bar is not None:
                bar.set_postfix_str(f"{nid} {cls}")
            kwargs = {}
            for name, value in node.get("inputs", {}).items():
                if spec.input(name) is None:
                    continue  # an input this node type does not have (warned about above)
                if _is_link(value):
                    src, index = str(value[0]), value[1]
                    kwargs[name] = values[src][index]
                else:
                    kwargs[name] = _cast(spec.input(name), value)
            host.check_interrupt()
            t0 = time.perf_counter()
            ctx.node_id = nid
            result, ui = _execute(path, nid, spec, kwargs, ctx)
            seconds = time.perf_counter() - t0
            if len(result) < len(spec.outputs):
                raise RuntimeError(f"node {nid} ({cls}) returned {len(result)} values for "
                                   f"{len(spec.outputs)} outputs")
            values[nid] = result
            report["executed"].append(nid)
            report["nodes"][nid] = {"class_type": cls, "seconds": round(seconds, 4),
                                    "outputs": [_describe(v, t) for v, (_, t) in zip(result, spec.outputs)],
                                    "ui": jsonable(ui) if ui else {}}
            for value in node.get("inputs", {}).values():
                if _is_link(value):
                    src = str(value[0])
                    consumers[src] -= 1
                    if consumers[src] == 0:
                        values.pop(src, None)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    report["seconds"] = round(time.perf_counter() - start, 4)
    after = _files(out_dir)
    report["outputs"] = sorted(p for p, stamp in after.items() if before.get(p) != stamp)
    return report


# ------------------------------------------------------------------------------------------------ pieces

def registry(input_dir=None) -> dict[str, NodeSpec]:
    """The node types a headless workflow may use, by id: the native stand-ins (LoadImage's choices: the
    images in `input_dir`) and our nodes, their schemas read now (so their combos list the models folder as
    it is set)."""
    from ..nodes import NODE_LIST
    specs = native_specs(input_dir)
    specs.update((spec.node_id, spec) for spec in map(spec_from_schema, NODE_LIST))
    return specs


def _read_json(path: Path):
    try:
        size = path.stat().st_size
        if size > MAX_WORKFLOW_BYTES:
            raise BadInput(path, f"the workflow file is {size} bytes, over the limit of "
                                 f"{MAX_WORKFLOW_BYTES // 2 ** 20} MB")
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise BadInput(path, f"cannot read the workflow: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise BadInput(path, "not valid JSON: the file is not UTF-8 text") from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise BadInput(path, f"not valid JSON: {exc}") from None
    except RecursionError:  # nesting deeper than Python's parser goes
        raise BadInput(path, "not valid JSON: nested too deeply") from None


def _models_dir(path: Path, models_dir):
    chosen = models_dir if models_dir is not None else os.environ.get(MODELS_ENV)
    if not chosen:
        return None
    chosen = Path(chosen)
    if not chosen.is_dir():
        where = "--models" if models_dir is not None else MODELS_ENV
        raise BadInput(chosen, f"the models folder ({where}) does not exist")
    return chosen


def _problem_line(problems) -> str:
    nid, cls, cause = problems[0]
    line = cause if nid == "-" else f"{nid} ({cls}): {cause}"
    if len(problems) > 1:
        rest = "; ".join(f"{n} ({c}): {why}" for n, c, why in problems[1:4])
        line += f" [and {len(problems) - 1} more: {rest}{'; …' if len(problems) > 4 else ''}]"
    return line


def _apply_overrides(path, prompt, overrides):
    if not overrides:
        return prompt
    if not isinstance(prompt, dict):
        return prompt
    prompt = copy.deepcopy(prompt)
    for nid, values in overrides.items():
        node = prompt.get(str(nid))
        if not isinstance(node, dict):
            raise BadInput(path, f"{nid}: override for a node that is not in the workflow")
        node.setdefault("inputs", {}).update(values)
    return prompt


def _execute(path, nid, spec, kwargs, ctx):
    """Run one node; returns (outputs tuple, ui dict)."""
    if spec.native:
        try:
            return spec.run(ctx, **kwargs)
        except BadInput as exc:
            raise BadInput(exc.path, f"{exc.cause} (node {nid}, {spec.node_id})") from None
    cls = spec.node_class
    hidden = _Hidden(unique_id=nid, prompt=ctx.prompt,
                     extra_pnginfo={"workflow": ctx.workflow} if ctx.workflow is not None else {})
    runner_cls = type(cls.__name__, (cls,), {"hidden": hidden, "__module__": cls.__module__})
    try:
        out = runner_cls.execute(**kwargs)
        if inspect.isawaitable(out):
            out = asyncio.run(out)
    except BadInput as exc:
        raise BadInput(exc.path, f"{exc.cause} (node {nid}, {spec.node_id})") from None
    except host.Interrupted:
        raise
    except Exception as exc:  # a fault of ours: keep it as it is, and say which node raised it
        exc.add_note(f"while running node {nid} ({spec.node_id})")
        raise
    return _normalize(out)


def _cast(inp, value):
    """Numbers as the input's type (ComfyUI casts INT and FLOAT widget values the same way)."""
    if inp is not None and inp.type == "INT" and isinstance(value, float):
        return int(value)
    if inp is not None and inp.type == "FLOAT" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


class _Hidden:
    def __init__(self, **values):
        self.__dict__.update(values)

    def __getattr__(self, key):
        return None


def _normalize(out):
    """(values tuple, ui dict) from a NodeOutput, a tuple, a {"ui", "result"} dict or None."""
    if out is None:
        return (), {}
    if isinstance(out, tuple):
        return out, {}
    if isinstance(out, dict):
        return tuple(out.get("result", ()) or ()), _ui_dict(out.get("ui"))
    args = getattr(out, "args", None)
    if args is None:
        args = getattr(out, "result", None) or ()
    return tuple(args), _ui_dict(getattr(out, "ui", None))


def _ui_dict(ui):
    if ui is None:
        return {}
    if hasattr(ui, "as_dict"):
        ui = ui.as_dict()
    return dict(ui)


def _describe(value, io_type: str):
    """A JSON-able summary of one output value (type and tensor shapes)."""
    desc = {"type": io_type}
    shape = getattr(value, "shape", None)
    if shape is not None and hasattr(value, "dtype"):
        desc.update(shape=list(shape), dtype=str(value.dtype).replace("torch.", ""))
    elif isinstance(value, dict) and hasattr(value.get("samples"), "shape"):
        desc.update(shape=list(value["samples"].shape))
    elif io_type == "CONDITIONING" and isinstance(value, list) and value and hasattr(value[0][0], "shape"):
        desc.update(shape=list(value[0][0].shape))
    return desc


def _files(root: Path) -> dict[str, tuple]:
    """Every file under `root` (relative, '/'-separated) with its size and modification time; sub-folders
    the user linked elsewhere included (`host.walk`)."""
    out = {}
    for dirpath, _, filenames in host.walk(str(root)):
        for name in filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            out[path.relative_to(root).as_posix()] = (st.st_size, st.st_mtime_ns)
    return out


def _progress_bar(order, progress):
    """A bar over the nodes, on a terminal only (see `host.terminal_bar`)."""
    return host.terminal_bar(len(order), desc="fluxbridge run", unit="node", leave=True) if progress else None
