"""The floor plan stays readable: `src/delrec/` shows its layers as folders (at most four loose
modules besides `__init__.py`), no file is over 500 lines, and no function over 80 lines but the
argument parser's."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "delrec"
MAX_FILE_LINES, MAX_FUNCTION_LINES = 500, 80
LONG_BY_NATURE = {"cli/parser.py:build_parser"}  # one add_argument per line


def test_at_most_four_loose_modules():
    loose = sorted(p.name for p in SRC.glob("*.py") if p.name != "__init__.py")
    assert len(loose) <= 4, f"loose modules in src/delrec: {loose}; give each a layer's folder"


def test_no_file_over_500_lines():
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES}
    assert not long, f"split along their concerns: {long}"


def test_no_function_over_80_lines():
    long = {}
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{path.relative_to(SRC)}:{node.name}"
                if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES and name not in LONG_BY_NATURE:
                    long[name] = node.end_lineno - node.lineno + 1
    assert not long, long
