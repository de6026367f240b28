"""The append-only, hash-chained audit log: verification and export.

Each entry's hash covers the previous entry's hash and its own fields, so editing a row
breaks its own hash, and deleting one breaks the link (``prev_hash``) or the sequence.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from broker.model import AuditEntry
from broker.store import Store
from broker.store.repo import GENESIS, audit_hash

_PAGE = 2000


@dataclass(frozen=True)
class Verdict:
    ok: bool
    checked: int
    broken_at: int | None = None
    reason: str = ""


async def entries(store: Store) -> AsyncIterator[AuditEntry]:
    after = 0
    for _ in range(10_000_000 // _PAGE):
        async with store.tx() as tx:
            page = await tx.audit_entries(after=after, limit=_PAGE)
        if not page:
            return
        for entry in page:
            yield entry
        after = page[-1].seq


async def verify(store: Store) -> Verdict:
    """Walk the chain; report the first entry whose link or hash does not hold."""
    prev_hash, expected_seq, checked = GENESIS, 1, 0
    async for e in entries(store):
        if e.seq != expected_seq:
            return Verdict(False, checked, expected_seq, f"entry {expected_seq} is missing (next is {e.seq})")
        if e.prev_hash != prev_hash:
            return Verdict(False, checked, e.seq, f"entry {e.seq} does not link to entry {e.seq - 1}")
        digest = audit_hash(e.prev_hash, e.seq, e.at, e.actor, e.chain, e.action, e.request_id,
                            e.grant_id, e.detail)
        if digest != e.hash:
            return Verdict(False, checked, e.seq, f"entry {e.seq} was altered (hash mismatch)")
        prev_hash, expected_seq, checked = e.hash, e.seq + 1, checked + 1
    return Verdict(True, checked)


def to_json(e: AuditEntry) -> dict[str, Any]:
    return {"seq": e.seq, "at": e.at.isoformat(), "actor": e.actor, "chain": list(e.chain),
            "chain_text": " → ".join(e.chain), "action": e.action, "request_id": e.request_id,
            "grant_id": e.grant_id, "detail": e.detail, "prev_hash": e.prev_hash, "hash": e.hash}


async def export_jsonl(store: Store) -> AsyncIterator[str]:
    async for e in entries(store):
        yield json.dumps(to_json(e), ensure_ascii=False, sort_keys=True)
