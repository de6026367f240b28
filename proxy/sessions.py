"""Live proxy sessions: registration, recording, deadlines, revocation and reviews.

How this works. A proxy opens a :class:`LiveSession` once its client is authenticated. The
hub stores the session row, announces it, and arms a timer at the grant's absolute expiry.
It is also a broker ``Notifier``: a ``GrantEnded`` event (expiry, revocation, or a parent's
end) calls every affected session's ``on_end`` at once; ``GrantExtended`` moves the timer.

Recording is crash-safe without a database round trip per statement. ``record()`` only
appends a compact tuple (session, seq, time, kind, data) to the hub's list for the current
event-loop iteration; the first record of an iteration schedules :meth:`SessionHub._write_tick`
with ``loop.call_soon``, which JSON-encodes the iteration's events and appends them to each
session's spool file with ONE ``os.write`` per session. A crash of hoop therefore loses at
most the events recorded in the loop iteration that was running (the statements in flight),
and a torn last line, which :meth:`SessionHub.recover` skips. The encoded lines are kept in
memory; a background task writes the batch to the store every ``flush_every`` seconds (a
failed write puts the batch back for the next flush). The spool is a chain of segment files
(:mod:`proxy.spool`); a segment whose events are all stored is deleted, so a session that lives
for days holds about one segment on disk. At start, :meth:`SessionHub.recover` ingests the
spool segments that a crash left behind.

Cost. ``record`` is on every proxy's per-statement path, so it does the least it can: a
clock read and a list append; encoding happens once per event in the iteration's write. On
SQLite the flush hands the already-encoded JSON and the timestamp text straight to the driver
in a few multi-row INSERTs (the stored form is exactly what the ``session_events`` table types
write and read back); other stores go through :meth:`Tx.add_events`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from broker.clock import Clock
from broker.events import Event, GrantEnded, GrantExtended, SessionClosed, SessionOpened
from broker.metrics import Metrics
from broker.model import Grant, GrantStatus, Session, SessionEvent, SessionStatus
from broker.reviews import Reviews
from broker.service import Service, new_id
from broker.store import tables
from proxy.spool import SEGMENT_BYTES, Spool, leftovers

_JSON_ENCODE = json.JSONEncoder(separators=(",", ":"), default=str).encode


def _ENCODE(value: Any) -> str:
    """Compact JSON: orjson (several times faster on the recording hot path), with the standard
    encoder as the fallback for what orjson refuses (lone surrogates from undecodable bytes)."""
    try:
        return orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
    except (TypeError, orjson.JSONEncodeError):
        return _JSON_ENCODE(value)

_SQLITE_INSERT = f"INSERT INTO {tables.session_events.name} (session_id, seq, at, kind, data) VALUES "
#: the largest multi-row INSERT: 512 rows x 5 values, under the 32766 variables SQLite allows since
#: 3.32; 128 rows (under the 999 of older builds) otherwise. Each statement costs ~200 µs however
#: few its rows, so big chunks matter: 128 rows cost 3.2 µs a row, 512 rows 2.1 (executemany: 2.2).
_SQLITE_CHUNK = 512 if sqlite3.sqlite_version_info >= (3, 32, 0) else 128
#: one statement per power-of-two row count, so a flush uses at most 10 distinct statements (all
#: stay in the driver's statement cache)
_SQLITE_INSERTS = {n: _SQLITE_INSERT + ",".join(["(?,?,?,?,?)"] * n)
                   for n in (1 << k for k in range(_SQLITE_CHUNK.bit_length()))}


def _sqlite_chunks(rows: list[tuple[str, int, str, str, str]]) -> list[tuple[str, tuple[Any, ...]]]:
    """The rows as multi-row INSERTs of ``_SQLITE_CHUNK`` rows, then of falling powers of two for the rest.

    Why not ``executemany``: the sqlite3 driver releases the GIL around every row's step, and the
    proxy's loop thread (which releases it at every socket call) then hands the GIL back and forth
    with the writer thread for the whole flush, two context switches each time. At 20k statements/s
    that cost the PostgreSQL proxy ~6 µs of CPU per statement (bench, 16 clients); one statement
    per chunk releases the GIL once per chunk."""
    out: list[tuple[str, tuple[Any, ...]]] = []
    i, n, size = 0, len(rows), _SQLITE_CHUNK
    while i < n:
        while size > n - i:
            size >>= 1
        out.append((_SQLITE_INSERTS[size], tuple(v for row in rows[i:i + size] for v in row)))
        i += size
    return out

#: (seq, at, at as ISO text with microseconds, kind, data (None when the store is SQLite), data as JSON)
_Pending = tuple[int, datetime, str, str, dict[str, Any] | None, str]


def _sqlite_at(at: datetime, iso: str) -> str:
    """Naive UTC text in SQLAlchemy's SQLite DATETIME format, cut from ``iso`` when it is UTC
    (``strftime`` per event cost more than the insert itself)."""
    if iso.endswith("+00:00") and len(iso) == 32:
        return f"{iso[:10]} {iso[11:26]}"
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")

log = logging.getLogger(__name__)


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
        self._pending: list[_Pending] = []
        self._timer: asyncio.TimerHandle | None = None
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
        self._timer = loop.call_at(loop.time() + delay, self.end, "access expired")

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
        self.record("review", {"review": review.id, "decision": "allowed" if allowed else "refused"})
        return allowed

    async def close(self, reason: str) -> None:
        """Idempotent: record the close, flush, update the row, announce it."""
        if self.closed:
            return
        if self._timer is not None:
            self._timer.cancel()
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
        #: SQLite is written from the encoded JSON alone: the event dicts need not be kept until
        #: the flush (fewer live containers for the garbage collector to walk on the hot path)
        self._keep_data = service.store.engine.dialect.name != "sqlite"

    async def open(self, grant: Grant, resource: str, protocol: str, client_addr: str,
                   on_end: Callable[[str], None]) -> LiveSession:
        row = Session(id=new_id("s"), grant_id=grant.id, resource=resource, protocol=protocol, login=grant.login,
                      chain=grant.chain, client_addr=client_addr, status=SessionStatus.OPEN,
                      opened_at=self.clock.now())
        async with self.service.store.tx() as tx:
            await tx.insert_session(row)
            request = await self.service.request_for(tx, grant)
        self._loop = asyncio.get_running_loop()
        live = LiveSession(self, row, grant, on_end)
        self._live[live.id] = live
        live.record("open", {"login": grant.login, "chain": list(grant.chain), "client": client_addr,
                             "resource": resource, "protocol": protocol})
        live.arm()
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_loop(), name="session-flusher")
        await self.service.publish([SessionOpened(session=row, request=request)])
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
        dirty = self._dirty
        keep = self._keep_data
        for s, seq, at, kind, data in tick:
            encoded = _ENCODE(data)
            iso = at.isoformat(timespec="microseconds")
            s._pending.append((seq, at, iso, kind, data if keep else None, encoded))
            if s._spool is not None:
                line = f'{{"seq":{seq},"at":"{iso}","kind":"{kind}","data":{encoded}}}\n' if kind.isidentifier() \
                    else f'{{"seq":{seq},"at":"{iso}","kind":{_ENCODE(kind)},"data":{encoded}}}\n'
                got = lines.get(s)
                if got is None:
                    lines[s] = [line]
                    dirty.add(s)
                else:
                    got.append(line)
            else:
                dirty.add(s)
        for s, chunk in lines.items():
            if s._spool is not None:
                s._spool.write("".join(chunk).encode(), s._seq)

    async def flush(self) -> None:
        self._write_tick()
        batch: list[tuple[str, list[_Pending]]] = []
        spooled: list[tuple[LiveSession, int]] = []
        pending: list[tuple[LiveSession, list[_Pending]]] = []
        for s in list(self._dirty):
            if s._pending:
                batch.append((s.id, s._pending))
                pending.append((s, s._pending))
                if s._spool is not None:
                    spooled.append((s, s._pending[-1][0]))
                s._pending = []
        self._dirty.clear()
        if not batch:
            return
        try:
            await self._store(batch)
        except BaseException:
            # nothing is lost: the batch goes back in front of what came since, for the next flush
            for s, items in pending:
                s._pending[:0] = items
                self._dirty.add(s)
            raise
        for s, seq in spooled:
            if s._spool is not None:
                s._spool.stored(seq)  # its finished spool segments are no longer needed

    async def _store(self, batch: list[tuple[str, list[_Pending]]]) -> None:
        async with self.service.store.tx() as tx:
            if tx.conn.dialect.name == "sqlite":
                # naive UTC text in SQLAlchemy's SQLite DATETIME storage format; JSON encoded once
                rows = [(sid, seq, _sqlite_at(at, iso), kind, encoded)
                        for sid, items in batch for seq, at, iso, kind, _, encoded in items]
                for statement, values in _sqlite_chunks(rows):
                    await tx.conn.exec_driver_sql(statement, values)
            else:
                await tx.add_events([SessionEvent(session_id=sid, seq=seq, at=at, kind=kind, data=data or {})
                                     for sid, items in batch for seq, at, _, kind, data, _ in items])

    async def _flush_loop(self) -> None:
        while self._live or self._dirty:
            await asyncio.sleep(self.flush_every)
            try:
                await self.flush()
            except Exception:
                log.exception("flushing session events failed; they stay in the spool")

    async def _closed(self, s: LiveSession) -> None:
        self._live.pop(s.id, None)
        await self.flush()
        async with self.service.store.tx() as tx:
            await tx.update_session(s.row)
            request = await self.service.request_for(tx, s.grant)
        if s._spool is not None:
            s._spool.remove()
            s._spool = None
        await self.service.publish([SessionClosed(session=s.row, request=request)])

    async def close_all(self, reason: str = "hoop shutting down") -> None:
        for s in list(self._live.values()):
            s.end(reason)
        for s in list(self._live.values()):
            await s.close(reason)
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        await self.flush()

    async def recover(self) -> int:
        """Ingest spool files a crash left behind; close their sessions. Returns sessions recovered."""
        if self.spool_dir is None:
            return 0
        count = 0
        for session_id, paths in leftovers(self.spool_dir).items():
            if session_id in self._live:
                continue
            events = []
            lines = [line for path in paths for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
            for line in lines:
                try:
                    item = json.loads(line)
                    events.append(SessionEvent(session_id=session_id, seq=int(item["seq"]),
                                               at=datetime.fromisoformat(item["at"]), kind=str(item["kind"]),
                                               data=dict(item["data"])))
                except (ValueError, KeyError, TypeError):
                    continue  # a torn last line: the event that was in flight
            async with self.service.store.tx() as tx:
                done = await tx.max_event_seq(session_id)
                await tx.add_events([e for e in events if e.seq > done])
                row = await tx.get_session(session_id)
                if row is not None and row.status is SessionStatus.OPEN:
                    row.status, row.closed_at, row.close_reason = SessionStatus.CLOSED, self.clock.now(), \
                        "hoop stopped while the session was open"
                    await tx.update_session(row)
            for path in paths:
                path.unlink()
            count += 1
        return count
