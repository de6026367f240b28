"""The append-only, hash-chained audit log: verification and export.

Each entry's hash covers the previous entry's hash and its own fields, so editing a row
breaks its own hash, and deleting one breaks the link (``prev_hash``) or the sequence. Deleting
the newest entries leaves a shorter chain that still holds: only an anchor kept outside hoop (an
entry's number and hash, which ``hoop audit verify`` prints as the head) shows that. Given one,
the walk checks that the entry is still there with the same hash.
"""

from __future__ import annotations

import hmac
import json
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from broker.errors import InvalidInput, UpstreamError
from broker.model import AuditEntry
from broker.store import Store
from broker.store.audit import GENESIS, audit_hash
from broker.terminal import json_visible

_PAGE = 2000
_ANCHOR = re.compile(r"([1-9][0-9]{0,17}):([0-9a-f]{64})")


def parse_anchor(text: str) -> tuple[int, str]:
    """``SEQ:HASH`` as ``hoop audit verify`` prints the head; :class:`InvalidInput` otherwise."""
    m = _ANCHOR.fullmatch(text.strip().lower())
    if m is None:
        raise InvalidInput(f"--anchor {text!r}: expected ENTRY:HASH, an entry number and its 64 hex digits, as "
                           "'hoop audit verify' prints the head")
    return int(m.group(1)), m.group(2)


@dataclass(frozen=True)
class Verdict:
    ok: bool
    checked: int
    broken_at: int | None = None
    reason: str = ""
    #: the last entry verified: its number and hash (an anchor to keep outside hoop)
    head: tuple[int, str] = field(default=(0, GENESIS), compare=False)


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

    def __init__(self, anchor: tuple[int, str] | None = None) -> None:
        self.prev_hash, self.expected_seq, self.checked = GENESIS, 1, 0
        self.broken: Verdict | None = None
        #: an entry's number and hash kept outside hoop: it must still be there, unchanged
        self.anchor = anchor

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
        if self.anchor is not None and e.seq == self.anchor[0] and not hmac.compare_digest(e.hash, self.anchor[1]):
            return Verdict(False, self.checked, e.seq, f"entry {e.seq} is not the anchored one (its hash differs): "
                                                       "the log was rewritten from there on")
        return None

    def verdict(self) -> Verdict:
        if self.broken is None and self.anchor is not None and self.anchor[0] >= self.expected_seq:
            self.broken = Verdict(False, self.checked, self.expected_seq,
                                  f"the log ends at entry {self.expected_seq - 1}, before the anchored entry "
                                  f"{self.anchor[0]}: entries were removed")
        return self.broken or Verdict(True, self.checked, head=(self.expected_seq - 1, self.prev_hash))

    def unreadable(self, exc: Unreadable) -> Verdict:
        self.broken = self.broken or Verdict(False, self.checked, exc.after + 1, exc.message)
        return self.broken


async def verify(store: Store, *, page: int = _PAGE, anchor: tuple[int, str] | None = None,
                 progress: Callable[[int], None] | None = None, every: int = 1000) -> Verdict:
    """Walk the chain; report the first entry whose link or hash does not hold, or that cannot be read, or
    where it differs from ``anchor`` (an entry's number and hash kept outside hoop). ``progress`` hears the
    number of the entry reached, every ``every`` entries."""
    chain = Chain(anchor)
    try:
        async for e in entries(store, page=page):
            if chain.check(e) is not None:
                break
            if progress is not None and e.seq % every == 0:
                progress(e.seq)
    except Unreadable as exc:
        return chain.unreadable(exc)
    return chain.verdict()


def to_json(e: AuditEntry) -> dict[str, Any]:
    return {"seq": e.seq, "at": e.at.isoformat(), "actor": e.actor, "chain": list(e.chain),
            "chain_text": " → ".join(e.chain), "action": e.action, "request_id": e.request_id,
            "grant_id": e.grant_id, "detail": e.detail, "prev_hash": e.prev_hash, "hash": e.hash}


async def export_jsonl(store: Store, chain: Chain | None = None) -> AsyncIterator[str]:
    """Every entry as a JSON line; with ``chain``, each is also checked (see :meth:`Chain.verdict`).
    Text stays readable UTF-8, but the controls JSON leaves raw (DEL, C1, bidi) are written as ``\\u``
    escapes: a reason read with ``cat`` or ``grep`` cannot steer the terminal, and decodes the same."""
    async for e in entries(store):
        if chain is not None:
            chain.check(e)
        yield json_visible(json.dumps(to_json(e), ensure_ascii=False, sort_keys=True))
