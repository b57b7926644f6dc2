"""Node specs: what a node type takes and gives, and the checks its values must pass.

A *node spec* says what a node type takes and gives: its inputs in the frontend's order (name, type, widget
range / choices), its outputs (name, type) and whether it is an output node. Our nodes' specs are read from
their V3 schemas (`spec_from_schema`); the headless stand-ins of native nodes declare theirs directly. The
nodes re-check their numbers with `check_widget_value` and the workflow checker validates whole workflows
with the same function, so both apply one rule. Imports neither the nodes nor the workflow checker.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Callable

from ..common.errors import BadInput
from . import host

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
MAX_RESOLUTION = 16384  # ComfyUI's largest width / height widget value (nodes.MAX_RESOLUTION)
SEED_NAMES = ("seed", "noise_seed")  # the frontend gives these INT inputs a control widget by default


@dataclass
class InputSpec:
    name: str
    type: str  # INT, FLOAT, STRING, BOOLEAN, COMBO, or a socket type (IMAGE, LATENT, FLUXBRIDGE_VAE, ...)
    optional: bool = False
    default: Any = None
    min: float | None = None
    max: float | None = None
    step: float | None = None
    options: list | None = None  # COMBO choices
    control: bool = False  # the frontend adds a control_after_generate widget right after this one
    upload: bool = False  # the frontend adds an upload widget right after this one (LoadImage)
    force_input: bool = False
    multiline: bool = False

    @property
    def is_widget(self) -> bool:
        return self.type in WIDGET_TYPES and not self.force_input


@dataclass
class NodeSpec:
    node_id: str
    inputs: list[InputSpec]
    outputs: list[tuple[str, str]]  # (name shown in the UI, type)
    output_node: bool = False
    display_name: str | None = None
    native: bool = False
    run: Callable | None = None  # native nodes: run(ctx, **inputs) -> (outputs tuple, ui dict)
    node_class: type | None = None  # our nodes: the V3 class
    needs_comfy: bool = False  # works on ComfyUI's own models: declared for the checker, never run headless

    def input(self, name: str) -> InputSpec | None:
        return next((i for i in self.inputs if i.name == name), None)

    def ordered(self) -> list[InputSpec]:
        """Inputs in the frontend's order: required ones in schema order, then optional ones."""
        return [i for i in self.inputs if not i.optional] + [i for i in self.inputs if i.optional]

    def widgets(self) -> list[InputSpec]:
        return [i for i in self.ordered() if i.is_widget]

    def sockets(self) -> list[InputSpec]:
        return [i for i in self.ordered() if not i.is_widget]


def spec_from_schema(node_class) -> NodeSpec:
    """The spec of a V3 node class (works with the real `comfy_api` objects and with `io_standalone`)."""
    schema = node_class.define_schema()
    inputs = []
    for inp in schema.inputs:
        io_type = inp.get_io_type() if hasattr(inp, "get_io_type") else inp.io_type
        io_type = str(getattr(io_type, "value", io_type))
        control = getattr(inp, "control_after_generate", None)
        if control is None:
            control = io_type == "INT" and inp.id in SEED_NAMES
        options = getattr(inp, "options", None)
        inputs.append(InputSpec(
            name=inp.id, type=io_type, optional=bool(getattr(inp, "optional", False)),
            default=getattr(inp, "default", None), min=getattr(inp, "min", None), max=getattr(inp, "max", None),
            step=getattr(inp, "step", None), options=list(options) if options is not None else None,
            control=bool(control) and io_type in ("INT", "COMBO"),
            upload=getattr(inp, "upload", None) is not None, force_input=bool(getattr(inp, "force_input", False)),
            multiline=bool(getattr(inp, "multiline", False))))
    outputs = []
    for out in schema.outputs:
        io_type = out.get_io_type() if hasattr(out, "get_io_type") else out.io_type
        outputs.append((out.display_name or io_type, io_type))
    return NodeSpec(node_id=schema.node_id, inputs=inputs, outputs=outputs,
                    output_node=bool(schema.is_output_node), display_name=schema.display_name,
                    node_class=node_class, needs_comfy=bool(getattr(node_class, "NEEDS_COMFY", False)))


def fmt_value(value) -> str:
    return json.dumps(value) if isinstance(value, str) else repr(value)


def check_widget_value(inp: InputSpec, value) -> str | None:
    """Why `value` is not acceptable for the widget input `inp` (None when it is)."""
    t = inp.type
    if t == "INT":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                (isinstance(value, float) and not value.is_integer()):
            return f"{inp.name}: {fmt_value(value)} is not an integer"
    elif t == "FLOAT":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"{inp.name}: {fmt_value(value)} is not a number"
    elif t == "STRING":
        if not isinstance(value, str):
            return f"{inp.name}: {fmt_value(value)} is not a string"
    elif t == "BOOLEAN":
        if not isinstance(value, bool):
            return f"{inp.name}: {fmt_value(value)} is not true or false"
    elif t == "COMBO":
        options = inp.options or []
        if value not in options and (why := name_problem(value, "model")):
            return f"{inp.name}: {fmt_value(value)}: {why}"
        if value not in options:
            shown = ", ".join(fmt_value(o) for o in options[:8]) + (", …" if len(options) > 8 else "")
            return f"{inp.name}: {fmt_value(value)} is not one of the choices ({shown or 'none available'})"
        return None
    if t in ("INT", "FLOAT"):
        if inp.min is not None and value < inp.min:
            return f"{inp.name}: {value} is below the minimum {inp.min}"
        if inp.max is not None and value > inp.max:
            return f"{inp.name}: {value} is above the maximum {inp.max}"
    return None


def name_problem(name, where: str) -> str | None:
    """Why `name` cannot name a file inside the `where` folder (None when it can): the host's rule."""
    try:
        host.check_name(name, where)
    except BadInput as exc:
        return exc.cause
    return None


def output_prefix_problem(prefix) -> str | None:
    """Why a `filename_prefix` would not stay inside the output folder (None when it does)."""
    return name_problem(prefix, "output")


