"""The library's imports: at module top unless a ``# lazy:`` comment says why not."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "d2m_dist"


def function_level_imports(path: Path):
    """(line, text) of every import inside a function body of ``path`` without a ``lazy:`` reason.

    The reason sits on the import's line or in the comment above the block of
    imports it belongs to.
    """
    source = path.read_text()
    lines = source.splitlines()
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for inner in ast.walk(node):
            if isinstance(inner, (ast.Import, ast.ImportFrom)):
                block = lines[inner.lineno - 1 : inner.end_lineno]
                k = inner.lineno - 2  # upwards through the comments and imports right above it
                while k >= 0 and lines[k].strip().startswith(("#", "import ", "from ")):
                    block.append(lines[k])
                    k -= 1
                if not any("lazy:" in line for line in block):
                    found.append((inner.lineno, lines[inner.lineno - 1].strip()))
    return sorted(set(found))


def test_no_function_level_import_without_a_reason():
    offenders = {str(p.relative_to(PACKAGE.parent)): function_level_imports(p) for p in sorted(PACKAGE.rglob("*.py"))}
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, "\n".join(f"{f}:{line}: {text}" for f, items in offenders.items() for line, text in items)


def test_the_check_sees_an_unexplained_import(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    import os\n\n\ndef g():\n    import sys  # lazy: start-up time\n\n\n"
                 "def h():\n    # lazy: optional dependency\n    import json\n    import csv\n\n\n"
                 "def i():\n    x = 1  # lazy: not about the import below\n    import re\n")
    assert function_level_imports(f) == [(2, "import os"), (17, "import re")]
