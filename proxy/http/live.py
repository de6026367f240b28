"""Sessions of the HTTP proxy: one live session per (grant, resource, client address).

How this works. Opening a session writes a row and announces it in the request's thread,
which is too slow and too noisy to do for every HTTP request (a ``kubectl`` command makes
several). So :class:`SessionPool` shares one :class:`LiveSession` between the requests of one
grant on one resource from one client address, and closes it after ``idle`` seconds without
a request in flight (reason ``"idle"``). Each request in flight is a :class:`Stream` with an
``abort`` callback. When the grant ends (the hub calls ``on_end``: revocation, expiry,
a parent's end) or the proxy's own deadline timer fires, every stream of the session is
aborted at once (HTTP: the response is cut and the connections closed; WebSocket: close code
1008 with the reason) and the session is closed. The ended grant is remembered for a while
so that a new request is refused even before the gate's short cache forgets it; an expiry is
remembered with the deadline that ended it, and forgotten once the grant (as the gate now returns it,
which takes ``GrantExtended`` at once) ends later: an extension that lands after the proxy's own
deadline fired must not leave the grant refused as expired. A grant that ends while its session is
being opened (the hub re-reads it once the session is registered) ends the new entry at once, and the
request that opened it is refused.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from datetime import datetime
from typing import Protocol

from broker.clock import Clock
from broker.model import Grant
from proxy.contracts import Hub, Live

log = logging.getLogger(__name__)

__all__ = ["Hub", "Live", "SessionPool", "Stream"]

_ENDED_MAX = 10_000
#: seconds after the deadline passed that the timer looks again (the session read the grant from the store)
_RECHECK_AFTER = 1.5


class Stream(Protocol):
    """One request (or WebSocket) in flight: ``abort(reason)`` cuts it, and records ``reason``."""

    reason: str | None

    def abort(self, reason: str) -> None: ...


class _Entry:
    __slots__ = ("ended", "idle", "key", "last", "loop", "session", "streams", "timer")

    def __init__(self, key: tuple[str, str, str], session: Live) -> None:
        self.loop = asyncio.get_running_loop()  # (each get_running_loop() call costs a getpid syscall)
        self.key = key
        self.session = session
        self.streams: set[Stream] = set()
        self.ended: str | None = None
        self.idle: asyncio.TimerHandle | None = None
        self.last = 0.0  # loop time the last request ended
        self.timer: asyncio.TimerHandle | None = None


class SessionPool:
    """Shares live sessions between the requests of one grant from one client address."""

    def __init__(self, hub: Hub, clock: Clock, *, idle: float = 30.0) -> None:
        self.hub = hub
        self.clock = clock
        self.idle = idle
        self._entries: dict[tuple[str, str, str], _Entry] = {}
        self._opening: dict[tuple[str, str, str], asyncio.Future[_Entry]] = {}
        self._ended: OrderedDict[str, tuple[str, datetime | None]] = OrderedDict()  # why, and for an expiry when
        self._tasks: set[asyncio.Task[None]] = set()

    def ended(self, grant: Grant) -> str | None:
        """Why a grant's sessions were ended, if they were (the proxy refuses it at once). An expiry no
        longer holds once ``grant`` expires after the deadline that ended them (it was extended)."""
        hit = self._ended.get(grant.id)
        if hit is None:
            return None
        reason, deadline = hit
        if deadline is not None and grant.expires_at > deadline:
            del self._ended[grant.id]
            return None
        return reason

    async def acquire(self, grant: Grant, resource: str, client_ip: str, stream: Stream) -> _Entry:
        """The live session for this grant, resource and client, with ``stream`` registered. The entry may
        have ``ended`` already (the grant ended while it was opening): the caller refuses the request."""
        key = (grant.id, resource, client_ip)
        entry = self._entries.get(key)
        if entry is None or entry.ended is not None:
            pending = self._opening.get(key)
            if pending is not None:
                entry = await asyncio.shield(pending)
            else:
                fut: asyncio.Future[_Entry] = asyncio.get_running_loop().create_future()
                self._opening[key] = fut
                early: list[str] = []  # the grant ended while the session was opening (no entry to end yet)

                def on_end(reason: str) -> None:
                    if fut.done():
                        self.end(key, reason)
                    else:
                        early.append(reason)

                try:
                    live: Live = await self.hub.open(grant, resource, "http", client_ip, on_end)
                    entry = _Entry(key, live)
                    self._entries[key] = entry
                    fut.set_result(entry)
                    if early:
                        self.end(key, early[0])  # the caller sees entry.ended and refuses
                    else:
                        self._arm(entry)
                except asyncio.CancelledError:
                    fut.cancel()
                    raise
                except Exception as exc:
                    fut.set_exception(exc)
                    fut.exception()  # retrieved: waiters re-raise it, nobody else must
                    raise
                finally:
                    self._opening.pop(key, None)
        entry.streams.add(stream)
        return entry

    def release(self, entry: _Entry, stream: Stream) -> None:
        """The request is over; the idle timer (one per idle period, not per request) runs when it was
        the session's last."""
        entry.streams.discard(stream)
        if not entry.streams and entry.ended is None:
            loop = entry.loop
            entry.last = loop.time()
            if entry.idle is None:
                entry.idle = loop.call_later(self.idle, self._idle_check, entry)

    def _idle_check(self, entry: _Entry) -> None:
        entry.idle = None
        if entry.streams or entry.ended is not None:
            return  # busy again: the next release re-arms
        left = entry.last + self.idle - asyncio.get_running_loop().time()
        if left > 0:
            entry.idle = asyncio.get_running_loop().call_later(left, self._idle_check, entry)
        else:
            self._close(entry, "idle")

    def end(self, key: tuple[str, str, str], reason: str) -> None:
        """The grant ended or the deadline passed: cut every stream, close the session."""
        entry = self._entries.get(key)
        if entry is None or entry.ended is not None:
            return
        if reason != "idle" and not reason.startswith("proxy"):
            self._ended[key[0]] = (reason, entry.session.deadline if reason == "access expired" else None)
            while len(self._ended) > _ENDED_MAX:
                self._ended.popitem(last=False)
        self._close(entry, reason)

    def _close(self, entry: _Entry, reason: str) -> None:
        if entry.ended is not None:
            return
        entry.ended = reason
        for handle in (entry.idle, entry.timer):
            if handle is not None:
                handle.cancel()
        if self._entries.get(entry.key) is entry:
            del self._entries[entry.key]
        for stream in list(entry.streams):
            stream.reason = reason
            try:
                stream.abort(reason)
            except Exception:
                log.exception("session=%s aborting a stream failed", entry.session.id)
        task = asyncio.get_running_loop().create_task(entry.session.close(reason))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _arm(self, entry: _Entry) -> None:
        """The proxy's own deadline timer: a lost notification cannot extend access. Once the deadline
        passed, the session reads the grant from the store (an extension stored before the old end but
        announced after it keeps the session) and ends it through ``on_end`` otherwise; the timer looks
        again soon after, at the deadline the session then holds."""
        delay = (entry.session.deadline - self.clock.now()).total_seconds()
        loop = asyncio.get_running_loop()
        if delay <= 0:
            entry.session.deadline_passed()
            entry.timer = loop.call_later(_RECHECK_AFTER, self._deadline, entry)
            return
        entry.timer = loop.call_later(min(delay, 3600.0), self._deadline, entry)

    def _deadline(self, entry: _Entry) -> None:
        if entry.ended is None:
            self._arm(entry)  # re-reads the deadline: an extension moved it

    def check_deadline(self, entry: _Entry) -> bool:
        """Per request: False when the deadline has passed (the request is refused; the session ends
        unless the store says the grant was extended, see :meth:`_arm`)."""
        if self.clock.now() >= entry.session.deadline:
            entry.session.deadline_passed()
            return False
        return True

    async def close_all(self, reason: str = "proxy stopped") -> None:
        for entry in list(self._entries.values()):
            self._close(entry, reason)
        for task in list(self._tasks):
            await task
