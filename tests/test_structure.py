"""The package's shape: no import circle between its modules, ComfyUI imported by the host module only, and a
root that holds the entry points only. Read from the sources (every `import`, at module level or inside a
function), so a circle is caught before it bites at run time."""
import ast
import fnmatch
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOT_PACK = {"tests", "bench", "docs", "web", "example_workflows", "tokenizers"}
HOST_MODULE = "runtime.host"
DOTTED_COMFY = re.compile(r"^(folder_paths|(comfy|comfy_api|comfy_extras)(\.[a-z_0-9]+)+)$")
COMFY_MODULES = ("comfy", "comfy_api", "folder_paths", "comfy_extras", "nodes", "node_helpers", "latent_preview")


def pack_modules() -> dict[str, Path]:
    """Dotted name (relative to the pack; "" is the root `__init__`) -> file, for every module of the pack."""
    found = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in NOT_PACK or rel.parts[0].startswith("."):
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, modules: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(pack modules `name` imports, absolute top-level modules it imports, also by a dotted string such as
    "comfy.model_management" handed to `importlib.import_module`)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    ours, absolute = set(), set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            absolute |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            absolute.add(node.module.split(".")[0])
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and DOTTED_COMFY.match(node.value):
            absolute.add(node.value.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".") if package else []
            base = base[:len(base) - (node.level - 1)]
            target = ".".join(base + (node.module.split(".") if node.module else []))
            for alias in node.names:  # `from pkg import sub` imports the module pkg.sub
                sub = f"{target}.{alias.name}" if target else alias.name
                ours.add(sub if sub in modules else target)
    return ours, absolute


def graph():
    modules = pack_modules()
    return modules, {name: imports(name, path, modules) for name, path in modules.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_reader_sees_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    modules = pack_modules()
    ours, _ = imports("nodes._common", modules["nodes._common"], modules)
    assert {"runtime.host", "runtime.node_specs", "common.errors"} <= ours


def test_no_import_circle_between_the_pack_modules():
    _, found = graph()
    edges = {name: ours - {name} for name, (ours, _) in found.items()}
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))


def test_only_the_host_module_imports_comfyui():
    _, found = graph()
    offenders = {name: sorted(absolute & set(COMFY_MODULES)) for name, (_, absolute) in found.items()
                 if name != HOST_MODULE and absolute & set(COMFY_MODULES)}
    assert offenders == {}
    assert {"comfy", "folder_paths"} <= found[HOST_MODULE][1]


def test_the_library_knows_nothing_of_nodes_runtime_or_headless():
    _, found = graph()
    for name, (ours, _) in found.items():
        if name.split(".")[0] in ("common", "convert", "pipeline"):
            above = {m for m in ours if m.split(".")[0] in ("runtime", "nodes", "headless", "")}
            assert not above, (name, above)


def test_the_root_holds_the_entry_points_only():
    modules = {p.name for p in ROOT.glob("*.py")}
    assert modules == {"__init__.py", "__main__.py"}


def test_the_architecture_page_names_every_module_and_no_other():
    """docs/ARCHITECTURE.md's package layout table lists each module of the pack and of bench/ (modules may
    share their folder's row: `convert/families/flux.py`, `vae.py`, ...; `bench_*.py`), and every path it
    names exists."""
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    table = doc[doc.index("| path | job |"):doc.index("\n\n", doc.index("| path | job |"))]
    rows = table.splitlines()
    files = [p.relative_to(ROOT) for p in list(pack_modules().values()) + list((ROOT / "bench").glob("*.py"))]
    missing = []
    for rel in files:
        if rel.name == "__init__.py" and rel.parent != Path("."):
            continue  # package docstrings: their folder's row
        spelled = f"`{rel.as_posix()}`"
        in_folder_row = any(f"`{rel.parent.as_posix()}/" in row and any(fnmatch.fnmatch(rel.name, name)
                                                                         for name in re.findall(r"`([^`]+)`", row))
                            for row in rows)
        if spelled not in table and not in_folder_row:
            missing.append(rel.as_posix())
    assert missing == []
    named = re.findall(r"`([a-z_0-9/]+\.py)`", table)
    gone = [name for name in named if "/" in name and not (ROOT / name).is_file()]
    assert gone == []
