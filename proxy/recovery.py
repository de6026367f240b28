"""Crash recovery of session recordings: the spool segments a crash (or SIGKILL) left behind are stored,
and their sessions closed at their last recorded event with a ``close`` event saying why.

A session whose spool a running hoop still holds (a replica sharing ``state_dir``: each holds an ``flock``
on the segment it writes, see :mod:`proxy.spool`) is left to it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Collection
from datetime import datetime
from pathlib import Path

from broker.eventlines import encode_data, line, parse
from broker.model import SessionStatus
from broker.store import Store
from proxy.chunks import Pending, as_chunks
from proxy.spool import claimed, leftovers

log = logging.getLogger(__name__)


async def recover(spool_dir: Path | None, store: Store, *, busy: Collection[str] = ()) -> int:
    """Ingest the spool files under ``spool_dir`` that a crash left behind, except those of the sessions in
    ``busy`` (live or closing in this process); close their sessions. Returns the sessions recovered."""
    if spool_dir is None:
        return 0
    count = 0
    for session_id, _ in leftovers(spool_dir):
        if session_id in busy:
            continue
        with claimed(spool_dir, session_id) as paths:
            if paths is None:
                log.info("session=%s: its spool is written by a running hoop (a replica sharing state_dir); "
                         "left to it", session_id)
            elif paths:
                await _ingest(store, session_id, paths)
                count += 1
    return count


async def _ingest(store: Store, session_id: str, paths: list[Path]) -> None:
    """Store what ``paths`` hold that the store lacks, close the session at its last event with a
    ``close`` event saying why, then delete the files."""
    last: tuple[int, datetime | None] = (0, None)
    for path in paths:  # one segment at a time: memory stays about one segment
        kept: list[Pending] = []
        for raw in path.read_text(encoding="utf-8", errors="replace").split("\n"):
            got = parse(raw)
            if got is not None:  # (not: a torn last line, the event that was in flight)
                kept.append((got[0], raw + "\n"))
                last = max(last, got[:2], key=lambda item: item[0])
        async with store.tx() as tx:
            done = await tx.max_event_seq(session_id)
            last = max(last, (done, last[1]), key=lambda item: item[0])
            kept = [item for item in kept if item[0] > done]
            if kept:
                await tx.add_event_chunks(as_chunks(session_id, kept))
    async with store.tx() as tx:
        row = await tx.get_session(session_id)
        if row is not None and row.status is SessionStatus.OPEN:
            # the crash's time is unknown: the last event recorded is the latest hoop knows it was open
            at, reason = last[1] or row.opened_at, "hoop stopped while the session was open"
            close = line(last[0] + 1, at.isoformat(), "close", encode_data({"reason": reason, "stats": {}}))
            await tx.add_event_chunks(as_chunks(session_id, [(last[0] + 1, close)]))
            row.status, row.closed_at, row.close_reason = SessionStatus.CLOSED, at, reason
            await tx.update_session(row)
    for path in paths:
        with contextlib.suppress(FileNotFoundError):  # (deleted meanwhile by a hoop that does not lock)
            path.unlink()
