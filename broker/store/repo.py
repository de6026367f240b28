"""The repository: dataclasses in and out, SQL inside, one transaction per ``tx()``.

Concurrency: on PostgreSQL, ``lock=True`` reads take ``SELECT ... FOR UPDATE`` and audit
appends take a transaction-scoped advisory lock, so replicas serialise where they must. The
lock order is rows first (a request, then grants, parents before children), the audit lock
last: a transaction that appended audit takes no further row lock, or it could wait for a row
whose holder waits for the audit lock. ``lock=True`` after an append raises to keep it so.
SQLite has one writer anyway; an asyncio lock serialises our transactions so they never
meet "database is locked".
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import zlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Row, delete, event, func, insert, select, text, update
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from broker import eventlines
from broker.errors import StoreUnavailable
from broker.model import (
    AccessRequest,
    Approval,
    AuditEntry,
    Grant,
    GrantStatus,
    RequestStatus,
    Review,
    Session,
    SessionEvent,
    SessionStatus,
    StepSpec,
)
from broker.store import tables as t
from broker.store.urls import redact_url

log = logging.getLogger(__name__)

GENESIS = "0" * 64
_AUDIT_LOCK = 0x686F6F70  # "hoop"
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


def audit_hash(prev_hash: str, seq: int, at: datetime, actor: str, chain: Sequence[str], action: str,
               request_id: str | None, grant_id: str | None, detail: dict[str, Any]) -> str:
    body = json.dumps(
        [seq, at.isoformat(), actor, list(chain), action, request_id, grant_id, detail],
        sort_keys=True, separators=(",", ":"), default=str,
    )
    return hashlib.sha256((prev_hash + body).encode("utf-8")).hexdigest()


def _request(row: Row[Any], approvals: list[Approval]) -> AccessRequest:
    m = row._mapping
    return AccessRequest(
        id=m["id"], resource=m["resource"], requester=m["requester"], chain=tuple(m["chain"]),
        duration=timedelta(seconds=m["duration_s"]), reason=m["reason"], status=RequestStatus(m["status"]),
        created_at=m["created_at"], lapses_at=m["lapses_at"],
        steps=tuple(StepSpec(group=s["group"], count=s["count"]) for s in m["steps"]),
        approvals=approvals, requester_slack_id=m["requester_slack_id"], card_channel=m["card_channel"],
        card_ts=m["card_ts"], decided_by=m["decided_by"], decision_reason=m["decision_reason"],
        decided_at=m["decided_at"], grant_id=m["grant_id"], extends_grant=m["extends_grant"],
    )


def _request_values(r: AccessRequest) -> dict[str, Any]:
    return {
        "id": r.id, "resource": r.resource, "requester": r.requester, "chain": list(r.chain),
        "duration_s": int(r.duration.total_seconds()), "reason": r.reason, "status": r.status.value,
        "created_at": r.created_at, "lapses_at": r.lapses_at,
        "steps": [{"group": s.group, "count": s.count} for s in r.steps],
        "requester_slack_id": r.requester_slack_id, "card_channel": r.card_channel, "card_ts": r.card_ts,
        "decided_by": r.decided_by, "decision_reason": r.decision_reason, "decided_at": r.decided_at,
        "grant_id": r.grant_id, "extends_grant": r.extends_grant,
    }


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


_SESSION_FIELDS = ("id", "grant_id", "resource", "protocol", "login", "client_addr", "opened_at",
                   "closed_at", "close_reason", "stats")


def _session(row: Row[Any]) -> Session:
    m = row._mapping
    return Session(chain=tuple(m["chain"]), status=SessionStatus(m["status"]),
                   **{k: m[k] for k in _SESSION_FIELDS})


def _session_values(s: Session) -> dict[str, Any]:
    out = {k: getattr(s, k) for k in _SESSION_FIELDS}
    out.update(chain=list(s.chain), status=s.status.value)
    return out


_REVIEW_FIELDS = ("id", "session_id", "grant_id", "resource", "text", "rule", "requested_by", "created_at",
                  "deadline", "status", "decided_by", "channel", "ts")


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


class Tx:
    """One transaction's worth of repository operations."""

    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn
        self.postgres = conn.dialect.name == "postgresql"
        self._audited = False

    def _row_lock(self) -> bool:
        """Whether a ``lock=True`` read takes row locks (PostgreSQL). Refuses one after this
        transaction appended audit, on every database: on PostgreSQL that order can deadlock
        (see the module doc)."""
        if self._audited:
            raise RuntimeError("a row lock after the audit lock can deadlock; lock rows before appending audit")
        return self.postgres

    # -- requests -------------------------------------------------------------------------
    async def insert_request(self, r: AccessRequest) -> None:
        await self.conn.execute(insert(t.requests).values(**_request_values(r)))

    async def update_request(self, r: AccessRequest) -> None:
        values = _request_values(r)
        del values["id"]
        await self.conn.execute(update(t.requests).where(t.requests.c.id == r.id).values(**values))

    async def _approvals(self, ids: list[str]) -> dict[str, list[Approval]]:
        out: dict[str, list[Approval]] = {i: [] for i in ids}
        if not ids:
            return out
        rows = await self.conn.execute(
            select(t.approvals).where(t.approvals.c.request_id.in_(ids)).order_by(t.approvals.c.id))
        for row in rows:
            m = row._mapping
            out[m["request_id"]].append(Approval(approver=m["approver"], groups=tuple(m["groups"]),
                                                 at=m["at"], via=m["via"], chain=tuple(m["chain"] or ())))
        return out

    async def get_request(self, request_id: str, *, lock: bool = False) -> AccessRequest | None:
        q = select(t.requests).where(t.requests.c.id == request_id)
        if lock and self._row_lock():
            q = q.with_for_update()
        row = (await self.conn.execute(q)).first()
        if row is None:
            return None
        return _request(row, (await self._approvals([request_id]))[request_id])

    async def list_requests(self, *, status: RequestStatus | None = None, requester: str | None = None,
                            resource: str | None = None, limit: int = 500, offset: int = 0) -> list[AccessRequest]:
        q = (select(t.requests).order_by(t.requests.c.created_at.desc(), t.requests.c.id.desc())
             .limit(limit).offset(offset))
        if status is not None:
            q = q.where(t.requests.c.status == status.value)
        if requester is not None:
            q = q.where(t.requests.c.requester == requester)
        if resource is not None:
            q = q.where(t.requests.c.resource == resource)
        rows = list(await self.conn.execute(q))
        approvals = await self._approvals([r._mapping["id"] for r in rows])
        return [_request(r, approvals[r._mapping["id"]]) for r in rows]

    async def pending_extension(self, grant_id: str, now: datetime) -> AccessRequest | None:
        """The oldest request to extend ``grant_id`` that is pending and not yet lapsed at ``now``."""
        q = (select(t.requests)
             .where(t.requests.c.extends_grant == grant_id, t.requests.c.status == RequestStatus.PENDING.value,
                    t.requests.c.lapses_at > now)
             .order_by(t.requests.c.created_at).limit(1))
        row = (await self.conn.execute(q)).first()
        if row is None:
            return None
        return _request(row, (await self._approvals([row._mapping["id"]]))[row._mapping["id"]])

    async def add_approval(self, request_id: str, a: Approval) -> None:
        await self.conn.execute(insert(t.approvals).values(
            request_id=request_id, approver=a.approver, groups=list(a.groups), at=a.at, via=a.via,
            chain=list(a.chain)))

    async def remove_approval(self, request_id: str, approver: str, *, via: str | None = None) -> bool:
        q = delete(t.approvals).where(t.approvals.c.request_id == request_id, t.approvals.c.approver == approver)
        if via is not None:
            q = q.where(t.approvals.c.via == via)
        return bool((await self.conn.execute(q)).rowcount)

    # -- grants ---------------------------------------------------------------------------
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

    # -- sessions -------------------------------------------------------------------------
    async def insert_session(self, s: Session) -> None:
        await self.conn.execute(insert(t.sessions).values(**_session_values(s)))

    async def update_session(self, s: Session) -> None:
        values = _session_values(s)
        del values["id"]
        await self.conn.execute(update(t.sessions).where(t.sessions.c.id == s.id).values(**values))

    async def get_session(self, session_id: str) -> Session | None:
        row = (await self.conn.execute(select(t.sessions).where(t.sessions.c.id == session_id))).first()
        return _session(row) if row is not None else None

    async def list_sessions(self, *, status: SessionStatus | None = None, resource: str | None = None,
                            grant_id: str | None = None, limit: int = 1000) -> list[Session]:
        q = select(t.sessions).order_by(t.sessions.c.opened_at.desc()).limit(limit)
        if status is not None:
            q = q.where(t.sessions.c.status == status.value)
        if resource is not None:
            q = q.where(t.sessions.c.resource == resource)
        if grant_id is not None:
            q = q.where(t.sessions.c.grant_id == grant_id)
        return [_session(r) for r in await self.conn.execute(q)]

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

    # -- reviews --------------------------------------------------------------------------
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

    async def request_by_card(self, channel: str, ts: str) -> AccessRequest | None:
        row = (await self.conn.execute(select(t.requests.c.id).where(
            t.requests.c.card_channel == channel, t.requests.c.card_ts == ts))).first()
        return await self.get_request(row[0], lock=True) if row is not None else None

    # -- audit ----------------------------------------------------------------------------
    async def append_audit(self, *, at: datetime, actor: str, chain: Sequence[str], action: str,
                           request_id: str | None = None, grant_id: str | None = None,
                           detail: dict[str, Any] | None = None) -> AuditEntry:
        if self.postgres and not self._audited:
            await self.conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _AUDIT_LOCK})
        self._audited = True
        last = (await self.conn.execute(
            select(t.audit_log.c.seq, t.audit_log.c.hash).order_by(t.audit_log.c.seq.desc()).limit(1))).first()
        seq, prev = (last[0] + 1, last[1]) if last is not None else (1, GENESIS)
        detail = json.loads(json.dumps(detail or {}, default=str))
        digest = audit_hash(prev, seq, at, actor, chain, action, request_id, grant_id, detail)
        await self.conn.execute(insert(t.audit_log).values(
            seq=seq, at=at, actor=actor, chain=list(chain), action=action, request_id=request_id,
            grant_id=grant_id, detail=detail, prev_hash=prev, hash=digest))
        return AuditEntry(seq=seq, at=at, actor=actor, chain=tuple(chain), action=action,
                          request_id=request_id, grant_id=grant_id, detail=detail, prev_hash=prev, hash=digest)

    async def audit_last_seq(self) -> int:
        """The newest entry's number (0 when the log is empty): how long a walk of the log is."""
        return int((await self.conn.execute(select(func.max(t.audit_log.c.seq)))).scalar_one() or 0)

    async def audit_entries(self, *, after: int = 0, limit: int = 10_000) -> list[AuditEntry]:
        rows = await self.conn.execute(select(t.audit_log).where(t.audit_log.c.seq > after)
                                       .order_by(t.audit_log.c.seq).limit(limit))
        return [AuditEntry(seq=r.seq, at=r.at, actor=r.actor, chain=tuple(r.chain), action=r.action,
                           request_id=r.request_id, grant_id=r.grant_id, detail=r.detail,
                           prev_hash=r.prev_hash, hash=r.hash) for r in rows]

    # -- sealed credential pickups (broker/sealing.py) ---------------------------------------
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

    # -- idempotency ----------------------------------------------------------------------
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


class Store:
    """Owns the engine. ``async with store.tx() as tx:`` is one transaction."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.postgres = engine.dialect.name == "postgresql"
        self._lock = asyncio.Lock() if not self.postgres else None

    @classmethod
    def from_url(cls, url: str) -> Store:
        if url.startswith("sqlite"):
            engine = create_async_engine(url, connect_args={"timeout": 30})

            @event.listens_for(engine.sync_engine, "connect")
            def _pragmas(dbapi_conn: Any, _record: Any) -> None:
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.close()
        else:
            engine = create_async_engine(url, pool_size=10, max_overflow=20, pool_pre_ping=True)
        return cls(engine)

    async def reachable(self) -> None:
        """Connect once: a store that cannot be reached or logged in to is a :class:`StoreUnavailable`
        naming it (password hidden) and why, not a driver's traceback."""
        shown = redact_url(self.engine.url.render_as_string(hide_password=False))
        path = self.engine.url.database if self.engine.dialect.name == "sqlite" else None
        if path and path != ":memory:" and not path.startswith("file:") and not Path(path).parent.is_dir():
            # (checked first: aiosqlite's thread outlives a failed open and reports into a closed loop)
            raise StoreUnavailable(f"cannot reach the store {shown}: the folder {Path(path).parent} does not exist")
        try:
            async with self.engine.connect():
                pass
        except (OSError, DBAPIError) as exc:
            cause = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
            why = (str(cause).strip().splitlines() or [""])[0][:300] or type(cause).__name__
            raise StoreUnavailable(f"cannot reach the store {shown}: {type(cause).__name__}: {why}") from exc

    async def migrate(self) -> None:
        from broker.store.migrate import upgrade

        await self.reachable()
        await upgrade(self.engine)

    async def close(self) -> None:
        await self.engine.dispose()

    @asynccontextmanager
    async def tx(self) -> AsyncIterator[Tx]:
        if self._lock is not None:
            async with self._lock, self.engine.begin() as conn:
                yield Tx(conn)
        else:
            async with self.engine.begin() as conn:
                yield Tx(conn)
