"""Proxy sessions: rows in and out of ``sessions`` (their events are in ``recordings``)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Row, insert, select, update

from broker.model import Session, SessionStatus
from broker.store import tables as t
from broker.store.base import TxBase

_SESSION_FIELDS = ("id", "grant_id", "resource", "protocol", "login", "client_addr", "opened_at",
                   "closed_at", "close_reason", "stats")


def _session(row: Row[Any]) -> Session:
    m = row._mapping
    return Session(chain=tuple(m["chain"]), status=SessionStatus(m["status"]),
                   **{k: m[k] for k in _SESSION_FIELDS})


def _session_values(s: Session) -> dict[str, Any]:
    out = {k: getattr(s, k) for k in _SESSION_FIELDS}
    out.update(chain=list(s.chain), status=s.status.value)
    return out


class SessionOps(TxBase):
    """Sessions: opened, updated as they close, read by id or listed."""

    async def insert_session(self, s: Session) -> None:
        await self.conn.execute(insert(t.sessions).values(**_session_values(s)))

    async def update_session(self, s: Session) -> None:
        values = _session_values(s)
        del values["id"]
        await self.conn.execute(update(t.sessions).where(t.sessions.c.id == s.id).values(**values))

    async def get_session(self, session_id: str) -> Session | None:
        row = (await self.conn.execute(select(t.sessions).where(t.sessions.c.id == session_id))).first()
        return _session(row) if row is not None else None

    async def list_sessions(self, *, status: SessionStatus | None = None, resource: str | None = None,
                            grant_id: str | None = None, limit: int = 1000) -> list[Session]:
        q = select(t.sessions).order_by(t.sessions.c.opened_at.desc()).limit(limit)
        if status is not None:
            q = q.where(t.sessions.c.status == status.value)
        if resource is not None:
            q = q.where(t.sessions.c.resource == resource)
        if grant_id is not None:
            q = q.where(t.sessions.c.grant_id == grant_id)
        return [_session(r) for r in await self.conn.execute(q)]
