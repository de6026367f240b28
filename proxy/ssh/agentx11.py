"""Agent forwarding (``ssh -A``) and X11 forwarding (``ssh -X``/``-Y``) through hoop, per resource.

How this works. Both are refused unless the resource of the client's grant sets
``allow.agent_forwarding`` / ``allow.x11``. asyncssh has no session hook for these two channel
requests, so the client-facing session channel is a :class:`RequestChannel`: its handlers for
``auth-agent-req@openssh.com`` and ``x11-req`` ask the connection's :class:`Forwards`, which
decides, logs and records; a refusal is also told to the client on the channel's stderr
(or terminal), since an SSH request failure carries no reason. asyncssh's own server-side
agent and X11 listeners stay off (no TCP display ports, no ``~/.Xauthority`` on hoop's host).

Both directions end in a relay socket that hoop owns, in a private (0700) temporary directory
per client connection, created only when the resource allows one of the two:

* Agent: the upstream connection is opened with ``agent_forwarding=<dir>/agent``, so asyncssh
  asks the host for agent forwarding and connects each agent channel the host opens to that
  socket. hoop splices each such connection to an ``auth-agent@openssh.com`` channel opened to
  the client, and only if the client asked for agent forwarding; otherwise it is closed at
  once. hoop's own login to the host uses the held credential only (``agent_path=None`` in
  :mod:`proxy.ssh.upstream`): the forwarded agent is never offered for authentication, and
  hoop's own agent (``SSH_AUTH_SOCK`` of the hoop process) is never used or forwarded.
* X11: for a session channel whose client asked for X11, the upstream session asks the host
  for X11 with ``x11_display=<dir>/x11:0`` and an Xauthority file holding the client's
  (fake) cookie, so asyncssh checks the host's cookie, puts the client's back and connects to
  the relay socket; hoop splices that to an ``x11`` channel opened to the client, whose ssh
  checks its cookie and connects to the real display. When the host refuses X11 the session
  still opens (without ``DISPLAY``).

Every relayed connection is recorded (``forward`` events ``{"what": "agent"}`` /
``{"what": "x11"}``), as is every channel that had the feature on (``agent forwarding`` /
``X11 forwarding`` with the channel number).
"""

from __future__ import annotations

import asyncio
import binascii
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import asyncssh
from asyncssh import SSHForwarder
from asyncssh.packet import SSHPacket

from broker.config import SshResource
from proxy.contracts import Live

if TYPE_CHECKING:
    UpChan = asyncssh.SSHClientChannel[bytes]
else:
    UpChan = Any

__all__ = ["Forwards", "RequestChannel", "X11Request", "xauth_entry"]

log = logging.getLogger(__name__)

#: Xauthority family "any address" (``FamilyWild``): the entry matches whatever host names the display.
_FAMILY_WILD = 0xFFFF
_DISPLAY = "0"
_WINDOW = 2 << 20
_MAX_PKTSIZE = 32 << 10


def xauth_entry(proto: bytes, cookie: bytes, display: str = _DISPLAY) -> bytes:
    """One Xauthority file entry for ``display`` on any host (big-endian length-prefixed fields)."""
    fields = (b"", display.encode("ascii"), proto, cookie)
    return _FAMILY_WILD.to_bytes(2, "big") + b"".join(len(f).to_bytes(2, "big") + f for f in fields)


@dataclass(frozen=True)
class X11Request:
    """What the client sent in its ``x11-req``: the (fake) cookie it will check, and the screen."""

    proto: bytes
    cookie: bytes
    screen: int
    single: bool


class RequestChannel(asyncssh.SSHServerChannel[bytes]):
    """A client-facing session channel whose agent and X11 requests go to :class:`Forwards`.

    asyncssh dispatches a channel request to the method ``_process_<request>_request``; these
    two replace asyncssh's own handlers (which would open listeners on hoop's host). Should a
    later asyncssh stop calling them, its own handlers answer, and with the server's
    ``agent_forwarding``/``x11_forwarding`` off they refuse: this fails closed. The exec and
    subsystem handlers also pass on what asyncssh cannot decode, for the session to refuse with a reason.
    """

    def __init__(self, conn: asyncssh.SSHServerConnection, forwards: Callable[[], Forwards | None]) -> None:
        # The same settings as the server's (create_server in proxy.ssh.server): raw bytes, PTYs, no line editor.
        super().__init__(conn, asyncio.get_running_loop(), allow_pty=True, line_editor=False, line_echo=True,
                         line_history=1000, max_line_length=1024, encoding=None, errors="strict", window=_WINDOW,
                         max_pktsize=_MAX_PKTSIZE)
        self._forwards = forwards
        #: The client asked for agent forwarding on this channel and it was granted.
        self.agent = False
        #: The client's granted X11 request on this channel.
        self.x11: X11Request | None = None

    # asyncssh's own handler returns None and answers later; its dispatcher also takes a bool answered now.
    def _process_auth_agent_req_at_openssh_dot_com_request(self, packet: SSHPacket) -> bool:  # type: ignore[override]
        packet.check_end()
        forwards = self._forwards()
        self.agent = forwards is not None and forwards.agent_request()
        return self.agent

    def _process_x11_req_request(self, packet: SSHPacket) -> bool:
        single = packet.get_boolean()
        proto = packet.get_string()
        data = packet.get_string()
        screen = packet.get_uint32()
        packet.check_end()
        try:
            request = X11Request(proto, binascii.a2b_hex(data), screen, single)
        except binascii.Error:
            return False
        forwards = self._forwards()
        if forwards is None or not forwards.x11_request(request):
            return False
        self.x11 = request
        return True

    # asyncssh answers an exec that is not UTF-8 (or a subsystem name that is not ASCII) with a bare
    # request failure, which the client reports without a reason. These hand the request to the session
    # instead, undecodable bytes as surrogates, so that it is refused with a message and exit status 126.
    def _process_exec_request(self, packet: SSHPacket) -> bool:
        command = packet.get_string()
        packet.check_end()
        return self._start_session(command=command.decode("utf-8", "surrogateescape"))

    def _process_subsystem_request(self, packet: SSHPacket) -> bool:
        subsystem = packet.get_string()
        packet.check_end()
        return self._start_session(subsystem=subsystem.decode("ascii", "replace"))


class _Relay(SSHForwarder):
    """One connection accepted on a relay socket; spliced to a channel that ``Forwards`` opens to the client."""

    def __init__(self, owner: Forwards, kind: str) -> None:
        super().__init__()
        self.owner = owner
        self.kind = kind

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.owner._accepted(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner._relays.discard(self)
        super().connection_lost(exc)


class Forwards:
    """Agent and X11 forwarding of one client connection: the decisions and the relay sockets.

    Built by :meth:`start` once the session is open; ``refuse(what, target, why)`` logs,
    records and tells the client (the server's ``_refused``). :meth:`close` ends it all.
    """

    def __init__(self, conn: asyncssh.SSHServerConnection, resource: SshResource, session: Live, label: str,
                 refuse: Callable[[str, str, str], None]) -> None:
        self.conn = conn
        self.resource = resource
        self.session = session
        self.label = label
        self._refuse = refuse
        self._dir: str | None = None
        self._servers: list[asyncio.AbstractServer] = []
        self._relays: set[_Relay] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._paths: dict[str, str] = {}
        self._agent_wanted = False
        self._x11_cookie: tuple[bytes, bytes] | None = None

    @classmethod
    async def start(cls, conn: asyncssh.SSHServerConnection, resource: SshResource, session: Live, label: str,
                    refuse: Callable[[str, str, str], None]) -> Forwards:
        """The connection's forwards, with a relay socket for each feature the resource allows."""
        self = cls(conn, resource, session, label, refuse)
        allow = resource.allow
        if allow.agent_forwarding or allow.x11:
            try:
                self._dir = tempfile.mkdtemp(prefix="hoop-ssh-")
            except OSError as exc:
                log.error("%s no directory for the relay sockets: %s", label, exc)
                return self
            for kind, name, on in (("agent", "agent", allow.agent_forwarding), ("x11", f"x11:{_DISPLAY}", allow.x11)):
                if on:
                    await self._listen(kind, os.path.join(self._dir, name))
        return self

    async def _listen(self, kind: str, path: str) -> None:
        try:
            server = await asyncio.get_running_loop().create_unix_server(lambda: _Relay(self, kind), path)
        except OSError as exc:
            log.error("%s %s relay socket cannot be created: %s", self.label, kind, exc)
            return
        self._servers.append(server)
        self._paths[kind] = path

    @property
    def agent_relay(self) -> str | None:
        """The socket the upstream connection forwards the host's agent channels to (None: not allowed)."""
        return self._paths.get("agent")

    # -- the client's requests (RequestChannel) -------------------------------------------------
    def agent_request(self) -> bool:
        res = self.resource
        if not res.allow.agent_forwarding:
            self._refuse("agent forwarding", res.name, "allow.agent_forwarding is off")
            return False
        if self.agent_relay is None:
            log.warning("%s agent forwarding refused: no relay socket", self.label)
            return False
        if not self._agent_wanted:
            log.info("%s agent forwarding on", self.label)
        self._agent_wanted = True
        return True

    def x11_request(self, request: X11Request) -> bool:
        res = self.resource
        if not res.allow.x11:
            self._refuse("X11 forwarding", res.name, "allow.x11 is off")
            return False
        if self._dir is None or "x11" not in self._paths:
            log.warning("%s X11 forwarding refused: no relay socket", self.label)
            return False
        cookie = (request.proto, request.cookie)
        if self._x11_cookie is None:
            path = os.path.join(self._dir, "xauthority")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(xauth_entry(*cookie))
            self._x11_cookie = cookie
            log.info("%s X11 forwarding on", self.label)
        elif cookie != self._x11_cookie:  # asyncssh keeps one cookie per upstream connection
            log.info("%s X11 request with a second cookie: the first one is used", self.label)
        return True

    # -- the upstream session ---------------------------------------------------------------------
    async def create_session(self, up: asyncssh.SSHClientConnection, down: object, number: int,
                             factory: Callable[[], asyncssh.SSHClientSession[bytes]], command: str | None,
                             **kwargs: Any) -> tuple[UpChan, asyncssh.SSHClientSession[bytes]]:
        """``up.create_session``, with X11 asked of the host when the client's channel ``down`` has it."""
        if isinstance(down, RequestChannel):
            if down.x11 is not None and self._dir is not None:
                kwargs.update(x11_forwarding="ignore_failure", x11_single_connection=down.x11.single,
                              x11_display=f"{self._paths['x11']}.{down.x11.screen}",
                              x11_auth_path=os.path.join(self._dir, "xauthority"))
                self.session.record("forward", {"what": "X11 forwarding", "channel": number})
            if down.agent:
                self.session.record("forward", {"what": "agent forwarding", "channel": number})
        return await up.create_session(factory, command, **kwargs)

    # -- relayed connections ----------------------------------------------------------------------
    def _accepted(self, relay: _Relay) -> None:
        wanted = self._agent_wanted if relay.kind == "agent" else self._x11_cookie is not None
        if not wanted:
            log.info("%s %s connection from the host closed: the client did not ask for it", self.label, relay.kind)
            relay.close()
            return
        relay.pause_reading()
        self._relays.add(relay)
        task = asyncio.create_task(self._open(relay), name=f"{self.label} {relay.kind}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _open(self, relay: _Relay) -> None:
        def make() -> SSHForwarder:
            return SSHForwarder(relay)

        peer: Any = make  # asyncssh types the factory as returning a session; a forwarder is one in practice
        try:
            if relay.kind == "agent":
                await self.conn.create_agent_channel().open(peer)
            else:
                await self.conn.create_x11_connection(peer, "127.0.0.1", 0)
        except (asyncssh.Error, OSError) as exc:
            log.info("%s %s channel to the client failed: %s", self.label, relay.kind, exc)
            relay.close()
            return
        self.session.record("forward", {"what": relay.kind})
        relay.resume_reading()

    def close(self) -> None:
        """Stop listening, close relayed connections, remove the relay directory."""
        for task in self._tasks:
            task.cancel()
        for server in self._servers:
            server.close()
        for relay in list(self._relays):
            relay.close()
        self._servers.clear()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
