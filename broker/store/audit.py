"""The append-only audit log: each entry's hash covers the previous entry's hash and its own body.

Appending takes a transaction-scoped advisory lock on PostgreSQL (the last lock a transaction
takes; see :mod:`broker.store.base`), so replicas append one at a time and the chain has no fork.
``broker/audit.py`` walks and verifies the chain with :func:`audit_hash`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import func, insert, select, text

from broker.model import AuditEntry
from broker.store import tables as t
from broker.store.base import TxBase

GENESIS = "0" * 64
_AUDIT_LOCK = 0x686F6F70  # "hoop"


def audit_hash(prev_hash: str, seq: int, at: datetime, actor: str, chain: Sequence[str], action: str,
               request_id: str | None, grant_id: str | None, detail: dict[str, Any]) -> str:
    body = json.dumps(
        [seq, at.isoformat(), actor, list(chain), action, request_id, grant_id, detail],
        sort_keys=True, separators=(",", ":"), default=str,
    )
    return hashlib.sha256((prev_hash + body).encode("utf-8")).hexdigest()


class AuditOps(TxBase):
    """Appending to the audit log and reading it in order."""

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
