"""Workflow files: API-format validation, the UI ⇄ API conversion, and the examples' consistency check.

Every check reads *node specs* (`runtime.node_specs`): the caller hands in the registry of node types a
workflow may use (our nodes' specs and the headless stand-ins of native ones: `runner.registry()`), so this
module knows no node list of its own. One registry drives three things:

* `validate_api(api, specs)`: everything ComfyUI's `/prompt` validation checks (node types, links, link
  types, required inputs, numbers within range, combo choices), and a little more (unknown inputs,
  cycles, file name prefixes that would leave the output folder). Problems are `(node id, class, cause)`.
* `ui_to_api(ui, specs)`: what the frontend's `graphToPrompt()` makes of a UI-format workflow.
* `workflow_check(ui, api, specs)`: a UI workflow and its API twin are valid and describe the same graph.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from ..common.errors import BadInput
from ..runtime.node_specs import NodeSpec, fmt_value, check_widget_value, output_prefix_problem

CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")


# -------------------------------------------------------------------------------------- API validation

def _is_link(value) -> bool:
    return (isinstance(value, list) and len(value) == 2 and isinstance(value[0], (str, int))
            and not isinstance(value[0], bool) and isinstance(value[1], int) and not isinstance(value[1], bool))


def unknown_inputs(api, specs: dict[str, NodeSpec]) -> list[tuple[str, str, str]]:
    """Inputs a node type does not have, as (node id, class_type, name): ComfyUI ignores them (some
    frontends export e.g. LoadImage's `upload`), so the runner only warns; the example check refuses them."""
    found = []
    for nid, node in (api.items() if isinstance(api, dict) else ()):
        spec = specs.get(node.get("class_type")) if isinstance(node, dict) else None
        if spec is not None and isinstance(node.get("inputs"), dict):
            found += [(str(nid), spec.node_id, name) for name in node["inputs"] if spec.input(name) is None]
    return found


def validate_api(api, specs: dict[str, NodeSpec], strict: bool = True) -> tuple[list[tuple[str, str, str]], list[str]]:
    """Validate an API-format workflow. Returns (problems, output node ids); each problem is
    (node id, class_type, cause). Nothing is executed. `strict`: an input the node type does not have is a
    problem (otherwise it is left to `unknown_inputs`)."""
    problems: list[tuple[str, str, str]] = []
    if not isinstance(api, dict) or not api:
        return [("-", "-", "not an API-format workflow (expected an object of nodes by id)")], []
    for nid, node in api.items():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
            problems.append((str(nid), "?", "not a node (expected {\"class_type\": ..., \"inputs\": {...}})"))
            continue
        cls = node["class_type"]
        spec = specs.get(cls)
        if spec is None:
            problems.append((str(nid), cls, f"unknown node type {cls!r}"))
            continue
        inputs = node.get("inputs", {})
        if not isinstance(inputs, dict):
            problems.append((str(nid), cls, "inputs is not an object"))
            continue
        for name, value in inputs.items():
            inp = spec.input(name)
            if inp is None:
                if strict:
                    problems.append((str(nid), cls, f"unknown input {name!r}"))
                continue
            if _is_link(value):
                src_id, index = str(value[0]), value[1]
                src = api.get(src_id)
                if not isinstance(src, dict):
                    problems.append((str(nid), cls, f"{name}: linked to node {src_id}, which is not in the workflow"))
                    continue
                src_spec = specs.get(src.get("class_type"))
                if src_spec is None:
                    continue  # reported at that node
                if not 0 <= index < len(src_spec.outputs):
                    problems.append((str(nid), cls, f"{name}: node {src_id} ({src_spec.node_id}) has no output "
                                                    f"{index} (it has {len(src_spec.outputs)})"))
                    continue
                out_type = src_spec.outputs[index][1]
                if out_type != inp.type and "*" not in (out_type, inp.type):
                    problems.append((str(nid), cls, f"{name}: expects {inp.type} but node {src_id} "
                                                    f"({src_spec.node_id}) output {index} gives {out_type}"))
            elif not inp.is_widget:
                problems.append((str(nid), cls, f"{name}: expects a link to a {inp.type} output, "
                                                f"got the value {fmt_value(value)}"))
            else:
                why = check_widget_value(inp, value)
                if why:
                    problems.append((str(nid), cls, why))
                elif name == "filename_prefix" and (why := output_prefix_problem(value)):
                    problems.append((str(nid), cls, f"filename_prefix: {why}"))
        for inp in spec.inputs:
            if not inp.optional and inp.name not in inputs:
                problems.append((str(nid), cls, f"required input {inp.name!r} is missing"))
    outputs = [str(nid) for nid, node in api.items()
               if isinstance(node, dict) and (s := specs.get(node.get("class_type"))) and s.output_node]
    if not problems and not outputs:
        problems.append(("-", "-", "the workflow has no output node (nothing would be saved or shown)"))
    return problems, outputs


def execution_order(api: dict, targets: list[str]) -> tuple[list[str], list[str] | None]:
    """Topological order of the nodes that `targets` need (dependencies first). Returns (order, cycle):
    cycle is the list of node ids on a cycle when there is one."""
    order, state = [], {}  # state: 1 = on the current path, 2 = done

    def deps(nid):
        return [str(v[0]) for v in api[nid].get("inputs", {}).values() if _is_link(v) and str(v[0]) in api]

    for target in targets:
        if state.get(target) == 2:
            continue
        stack, path = [(target, iter(deps(target)))], [target]
        state[target] = 1
        while stack:
            nid, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                stack.pop()
                path.pop()
                state[nid] = 2
                order.append(nid)
            elif state.get(nxt) == 1:
                return order, path[path.index(nxt):] + [nxt]
            elif state.get(nxt) != 2:
                state[nxt] = 1
                stack.append((nxt, iter(deps(nxt))))
                path.append(nxt)
    return order, None


def find_cycle(api: dict) -> list[str] | None:
    """A cycle anywhere in the workflow (not only among the nodes the outputs need)."""
    _, cycle = execution_order(api, sorted(api, key=_id_key))
    return cycle


def _id_key(nid):
    s = str(nid)
    return (0, int(s), s) if s.isdigit() else (1, 0, s)


# ----------------------------------------------------------------------------------------- UI format

def ui_widget_values(spec: NodeSpec, values: list) -> tuple[dict, list[str]]:
    """Map a UI node's `widgets_values` to input names, as the frontend does (control and upload widgets
    take a slot of their own right after their input). Returns (values by name, problems)."""
    named, problems, pos = {}, [], 0
    values = list(values or [])
    widgets = spec.widgets()
    for k, inp in enumerate(widgets):
        if pos >= len(values):
            # a workflow saved before optional widgets were added: the frontend leaves them at their defaults
            if not all(w.optional for w in widgets[k:]):
                problems.append(f"widgets_values has no value for {inp.name!r}")
            break
        named[inp.name] = values[pos]
        pos += 1
        if inp.control:
            if pos >= len(values) or values[pos] not in CONTROL_VALUES:
                problems.append(f"{inp.name}: expected a control_after_generate value "
                                f"({', '.join(CONTROL_VALUES)}) after it in widgets_values")
            pos += 1
        if inp.upload:
            pos += 1  # the upload button's value ("image")
    if pos < len(values):
        problems.append(f"widgets_values has {len(values) - pos} value(s) too many")
    return named, problems


def ui_to_api(ui: dict, specs: dict[str, NodeSpec]) -> tuple[dict, list[tuple[str, str, str]]]:
    """The API prompt the frontend would queue for a UI-format workflow, plus the problems found in the UI
    file itself (link table consistency, slot types, widgets_values)."""
    problems = []
    nodes = {str(n["id"]): n for n in ui.get("nodes", [])}
    links = {}
    for link in ui.get("links", []):
        if not (isinstance(link, list) and len(link) == 6):
            problems.append(("-", "-", f"link {link!r} is not [id, from, from_slot, to, to_slot, type]"))
            continue
        links[link[0]] = link
    api = {}
    for nid, node in nodes.items():
        cls = node.get("type")
        spec = specs.get(cls)
        if spec is None:
            problems.append((nid, str(cls), f"unknown node type {cls!r}"))
            continue
        if node.get("mode", 0) in (2, 4):  # muted / bypassed nodes are not queued
            continue
        inputs = {}
        # socket inputs, linked by the UI link table
        for slot, entry in enumerate(node.get("inputs", [])):
            inp = spec.input(entry.get("name"))
            if inp is None:
                problems.append((nid, cls, f"UI input {entry.get('name')!r} is not an input of {cls}"))
                continue
            if entry.get("type") != inp.type and not (entry.get("widget") and inp.is_widget):
                problems.append((nid, cls, f"UI input {inp.name!r} has type {entry.get('type')!r}, "
                                           f"the node takes {inp.type}"))
            lid = entry.get("link")
            if lid is None:
                continue
            link = links.get(lid)
            if link is None:
                problems.append((nid, cls, f"{inp.name}: link {lid} is not in the link table"))
                continue
            _, src, src_slot, dst, dst_slot, ltype = link
            if str(dst) != nid or dst_slot != slot:
                problems.append((nid, cls, f"{inp.name}: link {lid} says it ends at node {dst} slot {dst_slot}"))
            src_node = nodes.get(str(src))
            src_spec = specs.get(src_node.get("type")) if src_node else None
            if src_spec is None:
                problems.append((nid, cls, f"{inp.name}: link {lid} starts at unknown node {src}"))
                continue
            outs = src_node.get("outputs", [])
            if not 0 <= src_slot < len(src_spec.outputs) or src_slot >= len(outs):
                problems.append((nid, cls, f"{inp.name}: link {lid} starts at missing output {src_slot} of {src}"))
                continue
            if lid not in (outs[src_slot].get("links") or []):
                problems.append((str(src), src_node["type"], f"output {src_slot} does not list link {lid}"))
            if outs[src_slot].get("type") != src_spec.outputs[src_slot][1]:
                problems.append((str(src), src_node["type"], f"UI output {src_slot} has type "
                                 f"{outs[src_slot].get('type')!r}, the node gives {src_spec.outputs[src_slot][1]}"))
            if ltype != src_spec.outputs[src_slot][1] or ltype != inp.type:
                problems.append((nid, cls, f"{inp.name}: link {lid} has type {ltype}, joining output type "
                                           f"{src_spec.outputs[src_slot][1]} to input type {inp.type}"))
            inputs[inp.name] = [str(src), src_slot]
        if len(node.get("outputs", [])) != len(spec.outputs):
            problems.append((nid, cls, f"the UI node has {len(node.get('outputs', []))} outputs, "
                                       f"{cls} has {len(spec.outputs)}"))
        for out_slot, out in enumerate(node.get("outputs", [])):
            for lid in out.get("links") or []:
                link = links.get(lid)
                if link is None or str(link[1]) != nid or link[2] != out_slot:
                    problems.append((nid, cls, f"output {out_slot} lists link {lid}, which does not start there"))
        named, why = ui_widget_values(spec, node.get("widgets_values", []))
        problems += [(nid, cls, w) for w in why]
        for name, value in named.items():
            inputs.setdefault(name, value)  # a linked widget input keeps its link
        api[nid] = {"class_type": cls, "inputs": inputs}
        title = node.get("title") or spec.display_name or cls
        api[nid]["_meta"] = {"title": title}
    return api, problems


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) \
            and not isinstance(b, bool):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def workflow_check(ui_json, api_json, specs: dict[str, NodeSpec]) -> list[str]:
    """Problems with a UI-format workflow and its API-format twin (an empty list when all is well): every
    node type exists, links join matching types, widget values are in range / among the choices, the API
    twin validates, and both describe the same graph (node ids and types, links, widget values by name).
    `ui_json` / `api_json` are dicts or paths; `specs` is the registry of node types (`runner.registry()`)."""
    ui = _load(ui_json)
    api = _load(api_json)
    out = []
    if ui.get("version") != 0.4:
        out.append(f"UI workflow: version is {ui.get('version')!r}, expected 0.4")
    for key in ("id", "revision", "last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra"):
        if key not in ui:
            out.append(f"UI workflow: missing {key!r}")
    ids = [n.get("id") for n in ui.get("nodes", [])]
    if ids and max(ids) > ui.get("last_node_id", 0):
        out.append("UI workflow: last_node_id is smaller than a node id")
    lids = [link[0] for link in ui.get("links", []) if isinstance(link, list) and link]
    if lids and max(lids) > ui.get("last_link_id", 0):
        out.append("UI workflow: last_link_id is smaller than a link id")
    if len(set(ids)) != len(ids) or len(set(lids)) != len(lids):
        out.append("UI workflow: duplicate node or link ids")
    converted, problems = ui_to_api(ui, specs)
    out += [f"UI node {n} ({c}): {why}" for n, c, why in problems]
    for label, prompt in (("UI workflow", converted), ("API twin", api)):
        problems, _ = validate_api(prompt, specs)
        out += [f"{label}: node {n} ({c}): {why}" for n, c, why in problems]
        if not problems and (cycle := find_cycle(prompt)):
            out.append(f"{label}: cycle through nodes {' -> '.join(cycle)}")
    if set(converted) != set(map(str, api)):
        out.append(f"node ids differ: UI {sorted(converted, key=_id_key)} vs API {sorted(api, key=_id_key)}")
    for nid in sorted(set(converted) & set(api), key=_id_key):
        a, b = converted[nid], api[nid]
        if a["class_type"] != b.get("class_type"):
            out.append(f"node {nid}: type {a['class_type']} in the UI, {b.get('class_type')} in the API twin")
            continue
        names = set(a["inputs"]) | set(b.get("inputs", {}))
        for name in sorted(names):
            va, vb = a["inputs"].get(name, "<absent>"), b.get("inputs", {}).get(name, "<absent>")
            if _is_link(va) and _is_link(vb):
                va, vb = [str(va[0]), va[1]], [str(vb[0]), vb[1]]
            if not _same(va, vb):
                out.append(f"node {nid} ({a['class_type']}): {name} is {fmt_value(va)} in the UI, {fmt_value(vb)} in the API twin")
    return out


def _load(obj):
    if isinstance(obj, (str, Path)):
        try:
            return json.loads(Path(obj).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise BadInput(obj, f"cannot read the workflow: {exc}") from None
    return obj


def examples_dir() -> Path:
    """`example_workflows/` of the installed pack."""
    return Path(__file__).resolve().parents[1] / "example_workflows"


def example_pairs() -> list[tuple[Path, Path]]:
    """(UI workflow, API twin) for every example shipped with the pack."""
    root = examples_dir()
    return [(p, root / "api" / p.name) for p in sorted(root.glob("*.json"))]
