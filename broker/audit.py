"""The append-only, hash-chained audit log: verification and export.

Each entry's hash covers the previous entry's hash and its own fields, so editing a row
breaks its own hash, and deleting one breaks the link (``prev_hash``) or the sequence.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from broker.errors import UpstreamError
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


async def entries(store: Store, *, page: int = _PAGE) -> AsyncIterator[AuditEntry]:
    """Every entry in order, ``page`` at a time. A row that does not decode (an edited ``chain``,
    ``detail`` or ``at``) raises :class:`Unreadable`, naming where it is."""
    after, single = 0, 0
    while True:
        try:
            async with store.tx() as tx:
                rows = await tx.audit_entries(after=after, limit=1 if single else page)
        except (ValueError, TypeError) as exc:  # JSON, timestamp or shape of an edited row
            if not single and page > 1:
                single = page  # find the row: read this page's rows one by one
                continue
            raise Unreadable(after, f"{type(exc).__name__}: {exc}") from None
        if not rows:
            return
        for entry in rows:
            yield entry
        after, single = rows[-1].seq, max(single - 1, 0)


class Unreadable(UpstreamError):
    """A stored entry does not decode: it was edited outside hoop."""

    def __init__(self, after: int, why: str) -> None:
        super().__init__(f"the audit entry after entry {after} cannot be read (altered): {why}",
                         code="audit_unreadable")
        self.after = after


class Chain:
    """Checks entries one by one, in order: :meth:`check` returns the first break, then keeps it."""

    def __init__(self) -> None:
        self.prev_hash, self.expected_seq, self.checked = GENESIS, 1, 0
        self.broken: Verdict | None = None

    def check(self, e: AuditEntry) -> Verdict | None:
        if self.broken is None:
            self.broken = self._check(e)
            if self.broken is None:
                self.prev_hash, self.expected_seq, self.checked = e.hash, e.seq + 1, self.checked + 1
        return self.broken

    def _check(self, e: AuditEntry) -> Verdict | None:
        if e.seq != self.expected_seq:
            return Verdict(False, self.checked, self.expected_seq,
                           f"entry {self.expected_seq} is missing (next is {e.seq})")
        if e.prev_hash != self.prev_hash:
            return Verdict(False, self.checked, e.seq, f"entry {e.seq} does not link to entry {e.seq - 1}")
        digest = audit_hash(e.prev_hash, e.seq, e.at, e.actor, e.chain, e.action, e.request_id,
                            e.grant_id, e.detail)
        if digest != e.hash:
            return Verdict(False, self.checked, e.seq, f"entry {e.seq} was altered (hash mismatch)")
        return None

    def verdict(self) -> Verdict:
        return self.broken or Verdict(True, self.checked)

    def unreadable(self, exc: Unreadable) -> Verdict:
        self.broken = self.broken or Verdict(False, self.checked, exc.after + 1, exc.message)
        return self.broken


async def verify(store: Store, *, page: int = _PAGE) -> Verdict:
    """Walk the chain; report the first entry whose link or hash does not hold, or that cannot be read."""
    chain = Chain()
    try:
        async for e in entries(store, page=page):
            if chain.check(e) is not None:
                break
    except Unreadable as exc:
        return chain.unreadable(exc)
    return chain.verdict()


def to_json(e: AuditEntry) -> dict[str, Any]:
    return {"seq": e.seq, "at": e.at.isoformat(), "actor": e.actor, "chain": list(e.chain),
            "chain_text": " → ".join(e.chain), "action": e.action, "request_id": e.request_id,
            "grant_id": e.grant_id, "detail": e.detail, "prev_hash": e.prev_hash, "hash": e.hash}


async def export_jsonl(store: Store, chain: Chain | None = None) -> AsyncIterator[str]:
    """Every entry as a JSON line; with ``chain``, each is also checked (see :meth:`Chain.verdict`)."""
    async for e in entries(store):
        if chain is not None:
            chain.check(e)
        yield json.dumps(to_json(e), ensure_ascii=False, sort_keys=True)
