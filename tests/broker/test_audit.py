"""The audit log is hash-chained: edits and deletions are found, and export carries the chain."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import delete, text, update

from broker import policy
from broker.audit import Chain, Unreadable, Verdict, export_jsonl, verify
from broker.audit import entries as audit_entries
from broker.clock import FakeClock
from broker.config import HoopConfig
from broker.errors import InvalidInput
from broker.model import AuditEntry, Identity
from broker.service import Service
from broker.store import Store
from broker.store import tables as t


async def _history(service: Service, config: HoopConfig) -> None:
    def who(email: str) -> Identity:
        return Identity(email=email, groups=policy.groups_of(config, email))

    req = await service.request(who("alice@example.com"), "prod-db", "1h", "audit me")
    await service.approve(req.id, who("dana@example.com"))
    result = await service.approve(req.id, who("sam@example.com"))
    assert result.grant is not None
    await service.revoke(result.grant.id, who("alice@example.com"), "done")


async def test_intact_chain_verifies(service: Service, config: HoopConfig, store: Store) -> None:
    await _history(service, config)
    verdict = await verify(store)
    assert verdict.ok and verdict.checked == 6
    lines = [json.loads(line) async for line in export_jsonl(store)]
    assert [e["action"] for e in lines] == ["request.created", "request.approval", "request.approval",
                                            "request.approved", "grant.issued", "grant.revoked"]
    assert all(e["chain"] for e in lines) and lines[-1]["chain_text"] == "alice@example.com"


async def test_edited_row_is_found(service: Service, config: HoopConfig, store: Store) -> None:
    await _history(service, config)
    async with store.tx() as tx:
        await tx.conn.execute(update(t.audit_log).where(t.audit_log.c.seq == 3).values(actor="mallory@example.com"))
    verdict = await verify(store)
    assert not verdict.ok and verdict.broken_at == 3 and "altered" in verdict.reason


async def test_deleted_row_is_found(service: Service, config: HoopConfig, store: Store) -> None:
    await _history(service, config)
    async with store.tx() as tx:
        await tx.conn.execute(delete(t.audit_log).where(t.audit_log.c.seq == 4))
    verdict = await verify(store)
    assert not verdict.ok and verdict.broken_at == 4 and "missing" in verdict.reason
    async with store.tx() as tx:
        await tx.conn.execute(delete(t.audit_log).where(t.audit_log.c.seq >= 4))
    assert (await verify(store)).ok  # truncating the tail is only detectable with an external anchor


async def test_no_row_lock_after_an_audit_append(service: Service, config: HoopConfig, store: Store) -> None:
    """Rows are locked before the audit lock, never after (the order that can deadlock on
    PostgreSQL); the store refuses the other order on every database, so tests catch it."""
    await _history(service, config)
    async with store.tx() as tx:
        grant = (await tx.list_grants())[0]
        await tx.get_grant(grant.id, lock=True)
        await tx.append_audit(at=grant.created_at, actor="test", chain=("test",), action="test.order")
        await tx.get_grant(grant.id)  # a plain read is fine
        with pytest.raises(RuntimeError, match="deadlock"):
            await tx.get_grant(grant.id, lock=True)


@pytest.mark.parametrize(("column", "value"), [("chain", "not json"), ("chain", "5"), ("at", "yesterday")])
async def test_an_entry_edited_into_nonsense_is_reported_not_raised(
        service: Service, config: HoopConfig, store: Store, column: str, value: str) -> None:
    """An edit that makes a row undecodable (SQLite stores JSON and times as text) is tampering too:
    verify says where, instead of failing with a decoding error."""
    if store.postgres:
        pytest.skip("PostgreSQL's column types refuse these values")
    await _history(service, config)
    async with store.tx() as tx:
        await tx.conn.execute(text(f"UPDATE audit_log SET {column} = :v WHERE seq = 3"), {"v": value})
    verdict = await verify(store)
    assert not verdict.ok and verdict.broken_at == 3 and verdict.checked == 2 and "cannot be read" in verdict.reason
    verdict = await verify(store, page=1)
    assert not verdict.ok and verdict.broken_at == 3 and verdict.checked == 2
    with pytest.raises(Unreadable):
        _ = [line async for line in export_jsonl(store)]


async def test_paged_walk_and_export_check_the_chain(service: Service, config: HoopConfig, store: Store) -> None:
    await _history(service, config)
    assert await verify(store, page=4) == Verdict(True, 6)
    async with store.tx() as tx:
        await tx.conn.execute(update(t.audit_log).where(t.audit_log.c.seq == 5).values(action="grant.nothing"))
    chain = Chain()
    lines = [line async for line in export_jsonl(store, chain)]
    assert len(lines) == 6  # everything is exported, and the break is known
    assert chain.verdict() == Verdict(False, 4, 5, "entry 5 was altered (hash mismatch)")


async def test_an_anchor_kept_outside_finds_removed_newest_entries(service: Service, config: HoopConfig,
                                                                   store: Store) -> None:
    """Deleting the newest entries leaves a shorter chain that still holds; the head printed earlier and
    kept outside hoop shows it."""
    from broker.audit import parse_anchor

    await _history(service, config)
    first = await verify(store)
    assert first.ok and first.head[0] == 6 and len(first.head[1]) == 64
    assert (await verify(store, anchor=first.head)).ok
    earlier = await verify(store, anchor=(3, "0" * 64))  # entry 3 is there, but not with this hash
    assert not earlier.ok and earlier.broken_at == 3 and "not the anchored one" in earlier.reason
    async with store.tx() as tx:
        await tx.conn.execute(delete(t.audit_log).where(t.audit_log.c.seq >= 5))
    cut = await verify(store)
    assert cut.ok and cut.head[0] == 4  # without the anchor the shorter chain looks whole
    anchored = await verify(store, anchor=first.head)
    assert not anchored.ok and anchored.broken_at == 5 and "ends at entry 4" in anchored.reason
    assert parse_anchor(f" 6:{first.head[1].upper()} ") == first.head
    for bad in ("6", "x:" + "0" * 64, "0:" + "0" * 64, "6:" + "0" * 63):
        with pytest.raises(InvalidInput):
            parse_anchor(bad)


async def test_verify_reports_its_progress(service: Service, config: HoopConfig, store: Store) -> None:
    await _history(service, config)
    reached: list[int] = []
    assert (await verify(store, page=4, progress=reached.append, every=2)).ok
    assert reached == [2, 4, 6]
    async with store.tx() as tx:
        assert await tx.audit_last_seq() == 6


async def test_export_escapes_the_controls_json_leaves_raw(store: Store) -> None:
    """JSON escapes C0 controls but not DEL, C1 (the 8-bit CSI) or bidi overrides: written raw, a reason
    read with `cat` or `grep` steers the terminal. Escaped, the line still decodes to the same entry."""
    from broker.audit import to_json

    reason = "fix\x1b[2J\x9b1A\x7f\u202egnp.exe\u2066 é ✓"
    async with store.tx() as tx:
        entry = await tx.append_audit(at=datetime(2030, 1, 1, tzinfo=UTC), actor="alice@example.com",
                                      chain=("alice@example.com", "bot\u200f"), action="request.created",
                                      detail={"reason": reason})
    (line,) = [line async for line in export_jsonl(store)]
    assert not any(c in line for c in "\x1b\x9b\x7f\u202e\u2066\u200f")
    assert "\\u009b1A\\u007f\\u202egnp.exe\\u2066 é ✓" in line  # readable text stays as it is
    assert json.loads(line) == to_json(entry) and json.loads(line)["detail"]["reason"] == reason


async def test_every_state_change_appends_an_entry_naming_who_for_whom_and_the_ids(
        service: Service, config: HoopConfig, store: Store, clock: FakeClock) -> None:
    """Issue #2: every state change of a request or a grant appends an entry with who, on behalf of whom (the
    chain), what, when and the request and grant ids. Only creation, approval, issue and revocation were
    checked; a use case that forgot its entry (deny, cancel, lapse, withdraw, extend, expire, break-glass)
    would have gone unnoticed."""
    def who(email: str) -> Identity:
        return Identity(email=email, groups=policy.groups_of(config, email))

    alice, dana, sam, root = (who(f"{n}@example.com") for n in ("alice", "dana", "sam", "root"))
    denied = await service.request(alice, "prod-db", "1h", "a")
    await service.deny(denied.id, dana, "no")
    cancelled = await service.request(alice, "prod-db", "1h", "b")
    await service.cancel(cancelled.id, alice)
    lapsed = await service.request(alice, "prod-db", "1h", "c")
    await service.approve(lapsed.id, dana)
    await service.withdraw(lapsed.id, dana)
    req = await service.request(alice, "prod-db", "1h", "d")
    await service.approve(req.id, dana)
    grant = (await service.approve(req.id, sam)).grant
    assert grant is not None
    ext = await service.extend(grant.id, alice, "30m")
    await service.approve(ext.id, dana)
    await service.approve(ext.id, sam)
    glass, _ = await service.breakglass(root, "prod-db", "alice@example.com", "10m", "fire")
    clock.advance(timedelta(hours=2))
    await service.lapse(lapsed.id)
    await service.expire(grant.id)
    await service.expire(glass.id)

    entries = [e async for e in audit_entries(store)]
    assert (await verify(store)).ok
    by_action: dict[str, list[AuditEntry]] = {}
    for e in entries:
        by_action.setdefault(e.action, []).append(e)
        assert e.actor and e.chain and e.at is not None
    assert {a: len(es) for a, es in by_action.items()} == {
        "request.created": 5, "request.denied": 1, "request.cancelled": 1, "request.approval": 5,
        "request.approval_withdrawn": 1, "request.approved": 2, "grant.issued": 1, "grant.extended": 1,
        "grant.breakglass": 1, "request.lapsed": 1, "grant.expired": 2}
    assert [e.request_id for e in by_action["request.denied"] + by_action["request.cancelled"]
            + by_action["request.lapsed"]] == [denied.id, cancelled.id, lapsed.id]
    assert by_action["request.denied"][0].actor == "dana@example.com"
    (extended,) = by_action["grant.extended"]
    assert extended.grant_id == grant.id and extended.request_id == ext.id and extended.actor == "sam@example.com"
    (glass_entry,) = by_action["grant.breakglass"]
    assert glass_entry.grant_id == glass.id and glass_entry.chain == ("root@example.com",)
    assert sorted(e.grant_id or "" for e in by_action["grant.expired"]) == sorted([grant.id, glass.id])
    assert {e.request_id for e in by_action["grant.expired"]} == {req.id, None}  # (break-glass: no request)
