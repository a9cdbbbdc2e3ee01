"""No ``assert`` in ``services/``: it turns a domain reply into a 500 (or vanishes under
``python -O``). The one kind allowed is the settings type check that wires a service at start."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _wiring(path: Path, node: ast.Assert) -> bool:
    """``assert isinstance(settings, XSettings)`` in a service's app.py (start, not a request)."""
    test = node.test
    return (
        path.name == "app.py"
        and isinstance(test, ast.Call)
        and isinstance(test.func, ast.Name)
        and test.func.id == "isinstance"
        and isinstance(test.args[0], ast.Name)
        and test.args[0].id == "settings"
    )


def test_services_raise_the_projects_errors_instead_of_asserting():
    found = [
        f"{path.relative_to(ROOT)}:{node.lineno}"
        for path in sorted((ROOT / "services").rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path)))
        if isinstance(node, ast.Assert) and not _wiring(path, node)
    ]
    assert found == []
