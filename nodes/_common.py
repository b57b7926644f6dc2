"""What every node module shares: the V3 `io` namespace (through host), our socket types, UI payloads."""
from __future__ import annotations

import numbers

from ..runtime import host
from ..common.errors import BadInput
from ..common.jsonable import jsonable
from ..runtime.node_specs import check_widget_value, spec_from_schema

io = host.comfy_io()

TRANSFORMER = io.Custom("FLUXBRIDGE_TRANSFORMER")
TEXT_ENCODERS = io.Custom("FLUXBRIDGE_TEXT_ENCODERS")
VAE = io.Custom("FLUXBRIDGE_VAE")
REDUX = io.Custom("FLUXBRIDGE_REDUX")

CATEGORY = "FluxBridge"
MAX_SEED = 0xFFFFFFFFFFFFFFFF


def node_id(cls):
    """The id of the running node (for the progress bar), or None."""
    hidden = getattr(cls, "hidden", None)
    return getattr(hidden, "unique_id", None) if hidden is not None else None


def ui(lines=(), payload: dict | None = None, **extra) -> dict | None:
    """A node's UI payload: `text` (lines shown under the node), `fluxbridge` (a structured object the web
    extension reads: loader detections, LoRA reports, sigmas) and any other keys given. None if empty."""
    out = {}
    lines = [str(x) for x in lines if x]
    if lines:
        out["text"] = ["\n".join(lines)]
    if payload:
        out["fluxbridge"] = [jsonable(payload)]
    for key, value in extra.items():
        if value is not None:
            out[key] = jsonable(value)
    return out or None


def refuse_if_nothing_fits(lora_name: str, report: dict, placed, what: str) -> None:
    """BadInput when a LoRA has parts for a model (`report["parts"]`) and none of them fits it (`placed` is
    empty), naming the first part not placed and why; `what` names the parts and the model."""
    if report["parts"] and not placed:
        first = report["not_placed"][0] if report["not_placed"] else {"key": "?", "reason": "nothing fits"}
        raise BadInput(lora_name, f"none of the LoRA's {report['parts']} {what}: {first['key']}: {first['reason']}")


def lora_summary(lora_name: str, lora, patched: list, zero_filled: list, not_placed: list,
                 **strengths) -> tuple[list[str], dict]:
    """(UI lines, payload) of a LoRA node: its format, how many modules it patched and zero-filled, and what
    it did not place (the file's unusable keys, once, then `not_placed`: the parts that fit none of the models;
    the first five shown with the reason). `strengths` go into the payload by name."""
    not_placed = list(lora.not_placed) + list(not_placed)
    lines = [f"{lora_name}: format {lora.format}; patched {len(patched)} module(s), zero-filled "
             f"{len(zero_filled)}, not placed {len(not_placed)}"]
    lines += [f"not placed: {n['key']}: {n['reason']}" for n in not_placed[:5]]
    payload = {"name": lora_name, "format": lora.format, **strengths, "patched": patched,
               "zero_filled": zero_filled, "not_placed": not_placed}
    return lines, payload


def name_errors(**inputs: tuple[str, object]) -> bool | str:
    """For `validate_inputs`: True, or why a name would be refused, so that ComfyUI rejects the prompt
    when it is submitted (0.3.64 does not check a V3 combo's value against its options there). Each
    keyword is an input: `lora_name=("loras", lora_name)`, kind "output" for a filename_prefix; None (a
    linked input) is skipped.

    ComfyUI reports a failed `validate_inputs` against *every* input the function takes, so a node's
    `validate_inputs` takes only the names that must be checked before the run, one wherever it can (a node
    with a model name and a filename_prefix checks the prefix when it runs, before it writes anything).
    Where a node must check two (CLIP-L and T5; Redux and its vision tower), the message starts with the
    input at fault."""
    for input_name, (kind, name) in inputs.items():
        if name is None:
            continue
        try:
            if kind == "output":
                host.check_name(name, "output")
            else:
                host.model_path(kind, name)
        except BadInput as exc:
            return f"{input_name}: {exc}" if len(inputs) > 1 else str(exc)
    return True


_SPECS: dict = {}


def checked(cls, **values):
    """The numeric inputs `values`, re-checked against the node's own schema (integer, finite, min, max) and
    returned in order as int / float. ComfyUI and the runner validate before `execute`, but that can be
    bypassed (a direct call; ComfyUI skips its own checks for the inputs a `validate_inputs` takes), and a
    node must never size memory or loops from an unchecked number.
    Raises `BadInput("<node id>", "<input>: <value> is above the maximum ...")`."""
    key = getattr(cls.define_schema, "__func__", cls.define_schema)  # the runner's subclasses share it
    if key not in _SPECS:
        _SPECS[key] = spec_from_schema(cls)
    spec = _SPECS[key]
    out = []
    for name, value in values.items():
        inp = spec.input(name)
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            value = int(value)  # numpy / torch integers as well
        elif isinstance(value, numbers.Real) and not isinstance(value, bool):
            value = float(value)
        why = check_widget_value(inp, value)
        if why:
            raise BadInput(spec.node_id, why)
        out.append(int(value) if inp.type == "INT" else float(value))
    return out[0] if len(out) == 1 else out
