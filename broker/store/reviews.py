"""Statement reviews held for approval (``broker/reviews.py``): rows in and out of ``reviews``."""

from __future__ import annotations

from sqlalchemy import insert, select, update

from broker.model import Review
from broker.store import tables as t
from broker.store.base import TxBase

_REVIEW_FIELDS = ("id", "session_id", "grant_id", "resource", "text", "rule", "requested_by", "created_at",
                  "deadline", "status", "decided_by", "channel", "ts")


class ReviewOps(TxBase):
    """Reviews: by id or by the Slack message that asks for them."""

    async def insert_review(self, r: Review) -> None:
        await self.conn.execute(insert(t.reviews).values(**{k: getattr(r, k) for k in _REVIEW_FIELDS}))

    async def update_review(self, r: Review) -> None:
        await self.conn.execute(update(t.reviews).where(t.reviews.c.id == r.id).values(
            **{k: getattr(r, k) for k in _REVIEW_FIELDS if k != "id"}))

    async def get_review(self, review_id: str, *, lock: bool = False) -> Review | None:
        q = select(t.reviews).where(t.reviews.c.id == review_id)
        if lock and self._row_lock():
            q = q.with_for_update()
        row = (await self.conn.execute(q)).first()
        return Review(**{k: row._mapping[k] for k in _REVIEW_FIELDS}) if row is not None else None

    async def review_by_message(self, channel: str, ts: str) -> Review | None:
        row = (await self.conn.execute(select(t.reviews.c.id).where(
            t.reviews.c.channel == channel, t.reviews.c.ts == ts))).first()
        return await self.get_review(row[0]) if row is not None else None
