"""Grants: rows in and out of ``grants`` (secret digests and SCRAM verifiers, never secrets)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Row, func, insert, select, update

from broker.model import Grant, GrantStatus
from broker.store import tables as t
from broker.store.base import TxBase

_GRANT_FIELDS = ("id", "login", "identity", "created_at", "expires_at", "request_id", "parent_id", "depth",
                 "label", "breakglass", "ended_at", "end_reason", "ended_by", "reminded_at", "db_role")


def _grant(row: Row[Any]) -> Grant:
    m = row._mapping
    return Grant(chain=tuple(m["chain"]), resources=tuple(m["resources"]), status=GrantStatus(m["status"]),
                 **{k: m[k] for k in _GRANT_FIELDS})


def _grant_values(g: Grant) -> dict[str, Any]:
    out = {k: getattr(g, k) for k in _GRANT_FIELDS}
    out.update(chain=list(g.chain), resources=list(g.resources), status=g.status.value)
    return out


class GrantOps(TxBase):
    """Grants: by id, login or secret digest; lists, counts, and a parent's live children."""

    async def insert_grant(self, g: Grant, *, secret_digest: str, scram_verifier: str) -> None:
        await self.conn.execute(insert(t.grants).values(
            **_grant_values(g), secret_digest=secret_digest, scram_verifier=scram_verifier))

    async def update_grant(self, g: Grant) -> None:
        values = _grant_values(g)
        del values["id"]
        await self.conn.execute(update(t.grants).where(t.grants.c.id == g.id).values(**values))

    async def get_grant(self, grant_id: str, *, lock: bool = False) -> Grant | None:
        q = select(t.grants).where(t.grants.c.id == grant_id)
        if lock and self._row_lock():
            q = q.with_for_update()
        row = (await self.conn.execute(q)).first()
        return _grant(row) if row is not None else None

    async def grant_by_login(self, login: str) -> tuple[Grant, str, str] | None:
        """``(grant, secret_digest, scram_verifier)`` for a login."""
        row = (await self.conn.execute(select(t.grants).where(t.grants.c.login == login))).first()
        if row is None:
            return None
        return _grant(row), row._mapping["secret_digest"], row._mapping["scram_verifier"]

    async def grant_by_digest(self, secret_digest: str) -> Grant | None:
        row = (await self.conn.execute(select(t.grants).where(t.grants.c.secret_digest == secret_digest))).first()
        return _grant(row) if row is not None else None

    async def list_grants(self, *, status: GrantStatus | None = None, identity: str | None = None,
                          parent_id: str | None = None, expires_by: datetime | None = None,
                          limit: int | None = 1000, offset: int = 0, lock: bool = False) -> list[Grant]:
        """Newest first; ties by id, so pages by ``offset`` keep one order. ``expires_by``: only grants whose
        ``expires_at`` is at or before it."""
        q = (select(t.grants).order_by(t.grants.c.created_at.desc(), t.grants.c.id.desc())
             .limit(limit).offset(offset))
        if lock and self._row_lock():
            q = q.with_for_update()
        if status is not None:
            q = q.where(t.grants.c.status == status.value)
        if identity is not None:
            q = q.where(t.grants.c.identity == identity)
        if parent_id is not None:
            q = q.where(t.grants.c.parent_id == parent_id)
        if expires_by is not None:
            q = q.where(t.grants.c.expires_at <= expires_by)
        return [_grant(r) for r in await self.conn.execute(q)]

    async def count_grants(self, *, status: GrantStatus) -> int:
        q = select(func.count()).select_from(t.grants).where(t.grants.c.status == status.value)
        return int((await self.conn.execute(q)).scalar_one())

    async def live_children(self, parent_id: str, now: datetime) -> int:
        """How many grants delegated from ``parent_id`` are active and unexpired at ``now``."""
        q = select(func.count()).select_from(t.grants).where(
            t.grants.c.parent_id == parent_id, t.grants.c.status == GrantStatus.ACTIVE.value,
            t.grants.c.expires_at > now)
        return int((await self.conn.execute(q)).scalar_one())
