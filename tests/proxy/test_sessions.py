"""The session layer: gate refusals, deadline and revocation ending sessions, crash-safe recording, reviews."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import os
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest

from broker import policy
from broker.clock import FakeClock, SystemClock
from broker.config import HoopConfig
from broker.errors import Denied
from broker.events import (
    Broadcast,
    GrantExtended,
    RecordingNotifier,
    ReviewRequested,
    SessionClosed,
    SessionOpened,
)
from broker.model import Grant, Identity, SessionStatus
from broker.reviews import Reviews
from broker.service import Service
from broker.store import Store
from proxy.access import Gate
from proxy.chunks import CHUNK_CHARS, as_chunks
from proxy.sessions import LiveSession, SessionHub


def who(config: HoopConfig, email: str) -> Identity:
    return Identity(email=email, groups=policy.groups_of(config, email))


async def grant_for(service: Service, config: HoopConfig, duration: str = "1h") -> tuple[Grant, str]:
    req = await service.request(who(config, "alice@example.com"), "prod-db", duration, "x")
    await service.approve(req.id, who(config, "dana@example.com"))
    result = await service.approve(req.id, who(config, "sam@example.com"))
    assert result.grant is not None and result.secret is not None
    return result.grant, result.secret


async def _break_store(store: Store) -> None:
    """A real store failure: the events table goes away, so every write of events fails."""
    async with store.tx() as tx:
        await tx.conn.exec_driver_sql("ALTER TABLE session_event_chunks RENAME TO chunks_away")


async def _mend_store(store: Store) -> None:
    async with store.tx() as tx:
        await tx.conn.exec_driver_sql("ALTER TABLE chunks_away RENAME TO session_event_chunks")


def crash(hub: SessionHub) -> None:
    """What a crash leaves: the spool files, with their locks let go (the kernel closes a dead process's
    files), and nothing flushed."""
    for s in hub._live.values():
        if s._spool is not None:
            s._spool.close()
    hub._live.clear()
    hub._dirty.clear()


@pytest.fixture
async def live(config: HoopConfig,
               tmp_path: Path) -> AsyncIterator[tuple[Service, SessionHub, RecordingNotifier, Store]]:
    store = Store.from_url(f"sqlite+aiosqlite:///{tmp_path / 'h.db'}")
    await store.migrate()
    recorder = RecordingNotifier()
    bus = Broadcast([recorder])
    service = Service(config, store, SystemClock(), bus)
    hub = SessionHub(service, SystemClock(), spool_dir=tmp_path / "spool", flush_every=0.05)
    bus.add(hub)
    yield service, hub, recorder, store
    await hub.close_all()
    await store.close()


async def test_gate_refusals_and_bearer_cache(service: Service, config: HoopConfig, clock: FakeClock) -> None:
    gate = Gate(service, clock)
    grant, secret = await grant_for(service, config)
    assert (await gate.authenticate_bearer(secret, "prod-db")).id == grant.id
    with pytest.raises(Denied) as exc:
        await gate.authenticate_bearer(secret, "other")
    assert exc.value.code == "wrong_resource"
    with pytest.raises(Denied) as exc:
        await gate.authenticate_bearer("hoop_wrong", "prod-db")
    assert exc.value.code == "bad_credentials"
    revoked = await service.revoke(grant.id, who(config, "alice@example.com"))
    from broker.events import GrantEnded

    await gate.publish(GrantEnded(grant=revoked, request=None))
    with pytest.raises(Denied) as exc:
        await gate.authenticate_bearer(secret, "prod-db")
    assert exc.value.code == "revoked"
    unknown, verifier = await gate.scram_lookup("ghost.zzzzz")
    assert unknown is None and verifier.startswith("SCRAM-SHA-256$4096:")
    assert verifier == (await gate.scram_lookup("ghost.zzzzz"))[1]


async def test_bearer_cache_takes_an_extension_at_once(service: Service, config: HoopConfig,
                                                        clock: FakeClock) -> None:
    """A grant extended in its last seconds keeps working through the gate's cache after its old end."""
    gate = Gate(service, clock)
    grant, secret = await grant_for(service, config)
    other, other_secret = await grant_for(service, config)
    for s in (secret, other_secret):
        await gate.authenticate_bearer(s, "prod-db")  # both cached now
    later = dataclasses.replace(grant, expires_at=grant.expires_at + timedelta(minutes=30))
    await gate.publish(GrantExtended(grant=later, request=None, by=who(config, "alice@example.com")))
    clock.advance(grant.expires_at - clock.now() + timedelta(minutes=1))
    assert (await gate.authenticate_bearer(secret, "prod-db")).expires_at == later.expires_at
    with pytest.raises(Denied) as exc:  # the other grant's cached copy is untouched: it has expired
        await gate.authenticate_bearer(other_secret, "prod-db")
    assert exc.value.code == "expired" and other.expires_at < clock.now()


async def test_revocation_ends_live_sessions_and_records(live: tuple[Service, SessionHub, RecordingNotifier, Store],
                                                         config: HoopConfig) -> None:
    service, hub, recorder, store = live
    grant, _ = await grant_for(service, config)
    ended: list[str] = []
    s = await hub.open(grant, "prod-db", "postgres", "127.0.0.1:5555", ended.append)
    s.record("statement", {"sql": "SELECT 1", "decision": "allow"})
    assert len(recorder.of(SessionOpened)) == 1
    await service.revoke(grant.id, who(config, "dana@example.com"), "incident over")
    assert ended == ["access revoked: incident over"]
    await s.close("client gone")
    async with store.tx() as tx:
        row = await tx.get_session(s.id)
        events = await tx.events(s.id)
    assert row is not None and row.status is SessionStatus.CLOSED and row.close_reason == ended[0]
    assert [e.kind for e in events] == ["open", "statement", "close"]
    assert events[0].data["chain"] == ["alice@example.com"]
    assert recorder.of(SessionClosed)[0].session.id == s.id
    assert not list((hub.spool_dir or Path()).glob("*.jsonl"))


async def test_deadline_timer_ends_session(live: tuple[Service, SessionHub, RecordingNotifier, Store],
                                           config: HoopConfig) -> None:
    service, hub, _, _ = live
    grant, _ = await grant_for(service, config)
    ended = asyncio.Event()
    reasons: list[str] = []

    def on_end(reason: str) -> None:
        reasons.append(reason)
        ended.set()

    s = await hub.open(grant, "prod-db", "postgres", "c", on_end)
    s.deadline = SystemClock().now() + timedelta(milliseconds=200)
    s.arm()
    async with asyncio.timeout(3):
        await ended.wait()
    assert reasons == ["access expired"]
    await s.close("x")


async def test_a_spool_hoop_cannot_write_fails_the_open_before_the_store_says_open(
        live: tuple[Service, SessionHub, RecordingNotifier, Store], config: HoopConfig, tmp_path: Path) -> None:
    """The spool was made after the session's row was stored as open: a disk hoop cannot write (read-only,
    gone) failed the open and left a row saying open forever, which no recovery closes (it has no spool)."""
    service, _, _, store = live
    grant, _ = await grant_for(service, config)
    spool = tmp_path / "gone"
    hub = SessionHub(service, SystemClock(), spool_dir=spool, flush_every=0.05)
    spool.rmdir()  # (as root, a read-only mode would not stop the writes: the folder goes instead)
    with pytest.raises(OSError):
        await hub.open(grant, "prod-db", "postgres", "c", lambda reason: None)
    async with store.tx() as tx:
        assert await tx.list_sessions() == []


async def test_spool_recovers_after_crash(live: tuple[Service, SessionHub, RecordingNotifier, Store],
                                          config: HoopConfig, tmp_path: Path) -> None:
    service, hub, _, store = live
    grant, _ = await grant_for(service, config)
    s = await hub.open(grant, "prod-db", "postgres", "c", lambda r: None)
    for i in range(5):
        s.record("statement", {"sql": f"SELECT {i}" + ("  -- \u2028 \udc80" if i == 2 else "")})
    await asyncio.sleep(0)  # one loop iteration: the events recorded in it reach the spool
    spool = tmp_path / "spool" / f"{s.id}.jsonl"
    with spool.open("a") as f:
        f.write('{"seq": 99, "at": "2030-01-0')  # a torn write: the event in flight
    assert len(spool.read_text(errors="surrogateescape").split("\n")) == 7
    # "crash": a new hub over the same spool directory, the old one never flushed
    hub2 = SessionHub(service, SystemClock(), spool_dir=tmp_path / "spool")
    crash(hub)
    assert await hub2.recover() == 1
    async with store.tx() as tx:
        events = await tx.events(s.id)
        row = await tx.get_session(s.id)
    assert [e.data.get("sql") for e in events if e.kind == "statement"] == [
        f"SELECT {i}" + ("  -- \u2028 \udc80" if i == 2 else "") for i in range(5)]
    assert row is not None and row.status is SessionStatus.CLOSED and "stopped" in (row.close_reason or "")
    assert json.dumps([e.data for e in events]).count("SELECT") == 5


async def test_spool_segments_are_freed_once_stored_and_all_recovered_after_a_crash(
        config: HoopConfig, tmp_path: Path) -> None:
    store = Store.from_url(f"sqlite+aiosqlite:///{tmp_path / 'h.db'}")
    await store.migrate()
    service = Service(config, store, SystemClock(), Broadcast([]))
    spool_dir = tmp_path / "spool"
    hub = SessionHub(service, SystemClock(), spool_dir=spool_dir, flush_every=3600, segment_bytes=2000)
    grant, _ = await grant_for(service, config)
    s = await hub.open(grant, "prod-db", "postgres", "c", lambda r: None)
    for i in range(60):  # ~130 bytes a line, one loop iteration each: a new segment every ~16 events
        s.record("statement", {"sql": f"SELECT {i:04d}", "pad": "x" * 60})
        await asyncio.sleep(0)
    assert len(list(spool_dir.glob(f"{s.id}*.jsonl"))) >= 4  # nothing stored yet: every segment kept
    await hub.flush()
    assert s._spool is not None  # stored: only the current segment is left
    assert [p.name for p in spool_dir.glob(f"{s.id}*.jsonl")] == [s._spool.segments[-1].name]
    for i in range(60, 100):
        s.record("statement", {"sql": f"SELECT {i:04d}", "pad": "x" * 60})
        await asyncio.sleep(0)
    # "crash" with 40 events in the spool only (2+ segments); a new hub recovers each event once
    crash(hub)
    hub2 = SessionHub(service, SystemClock(), spool_dir=spool_dir)
    assert len(list(spool_dir.glob(f"{s.id}*.jsonl"))) >= 2
    assert await hub2.recover() == 1
    async with store.tx() as tx:
        events = await tx.events(s.id)
    assert [e.data["sql"] for e in events if e.kind == "statement"] == [f"SELECT {i:04d}" for i in range(100)]
    assert not list(spool_dir.glob("*.jsonl"))
    await store.close()


async def test_a_failed_store_write_loses_nothing(live: tuple[Service, SessionHub, RecordingNotifier, Store],
                                                  config: HoopConfig, tmp_path: Path) -> None:
    service, hub, _, store = live
    grant, _ = await grant_for(service, config)
    s = await hub.open(grant, "prod-db", "postgres", "c", lambda r: None)
    await hub.flush()
    await _break_store(store)  # its events table is gone for a while
    s.record("statement", {"sql": "SELECT 1"})
    with pytest.raises(Exception, match="session_event_chunks"):
        await hub.flush()
    s.record("statement", {"sql": "SELECT 2"})
    await _mend_store(store)
    await hub.flush()
    async with store.tx() as tx:
        events = await tx.events(s.id)
    assert [e.data["sql"] for e in events if e.kind == "statement"] == ["SELECT 1", "SELECT 2"]
    assert [e.seq for e in events] == sorted({e.seq for e in events})


async def test_a_close_while_the_store_is_down_finishes_once_it_is_back(
        live: tuple[Service, SessionHub, RecordingNotifier, Store], config: HoopConfig) -> None:
    """The spool is the only copy while the store is down: it stays until every event and the closed row
    are stored, and the session is announced closed then, not before and not never."""
    service, hub, recorder, store = live
    grant, _ = await grant_for(service, config)
    s = await hub.open(grant, "prod-db", "postgres", "c", lambda r: None)
    await hub.flush()
    await _break_store(store)
    s.record("statement", {"sql": "SELECT 1"})
    await s.close("client gone")  # (does not raise: the flush loop finishes the close later)
    assert s._spool is not None and all(p.exists() for p in s._spool.segments)
    assert not recorder.of(SessionClosed)
    async with store.tx() as tx:
        row = await tx.get_session(s.id)
    assert row is not None and row.status is SessionStatus.OPEN
    await _mend_store(store)
    async with asyncio.timeout(5):
        while not recorder.of(SessionClosed):
            await asyncio.sleep(0.02)
    async with store.tx() as tx:
        row = await tx.get_session(s.id)
        events = await tx.events(s.id)
    assert row is not None and row.status is SessionStatus.CLOSED and row.close_reason == "client gone"
    assert [e.kind for e in events] == ["open", "statement", "close"]
    assert not list((hub.spool_dir or Path()).glob(f"{s.id}*"))
    assert len(recorder.of(SessionClosed)) == 1


async def test_concurrent_flushes_run_one_at_a_time(live: tuple[Service, SessionHub, RecordingNotifier, Store],
                                                    config: HoopConfig) -> None:
    service, hub, _, store = live
    grant, _ = await grant_for(service, config)
    s = await hub.open(grant, "prod-db", "postgres", "c", lambda r: None)
    for i in range(50):
        s.record("statement", {"sql": f"SELECT {i}"})
        if i % 10 == 9:
            await asyncio.sleep(0)
    await asyncio.gather(*(hub.flush() for _ in range(5)), s.close("bye"))
    async with store.tx() as tx:
        events = await tx.events(s.id)
    assert [e.seq for e in events] == list(range(1, 53))  # open, 50 statements, close: each once, in order


async def test_a_failing_disk_stops_the_spool_and_loses_nothing_stored(
        live: tuple[Service, SessionHub, RecordingNotifier, Store], config: HoopConfig,
        caplog: pytest.LogCaptureFixture) -> None:
    service, hub, recorder, store = live
    grant, _ = await grant_for(service, config)
    s = await hub.open(grant, "prod-db", "postgres", "c", lambda r: None)
    s.record("statement", {"sql": "SELECT 1"})
    await asyncio.sleep(0)  # spooled
    assert s._spool is not None and s._spool._fd is not None
    full = os.open("/dev/full", os.O_WRONLY)  # the kernel's own "no space left on device"
    try:
        os.dup2(full, s._spool._fd)
    finally:
        os.close(full)
    s.record("statement", {"sql": "SELECT 2"})
    await asyncio.sleep(0)
    assert s._spool.failed and "spool stopped (No space left on device)" in caplog.text
    s.record("statement", {"sql": "SELECT 3"})
    await s.close("done")
    async with store.tx() as tx:
        events = await tx.events(s.id)
        row = await tx.get_session(s.id)
    assert [e.data.get("sql") for e in events if e.kind == "statement"] == ["SELECT 1", "SELECT 2", "SELECT 3"]
    assert row is not None and row.status is SessionStatus.CLOSED and len(recorder.of(SessionClosed)) == 1


def test_a_long_run_of_events_is_cut_into_chunks() -> None:
    big = CHUNK_CHARS + 10
    sizes = [1000] * 200 + [big] + [1000] * 3 + [big, big] + [1000] * 150  # lines, in characters
    items = [(seq, f'{{"seq":{seq},"pad":"{"x" * n}"}}\n') for seq, n in enumerate(sizes, start=1)]
    chunks = as_chunks("s_1", items)
    assert "".join(text for *_, text in chunks) == "".join(t for _, t in items)  # all, in order, once
    assert chunks[0][1] == 1 and chunks[-1][2] == len(items)
    assert all(nxt[1] == prev[2] + 1 for prev, nxt in itertools.pairwise(chunks))  # contiguous
    lines = {seq: t for seq, t in items}
    for _, first, last, text in chunks:
        if len(lines[first]) >= CHUNK_CHARS:
            assert first == last and text is lines[first]  # a line that long is its own chunk, not copied
        else:
            assert len(text) < CHUNK_CHARS + 1100  # runs of short lines up to about the limit
    assert sum(1 for _, first, last, _ in chunks if first == last and len(lines[first]) >= CHUNK_CHARS) == 3
    assert as_chunks("s_1", items[:3]) == [("s_1", 1, 3, "".join(t for _, t in items[:3]))]


@pytest.mark.parametrize("count", [1, 2, 700])
async def test_a_flush_stores_every_event_once_in_order(live: tuple[Service, SessionHub, RecordingNotifier, Store],
                                                        config: HoopConfig, count: int) -> None:
    service, hub, _, store = live
    grant, _ = await grant_for(service, config)
    sessions = [await hub.open(grant, "prod-db", "postgres", "c", lambda r: None) for _ in range(2)]
    for i in range(count):
        sessions[i % 2].record("statement", {"sql": f"SELECT {i}", "n": i})
    await hub.flush()
    for k, s in enumerate(sessions):
        async with store.tx() as tx:
            events = await tx.events(s.id)
        assert [e.kind for e in events[:1]] == ["open"]
        assert [e.data for e in events[1:]] == [{"sql": f"SELECT {i}", "n": i} for i in range(k, count, 2)]
        assert [e.seq for e in events] == list(range(1, len(events) + 1))


async def test_recording_chunks_and_recovery_on_each_store(store: Store, config: HoopConfig, tmp_path: Path) -> None:
    """The same recording path on SQLite and on PostgreSQL: flushed chunks, then a crash's spool."""
    service = Service(config, store, SystemClock(), Broadcast([]))
    spool_dir = tmp_path / "spool"
    hub = SessionHub(service, SystemClock(), spool_dir=spool_dir, flush_every=3600)
    grant, _ = await grant_for(service, config)
    s = await hub.open(grant, "prod-db", "postgres", "c", lambda r: None)
    for i in range(300):
        s.record("statement", {"sql": f"SELECT {i}", "rows_sample": {"columns": ["e"], "rows": [["[email]"]]}})
        if i % 100 == 99:
            await hub.flush()  # three chunks
    for i in range(300, 340):
        s.record("statement", {"sql": f"SELECT {i}"})
        await asyncio.sleep(0)
    crash(hub)  # 40 events only in the spool
    assert await SessionHub(service, SystemClock(), spool_dir=spool_dir).recover() == 1
    async with store.tx() as tx:
        events = await tx.events(s.id)
        assert await tx.max_event_seq(s.id) == 342  # open, 340 statements, and the close recovery adds
        first = await tx.events(s.id, limit=5)
    assert [e.data["sql"] for e in events[1:-1]] == [f"SELECT {i}" for i in range(340)]
    assert events[-1].kind == "close"
    assert [e.seq for e in events] == list(range(1, 343))
    assert events[1].data["rows_sample"] == {"columns": ["e"], "rows": [["[email]"]]}
    assert [e.seq for e in first] == [1, 2, 3, 4, 5]
    assert all(e.at.tzinfo is not None for e in events)


async def test_a_retried_write_skips_what_a_lost_commit_already_stored(
        live: tuple[Service, SessionHub, RecordingNotifier, Store], config: HoopConfig) -> None:
    """A store write can commit and still fail for hoop (the answer to COMMIT lost with the
    connection): the retry must neither store those events twice nor fail on them forever."""
    service, hub, _, store = live
    grant, _ = await grant_for(service, config)
    s = await hub.open(grant, "prod-db", "postgres", "c", lambda r: None)
    await hub.flush()
    await _break_store(store)
    s.record("statement", {"sql": "SELECT 1"})
    with pytest.raises(Exception, match="session_event_chunks"):
        await hub.flush()
    await _mend_store(store)
    async with store.tx() as tx:  # what the failed write would have stored had its commit gone through
        await tx.add_event_chunks([(s.id, 2, 2, s._pending[0][1])])
    s.record("statement", {"sql": "SELECT 2"})
    await hub.flush()
    s.record("statement", {"sql": "SELECT 3"})
    await hub.flush()  # (back to plain writes)
    async with store.tx() as tx:
        events = await tx.events(s.id)
    assert [e.data.get("sql") for e in events] == [None, "SELECT 1", "SELECT 2", "SELECT 3"]
    assert [e.seq for e in events] == [1, 2, 3, 4]
    assert not hub._retrying


async def test_review_allowed_refused_and_timeout(live: tuple[Service, SessionHub, RecordingNotifier, Store],
                                                  config: HoopConfig) -> None:
    service, hub, recorder, _ = live
    grant, _ = await grant_for(service, config)
    s = await hub.open(grant, "prod-db", "postgres", "c", lambda r: None)
    reviews: Reviews = hub.reviews

    async def decide_when_asked(email: str, allow: bool) -> None:
        for _ in range(100):
            asked = recorder.of(ReviewRequested)
            pending = [e for e in asked if e.review.status == "pending" and e.review.id not in done]
            if pending:
                review = pending[-1].review
                done.add(review.id)
                with pytest.raises(Denied):
                    await reviews.decide(review.id, who(config, "alice@example.com"), True)  # self
                with pytest.raises(Denied):
                    await reviews.decide(review.id, who(config, "bob@example.com"), True)  # not approver
                await reviews.decide(review.id, who(config, email), allow)
                return
            await asyncio.sleep(0.02)

    done: set[str] = set()
    ok, _ = await asyncio.gather(s.review("DELETE FROM t WHERE id = 1", "review-writes", 5),
                                 decide_when_asked("dana@example.com", True))
    assert ok is True
    refused, _ = await asyncio.gather(s.review("DROP TABLE t", "review-ddl", 5),
                                      decide_when_asked("sam@example.com", False))
    assert refused is False
    assert await s.review("TRUNCATE t", "review-ddl", 0.2) is False  # nobody answers
    await s.close("done")


async def test_statements_counter_follows_the_recorded_decisions(config: HoopConfig, tmp_path: Path) -> None:
    """hoop_statements_total counts each recorded statement, request or command by protocol and decision
    (it was declared, and stayed 0)."""
    from broker.metrics import Metrics

    store = Store.from_url(f"sqlite+aiosqlite:///{tmp_path / 'h.db'}")
    await store.migrate()
    metrics = Metrics()
    service = Service(config, store, SystemClock(), Broadcast([]))
    hub = SessionHub(service, SystemClock(), spool_dir=tmp_path / "spool", flush_every=0.05, metrics=metrics)
    try:
        grant, _ = await grant_for(service, config)
        pg = await hub.open(grant, "prod-db", "postgres", "127.0.0.1", lambda _: None)
        for decision in ("allow", "allow", "block", "review"):
            pg.record("statement", {"sql": "select 1", "decision": decision})
        pg.record("notice", {"text": "not a statement"})
        web = await hub.open(grant, "prod-db", "http", "127.0.0.1", lambda _: None)
        web.record("http", {"method": "GET", "decision": "allow"})
        await hub.flush()
        text = metrics.render().decode()
        assert 'hoop_statements_total{decision="allow",protocol="postgres"} 2.0' in text
        assert 'hoop_statements_total{decision="block",protocol="postgres"} 1.0' in text
        assert 'hoop_statements_total{decision="review",protocol="postgres"} 1.0' in text
        assert 'hoop_statements_total{decision="allow",protocol="http"} 1.0' in text
    finally:
        await hub.close_all()
        await store.close()


async def test_a_replica_sharing_the_spool_leaves_live_sessions_alone(
        live: tuple[Service, SessionHub, RecordingNotifier, Store], config: HoopConfig, tmp_path: Path) -> None:
    """Two `hoop serve` on one state_dir: the one that (re)starts recovered the other's live session,
    closed its row ("hoop stopped") and deleted its spool while its client went on working."""
    service, hub, _, store = live
    grant, _ = await grant_for(service, config)
    s = await hub.open(grant, "prod-db", "postgres", "c", lambda r: None)
    s.record("statement", {"sql": "SELECT 1"})
    await asyncio.sleep(0)
    other = SessionHub(service, SystemClock(), spool_dir=tmp_path / "spool")  # the replica starting
    assert await other.recover() == 0
    async with store.tx() as tx:
        row = await tx.get_session(s.id)
    assert row is not None and row.status is SessionStatus.OPEN
    assert [p.name for p in (tmp_path / "spool").glob(f"{s.id}*")] == [f"{s.id}.jsonl"]
    s.record("statement", {"sql": "SELECT 2"})
    await hub.close_all()
    async with store.tx() as tx:
        events = await tx.events(s.id)
    assert [e.data.get("sql") for e in events if e.kind == "statement"] == ["SELECT 1", "SELECT 2"]


async def test_a_recovered_session_ends_at_its_last_event_and_says_why(
        live: tuple[Service, SessionHub, RecordingNotifier, Store], config: HoopConfig, tmp_path: Path) -> None:
    """A recovered session was closed at the time of the restart (a pod down an hour: "1h connected")
    and its transcript ended without saying why."""
    service, hub, _, store = live
    grant, _ = await grant_for(service, config)
    s = await hub.open(grant, "prod-db", "postgres", "c", lambda r: None)
    s.record("statement", {"sql": "SELECT 1"})
    await asyncio.sleep(0)
    crash(hub)
    await asyncio.sleep(0.05)
    assert await SessionHub(service, SystemClock(), spool_dir=tmp_path / "spool").recover() == 1
    async with store.tx() as tx:
        events = await tx.events(s.id)
        row = await tx.get_session(s.id)
    assert [e.kind for e in events][-2:] == ["statement", "close"]
    assert events[-1].data["reason"] == "hoop stopped while the session was open"
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert row is not None and row.closed_at == events[-2].at == events[-1].at
    assert row.close_reason == "hoop stopped while the session was open"


class _StalledStore:
    """The real store, until ``stall`` is set: then a transaction never answers, and its clean-up (the
    rollback a cancelled transaction makes, on a connection to a database that stopped answering) waits
    as long. Everything else goes to the real store."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.stall = False
        self.answer = asyncio.Event()

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)

    def tx(self) -> object:
        return self._Stalled(self) if self.stall else self._store.tx()

    class _Stalled:
        def __init__(self, outer: _StalledStore) -> None:
            self.outer = outer

        async def __aenter__(self) -> _StalledStore._Stalled:
            return self

        def __getattr__(self, name: str) -> object:  # every query (a read of the grant, a flush's write)
            async def query(*args: object) -> None:
                await self.outer.answer.wait()
            return query

        async def __aexit__(self, *exc: object) -> None:
            await self.outer.answer.wait()


@contextlib.asynccontextmanager
async def _stalled(config: HoopConfig, tmp_path: Path, *, flush_every: float
                   ) -> AsyncIterator[tuple[_StalledStore, SessionHub, LiveSession, list[str]]]:
    """A hub on a store that stops answering once the block starts, with one open session (and the reasons it
    ended); the store answers again, the hub closes and the store closes when the block ends."""
    real = Store.from_url(f"sqlite+aiosqlite:///{tmp_path / 'h.db'}")
    await real.migrate()
    store = _StalledStore(real)
    service = Service(config, store, SystemClock(), Broadcast([]))  # type: ignore[arg-type]
    hub = SessionHub(service, SystemClock(), spool_dir=tmp_path / "spool", flush_every=flush_every)
    grant, _ = await grant_for(service, config)
    ended: list[str] = []
    s = await hub.open(grant, "prod-db", "postgres", "c", ended.append)
    store.stall = True
    try:
        yield store, hub, s, ended
    finally:
        store.stall = False
        store.answer.set()
        await hub.close_all()
        await real.close()


async def test_a_store_that_stops_answering_keeps_no_session_past_its_end(
        config: HoopConfig, tmp_path: Path) -> None:
    """The deadline's read of the grant was bounded by a timeout around the transaction, which then waited
    for the transaction's clean-up as well: a store that stopped answering kept the session open past its
    end for as long, and every later recheck was skipped as already running."""
    async with _stalled(config, tmp_path, flush_every=0.05) as (_, _, s, ended):
        loop = asyncio.get_running_loop()
        started = loop.time()
        s.deadline_passed()
        for _ in range(60):  # bounded: 3 s
            if ended:
                break
            await asyncio.sleep(0.05)
        assert ended == ["access expired"] and loop.time() - started < 1.5


async def test_a_grant_read_given_up_on_is_not_left_pending_when_the_hub_closes(
        config: HoopConfig, tmp_path: Path) -> None:
    """The deadline gives up on a read of the grant after 1 s and cancels it, and its clean-up (the rollback,
    on a store that does not answer) goes on in the background: it was still pending when the hub closed,
    and then when the event loop closed ("Task was destroyed but it is pending")."""
    # (no flush while the store stalls: only the read of the grant is to wait on it)
    async with _stalled(config, tmp_path, flush_every=60) as (store, hub, s, ended):
        s.deadline_passed()
        for _ in range(60):  # bounded: 3 s
            if ended:
                break
            await asyncio.sleep(0.05)
        assert ended == ["access expired"]
        (read,) = [t for t in asyncio.all_tasks() if t.get_name() == f"session={s.id} grant read"]
        assert not read.done()  # given up on: cancelled, its clean-up waits on the store
        store.stall = False  # the close's own writes are answered; the read's clean-up still is not
        await asyncio.wait_for(hub.close_all(), 5)
        assert read.done()
        assert not [t for t in asyncio.all_tasks() if t.get_name().endswith(" grant read")]
