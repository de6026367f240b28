"""Transcripts are published when a session closes and when its grant ends, from the masked recording."""

from __future__ import annotations

from pathlib import Path

from broker import policy
from broker.clock import SystemClock
from broker.config import HoopConfig
from broker.events import Broadcast, RecordingNotifier, TranscriptReady
from broker.model import Identity
from broker.recap import Recap
from broker.service import Service
from broker.store import Store
from proxy.sessions import SessionHub


def who(config: HoopConfig, email: str) -> Identity:
    return Identity(email=email, groups=policy.groups_of(config, email))


async def test_transcripts_on_session_close_and_grant_end(config: HoopConfig, tmp_path: Path) -> None:
    store = Store.from_url(f"sqlite+aiosqlite:///{tmp_path / 'h.db'}")
    await store.migrate()
    recorder = RecordingNotifier()
    bus = Broadcast([recorder])
    service = Service(config, store, SystemClock(), bus)
    hub = SessionHub(service, SystemClock(), flush_every=0.05)
    recap = Recap(service, settle_seconds=2)
    bus.add(hub)
    bus.add(recap)
    try:
        req = await service.request(who(config, "alice@example.com"), "prod-db", "1h", "x")
        await service.approve(req.id, who(config, "dana@example.com"))
        grant = (await service.approve(req.id, who(config, "sam@example.com"))).grant
        assert grant is not None
        first = await hub.open(grant, "prod-db", "postgres", "10.0.0.1:5000", lambda r: None)
        first.record("statement", {"sql": "SELECT email FROM users", "rows": 1, "decision": "allow"})
        first.record("rows", {"columns": ["email"], "rows": [["[email]"]]})
        await first.close("client quit")
        await recap.drain()
        session_t = recorder.of(TranscriptReady)
        assert len(session_t) == 1 and session_t[0].request.id == req.id
        assert "SELECT email FROM users" in session_t[0].text and "| [email]" in session_t[0].text
        assert session_t[0].summary.startswith("1 session(s) · 1 statement(s)/command(s) · 1 row(s)")

        second = await hub.open(grant, "prod-db", "postgres", "10.0.0.1:5001", lambda r: None)
        second.record("statement", {"sql": "DROP TABLE users", "decision": "block", "rule": "no-drop"})
        # the revocation ends the live session; the proxy would close it on on_end
        await service.revoke(grant.id, who(config, "alice@example.com"), "done")
        await second.close("access revoked")
        await recap.drain()
        ready = recorder.of(TranscriptReady)
        grant_t = [t for t in ready if t.title.startswith("Revoked by alice@example.com")]
        assert len(grant_t) == 1 and grant_t[0].filename == f"hoop-{grant.id}.txt"
        assert "2 session(s)" in grant_t[0].summary and "1 blocked" in grant_t[0].summary
        assert "BLOCKED DROP TABLE users" in grant_t[0].text
    finally:
        await hub.close_all()
        await store.close()
