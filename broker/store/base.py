"""What every area of a transaction shares: the connection, the dialect, and the lock-order rule.

Concurrency: on PostgreSQL, ``lock=True`` reads take ``SELECT ... FOR UPDATE`` and audit
appends take a transaction-scoped advisory lock, so replicas serialise where they must. The
lock order is rows first (a request, then grants, parents before children), the audit lock
last: a transaction that appended audit takes no further row lock, or it could wait for a row
whose holder waits for the audit lock. ``lock=True`` after an append raises to keep it so.
SQLite has one writer anyway; an asyncio lock (:class:`broker.store.repo.Store`) serialises our
transactions so they never meet "database is locked".
"""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncConnection


class TxBase:
    """The state one transaction's operations share; each area of ``Tx`` extends it."""

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
