"""Plain rows and rich tables for the CLI's listings."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from rich.table import Table

from broker.duration import format_duration
from broker.model import AccessRequest, Grant


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


def requests_table(rows: list[dict[str, Any]]) -> Table:
    table = Table("id", "resource", "requester", "status", "duration", "approvals", "reason", title="requests")
    for r in rows:
        table.add_row(r["id"], r["resource"], r["requester"], r["status"], r["duration"],
                      ", ".join(r["approvals"]), r["reason"])
    return table


def grants_table(rows: list[dict[str, Any]]) -> Table:
    table = Table("id", "login", "chain", "resources", "status", "expires_at", "left", title="grants")
    for g in rows:
        table.add_row(g["id"], g["login"], " → ".join(g["chain"]), ", ".join(g["resources"]), g["status"],
                      g["expires_at"], g["remaining"])
    return table
