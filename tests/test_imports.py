"""Every module of `delrec` imports on its own, and no two modules import each other, even
through imports placed inside functions (which hide a cycle until the function runs)."""

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
