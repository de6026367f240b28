"""Publishes masked transcripts: when a session closes, and when its grant ends.

Runs as a broker ``Notifier``. Rendering happens in background tasks so the event that
triggered it is not held up; at a grant's end it first waits (bounded) for that grant's
live sessions to close, so the grant's transcript includes them. :func:`full_session_transcript`
is the uncapped one (``hoop transcript --full``): read and rendered a page of events at a time.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Coroutine, Sequence
from typing import Any

from broker.events import Event, GrantEnded, SessionClosed, TranscriptReady
from broker.model import Grant, Session, SessionEvent, SessionStatus
from broker.service import Service
from broker.store import Tx
from broker.transcript import Counts, SessionLines, Transcript, heading, render, session_end, visible_text

log = logging.getLogger(__name__)
#: events read and rendered at a time by :func:`full_session_transcript`
PAGE = 2000
#: events of one session a capped transcript reads (its byte cap cuts long before, unless raised a lot)
READ_MAX = 200_000


async def _first_events(tx: Tx, session_id: str, read_max: int) -> tuple[list[SessionEvent], bool]:
    """The first ``read_max`` events of a session, and whether there are more."""
    events = await tx.events(session_id, limit=read_max + 1)
    return events[:read_max], len(events) > read_max


async def session_transcript(service: Service, session_id: str, *,
                             read_max: int = READ_MAX) -> tuple[Session, Transcript]:
    """A session's transcript, capped at ``transcripts.max_bytes`` (uncapped: :func:`full_session_transcript`)."""
    from broker.errors import NotFound

    async with service.store.tx() as tx:
        session = await tx.get_session(session_id)
        if session is None:
            raise NotFound(f"no session {session_id!r}", code="no_session")
        events, more = await _first_events(tx, session_id, read_max)
        grant = await tx.get_grant(session.grant_id)
    return session, render(grant, [(session, events)],
                           max_bytes=service.config.transcripts.max_bytes,
                           title=f"transcript of session {session.id}", unread={session.id} if more else ())


async def full_session_transcript(service: Service, session_id: str, counts: Counts, *,
                                  page: int = PAGE) -> AsyncIterator[str]:
    """A session's whole transcript, uncapped, as text: the heading, then each page of ``page`` events as
    it is read and rendered, so a long recording is never held in memory (nor waited for) as a whole.
    Events recorded meanwhile are in it up to the last page read. ``counts`` gathers the summary's
    numbers (:meth:`Counts.summary`), complete once the iteration ends."""
    from broker.errors import NotFound

    async with service.store.tx() as tx:
        session = await tx.get_session(session_id)
        if session is None:
            raise NotFound(f"no session {session_id!r}", code="no_session")
        grant = await tx.get_grant(session.grant_id)
        last: SessionEvent | None = None
        if session.closed_at is None:  # the heading shows an open session until its last event so far
            newest = await tx.max_event_seq(session_id)
            tail = await tx.events_after(session_id, after=newest - 1, limit=1) if newest else []
            last = tail[0] if tail else None
    lines = SessionLines(session, counts, full=True)
    yield visible_text([*heading(grant, f"transcript of session {session.id}"),
                        lines.header(session_end(session, last))])
    after = 0
    while True:
        async with service.store.tx() as tx:
            events = await tx.events_after(session_id, after=after, limit=page)
        if not events:
            break
        rendered = lines.feed(events)
        if rendered:
            yield visible_text(rendered)
        after = events[-1].seq
    lines.close()


async def grant_transcript(service: Service, grant: Grant) -> Transcript:
    async with service.store.tx() as tx:
        sessions = await tx.list_sessions(grant_id=grant.id)
        pairs: list[tuple[Session, Sequence[SessionEvent]]] = []
        unread: set[str] = set()
        for s in reversed(sessions):
            events, more = await _first_events(tx, s.id, READ_MAX)
            pairs.append((s, events))
            if more:
                unread.add(s.id)
    return render(grant, pairs, max_bytes=service.config.transcripts.max_bytes,
                  title=f"transcript of grant {grant.id}", unread=unread)


class Recap:
    def __init__(self, service: Service, *, settle_seconds: float = 3.0) -> None:
        self.service = service
        self.settle_seconds = settle_seconds
        self._tasks: set[asyncio.Task[None]] = set()

    async def publish(self, event: Event) -> None:
        if isinstance(event, SessionClosed):
            self._spawn(self._session(event))
        elif isinstance(event, GrantEnded):
            self._spawn(self._grant(event))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _session(self, event: SessionClosed) -> None:
        try:
            session, t = await session_transcript(self.service, event.session.id)
            async with self.service.store.tx() as tx:
                grant = await tx.get_grant(session.grant_id)
            if grant is None:
                return
            await self.service.publish([TranscriptReady(
                request=event.request, grant=grant, title=f"Session {session.id} closed ({session.close_reason})",
                summary=t.summary, text=t.text, filename=f"hoop-{session.id}.txt",
                extra={"session": session.id, "truncated": t.truncated})])
        except Exception:
            log.exception("transcript for session %s failed", event.session.id)

    async def _grant(self, event: GrantEnded) -> None:
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.settle_seconds
            while loop.time() < deadline:
                async with self.service.store.tx() as tx:
                    open_ = await tx.list_sessions(grant_id=event.grant.id, status=SessionStatus.OPEN)
                if not open_:
                    break
                await asyncio.sleep(0.1)
            t = await grant_transcript(self.service, event.grant)
            verb = "Expired" if event.grant.status.value == "expired" else f"Revoked by {event.grant.ended_by}"
            await self.service.publish([TranscriptReady(
                request=event.request, grant=event.grant, title=f"{verb}: grant {event.grant.id}",
                summary=t.summary, text=t.text, filename=f"hoop-{event.grant.id}.txt",
                extra={"truncated": t.truncated})])
        except Exception:
            log.exception("transcript for grant %s failed", event.grant.id)

    async def drain(self) -> None:
        """Wait for transcripts in progress (at shutdown and in tests)."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
