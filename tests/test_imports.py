"""Every module of `delrec` imports on its own, no two modules import each other, even through
imports placed inside functions (which hide a cycle until the function runs), and no module
imports one of a higher layer (LAYERS: the pipeline read from the bottom up)."""

import ast
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((SRC / "delrec").rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the delrec modules it imports anywhere in its file."""
    modules, graph = _modules(), {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                deps |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


# The layers, lowest first: a module may import its own layer and those below, never one above.
# Each entry is a module or a package (its modules). The package root `delrec` only re-exports the
# public API lazily (Recommender) and is outside the layers.
LAYERS = [
    ("core", ["delrec.core"]),
    ("data", ["delrec.data"]),
    ("evaluation", ["delrec.evaluation"]),
    ("teachers", ["delrec.teachers"]),
    ("llm", ["delrec.llm"]),
    ("methods", ["delrec.methods"]),
    ("training", ["delrec.training"]),
    ("config", ["delrec.config"]),
    ("serving", ["delrec.serving"]),
    ("report", ["delrec.report"]),
    ("pipeline", ["delrec.pipeline", "delrec.experiments"]),
    ("cli", ["delrec.cli"]),
]


def layer_of(module: str) -> int | None:
    """The index in LAYERS of the most specific entry naming `module` or a package above it."""
    best, depth = None, -1
    for index, (_, entries) in enumerate(LAYERS):
        for entry in entries:
            if (module == entry or module.startswith(entry + ".")) and entry.count(".") > depth:
                best, depth = index, entry.count(".")
    return best


def test_no_module_imports_a_higher_layer():
    graph = import_graph()
    unplaced = sorted(m for m in graph if m != "delrec" and layer_of(m) is None)
    assert not unplaced, f"modules in no layer of LAYERS: {unplaced}"
    upward = sorted(f"{m} ({LAYERS[layer_of(m)][0]}) -> {d} ({LAYERS[layer_of(d)][0]})"
                    for m, deps in graph.items() if m != "delrec"
                    for d in deps if d != "delrec" and layer_of(d) > layer_of(m))
    assert not upward, upward


def test_the_import_graph_is_acyclic():
    graph, state, cycles = import_graph(), {}, []

    def visit(path):  # depth first; an edge back to a module on the current path closes a cycle
        state[path[-1]] = "open"
        for dep in sorted(graph[path[-1]]):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(path[path.index(dep):] + [dep]))
            elif dep not in state:
                visit(path + [dep])
        state[path[-1]] = "done"

    for module in sorted(graph):
        if module not in state:
            visit([module])
    assert len(graph) > 20 and not cycles, cycles


def test_every_module_imports_on_its_own():
    def run(module):
        proc = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True)
        return module, proc.returncode, proc.stderr[-500:]

    with ThreadPoolExecutor(max_workers=2) as pool:
        failed = [(m, err) for m, rc, err in pool.map(run, sorted(_modules())) if rc != 0]
    assert not failed, failed
