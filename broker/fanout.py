"""Grant changes carried between broker replicas, and the one scheduler leader.

How this works. Every replica serves proxies, and a grant revoked on one replica must end the
sessions that other replicas hold open. :class:`Replicas` is a :class:`~broker.events.Notifier`
on the local bus. When this replica ends or extends a grant, or learns a new deadline, it
sends ``NOTIFY hoop_grants`` with a small JSON payload: the kind, an id or a time, and its own
replica id. The payload never carries a secret. Every replica LISTENs on one dedicated
asyncpg connection. A notification from another replica is only a hint to look: the grant is
read back from the store, which is the truth, and the local event is handed to ``targets``,
the local parts that enforce access (the session hub, the gate's credential cache).

The same connection holds a session-level advisory lock. The replica that holds it is the
scheduler leader, so reminders and expiries are acted on once. asyncpg runs one operation at
a time on a connection, so NOTIFYs and the lock check take turns under one ``asyncio.Lock``.
When a leader dies, its connection closes and the lock goes with it; a follower takes it at
its next try. A dropped connection is re-made with backoff. Notifications sent meanwhile are
lost, so every (re)connect, and every ``resync_every`` seconds in any case, the grants of this
replica's live sessions are re-read from the store. This sweep alone covers a single process
on SQLite, where another process (``hoop revoke``) changes the store. Proxies also enforce
expiry on local timers, so a lost notification never extends access.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode

import asyncpg

from broker.events import Event, GrantEnded, GrantExtended, GrantIssued, Notifier, RequestCreated
from broker.model import Grant, GrantStatus, Identity
from broker.store import Store

log = logging.getLogger(__name__)

CHANNEL = "hoop_grants"
#: the advisory lock key of the scheduler leader ("hoop" + "lead" in ASCII)
LEADER_LOCK = 0x686F6F706C656164

Connect = Callable[[str], Awaitable[Any]]


#: query parameters of SQLAlchemy's asyncpg dialect that are not libpq/asyncpg DSN parameters
_DIALECT_ONLY = {"prepared_statement_cache_size", "prepared_statement_name_func", "async_fallback"}


def asyncpg_dsn(database_url: str) -> str | None:
    """The libpq-style DSN of a PostgreSQL store URL; ``None`` for other stores (SQLite).
    The dialect's ``ssl=`` becomes ``sslmode=``; dialect-only parameters are dropped."""
    scheme, sep, rest = database_url.partition("://")
    if not sep or scheme.split("+", 1)[0] not in ("postgresql", "postgres"):
        return None
    base, _, query = rest.partition("?")
    params = [(("sslmode" if k == "ssl" else k), v) for k, v in parse_qsl(query, keep_blank_values=True)
              if k not in _DIALECT_ONLY]
    return f"postgresql://{base}" + (f"?{urlencode(params)}" if params else "")


def _by(grant: Grant) -> Identity:
    return Identity(email=grant.ended_by or "another hoop replica")


class Replicas:
    """LISTEN/NOTIFY fan-out of grant endings and extensions, the leader lock, and the resync sweep.

    ``dsn`` is ``None`` for a single process (SQLite): then this replica is always the leader
    and only the resync sweep runs. ``live`` returns the grants of this replica's live
    sessions; ``on_deadline`` schedules a wake-up of the local scheduler; ``on_leader`` runs
    when this replica becomes the leader (to act at once on what became due).
    """

    def __init__(self, store: Store, dsn: str | None, targets: Sequence[Notifier], *,
                 live: Callable[[], Iterable[Grant]] = tuple,
                 on_deadline: Callable[[datetime], None] | None = None,
                 on_leader: Callable[[], Awaitable[None]] | None = None,
                 resync_every: float = 5.0, retry_every: float = 2.0, connect: Connect | None = None) -> None:
        self.store = store
        self.dsn = dsn
        self.targets = list(targets)
        self.live = live
        self.on_deadline = on_deadline
        self.on_leader = on_leader
        self.resync_every = resync_every
        self.retry_every = retry_every
        self.replica = secrets.token_hex(6)
        self._connect: Connect = connect or asyncpg.connect
        self._conn: Any = None
        # asyncpg runs one operation at a time on a connection and refuses a second one
        # ("another operation is in progress"); NOTIFYs from concurrent publishers and the
        # follower's lock check take turns on the LISTEN connection under this lock.
        self._conn_busy = asyncio.Lock()
        self._leader = dsn is None
        self._tasks: list[asyncio.Task[None]] = []
        self._inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=10_000)
        self._lost = asyncio.Event()

    @property
    def is_leader(self) -> bool:
        return self._leader

    @property
    def connected(self) -> bool:
        return self._conn is not None

    async def start(self) -> None:
        """Connect (when there is PostgreSQL) and start the background tasks; a failed first
        connect is logged and retried, it does not stop the replica from serving."""
        if self.dsn is not None:
            with contextlib.suppress(OSError, asyncpg.PostgresError, TimeoutError):
                await self._open()
            self._tasks.append(asyncio.create_task(self._keep_connected(), name="replicas-connection"))
            self._tasks.append(asyncio.create_task(self._consume(), name="replicas-inbox"))
        self._tasks.append(asyncio.create_task(self._sweep(), name="replicas-resync"))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        await self._drop()

    # -- outgoing ---------------------------------------------------------------------------
    async def publish(self, event: Event) -> None:
        """Tell the other replicas about this replica's grant changes and new deadlines."""
        if isinstance(event, GrantEnded):
            await self._notify({"k": "ended", "g": event.grant.id})
        elif isinstance(event, GrantExtended):
            await self._notify({"k": "extended", "g": event.grant.id, "at": event.grant.expires_at.isoformat()})
        elif isinstance(event, GrantIssued):
            await self._notify({"k": "deadline", "g": event.grant.id, "at": event.grant.expires_at.isoformat()})
        elif isinstance(event, RequestCreated):
            await self._notify({"k": "deadline", "at": event.request.lapses_at.isoformat()})

    async def _notify(self, payload: dict[str, Any]) -> None:
        if self.dsn is None:
            return
        payload["r"] = self.replica
        text = json.dumps(payload)
        conn = self._conn
        try:
            if conn is not None:
                async with self._conn_busy:
                    if conn is not self._conn:  # dropped while waiting: the resync sweep covers it
                        return
                    await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, text)
            elif not self._tasks:  # a one-shot command (hoop revoke): a connection of its own
                once = await asyncio.wait_for(self._connect(self.dsn), timeout=10)
                try:
                    await once.execute("SELECT pg_notify($1, $2)", CHANNEL, text)
                finally:
                    await once.close()
            # else: reconnecting; the others' resync sweep and local timers cover it
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("replica fan-out: NOTIFY failed (%s); the other replicas' resync sweep covers it",
                        type(exc).__name__)
            if conn is not None:
                self._lost.set()

    # -- incoming ---------------------------------------------------------------------------
    def _heard(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        try:
            message = json.loads(payload)
        except ValueError:
            log.warning("replica fan-out: ignoring a malformed notification")
            return
        if not isinstance(message, dict) or message.get("r") == self.replica:
            return
        try:
            self._inbox.put_nowait(message)
        except asyncio.QueueFull:
            log.warning("replica fan-out: inbox full; the resync sweep will catch up")

    async def _consume(self) -> None:
        while True:
            message = await self._inbox.get()
            try:
                await self.apply(message)
            except Exception:
                log.exception("replica fan-out: applying %s failed", message.get("k"))

    async def apply(self, message: dict[str, Any]) -> None:
        """Act on one notification from another replica."""
        kind = message.get("k")
        at = message.get("at")
        if kind == "deadline" and isinstance(at, str) and self.on_deadline is not None:
            with contextlib.suppress(ValueError):
                self.on_deadline(datetime.fromisoformat(at))
        grant_id = message.get("g")
        if kind in ("ended", "extended") and isinstance(grant_id, str):
            await self.refresh([grant_id], only_changed=False)
            if kind == "extended" and isinstance(at, str) and self.on_deadline is not None:
                with contextlib.suppress(ValueError):
                    self.on_deadline(datetime.fromisoformat(at))

    async def refresh(self, grant_ids: Iterable[str], *, known: dict[str, Grant] | None = None,
                      only_changed: bool = True) -> int:
        """Re-read grants from the store and hand their changes to the local targets; returns
        how many changes were delivered."""
        ids = list(dict.fromkeys(grant_ids))
        if not ids:
            return 0
        async with self.store.tx() as tx:
            fresh = [await tx.get_grant(gid) for gid in ids]
        delivered = 0
        for grant in fresh:
            if grant is None:
                continue
            before = (known or {}).get(grant.id)
            event: Event | None = None
            if grant.status is not GrantStatus.ACTIVE:
                event = GrantEnded(grant=grant, request=None)
            elif not only_changed or (before is not None and before.expires_at != grant.expires_at):
                event = GrantExtended(grant=grant, request=None, by=_by(grant))
            if event is None:
                continue
            delivered += 1
            for target in self.targets:
                try:
                    await target.publish(event)
                except Exception:
                    log.exception("replica fan-out: %s failed on %s", type(target).__name__, type(event).__name__)
        return delivered

    async def resync(self) -> int:
        """Re-check the grants of this replica's live sessions against the store."""
        known = {g.id: g for g in self.live()}
        return await self.refresh(known, known=known)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.resync_every)
            try:
                changed = await self.resync()
                if changed:
                    log.info("resync: %d grant change(s) made elsewhere applied to live sessions", changed)
            except Exception:
                log.exception("resync sweep failed")

    # -- the connection and the leader lock ---------------------------------------------------
    async def _open(self) -> None:
        assert self.dsn is not None
        conn = await asyncio.wait_for(self._connect(self.dsn), timeout=10)
        try:
            await conn.add_listener(CHANNEL, self._heard)
            conn.add_termination_listener(lambda _c: self._lost.set())
        except BaseException:
            await conn.close()
            raise
        self._conn = conn
        self._lost.clear()
        log.info("replica fan-out: listening on %s as replica %s", CHANNEL, self.replica)
        await self._try_lead()
        try:
            await self.resync()
        except Exception:
            log.exception("resync after connecting failed; the sweep retries")

    async def _try_lead(self) -> None:
        if self._leader or self._conn is None:
            return
        async with self._conn_busy:  # not around on_leader: its catch-up publishes, and NOTIFY takes the lock
            conn = self._conn
            if conn is None:
                return
            got = bool(await conn.fetchval("SELECT pg_try_advisory_lock($1)", LEADER_LOCK))
        if got:
            self._leader = True
            log.info("replica %s is now the scheduler leader", self.replica)
            if self.on_leader is not None:
                await self.on_leader()

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if self.dsn is not None:
            self._leader = False  # the lock lived on that connection
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), timeout=5)

    async def _keep_connected(self) -> None:
        backoff = self.retry_every
        while True:
            if self._conn is None:
                try:
                    await self._open()
                    backoff = self.retry_every
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                    log.warning("replica fan-out: cannot reach PostgreSQL (%s); retrying in %.0fs",
                                type(exc).__name__, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 30.0)
                    continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lost.wait(), timeout=self.retry_every)
            if self._lost.is_set():
                log.warning("replica fan-out: connection lost; reconnecting")
                await self._drop()
                continue
            try:
                await self._try_lead()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                self._lost.set()
