"""The repository: dataclasses in and out, SQL inside, one transaction per ``tx()``.

:class:`Tx` is composed of one class per area, each in its own module: requests and approvals
(``requests``), grants (``grants``), sessions (``sessions``), session recordings
(``recordings``), statement reviews (``reviews``), the audit log (``audit``), sealed credential
pickups (``pickups``) and idempotency keys (``dedup``). What they share, and the lock order
that keeps replicas from deadlocking, is in ``base``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from broker.errors import StoreUnavailable
from broker.store.audit import AuditOps
from broker.store.dedup import DedupOps
from broker.store.grants import GrantOps
from broker.store.pickups import PickupOps
from broker.store.recordings import RecordingOps
from broker.store.requests import RequestOps
from broker.store.reviews import ReviewOps
from broker.store.sessions import SessionOps
from broker.store.urls import engine_args, redact_url


class Tx(RequestOps, GrantOps, SessionOps, RecordingOps, ReviewOps, AuditOps, PickupOps, DedupOps):
    """One transaction's worth of repository operations."""


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
            target, connect_args = engine_args(url)
            engine = create_async_engine(target, connect_args=connect_args, pool_size=10, max_overflow=20,
                                         pool_pre_ping=True)
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
