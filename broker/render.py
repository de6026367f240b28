"""Plain rows and rich tables for the CLI's listings.

The rows are the exact data (``--json`` prints them). The tables show them to a person: every cell
is plain text, never rich markup, with what users wrote in it (reasons, chains, names, close reasons)
escaped by :func:`broker.terminal.visible`; long cells wrap, and words longer than their column (ids,
times, emails) fold onto the next line instead of being cut with an ellipsis.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from rich.table import Table
from rich.text import Text

from broker.duration import format_duration
from broker.model import AccessRequest, Grant, Session
from broker.terminal import visible


def request_row(r: AccessRequest) -> dict[str, Any]:
    return {"id": r.id, "resource": r.resource, "requester": r.requester, "chain": list(r.chain),
            "status": r.status.value, "duration": format_duration(r.duration), "reason": r.reason,
            "created_at": r.created_at.isoformat(), "lapses_at": r.lapses_at.isoformat(),
            "approvals": [a.approver for a in r.approvals], "grant_id": r.grant_id,
            "extends_grant": r.extends_grant}


def grant_row(g: Grant, now: datetime) -> dict[str, Any]:
    return {"id": g.id, "login": g.login, "identity": g.identity, "chain": list(g.chain),
            "resources": list(g.resources), "status": g.status.value, "created_at": g.created_at.isoformat(),
            "expires_at": g.expires_at.isoformat(),
            "remaining": format_duration(g.remaining(now)) if g.status.value == "active" else "",
            "request_id": g.request_id, "parent_id": g.parent_id, "breakglass": g.breakglass,
            "end_reason": g.end_reason}


def session_row(s: Session) -> dict[str, Any]:
    return {"id": s.id, "resource": s.resource, "protocol": s.protocol, "chain": list(s.chain),
            "client": s.client_addr, "status": s.status.value, "opened_at": s.opened_at.isoformat(),
            "closed_at": s.closed_at.isoformat() if s.closed_at else None, "close_reason": s.close_reason,
            "grant_id": s.grant_id}


def cell(value: object) -> Text:
    """A table cell: plain text (a ``[`` in a reason is not markup), its controls shown as escapes."""
    return Text(visible("" if value is None else str(value)))


def _table(title: str, *columns: str) -> Table:
    """The first column is the row's id, which is never folded: it is what the next command takes
    (``hoop transcript``, ``hoop revoke``), and a folded one is copied in half."""
    table = Table(title=title)
    for i, name in enumerate(columns):
        table.add_column(name, overflow="fold", no_wrap=i == 0)
    return table


def requests_table(rows: list[dict[str, Any]]) -> Table:
    table = _table("requests", "id", "resource", "requester", "status", "duration", "approvals", "reason")
    for r in rows:
        table.add_row(*map(cell, (r["id"], r["resource"], r["requester"], r["status"], r["duration"],
                                  ", ".join(r["approvals"]), r["reason"])))
    return table


def grants_table(rows: list[dict[str, Any]]) -> Table:
    table = _table("grants", "id", "login", "chain", "resources", "status", "expires_at", "left")
    for g in rows:
        table.add_row(*map(cell, (g["id"], g["login"], " → ".join(g["chain"]), ", ".join(g["resources"]),
                                  g["status"], g["expires_at"], g["remaining"])))
    return table


def sessions_table(rows: list[dict[str, Any]]) -> Table:
    table = _table("sessions", "id", "resource", "protocol", "chain", "client", "status", "opened",
                   "closed because")
    for r in rows:
        table.add_row(*map(cell, (r["id"], r["resource"], r["protocol"], " → ".join(r["chain"]), r["client"],
                                  r["status"], r["opened_at"], r["close_reason"])))
    return table
