"""The CLI's tables as an operator reads them at a terminal's width."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta

from rich.console import Console

from broker.model import Grant, GrantStatus, Session, SessionStatus
from broker.render import grant_row, grants_table, session_row, sessions_table

T0 = datetime(2030, 1, 1, 12, tzinfo=UTC)


def shown(table: object, width: int) -> str:
    console = Console(file=io.StringIO(), width=width, highlight=False, color_system=None)
    console.print(table)
    return console.file.getvalue()  # type: ignore[attr-defined]


def test_ids_are_never_folded_at_a_narrow_terminal() -> None:
    """At 80 columns `hoop sessions` printed the id `skwcr6mgh` as `skwcr6m` and `gh` on two lines: the
    operator copies the id into `hoop transcript` and gets a session that does not exist."""
    s = Session(id="skwcr6mgh", grant_id="gt6zw9kkw", resource="prod-db", protocol="postgres", login="a.b",
                chain=("ops-lead@example.com",), client_addr="127.0.0.1:37378", status=SessionStatus.CLOSED,
                opened_at=T0, closed_at=T0, close_reason="access revoked: walk revoke")
    g = Grant(id="gt6zw9kkw", login="opslead.48cr5", identity="ops-lead@example.com",
              chain=("ops-lead@example.com",), resources=("prod-db",), status=GrantStatus.ACTIVE, created_at=T0,
              expires_at=T0 + timedelta(minutes=30))
    for width in (60, 80):
        assert any("│ skwcr6mgh │" in line for line in shown(sessions_table([session_row(s)]), width).splitlines())
        assert any("│ gt6zw9kkw │" in line for line in shown(grants_table([grant_row(g, T0)]), width).splitlines())
