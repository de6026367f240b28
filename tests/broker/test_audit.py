"""The audit log is hash-chained: edits and deletions are found, and export carries the chain."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from sqlalchemy import delete, text, update

from broker import policy
from broker.audit import Chain, Unreadable, Verdict, export_jsonl, verify
from broker.config import HoopConfig
from broker.errors import InvalidInput
from broker.model import Identity
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
