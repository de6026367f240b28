"""Idempotency: the keys of events already handled (Slack event ids), so a retry is dropped."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete, insert
from sqlalchemy.exc import IntegrityError

from broker.store import tables as t
from broker.store.base import TxBase


class DedupOps(TxBase):
    """Recording a key once; forgetting old keys."""

    async def mark_processed(self, key: str, at: datetime) -> bool:
        """Record ``key``; False when it was already recorded (a retry or a duplicate)."""
        try:
            async with self.conn.begin_nested():
                await self.conn.execute(insert(t.processed_events).values(key=key, at=at))
        except IntegrityError:
            return False
        return True

    async def prune_processed(self, before: datetime) -> int:
        """Forget the keys recorded before ``before`` (Slack retries an event within minutes); how many."""
        done = await self.conn.execute(delete(t.processed_events).where(t.processed_events.c.at < before))
        return int(done.rowcount or 0)
