"""Session recordings: events stored as chunks of JSON lines, long chunks zlib-packed.

How this works: a batch of events becomes one chunk per session (``session_event_chunks``),
numbered by its first and last event. Reads walk the (session, first event) index and unpack
what they need; a damaged chunk is logged and skipped. Rows a replica older than migration
0003 wrote one event at a time (``session_events``) are merged in, the chunk's copy winning.
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Row, func, insert, select

from broker import eventlines
from broker.model import SessionEvent
from broker.store import tables as t
from broker.store.base import TxBase

log = logging.getLogger(__name__)

#: a batch of chunks this long (characters in all) is packed in a worker thread, not on the loop
_PACK_OFF_LOOP = 256 * 1024
#: chunks fetched per query by a paged read of a recording (a chunk holds up to ~64 KiB of events)
_CHUNKS_PER_READ = 8


def _chunk_rows(chunks: Sequence[tuple[str, int, int, str]]) -> list[dict[str, Any]]:
    """The rows of ``session_event_chunks`` for these chunks: long ones packed, short ones as text."""
    rows = []
    for sid, first, last, lines in chunks:
        packed = eventlines.pack(lines) if len(lines) >= eventlines.PACK_MIN else None
        rows.append({"session_id": sid, "first_seq": first, "last_seq": last,
                     "lines": "" if packed is not None else lines, "packed": packed})
    return rows


def _chunk_events(session_id: str, stored: str, packed: bytes | None, first: int) -> list[SessionEvent]:
    """The events of one stored chunk; none for a damaged one (logged: the rest of the recording still reads)."""
    lines = stored
    if packed is not None:
        try:
            lines = eventlines.unpack(packed)
        except (zlib.error, UnicodeDecodeError) as exc:
            log.error("session=%s the recorded chunk from event %s is damaged and is skipped: %s",
                      session_id, first, exc)
            return []
    return eventlines.decode(session_id, lines)


def _legacy_event(r: Row[Any]) -> SessionEvent:
    return SessionEvent(session_id=r.session_id, seq=r.seq, at=r.at, kind=r.kind, data=r.data)


class RecordingOps(TxBase):
    """A session's events: appended in chunks, read whole or page by page."""

    async def add_events(self, events: Sequence[SessionEvent]) -> None:
        """Store events: one chunk per session, in sequence order."""
        runs: dict[str, list[SessionEvent]] = {}
        for e in events:
            if e.at.tzinfo is None:
                raise ValueError("naive datetime given to the store")
            runs.setdefault(e.session_id, []).append(e)
        chunks = []
        for session_id, run in runs.items():
            run.sort(key=lambda e: e.seq)
            chunks.append((session_id, run[0].seq, run[-1].seq, eventlines.join(run)))
        await self.add_event_chunks(chunks)

    async def add_event_chunks(self, chunks: Sequence[tuple[str, int, int, str]]) -> None:
        """Store runs of events already encoded: (session id, first seq, last seq, their lines). A chunk
        of ``eventlines.PACK_MIN`` characters or more is stored packed; a large batch is packed in a
        worker thread (zlib lets go of the GIL), so the event loop keeps running meanwhile."""
        if not chunks:
            return
        if sum(len(c[3]) for c in chunks) >= _PACK_OFF_LOOP:
            rows = await asyncio.to_thread(_chunk_rows, chunks)
        else:
            rows = _chunk_rows(chunks)
        await self.conn.execute(insert(t.session_event_chunks), rows)

    async def events(self, session_id: str, *, limit: int | None = None) -> list[SessionEvent]:
        """A session's events in order: its chunks, plus any rows a replica older than migration 0003
        stored during a rolling upgrade."""
        c = t.session_event_chunks.c
        q = select(c.lines, c.packed, c.first_seq).where(c.session_id == session_id).order_by(c.first_seq)
        out: list[SessionEvent] = []
        for stored, packed, first in await self.conn.execute(q):
            out.extend(_chunk_events(session_id, stored, packed, first))
            if limit is not None and len(out) >= limit:
                break
        old = t.session_events.c
        rows = select(t.session_events).where(old.session_id == session_id).order_by(old.seq)
        legacy = [_legacy_event(r) for r in await self.conn.execute(rows if limit is None else rows.limit(limit))]
        if legacy:
            merged = {e.seq: e for e in legacy}
            merged.update((e.seq, e) for e in out)
            out = [merged[seq] for seq in sorted(merged)]
        return out[:limit] if limit is not None else out

    async def events_after(self, session_id: str, *, after: int = 0, limit: int = 2000) -> list[SessionEvent]:
        """One page of a session's events: the first ``limit`` numbered above ``after``, in order. A long
        recording is read page by page (the next page starts after this page's last event), so whoever
        prints it holds one page, not the session. Chunks are read a few at a time for the same reason,
        each read walking the (session, first event) index from where the last one ended."""
        c = t.session_event_chunks.c
        columns = (c.lines, c.packed, c.first_seq)
        out: list[SessionEvent] = []
        # the chunk holding event after + 1 may begin at or before it: the last chunk to begin there
        holder = (await self.conn.execute(select(*columns, c.last_seq).where(
            c.session_id == session_id, c.first_seq <= after).order_by(c.first_seq.desc()).limit(1))).first()
        if holder is not None and holder.last_seq > after:
            out.extend(e for e in _chunk_events(session_id, holder.lines, holder.packed, holder.first_seq)
                       if e.seq > after)
        begun = after
        while len(out) < limit:
            rows = (await self.conn.execute(select(*columns).where(c.session_id == session_id, c.first_seq > begun)
                                            .order_by(c.first_seq).limit(_CHUNKS_PER_READ))).all()
            for stored, packed, first in rows:
                out.extend(e for e in _chunk_events(session_id, stored, packed, first) if e.seq > after)
                begun = first
                if len(out) >= limit:
                    break
            if len(rows) < _CHUNKS_PER_READ:
                break
        old = t.session_events.c
        legacy = (select(t.session_events).where(old.session_id == session_id, old.seq > after)
                  .order_by(old.seq).limit(limit))
        merged = {e.seq: e for e in map(_legacy_event, await self.conn.execute(legacy))}
        merged.update((e.seq, e) for e in out)  # (a chunk holds the newer copy of an event both hold)
        return [merged[seq] for seq in sorted(merged)[:limit]]

    async def max_event_seq(self, session_id: str) -> int:
        c, old = t.session_event_chunks.c, t.session_events.c
        chunked = (await self.conn.execute(select(func.max(c.last_seq)).where(c.session_id == session_id))).scalar()
        legacy = (await self.conn.execute(select(func.max(old.seq)).where(old.session_id == session_id))).scalar()
        return max(int(chunked or 0), int(legacy or 0))
