"""DESIGN.md's dependency direction, checked on the source: ``bot`` and ``proxy`` import ``broker``; ``broker``
imports neither (and no Slack library), except its composition root (``cli.py``, ``runtime.py`` and
``commands/``), which wires them; ``bot`` and ``proxy`` do not import each other."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
COMPOSITION_ROOT = {"broker/cli.py", "broker/runtime.py", "broker/commands"}
FORBIDDEN = {"broker": {"bot", "proxy", "slack_sdk", "slack_bolt"}, "bot": {"proxy"}, "proxy": {"bot", "slack_sdk",
                                                                                                 "slack_bolt"}}


def imported(path: Path) -> set[str]:
    """The top-level packages ``path`` imports, anywhere in it (also inside functions)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


def _in_root(rel: str) -> bool:
    return any(rel == root or rel.startswith(root + "/") for root in COMPOSITION_ROOT)


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_packages_import_only_in_the_designed_direction(package: str) -> None:
    wrong = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if _in_root(rel):
            continue
        if bad := imported(path) & FORBIDDEN[package]:
            wrong[rel] = sorted(bad)
    assert wrong == {}


def test_the_check_sees_an_import_inside_a_function(tmp_path: Path) -> None:
    (tmp_path / "m.py").write_text("def f():\n    from bot.app import build_app\n    import proxy.sessions as s\n")
    assert imported(tmp_path / "m.py") == {"bot", "proxy"}
