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
its next try. A dropped connection is re-made with backoff.

A connection can also die silently (a NAT or conntrack entry expires, a failover sends no RST).
So every operation on it is bounded by ``op_timeout``, and one that times out counts as a lost
connection: leadership is dropped at once and the connection is re-made. Every ``retry_every``
seconds each replica probes its connection: a follower tries the lock, and the leader checks
that its backend still holds it. The leader therefore gives up within ``retry_every +
op_timeout`` of its last good answer. The server side is bounded by the TCP keepalive and user
timeout settings sent at connect (:data:`SERVER_SETTINGS`). They let PostgreSQL end a vanished
leader's backend, and so free the lock, within about 30 s. That is later than the old leader
gives up, so two replicas never lead at once. Notifications sent meanwhile are
lost, so every (re)connect, and every ``resync_every`` seconds in any case, the grants of this
replica's live sessions are re-read from the store. This sweep alone covers a single process
on SQLite, where another process (``hoop revoke``) changes the store. Proxies also enforce
expiry on local timers, so a lost notification never extends access.

The same channel carries PostgreSQL CancelRequests that reached a replica not holding the
session (:meth:`Replicas.ask_cancel`): only a digest of the cancel key, at most
``cancel_rate`` per second from each replica (a CancelRequest has no authentication beyond its
key, so forged ones must not become a NOTIFY storm). They are acted on as they arrive
(``on_cancel``), not queued behind grant changes, and never retried: like PostgreSQL, a lost
cancel is simply lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode

import asyncpg

from broker.events import Event, GrantEnded, GrantExtended, GrantIssued, Notifier, RequestCreated
from broker.model import Grant, GrantStatus, Identity
from broker.ratebound import RateBound
from broker.store import Store
from broker.store.urls import DIALECT_ONLY

log = logging.getLogger(__name__)

CHANNEL = "hoop_grants"
#: the advisory lock key of the scheduler leader ("hoop" + "lead" in ASCII)
LEADER_LOCK = 0x686F6F706C656164

Connect = Callable[..., Awaitable[Any]]

#: sent in the startup packet of the fan-out connection so that PostgreSQL notices a vanished
#: replica (keepalives when idle; tcp_user_timeout, PostgreSQL 12+, when a NOTIFY sent to it
#: goes unacknowledged) and frees its leader lock in about 30 s instead of 15 min to 2 h.
#: asyncpg offers no client-side keepalive option; the periodic probe covers that side.
SERVER_SETTINGS = {"tcp_keepalives_idle": "10", "tcp_keepalives_interval": "5", "tcp_keepalives_count": "3",
                   "tcp_user_timeout": "30000"}
#: the leader's check that its backend still holds :data:`LEADER_LOCK` (pg_locks splits the key)
_HOLDS_LOCK = ("SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted"
               " AND pid = pg_backend_pid() AND classid = ($1::bigint >> 32)::oid"
               " AND objid = ($1::bigint & 4294967295)::oid AND objsubid = 1)")


def asyncpg_dsn(database_url: str) -> str | None:
    """The libpq-style DSN of a PostgreSQL store URL; ``None`` for other stores (SQLite).
    The dialect's ``ssl=`` becomes ``sslmode=``; dialect-only parameters are dropped."""
    scheme, sep, rest = database_url.partition("://")
    if not sep or scheme.split("+", 1)[0] not in ("postgresql", "postgres"):
        return None
    base, _, query = rest.partition("?")
    params = [(("sslmode" if k == "ssl" else k), v) for k, v in parse_qsl(query, keep_blank_values=True)
              if k not in DIALECT_ONLY]
    return f"postgresql://{base}" + (f"?{urlencode(params)}" if params else "")


def _by(grant: Grant) -> Identity:
    return Identity(email=grant.ended_by or "another hoop replica")


class Replicas:
    """LISTEN/NOTIFY fan-out of grant endings and extensions, the leader lock, and the resync sweep.

    ``dsn`` is ``None`` for a single process (SQLite): then this replica is always the leader
    and only the resync sweep runs. ``live`` returns the grants of this replica's live
    sessions; ``on_deadline`` schedules a wake-up of the local scheduler; ``on_leader`` runs
    when this replica becomes the leader (to act at once on what became due); ``on_cancel``
    gets the digest of a CancelRequest another replica could not place (the PostgreSQL proxy's
    :meth:`~proxy.pg.server.PgProxy.cancel_by_digest`).
    """

    def __init__(self, store: Store, dsn: str | None, targets: Sequence[Notifier], *,
                 live: Callable[[], Iterable[Grant]] = tuple,
                 on_deadline: Callable[[datetime], None] | None = None,
                 on_leader: Callable[[], Awaitable[None]] | None = None,
                 on_cancel: Callable[[bytes, str], None] | None = None,
                 resync_every: float = 5.0, retry_every: float = 2.0, op_timeout: float = 5.0,
                 cancel_rate: float = 20.0, cancel_burst: int = 50,
                 monotonic: Callable[[], float] = time.monotonic,
                 connect: Connect | None = None) -> None:
        self.store = store
        self.dsn = dsn
        self.targets = list(targets)
        self.live = live
        self.on_deadline = on_deadline
        self.on_leader = on_leader
        self.on_cancel = on_cancel
        self.cancels = RateBound(cancel_rate, cancel_burst, now=monotonic)
        self.resync_every = resync_every
        self.retry_every = retry_every
        self.op_timeout = op_timeout
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
            with contextlib.suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
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
                await self._on(conn, "execute", "SELECT pg_notify($1, $2)", CHANNEL, text)
            elif not self._tasks:  # a one-shot command (hoop revoke): a connection of its own
                once = await asyncio.wait_for(self._connect(self.dsn), timeout=10)
                try:
                    async with asyncio.timeout(self.op_timeout):
                        await once.execute("SELECT pg_notify($1, $2)", CHANNEL, text)
                finally:
                    await _close(once, self.op_timeout)
            # else: reconnecting; the others' resync sweep and local timers cover it
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("replica fan-out: NOTIFY failed (%s); the other replicas' resync sweep covers it",
                        type(exc).__name__)

    async def ask_cancel(self, digest: bytes, key_id: str = "") -> bool:
        """Hand the digest of a CancelRequest that no session here holds to the other replicas;
        ``False`` when it was not sent: no fan-out (SQLite, one process), no connection right
        now, or over the rate bound (then counted, and logged once per interval)."""
        conn = self._conn
        if self.dsn is None or conn is None:
            return False
        allowed = self.cancels.take()
        dropped = self.cancels.report()
        if dropped:
            log.warning("replica fan-out: %d CancelRequest(s) for unknown keys not passed on to the other replicas "
                        "(over %g/s, bursts of %d): forged CancelRequests?", dropped, self.cancels.rate,
                        int(self.cancels.burst))
        if not allowed:
            return False
        text = json.dumps({"k": "cancel", "d": digest.hex(), "f": key_id, "r": self.replica})
        try:
            await self._on(conn, "execute", "SELECT pg_notify($1, $2)", CHANNEL, text)
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("replica fan-out: passing on a CancelRequest failed (%s)", type(exc).__name__)
            return False
        return True

    # -- incoming ---------------------------------------------------------------------------
    def _heard(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        try:
            message = json.loads(payload)
        except ValueError:
            log.warning("replica fan-out: ignoring a malformed notification")
            return
        if not isinstance(message, dict) or message.get("r") == self.replica:
            return
        if message.get("k") == "cancel":
            self._heard_cancel(message.get("d"), message.get("f"))
            return
        try:
            self._inbox.put_nowait(message)
        except asyncio.QueueFull:
            log.warning("replica fan-out: inbox full; the resync sweep will catch up")

    def _heard_cancel(self, digest: Any, key_id: Any) -> None:
        # at once, not through the inbox: a cancel is worth nothing once it waits behind store reads
        if self.on_cancel is None or not isinstance(digest, str) or len(digest) != 64:
            return
        if not isinstance(key_id, str) or len(key_id) > 64:
            key_id = ""
        try:
            raw = bytes.fromhex(digest)
        except ValueError:
            return
        try:
            self.on_cancel(raw, key_id)
        except Exception:
            log.exception("replica fan-out: acting on a CancelRequest failed")

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
        conn = await asyncio.wait_for(self._connect(self.dsn, server_settings=SERVER_SETTINGS), timeout=10)
        try:
            async with asyncio.timeout(self.op_timeout):
                await conn.add_listener(CHANNEL, self._heard)
            # only for the current connection: a dropped one also reports its close
            conn.add_termination_listener(lambda c: self._lose() if c is self._conn else None)
        except BaseException:
            await _close(conn, self.op_timeout)
            raise
        self._conn = conn
        self._lost.clear()
        log.info("replica fan-out: listening on %s as replica %s", CHANNEL, self.replica)
        await self._try_lead()
        try:
            await self.resync()
        except Exception:
            log.exception("resync after connecting failed; the sweep retries")

    async def _on(self, conn: Any, method: str, *args: Any) -> Any:
        """One operation on the LISTEN connection, in turn and bounded by ``op_timeout``. A
        timeout or a connection error means the connection is lost: leadership goes at once
        (another replica may soon hold the lock) and ``_keep_connected`` re-makes it."""
        async with self._conn_busy:
            if conn is not self._conn or self._lost.is_set():  # dropped while waiting
                raise asyncpg.InterfaceError("the fan-out connection was lost")
            try:
                async with asyncio.timeout(self.op_timeout):
                    return await getattr(conn, method)(*args)
            except (TimeoutError, OSError, asyncpg.InterfaceError):
                self._lose()
                raise

    def _lose(self) -> None:
        if self.dsn is not None and self._leader:
            self._leader = False
            log.warning("replica %s gives up the scheduler lead: its connection is lost", self.replica)
        self._lost.set()

    async def _try_lead(self) -> None:
        """The periodic probe of the connection: a follower tries to take the lock, the leader
        checks that its backend still holds it."""
        conn = self._conn
        if self.dsn is None or conn is None:
            return
        if self._leader:
            if not await self._on(conn, "fetchval", _HOLDS_LOCK, LEADER_LOCK):
                log.warning("replica %s lost the leader lock; giving up the lead", self.replica)
                self._lose()
            return
        # not around on_leader: its catch-up publishes, and NOTIFY takes the connection in turn
        got = bool(await self._on(conn, "fetchval", "SELECT pg_try_advisory_lock($1)", LEADER_LOCK))
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
            await _close(conn, self.op_timeout)

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
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
                self._lose()


async def _close(conn: Any, timeout: float) -> None:
    """Close politely (the server then frees the lock at once); abort if the peer does not answer."""
    try:
        await asyncio.wait_for(conn.close(), timeout=timeout)
    except Exception:
        with contextlib.suppress(Exception):
            conn.terminate()
