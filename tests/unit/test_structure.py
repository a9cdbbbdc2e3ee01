"""Size limits on the code in ``services/`` and ``libs/``: a unit that grows past them has grown
a second responsibility and is split, unless its docstring gives the reason (``Size: …``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MAX_FUNCTION_LINES = 80
MAX_CLASS_LINES = 400


def _units() -> list[tuple[str, ast.AST]]:
    out: list[tuple[str, ast.AST]] = []
    for base in ("services", "libs"):
        for path in sorted((ROOT / base).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                    out.append((f"{path.relative_to(ROOT)}:{node.lineno} {node.name}", node))
    return out


def _too_long(node: ast.AST) -> bool:
    limit = MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else MAX_FUNCTION_LINES
    length = node.end_lineno - node.lineno + 1  # type: ignore[attr-defined]
    excused = "Size:" in (ast.get_docstring(node) or "")  # type: ignore[arg-type]
    return length > limit and not excused


def test_units_are_found() -> None:
    """The walk sees the code base (a broken path would make the next test pass vacuously)."""
    assert len(_units()) > 500


@pytest.mark.parametrize(
    ("where", "node"), [u for u in _units() if _too_long(u[1])] or [("none", None)]
)
def test_no_function_over_80_lines_or_class_over_400(where: str, node: ast.AST | None) -> None:
    """Every function fits in 80 lines and every class in 400, or says why not."""
    assert node is None, f"{where} is {node.end_lineno - node.lineno + 1} lines"  # type: ignore[union-attr]
