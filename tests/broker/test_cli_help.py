"""``hoop … --help``: a flag shows no value placeholder, an option that takes a value shows its type.

In process with typer's CliRunner (the same ``app`` that ``hoop`` runs), since every command's help is
read: a subprocess each would take about 1.5 s.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import typer.main
from typer.testing import CliRunner

from broker.cli import app


def _paths(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield path
    for name, sub in getattr(command, "commands", {}).items():
        yield from _paths(sub, (*path, name))


PATHS = list(_paths(typer.main.get_command(app)))


def _options(*path: str) -> dict[str, str | None]:
    """The options in ``hoop PATH --help``, each with the placeholder of its value (None: it shows none)."""
    result = CliRunner().invoke(app, [*path, "--help"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    options: dict[str, str | None] = {}
    for row in result.output.splitlines():
        words = row.strip("│ ").removeprefix("* ").split()
        if words and words[0].startswith("--"):  # a row of the Options panel (a wrapped help line starts otherwise)
            rest = words[1:]
            if rest and rest[0].startswith("-") and not rest[0].startswith("--"):
                rest = rest[1:]  # its short name
            options[words[0]] = rest[0] if rest and rest[0].startswith("<") else None
    return options


def test_revoke_help_shows_a_placeholder_for_a_value_and_none_for_help() -> None:
    """``hoop revoke --help`` showed ``--help <bool>``, which tells a user that --help takes a value."""
    options = _options("revoke")
    assert options["--help"] is None
    assert options["--as"] == options["--reason"] == options["--api"] == "<str>"
    assert options["--config"] == "<path>"


def test_a_boolean_flag_shows_no_placeholder() -> None:
    options = _options("grants")
    assert options["--json"] is None
    assert options["--status"] == "<active|expired|revoked>" and options["--config"] == "<path>"
    assert _options()["--version"] is None
    assert _options("status")["--collect"] is None


@pytest.mark.parametrize("path", PATHS, ids=lambda path: " ".join(path) or "hoop")
def test_no_command_shows_a_bool_placeholder(path: tuple[str, ...]) -> None:
    options = _options(*path)
    assert options["--help"] is None
    assert "<bool>" not in options.values()
