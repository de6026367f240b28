"""Publishes masked transcripts: when a session closes, and when its grant ends.

Runs as a broker ``Notifier``. Rendering happens in background tasks so the event that
triggered it is not held up; at a grant's end it first waits (bounded) for that grant's
live sessions to close, so the grant's transcript includes them.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

from broker.events import Event, GrantEnded, SessionClosed, TranscriptReady
from broker.model import Grant, Session, SessionEvent, SessionStatus
from broker.service import Service
from broker.transcript import Transcript, render

log = logging.getLogger(__name__)


async def session_transcript(service: Service, session_id: str, *,
                             full: bool = False) -> tuple[Session, Transcript]:
    """A session's transcript, capped at ``transcripts.max_bytes``; ``full``: every event, uncapped."""
    from broker.errors import NotFound

    async with service.store.tx() as tx:
        session = await tx.get_session(session_id)
        if session is None:
            raise NotFound(f"no session {session_id!r}", code="no_session")
        events = await tx.events(session_id, limit=None if full else 200_000)
        grant = await tx.get_grant(session.grant_id)
    return session, render(grant, [(session, events)],
                           max_bytes=sys.maxsize if full else service.config.transcripts.max_bytes,
                           title=f"transcript of session {session.id}")


async def grant_transcript(service: Service, grant: Grant) -> Transcript:
    async with service.store.tx() as tx:
        sessions = await tx.list_sessions(grant_id=grant.id)
        pairs: list[tuple[Session, Sequence[SessionEvent]]] = []
        for s in reversed(sessions):
            pairs.append((s, await tx.events(s.id, limit=200_000)))
    return render(grant, pairs, max_bytes=service.config.transcripts.max_bytes,
                  title=f"transcript of grant {grant.id}")


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
