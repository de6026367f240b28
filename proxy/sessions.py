"""Live proxy sessions: registration, recording, deadlines, revocation and reviews.

How this works. A proxy opens a :class:`LiveSession` once its client is authenticated. The
hub stores the session row, announces it, and arms a timer at the grant's absolute expiry.
It is also a broker ``Notifier``: a ``GrantEnded`` event (expiry, revocation, or a parent's
end) calls every affected session's ``on_end`` at once; ``GrantExtended`` moves the timer. When the timer
fires, the grant is read from the store first: an extension stored before the old end but announced after
it moves the deadline instead (a store that does not answer within 1 s ends the session; the read given up on
is cancelled again, and waited for up to :data:`READS_WAIT`, when the hub closes).

Recording is crash-safe without a database round trip per statement. ``record()`` only
appends a compact tuple (session, seq, time, kind, data) to the hub's list for the current
event-loop iteration; the first record of an iteration schedules :meth:`SessionHub._write_tick`
with ``loop.call_soon``, which JSON-encodes the iteration's events and appends them to each
session's spool file with ONE ``os.write`` per session. A crash of hoop therefore loses at
most the events recorded in the loop iteration that was running (the statements in flight),
and a torn last line, which :meth:`SessionHub.recover` skips. The encoded lines are kept in
memory; a background task writes the batch to the store every ``flush_every`` seconds (a
failed write puts the batch back for the next flush, which first skips what the store already
holds, in case the failed write committed and only its answer was lost; flushes run one at a
time, so that check holds). A session's spool is deleted only once its events and its closed
row are stored; while the store is down the flush loop keeps retrying. The spool is a chain
of segment files (:mod:`proxy.spool`); a segment whose events are all stored is deleted, so a session that lives
for days holds about one segment on disk. At start, :meth:`SessionHub.recover` (:mod:`proxy.recovery`) ingests the
spool segments that a crash left behind.

Cost. ``record`` is on every proxy's per-statement path, so it does the least it can: a
clock read and a list append; each event is encoded once, in the iteration's write, as the JSON
line (:mod:`broker.eventlines`) that both the spool and the store keep. A flush stores each
session's pending lines as chunk rows (``session_event_chunks``, runs of ~64 KiB), so the store's
cost hardly grows with the number of events: a row per event cost the PostgreSQL proxy 3-6 µs of CPU per
statement, most of it the sqlite3 driver and the loop thread passing the GIL to each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from broker.clock import Clock
from broker.eventlines import encode_data, line
from broker.events import Event, GrantEnded, GrantExtended, SessionClosed, SessionOpened
from broker.metrics import Metrics
from broker.model import Grant, GrantStatus, Session, SessionStatus
from broker.reviews import Reviews
from broker.service import Service, new_id
from proxy.chunks import Pending, as_chunks
from proxy.recovery import recover
from proxy.spool import SEGMENT_BYTES, Spool

log = logging.getLogger(__name__)

#: the event kinds that carry a guard decision (hoop_statements_total): a SQL statement, an HTTP request,
#: an SSH exec command
_DECIDED = frozenset({"statement", "http", "command"})
#: seconds :meth:`SessionHub.close_all` waits for the deadline's reads of grants it cancels
READS_WAIT = 2.0


class LiveSession:
    """One client connection (or HTTP request) through a proxy, from auth to close."""

    def __init__(self, hub: SessionHub, row: Session, grant: Grant, on_end: Callable[[str], None]) -> None:
        self.hub = hub
        self.row = row
        self.id = row.id
        self.grant = grant
        self.resource = row.resource
        self.protocol = row.protocol
        self.chain = grant.chain
        self.deadline: datetime = grant.expires_at
        self.stats: dict[str, int] = {"statements": 0, "rows": 0, "blocked": 0, "reviewed": 0,
                                      "bytes_in": 0, "bytes_out": 0}
        self.closed = False
        self.end_reason: str | None = None
        self._on_end = on_end
        self._seq = 0
        self._pending: list[Pending] = []
        self._timer: asyncio.TimerHandle | None = None
        self._rechecking: asyncio.Task[None] | None = None  # the store is asked whether the grant was extended
        self._spool = Spool(hub.spool_dir, self.id, segment_bytes=hub.segment_bytes) \
            if hub.spool_dir is not None else None

    def record(self, kind: str, data: dict[str, Any]) -> None:
        """Append an event. ``data`` must already be masked; the recording is masked by construction."""
        if self.closed and kind != "close":
            return
        self._seq = seq = self._seq + 1
        hub = self.hub
        tick = hub._tick
        if not tick:
            loop = hub._loop
            if loop is None or loop.is_closed():
                tick.append((self, seq, hub.clock.now(), kind, data))
                hub._write_tick()
                return
            loop.call_soon(hub._write_tick)
        tick.append((self, seq, hub.clock.now(), kind, data))

    def arm(self) -> None:
        """(Re)arm the local deadline timer: the proxy enforces expiry even if no event arrives."""
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        delay = max((self.deadline - self.hub.clock.now()).total_seconds(), 0.0)
        self._timer = loop.call_at(loop.time() + delay, self.deadline_passed)

    def deadline_passed(self) -> None:
        """The deadline has passed: end the session ("access expired") once the store confirms that the grant
        was not extended. An extension is stored before it is announced (after its side effects, or late on
        another replica), and must not lose a session whose old end falls in between. A store that does not
        answer within 1 s does not keep the session open."""
        if self.closed or self.end_reason is not None or self._rechecking is not None:
            return
        self._rechecking = asyncio.create_task(self._recheck(self.deadline), name=f"session={self.id} deadline")

    async def _recheck(self, passed: datetime) -> None:
        """Whether the end moved past ``passed``, the deadline the caller saw pass (its timer was armed in real
        time from the clock, so the clock is not asked again: a clock set by a test or stepped meanwhile must
        not keep a passed deadline open)."""
        current: Grant | None = None
        # The read runs as a task of its own, waited for 1 s: a timeout around it would wait for its clean-up
        # too (the rollback of a cancelled transaction, on a store connection that hangs, takes as long).
        read = asyncio.create_task(self._read_grant(), name=f"session={self.id} grant read")
        read.add_done_callback(lambda task: task.cancelled() or task.exception())  # (one abandoned fails quietly)
        self.hub._reads.add(read)
        read.add_done_callback(self.hub._reads.discard)
        try:
            await asyncio.wait([read], timeout=1)
            if not read.done():
                raise TimeoutError  # (the read is cancelled below; its clean-up ends in the background)
            current = read.result()
        except Exception as exc:
            log.warning("session=%s grant=%s the grant could not be read at its end (%s): ending the session",
                        self.id, self.grant.id, type(exc).__name__)
        finally:
            self._rechecking = None
            read.cancel()
        if current is not None and current.status is GrantStatus.ACTIVE and current.expires_at > passed \
                and current.expires_at > self.grant.expires_at:  # extended: its announcement is on its way
            self.deadline, self.grant = current.expires_at, current
        if self.deadline > passed:  # moved, by the store or by the announcement meanwhile
            self.arm()
            return
        self.end("access expired")

    async def _read_grant(self) -> Grant | None:
        async with self.hub.service.store.tx() as tx:
            return await tx.get_grant(self.grant.id)

    def end(self, reason: str) -> None:
        """Ask the proxy to end this session (it sends its protocol's message, then calls close)."""
        if self.closed or self.end_reason is not None:
            return
        self.end_reason = reason
        try:
            self._on_end(reason)
        except Exception:
            log.exception("session=%s on_end failed", self.id)

    async def review(self, text: str, rule: str, timeout: float) -> bool:
        """Hold ``text`` (masked) until an approver allows it; False on refusal or timeout."""
        reviews = self.hub.reviews
        self.stats["reviewed"] += 1
        review = await reviews.open(session_id=self.id, grant=self.grant, resource=self.resource, text=text,
                                    rule=rule, timeout=timedelta(seconds=timeout))
        self.record("review", {"review": review.id, "text": text, "rule": rule})
        allowed = await reviews.wait(review)
        # the review's own record says how it ended: a timeout was once recorded as "refused", and the
        # transcript then told its reader an approver had refused what nobody had looked at
        decided = await reviews.get(review.id)
        outcome: dict[str, Any] = {"review": review.id, "decision": "allowed" if allowed else "refused"}
        if not allowed and decided is not None and decided.status == "timed_out":
            outcome["decision"] = "timed_out"
        elif decided is not None and decided.decided_by:
            outcome["by"] = decided.decided_by
        self.record("review", outcome)
        return allowed

    async def close(self, reason: str) -> None:
        """Idempotent: record the close, flush, update the row, announce it."""
        if self.closed:
            return
        if self._timer is not None:
            self._timer.cancel()
        if self._rechecking is not None and self._rechecking is not asyncio.current_task():
            self._rechecking.cancel()
        reason = self.end_reason or reason
        self.record("close", {"reason": reason, "stats": dict(self.stats)})
        self.closed = True
        now = self.hub.clock.now()
        if reason == "access expired" and self.hub.metrics is not None:
            self.hub.metrics.expiry_lag.observe(max((now - self.deadline).total_seconds(), 0.0))
        self.row.status = SessionStatus.CLOSED
        self.row.closed_at, self.row.close_reason, self.row.stats = now, reason, dict(self.stats)
        await self.hub._closed(self)


class SessionHub:
    def __init__(self, service: Service, clock: Clock, *, spool_dir: Path | None = None,
                 reviews: Reviews | None = None, metrics: Metrics | None = None,
                 flush_every: float = 0.2, segment_bytes: int = SEGMENT_BYTES) -> None:
        self.service = service
        self.clock = clock
        self.spool_dir = spool_dir
        if spool_dir is not None:
            spool_dir.mkdir(parents=True, exist_ok=True)
        self.reviews = reviews or Reviews(service)
        self.metrics = metrics
        self.flush_every = flush_every
        self.segment_bytes = segment_bytes
        self._live: dict[str, LiveSession] = {}
        self._dirty: set[LiveSession] = set()
        self._flusher: asyncio.Task[None] | None = None
        #: events recorded in the current loop iteration, spooled by :meth:`_write_tick`
        self._tick: list[tuple[LiveSession, int, datetime, str, dict[str, Any]]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._retrying = False  # the last store write failed: the next one checks what is stored
        self._flush_lock = asyncio.Lock()
        #: sessions that ended and whose final store writes (events, row) are not all done yet
        self._closing: dict[str, LiveSession] = {}
        #: the deadline's reads of grants not done yet; one given up on may still be cleaning up
        self._reads: set[asyncio.Task[Grant | None]] = set()

    async def open(self, grant: Grant, resource: str, protocol: str, client_addr: str,
                   on_end: Callable[[str], None], detail: Mapping[str, Any] | None = None) -> LiveSession:
        row = Session(id=new_id("s"), grant_id=grant.id, resource=resource, protocol=protocol, login=grant.login,
                      chain=grant.chain, client_addr=client_addr, status=SessionStatus.OPEN,
                      opened_at=self.clock.now())
        # the spool first: a disk hoop cannot write fails the open before the store says the session is open
        live = LiveSession(self, row, grant, on_end)
        try:
            async with self.service.store.tx() as tx:
                await tx.insert_session(row)
                request = await self.service.request_for(tx, grant)
        except BaseException:
            if live._spool is not None:
                live._spool.remove()
            raise
        self._loop = asyncio.get_running_loop()
        self._live[live.id] = live
        live.record("open", {"login": grant.login, "chain": list(grant.chain), "client": client_addr,
                             "resource": resource, "protocol": protocol, **(detail or {})})
        live.arm()
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_loop(), name="session-flusher")
        await self.service.publish([SessionOpened(session=row, request=request)])
        # A grant ended (or extended) while the row was being written reached no session: read it again now
        # that this one is registered (any later change reaches it as an event).
        async with self.service.store.tx() as tx:
            current = await tx.get_grant(grant.id)
        if current is not None and current.status is not GrantStatus.ACTIVE:
            await self.publish(GrantEnded(grant=current, request=None))
        elif current is not None and current.expires_at != live.deadline and not live.closed:
            live.deadline, live.grant = current.expires_at, current
            live.arm()
        return live

    def live(self, resource: str | None = None) -> list[LiveSession]:
        return [s for s in self._live.values() if resource is None or s.resource == resource]

    async def publish(self, event: Event) -> None:
        if isinstance(event, GrantEnded):
            reason = "access expired" if event.grant.status is GrantStatus.EXPIRED else \
                f"access revoked: {event.grant.end_reason or 'revoked'}"
            for s in list(self._live.values()):
                if s.grant.id == event.grant.id:
                    s.end(reason)
        elif isinstance(event, GrantExtended):
            for s in list(self._live.values()):
                if s.grant.id == event.grant.id:
                    s.deadline = event.grant.expires_at
                    s.grant = event.grant
                    s.arm()

    def _write_tick(self) -> None:
        """Encode this iteration's events; one ``os.write`` per session spool; queue them for the store."""
        tick, self._tick = self._tick, []
        if not tick:
            return
        lines: dict[LiveSession, list[str]] = {}
        decided: dict[tuple[str, str], int] | None = {} if self.metrics is not None else None
        for s, seq, at, kind, data in tick:
            text = line(seq, at.isoformat(timespec="microseconds"), kind, encode_data(data))
            if decided is not None and kind in _DECIDED:
                key = (s.protocol, str(data.get("decision") or "allow"))
                decided[key] = decided.get(key, 0) + 1
            s._pending.append((seq, text))
            got = lines.get(s)
            if got is None:
                lines[s] = [text]
            else:
                got.append(text)
        if decided:
            assert self.metrics is not None
            for (protocol, decision), n in decided.items():
                self.metrics.statements.labels(protocol=protocol, decision=decision).inc(n)
        dirty = self._dirty
        for s, chunk in lines.items():
            dirty.add(s)
            if s._spool is not None:
                s._spool.write("".join(chunk).encode(), s._seq)

    async def flush(self) -> None:
        """Store every pending event. One flush at a time: a later flush must never store events past
        those a failed earlier one puts back (the retry's skip-what-is-stored check relies on it)."""
        async with self._flush_lock:
            await self._flush()

    async def _flush(self) -> None:
        self._write_tick()
        batch: list[tuple[LiveSession, list[Pending]]] = []
        for s in list(self._dirty):
            if s._pending:
                batch.append((s, s._pending))
                s._pending = []
        self._dirty.clear()
        if not batch:
            return
        try:
            async with self.service.store.tx() as tx:
                chunks = []
                for s, items in batch:
                    todo = items
                    if self._retrying:
                        # the failed write may have committed before its answer was lost: skip
                        # what the store already holds, so a retry never duplicates nor fails on it
                        done = await tx.max_event_seq(s.id)
                        todo = [item for item in items if item[0] > done]
                    if todo:
                        chunks.extend(as_chunks(s.id, todo))
                await tx.add_event_chunks(chunks)
        except BaseException:
            # nothing is lost: the batch goes back in front of what came since, for the next flush
            self._retrying = True
            for s, items in batch:
                s._pending[:0] = items
                self._dirty.add(s)
            raise
        self._retrying = False
        for s, items in batch:
            if s._spool is not None:
                s._spool.stored(items[-1][0])  # its finished spool segments are no longer needed

    async def _flush_loop(self) -> None:
        while self._live or self._dirty or self._closing:
            await asyncio.sleep(self.flush_every)
            try:
                await self.flush()
                for s in list(self._closing.values()):
                    await self._finish_close(s)
            except Exception:
                log.exception("flushing session events failed; they stay in the spool")

    async def _closed(self, s: LiveSession) -> None:
        """A session ended: store its events, then its row, then drop its spool and announce it. When the
        store fails, nothing is dropped: the flush loop retries until the close is complete."""
        self._live.pop(s.id, None)
        self._closing[s.id] = s
        try:
            await self._finish_close(s)
        except Exception:
            log.exception("session=%s closing: the store failed; its events stay in the spool, the close is "
                          "retried", s.id)
            if self._flusher is None or self._flusher.done():
                self._flusher = asyncio.create_task(self._flush_loop(), name="session-flusher")

    async def _finish_close(self, s: LiveSession) -> None:
        await self.flush()
        if s.id not in self._closing:
            return  # (finished meanwhile by the flush loop)
        async with self.service.store.tx() as tx:
            await tx.update_session(s.row)
            request = await self.service.request_for(tx, s.grant)
        if self._closing.pop(s.id, None) is None:
            return
        if s._spool is not None:
            s._spool.remove()  # (every event is stored: the flush above found none pending, or raised)
            s._spool = None
        await self.service.publish([SessionClosed(session=s.row, request=request)])

    async def close_all(self, reason: str = "hoop shutting down") -> None:
        """hoop stops: end and close every session, stop the hub's tasks, and store what is pending."""
        for s in list(self._live.values()):
            s.end(reason)
        for s in list(self._live.values()):
            await s.close(reason)
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        # The deadline's reads of grants are cancelled (again, for one given up on: this cancels its clean-up, which
        # hangs on a store that does not answer) and waited for: one was left pending when the event loop closed.
        reads = list(self._reads)
        for read in reads:
            read.cancel()
        if reads and (await asyncio.wait(reads, timeout=READS_WAIT))[1]:
            log.warning("a read of a grant at its end did not stop within %.0f s of the close", READS_WAIT)
        await self.flush()

    async def recover(self) -> int:
        """Ingest spool files a crash left behind; close their sessions (:func:`proxy.recovery.recover`).
        Returns the number of sessions recovered."""
        return await recover(self.spool_dir, self.service.store, busy=set(self._live) | set(self._closing))
