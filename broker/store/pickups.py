"""Sealed credential pickups (``broker/sealing.py``): rows in and out of ``pickups``."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import insert, select, update

from broker.store import tables as t
from broker.store.base import TxBase


class PickupOps(TxBase):
    """A requester's public key, the credential sealed to it, and its one-time collection."""

    async def insert_pickup(self, request_id: str, public_key: str, at: datetime) -> None:
        await self.conn.execute(insert(t.pickups).values(request_id=request_id, public_key=public_key, created_at=at))

    async def pickup_key(self, request_id: str) -> str | None:
        """The requester's public key, when the request was made with one."""
        p = t.pickups
        row = (await self.conn.execute(select(p.c.public_key).where(p.c.request_id == request_id))).first()
        return None if row is None else str(row[0])

    async def seal_pickup(self, request_id: str, grant_id: str, sealed: str, expires_at: datetime) -> bool:
        p = t.pickups
        done = await self.conn.execute(update(p).where(
            p.c.request_id == request_id, p.c.sealed.is_(None), p.c.collected_at.is_(None)).values(
            sealed=sealed, grant_id=grant_id, expires_at=expires_at))
        return bool(done.rowcount)

    async def take_pickup(self, request_id: str, at: datetime) -> tuple[str, str | None]:
        """``(state, sealed)``; state is none|waiting|collected|expired|sealed. Taking a sealed box
        empties it, so it is handed out once, whichever replica is asked."""
        p = t.pickups
        row = (await self.conn.execute(select(p.c.sealed, p.c.expires_at, p.c.collected_at).where(
            p.c.request_id == request_id).with_for_update())).first()
        if row is None:
            return "none", None
        if row.collected_at is not None:
            return "collected", None
        if row.sealed is None:
            return "waiting", None
        if row.expires_at is not None and row.expires_at <= at:
            await self.conn.execute(update(p).where(p.c.request_id == request_id).values(sealed=None))
            return "expired", None
        done = await self.conn.execute(update(p).where(
            p.c.request_id == request_id, p.c.collected_at.is_(None)).values(sealed=None, collected_at=at))
        return ("sealed", str(row.sealed)) if done.rowcount else ("collected", None)

    async def drop_pickup(self, request_id: str) -> None:
        """Forget a box whose grant ended before it was collected."""
        p = t.pickups
        await self.conn.execute(update(p).where(p.c.request_id == request_id, p.c.sealed.is_not(None)).values(
            sealed=None))
