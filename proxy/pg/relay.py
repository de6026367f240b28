"""The relay: two ``asyncio.Protocol`` objects moving bytes between client and server.

How this works. After set-up, :class:`Relay` swaps its :class:`ClientSide` and
:class:`ServerSide` protocols onto the two transports. Each received chunk goes through a
:class:`~proxy.pg.framer.Framer`, then through the :class:`~proxy.pg.inspect.Inspector`,
which returns the bytes to send as slices; they go out in ONE ``transport.write``. A chunk
that is exactly one statement or its whole answer, and needs nothing changed, takes the
fast path of :mod:`proxy.pg.fast` instead and is forwarded as it came.

Backpressure: when a transport's write buffer passes its high-water mark, asyncio calls
``pause_writing`` on that side's protocol and the relay pauses *reading* on the other side;
``resume_writing`` undoes it. A statement held for review pauses reading from the client the
same way, and so does a table-name lookup for the server side: the chunk being processed is
kept with the index of the message that waits, and processing resumes there (reading resumes
only once nothing is held any more: a replayed chunk may start a new hold).

Row size: with masking on, a DataRow (or CopyData) is held whole until it can be inspected,
and so is every other server message (an error, a notice, a RowDescription). ``max_row`` caps
that for every type: the framer refuses a longer message as soon as its header arrives, so the
cap costs nothing per row, and the session ends with SQLSTATE 54000 naming the message type.

The end: ``end(reason)`` (the hub's ``on_end``, the local deadline timer, or a fault) records the
statements still in flight (the server may have run them), sends the client a FATAL ErrorResponse,
closes both transports and closes the session. A side that has not taken in what was still queued
for it :data:`CLOSE_GRACE` seconds later (a client that stopped reading) is reset. A statement still
running upstream is cancelled (``cancel``, a CancelRequest for the upstream backend): PostgreSQL
notices a closed socket only when it next reads or writes, so a long write would otherwise run on,
and commit, after the grant ended. The cancel is sent again after :data:`RECANCEL_AFTER` seconds, in
case the first reached the backend before it had read the statement (a cancel of an idle backend is
dropped). So is a statement in flight when the client goes without a Terminate: nothing hoop
recorded as closed keeps running on the database.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from broker.clock import Clock
from broker.errors import HoopError
from proxy.pg import codec
from proxy.pg.fast import fast_reply, fast_request
from proxy.pg.inspect import Inspector, Suspend
from proxy.pg.messages import Backend, Frontend
from proxy.pg.upstream import Upstream

log = logging.getLogger(__name__)

#: how the end of a session names a server message over ``max_row`` (the cap holds every type whole)
_MESSAGE_NAMES = {
    Backend.DATA_ROW: "a result row (DataRow)", Backend.COPY_DATA: "a COPY data row (CopyData)",
    Backend.ERROR_RESPONSE: "an error (ErrorResponse)", Backend.NOTICE_RESPONSE: "a notice (NoticeResponse)",
    Backend.ROW_DESCRIPTION: "a result description (RowDescription)",
    Backend.NOTIFICATION_RESPONSE: "a notification (NotificationResponse)",
}
#: seconds after the first cancel of a statement in flight at the end that the second one is sent
RECANCEL_AFTER = 1.0
#: seconds after the deadline passed that the relay looks again (the session read the grant from the store)
RECHECK_AFTER = 1.5
#: seconds a side closed at the end has to take in what was still queued for it before it is cut (reset)
CLOSE_GRACE = 5.0


class _Side(asyncio.Protocol):
    def __init__(self, relay: Relay, name: str) -> None:
        self.relay = relay
        self.name = name

    def pause_writing(self) -> None:
        self.relay._pause(self.relay.other(self.name), f"{self.name}-slow")

    def resume_writing(self) -> None:
        self.relay._resume(self.relay.other(self.name), f"{self.name}-slow")

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay.lost(self.name)


class ClientSide(_Side):
    def data_received(self, data: bytes) -> None:
        self.relay.from_client(data)


class ServerSide(_Side):
    def data_received(self, data: bytes) -> None:
        self.relay.from_server(data)


class Relay:
    """One proxied connection from the end of set-up to the close of both sides."""

    def __init__(self, client: asyncio.Transport, up: Upstream, inspector: Inspector, session: Any,
                 clock: Clock, *, conn: str, stream_rows: bool, on_closed: Callable[[Relay], None],
                 fast: bool = True, max_row: int = codec.SERVER_MAX_MESSAGE,
                 cancel: Callable[[], Awaitable[None]] | None = None, close_grace: float = CLOSE_GRACE) -> None:
        self.client = client
        self.up = up
        self.server = up.transport
        self.insp = inspector
        self.session = session
        self.clock = clock
        self.conn = conn
        self.stats: dict[str, int] = session.stats
        self.on_closed = on_closed
        self.cancel = cancel  # a CancelRequest for the upstream backend (None: nothing is cancelled)
        self.fast = fast  # False: every chunk takes the general path (the tests' twin)
        self.c_framer = codec.Framer(codec.CLIENT_MAX_MESSAGE, stream_types=frozenset({Frontend.COPY_DATA}))
        stream = frozenset({Backend.DATA_ROW, Backend.COPY_DATA}) if stream_rows else frozenset()
        #: the longest server message held whole (rows are streamed instead when nothing is masked)
        self.max_row = codec.SERVER_MAX_MESSAGE if stream_rows else min(max_row, codec.SERVER_MAX_MESSAGE)
        self.s_framer = codec.Framer(self.max_row, stream_types=stream, coalesce_rows=True)
        self._paused: dict[str, set[str]] = {"client": set(), "server": set()}
        self._held: dict[str, list[bytes] | None] = {"client": None, "server": None}
        self._tasks: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._canceller: asyncio.Task[None] | None = None
        self.close_grace = close_grace
        self._gone: set[str] = set()  # the sides whose connection is lost
        self._cutter: asyncio.TimerHandle | None = None
        self.closing = False
        self.end_reason: str | None = None
        self.done = asyncio.get_running_loop().create_future()

    # ---- wiring -------------------------------------------------------------------------

    def start(self, client_leftover: bytes, server_leftover: bytes) -> None:
        self.client.set_protocol(ClientSide(self, "client"))
        self.server.set_protocol(ServerSide(self, "server"))
        self._arm()
        if server_leftover:
            self.from_server(server_leftover)
        if client_leftover:
            self.from_client(client_leftover)

    def other(self, name: str) -> str:
        return "server" if name == "client" else "client"

    def _transport(self, name: str) -> asyncio.Transport:
        return self.client if name == "client" else self.server

    def _pause(self, name: str, reason: str) -> None:
        reasons = self._paused[name]
        if not reasons and not self.closing:
            self._transport(name).pause_reading()
        reasons.add(reason)

    def _resume(self, name: str, reason: str) -> None:
        reasons = self._paused[name]
        reasons.discard(reason)
        if not reasons and not self.closing:
            self._transport(name).resume_reading()

    # ---- deadline -----------------------------------------------------------------------

    def _arm(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = self.session.deadline
        delay = max((deadline - self.clock.now()).total_seconds(), 0.0)
        self._timer = loop.call_later(delay, self._deadline, deadline)

    def _deadline(self, scheduled: Any) -> None:
        if self.closing:
            return
        if self.session.deadline > scheduled:  # extended meanwhile
            self._arm()
            return
        # the session asks the store first: an extension stored before the old end but announced after it
        # keeps the session; otherwise it ends it, through the hub's on_end (self.end). Checked again soon,
        # at the deadline the session then holds.
        self.session.deadline_passed()
        self._timer = asyncio.get_running_loop().call_later(RECHECK_AFTER, self._deadline, scheduled)

    # ---- data ---------------------------------------------------------------------------

    def from_client(self, data: bytes) -> None:
        self.stats["bytes_in"] += len(data)
        held = self._held["client"]
        if held is not None:
            held.append(data)
            return
        try:
            if self.fast and self.c_framer.idle and fast_request(self.insp, data):
                if not self.closing:
                    self.server.write(data)
                return
            buf, frames = self.c_framer.feed(data)
            if frames:
                self._run("client", buf, frames, 0)
        except HoopError as exc:
            self.fault(exc)
        except Exception:
            log.exception("conn=%s internal error on client data", self.conn)
            self.end("hoop: internal error", sqlstate="XX000")

    def from_server(self, data: bytes) -> None:
        held = self._held["server"]
        if held is not None:
            held.append(data)
            return
        try:
            if self.fast and self.s_framer.idle and fast_reply(self.insp, data):
                if not self.closing:
                    self.stats["bytes_out"] += len(data)
                    self.client.write(data)
                return
            buf, frames = self.s_framer.feed(data)
            if frames:
                self._run("server", buf, frames, 0)
        except codec.MessageTooLong as exc:
            if self.max_row < exc.length <= codec.SERVER_MAX_MESSAGE:
                what = _MESSAGE_NAMES.get(exc.msg_type) or f"a message of type {chr(exc.msg_type)!r}"
                log.warning("conn=%s %s of %d bytes from the database is over max_row_bytes (%d)", self.conn,
                            what, exc.length, self.max_row)
                self.end(f"hoop: {what} of {exc.length} bytes from the database is larger than hoop holds to "
                         f"inspect a message (max_row_bytes: {self.max_row}); the session ends", sqlstate="54000")
            else:
                self.fault(exc, server=True)
        except HoopError as exc:
            self.fault(exc, server=True)
        except Exception:
            log.exception("conn=%s internal error on server data", self.conn)
            self.end("hoop: internal error", sqlstate="XX000")

    def _run(self, side: str, buf: bytes, frames: list[codec.Frame], start: int) -> None:
        if side == "client":
            out, reached, wait = self.insp.from_client(buf, frames, start)
            target = self.server
        else:
            out, reached, wait = self.insp.from_server(buf, frames, start)
            target = self.client
        if out and not self.closing:
            data = out[0] if len(out) == 1 else b"".join(out)
            if side == "server":
                self.stats["bytes_out"] += len(data)
            target.write(data)
        if self.insp.abort is not None:
            self.end(self.insp.abort, sqlstate="42501")
            return
        if wait is not None:
            self._suspend(side, wait, buf, frames, reached)

    def _suspend(self, side: str, wait: Suspend, buf: bytes, frames: list[codec.Frame], index: int) -> None:
        self._held[side] = []
        self._pause(side, "hold")
        task = asyncio.get_running_loop().create_task(self._continue(side, wait, buf, frames, index))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _continue(self, side: str, wait: Suspend, buf: bytes, frames: list[codec.Frame], index: int) -> None:
        try:
            await wait()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("conn=%s hold failed", self.conn)
            self.end("internal error while holding a statement", sqlstate="XX000")
            return
        if self.closing:
            return
        held = self._held[side] or []
        self._held[side] = None
        try:
            self._run(side, buf, frames, index)
        except HoopError as exc:
            self.fault(exc, server=side == "server")
            return
        if self._held[side] is None:  # not suspended again
            for data in held:
                (self.from_client if side == "client" else self.from_server)(data)
            if self._held[side] is None:  # a replayed chunk may have started a new hold: keep reading paused
                self._resume(side, "hold")
        else:
            self._held[side] = held + (self._held[side] or [])

    # ---- the end ------------------------------------------------------------------------

    def fault(self, exc: HoopError, *, server: bool = False) -> None:
        who = "server" if server else "client"
        log.warning("conn=%s protocol error from the %s: %s", self.conn, who, exc.message)
        message = exc.message if not server else f"the database sent a malformed message: {exc.message}"
        self.end(message, sqlstate=exc.sqlstate if not server else "08P01")

    def end(self, reason: str, *, sqlstate: str = "57P01") -> None:
        """Tell the client why (FATAL), close both sides and the session. Idempotent."""
        if self.closing:
            return
        self.end_reason = reason
        running = bool(self.insp.expect)
        self.insp.end_in_flight(reason)
        try:
            self.client.write(codec.encode_error(sqlstate, reason, severity="FATAL"))
        except Exception:  # the client may be gone already
            log.debug("conn=%s could not send the FATAL error", self.conn)
        self._shutdown(reason, cancel=running)

    def lost(self, side: str) -> None:
        self._gone.add(side)
        if len(self._gone) == 2 and self._cutter is not None:
            self._cutter.cancel()
        if not self.closing:
            if side == "server" and not self.insp.said_goodbye:
                self._shutdown(self.insp.fatal or "the database closed the connection")
            else:
                # a client that vanished mid-statement (no Terminate) leaves nothing running in hoop's name
                self._shutdown("client closed the connection",
                               cancel=side == "client" and bool(self.insp.expect) and not self.insp.said_goodbye)

    def _shutdown(self, reason: str, *, cancel: bool = False) -> None:
        self.closing = True
        if self._timer is not None:
            self._timer.cancel()
        for task in list(self._tasks):
            task.cancel()
        if not self.server.is_closing():
            try:
                self.server.write(codec.TERMINATE)
            except Exception:
                log.debug("conn=%s could not send Terminate", self.conn)
            self.server.close()
        self.client.close()
        loop = asyncio.get_running_loop()
        self._cutter = loop.call_later(self.close_grace, self._cut)
        if cancel and self.cancel is not None:
            self._canceller = loop.create_task(self._cancel_upstream())
        task = loop.create_task(self._close_session(reason))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _cut(self) -> None:
        """Reset a side that, closed at the end, still has not taken in what was queued for it: a
        client that stopped reading would otherwise keep its connection (and hoop's buffer) open."""
        for side in ("client", "server"):
            if side not in self._gone:
                log.info("conn=%s the %s did not take in the end of the session within %.0f s: connection reset",
                         self.conn, side, self.close_grace)
                self._transport(side).abort()

    def give_up_cancel(self) -> None:
        """hoop stops: a cancel still trying to reach a database that does not answer is given up (each of its
        stages is bounded, but two attempts can take about 20 s)."""
        if self._canceller is not None and not self._canceller.done():
            log.warning("conn=%s hoop stops: the cancel of the statement still running upstream is given up",
                        self.conn)
            self._canceller.cancel()

    async def _cancel_upstream(self) -> None:
        assert self.cancel is not None
        log.info("conn=%s a statement was still running upstream: cancelling it", self.conn)
        for attempt in range(2):
            if attempt:
                await asyncio.sleep(RECANCEL_AFTER)
            try:
                await self.cancel()
            except Exception:
                log.exception("conn=%s cancelling the statement still running upstream failed", self.conn)

    async def _close_session(self, reason: str) -> None:
        log.info("conn=%s session closed: %r (%d statements, %d bytes in, %d out)", self.conn, reason,
                 self.stats.get("statements", 0), self.stats.get("bytes_in", 0), self.stats.get("bytes_out", 0))
        try:
            await self.session.close(reason)
        except Exception:
            log.exception("conn=%s closing the session failed", self.conn)
        finally:
            try:
                if self._canceller is not None:  # done only once nothing of the session runs upstream
                    await self._canceller
            finally:  # (also when the canceller was cancelled: the relay is still let go of)
                self.on_closed(self)
                if not self.done.done():
                    self.done.set_result(None)
