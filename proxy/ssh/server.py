"""hoop's SSH server: grant logins in, held-credential connections out.

How this works. :class:`SshProxy` runs an asyncssh server whose host key is generated at
first start under ``state_dir`` (``ssh_host_ed25519_key``) and whose fingerprint is logged.
Each client connection is a :class:`_Connection` (asyncssh's ``SSHServer`` hooks):

* Login: the SSH user name is the grant's login, optionally ``login+resource`` to pick one of
  several SSH resources; the password (or the single keyboard-interactive answer) is the
  grant's secret. Each attempt makes exactly one credential check (``gate.identify``), whether
  or not the login exists, the resource is known, or the grant matches the first resource tried;
  the grant's state and resources are then checked without I/O. Every refusal is the same SSH
  authentication failure with the same banner (:data:`REFUSED_BANNER`), so it tells a guesser
  nothing; the reason is logged.
* After login: the session is opened on the hub (``on_end`` ends it) and the upstream
  connection is started (:mod:`proxy.ssh.upstream`); channels wait for it. A local timer at
  ``session.deadline`` ends the session too, even if no broker event arrives.
* Channels: session channels are :class:`~proxy.ssh.channel.ProxyChannel`; local port
  forwarding is tunnelled through the upstream connection, and remote forwarding makes the
  host listen (:mod:`proxy.ssh.forwarding`), both only when ``allow.port_forwarding``. A
  refused request is logged, recorded, and explained to the client on its session channel
  (``notices``: SSH global requests carry no reason).
* End: every channel is told why (on the terminal or stderr), both halves close, the SSH
  connection is disconnected with the reason, and ``session.close(reason)`` is awaited. The host's
  connection gets :data:`UPSTREAM_CLOSE_WAIT` to finish closing; then it is aborted.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import asyncssh

from broker.clock import Clock
from broker.config import HoopConfig, SshResource
from broker.errors import Denied, HoopError
from broker.model import Grant
from proxy.contracts import AccessGate, Hub, Live
from proxy.mask import Masker
from proxy.shellguard import ShellGuard
from proxy.ssh import agentx11, forwarding, tuning, upstream
from proxy.ssh.channel import ProxyChannel
from proxy.ssh.context import ChannelContext
from proxy.ssh.hostkey import ensure_host_key

__all__ = ["REFUSED_BANNER", "SshProxy"]

log = logging.getLogger(__name__)

#: What every refused login is told (once per connection), whatever the reason.
REFUSED_BANNER = ("hoop: login refused: unknown login or wrong secret, or the grant has ended or is not for "
                  "this resource\n")
#: seconds the end of a session waits for the host's connection to finish closing; then it is aborted
UPSTREAM_CLOSE_WAIT = 5.0


class SshProxy:
    """The SSH proxy. ``start`` binds (port 0 picks one) and returns the port; ``stop`` ends all."""

    def __init__(self, config: HoopConfig, gate: AccessGate, hub: Hub, clock: Clock, environ: Mapping[str, str],
                 state_dir: Path, *, hash_key: bytes | None = None) -> None:
        self.config = config
        self.gate = gate
        self.hub = hub
        self.clock = clock
        self.environ = environ
        self.state_dir = state_dir
        self.resources = {r.name: r for r in config.resources if isinstance(r, SshResource)}
        key = hash_key or (config.masking_key.resolve(environ).encode() if config.masking_key else os.urandom(32))
        self._maskers = {name: Masker(r.masking, key) for name, r in self.resources.items()}
        self._guards = {name: ShellGuard(r.guardrails) for name, r in self.resources.items()}
        self._ids = itertools.count(1)
        self._server: asyncssh.SSHAcceptor | None = None
        self.connections: set[_Connection] = set()
        self.fingerprint = ""
        self.upstream_close_wait = UPSTREAM_CLOSE_WAIT

    def host_key(self) -> asyncssh.SSHKey:
        """Load the persisted host key, or generate and persist one (0600)."""
        key = ensure_host_key(self.state_dir)
        self.fingerprint = key.get_fingerprint()
        return key

    async def start(self, host: str, port: int) -> int:
        self.check_pinned_keys()
        key = self.host_key()
        # Agent and X11 requests are handled by agentx11.RequestChannel, not by asyncssh's listeners.
        self._server = await asyncssh.create_server(
            lambda: _Connection(self), host, port, server_host_keys=[key], encoding=None,
            x11_forwarding=False, agent_forwarding=False, allow_pty=True, line_editor=False,
            login_timeout=30, keepalive_interval=60, config=None, encryption_algs=tuning.CLIENT_FACING_CIPHERS)
        bound = int(self._server.sockets[0].getsockname()[1])
        log.info("ssh proxy listening on %s:%d, host key %s", host, bound, self.fingerprint)
        return bound

    def check_pinned_keys(self) -> None:
        """Every ssh resource's pinned host key must be readable now, as the HTTP proxy's TLS files are:
        a missing known_hosts file, or one with no entry for the host, used to fail only when a user
        connected. Raises :class:`ConfigError` naming the resource."""
        for res in self.config.resources:
            if isinstance(res, SshResource):
                upstream.check_pinned(res)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.end("hoop shutting down")
        for conn in list(self.connections):
            await conn.finished()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def candidates(self, username: str) -> tuple[str, list[str]]:
        """``(login, resources to try)`` for an SSH user name."""
        login, sep, resource = username.partition("+")
        if sep:
            return login, [resource] if resource in self.resources else []
        return username, list(self.resources)


class _Connection(asyncssh.SSHServer):
    def __init__(self, proxy: SshProxy) -> None:
        self.proxy = proxy
        self.label = f"conn={next(proxy._ids)}"
        self.conn: asyncssh.SSHServerConnection | None = None
        self.peer = "?"
        self.grant: Grant | None = None
        self.resource: SshResource | None = None
        self.session: Live | None = None
        self.ctx: ChannelContext | None = None
        self.forwards: agentx11.Forwards | None = None
        self._upstream: asyncio.Task[asyncssh.SSHClientConnection] | None = None
        self._ending: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._done = asyncio.get_running_loop().create_future()
        self._ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._early: list[dict[str, Any]] = []  # refusals seen before the session was open
        self.notices: list[str] = []  # told to the client on its next session channel
        self._told_refusal = False  # the refusal banner goes out once per connection

    # -- authentication ----------------------------------------------------------------------
    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        peer = conn.get_extra_info("peername") or ("?", 0)
        self.peer = f"{peer[0]}:{peer[1]}"
        self.proxy.connections.add(self)

    def begin_auth(self, username: str) -> bool:
        return True

    def public_key_auth_supported(self) -> bool:
        return False

    def password_auth_supported(self) -> bool:
        return True

    async def validate_password(self, username: str, password: str) -> bool:
        return await self._login(username, password)

    def kbdint_auth_supported(self) -> bool:
        return True

    def get_kbdint_challenge(self, username: str, lang: str, submethods: str) -> tuple[str, str, str, list[Any]]:
        return "hoop", "Password: the secret of your hoop grant.", "", [("Password: ", False)]

    async def validate_kbdint_response(self, username: str, responses: Sequence[str]) -> bool:
        # the credential check runs even for a malformed answer: a refusal costs the same either way
        ok = await self._login(username, responses[0] if len(responses) == 1 else "")
        return ok and len(responses) == 1

    async def _login(self, username: str, secret: str) -> bool:
        login, names = self.proxy.candidates(username)
        try:
            grant = await self.proxy.gate.identify(login, secret)
            why = "wrong_resource"
        except Denied as exc:
            names, why = [], exc.code
        for name in names:
            try:
                self.grant = self.proxy.gate.authorize(grant, name)
            except Denied as exc:
                why = exc.code
                if exc.code == "wrong_resource":
                    continue
                break
            self.resource = self.proxy.resources[name]
            self.label += f" grant={self.grant.id} user={self.grant.identity}"
            log.info("%s login to %s from %s", self.label, name, self.peer)
            return True
        log.info("%s login refused for %r from %s: %s", self.label, login[:64], self.peer, why)
        if not self._told_refusal and self.conn is not None:
            self._told_refusal = True
            self.conn.send_auth_banner(REFUSED_BANNER)
        return False

    async def auth_completed(self) -> None:
        assert self.grant is not None and self.resource is not None
        res = self.resource
        try:
            self.session = await self.proxy.hub.open(self.grant, res.name, "ssh", self.peer, self.end)
        except HoopError as exc:
            log.error("%s opening the session failed: %s", self.label, exc.message)
            assert self.conn is not None
            self.conn.disconnect(asyncssh.DISC_BY_APPLICATION, "hoop: the session could not be opened")
            if not self._ready.done():
                self._ready.set_result(None)
            return
        if self._ending is not None:  # the client left while the session was being opened
            await self.session.close("client disconnected")
            return
        assert self.conn is not None
        self.forwards = await agentx11.Forwards.start(self.conn, res, self.session, self.label, self._refused)
        if self._ending is not None:  # the client left while the relay sockets were being made
            self.forwards.close()
            return
        self.ctx = ChannelContext(label=self.label, resource=res, session=self.session,
                                  guard=self.proxy._guards[res.name], masker=self.proxy._maskers[res.name],
                                  upstream=self.upstream, notices=self.notices, forwards=self.forwards)
        self._upstream = asyncio.create_task(upstream.connect(res, self.proxy.environ, context=self.label,
                                                              agent_relay=self.forwards.agent_relay))
        self._upstream.add_done_callback(lambda t: t.cancelled() or t.exception())
        for item in self._early:
            self.session.record("blocked", item)
            self.session.stats["blocked"] += 1
        self._early.clear()
        if not self._ready.done():
            self._ready.set_result(None)
        self._arm()

    async def upstream(self) -> asyncssh.SSHClientConnection:
        assert self._upstream is not None
        return await asyncio.shield(self._upstream)

    def _arm(self) -> None:
        """Our own deadline timer, re-armed when an extension moved the deadline."""
        if self.session is None:
            return
        remaining = (self.session.deadline - self.proxy.clock.now()).total_seconds()
        if remaining <= 0:
            self.session.deadline_passed()  # (it ends the session, through self.end, unless the grant was extended)
            self._timer = asyncio.get_running_loop().call_later(1.5, self._arm)
            return
        self._timer = asyncio.get_running_loop().call_later(min(remaining, 3600.0), self._arm)

    # -- channels -----------------------------------------------------------------------------
    def session_requested(self) -> Any:
        async def channel() -> ProxyChannel:
            await asyncio.shield(self._ready)  # auth_completed may still be opening the session
            if self.ctx is None or self._ending is not None:
                raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, "hoop: the session is not open")
            return ProxyChannel(self.ctx)
        assert self.conn is not None
        return agentx11.RequestChannel(self.conn, lambda: self.forwards), channel()

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int) -> Any:
        if self.resource is None or not self.resource.allow.port_forwarding:
            self._refused("port forwarding", f"{dest_host}:{dest_port}", "allow.port_forwarding is off")
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                                            "hoop: port forwarding is not allowed on this resource")
        async def tunnel() -> Any:
            await asyncio.shield(self._ready)
            assert self.conn is not None
            if self.session is None or self._ending is not None:
                raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, "hoop: the session is not open")
            up = await self.upstream()
            if self._ending is not None:  # the grant ended while the host connection was made
                raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, "hoop: the session is not open")
            self.session.record("forward", {"dest": f"{dest_host}:{dest_port}"})
            return await self.conn.forward_tunneled_connection(up, dest_host, dest_port)
        return tunnel()

    def server_requested(self, listen_host: str, listen_port: int) -> Any:
        target = f"{listen_host}:{listen_port}"
        if self.resource is None or not self.resource.allow.port_forwarding:
            self._refused("remote port forwarding", target, "allow.port_forwarding is off")
            return False

        async def listen() -> asyncssh.SSHListener | bool:
            await asyncio.shield(self._ready)
            session = self.session
            if session is None or self.conn is None or self._ending is not None:
                return False
            try:
                listener = await forwarding.listen_upstream(
                    self.conn, await self.upstream(), listen_host, listen_port,
                    lambda host, port: session.record("forward", {"remote": target, "from": f"{host}:{port}"}))
            except HoopError as exc:
                log.warning("%s remote port forwarding to %s failed: %s", self.label, target, exc.message)
                return False
            except (asyncssh.Error, OSError) as exc:
                log.info("%s remote port forwarding on %s refused by the host: %s", self.label, target, exc)
                self._notice(f"hoop: remote port forwarding on {target}: the host refused to listen")
                return False
            log.info("%s remote port forwarding: the host listens on %s:%d", self.label, listen_host,
                     listener.get_port())
            session.record("forward", {"listen": f"{listen_host}:{listener.get_port()}"})
            return listener
        return listen()

    def unix_connection_requested(self, dest_path: str) -> bool:
        self._refused("unix socket forwarding", dest_path, "hoop does not forward unix sockets")
        return False

    def unix_server_requested(self, listen_path: str) -> bool:
        self._refused("remote unix socket forwarding", listen_path, "hoop does not forward unix sockets")
        return False

    def _refused(self, what: str, target: str, why: str = "not allowed") -> None:
        log.info("%s %s to %s refused: %s", self.label, what, target, why)
        # text and rule are what transcripts show for a blocked event (as for refused commands)
        item = {"what": what, "target": target, "reason": why, "text": f"{what} ({target}): {why}",
                "rule": why.split(maxsplit=1)[0] if why.startswith("allow.") else "unsupported"}
        self._notice(f"hoop: {what} ({target}) refused: {why} on this resource")
        if self.session is None:
            self._early.append(item)
        else:
            self.session.record("blocked", item)
            self.session.stats["blocked"] += 1

    def _notice(self, text: str) -> None:
        """Tell the client on its next session channel (global requests carry no reason)."""
        self.notices.append(text)

    # -- the end --------------------------------------------------------------------------------
    def end(self, reason: str) -> None:
        """on_end: the grant ended or the deadline passed (or hoop stops)."""
        if self._ending is None:
            self._ending = asyncio.create_task(self._shutdown(reason, notify=True))

    def connection_lost(self, exc: Exception | None) -> None:
        if self._ending is None:
            self._ending = asyncio.create_task(self._shutdown("client disconnected", notify=False))

    async def _shutdown(self, reason: str, *, notify: bool) -> None:
        try:
            if self._timer is not None:
                self._timer.cancel()
            channels = list(self.ctx.channels) if self.ctx is not None else []
            if notify:
                log.info("%s ending: %s", self.label, reason)
                for ch in channels:
                    ch.end(reason)
                # The host is cut off now, not once the client has taken in the end of its channels: one that
                # does not read its output takes up to the 2 s below, while its agent, X11 and port forwards
                # would still be relayed.
                if self.forwards is not None:
                    self.forwards.close()
                cut = asyncio.create_task(self._cut_host(channels))
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(2):
                        await asyncio.gather(*(ch.closed for ch in channels))
                if self.conn is not None:
                    self.conn.disconnect(asyncssh.DISC_BY_APPLICATION, f"hoop: {reason}")
                await cut
            if self._upstream is not None:
                # Let a connect in flight finish and close it: cancelling asyncssh mid-handshake leaks its socket.
                up: asyncssh.SSHClientConnection | None = None
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(20):
                        up = await asyncio.shield(self._upstream)
                if up is not None:
                    up.close()
                    try:  # (a close that never finished held the end of the session, and hoop's stop, for good)
                        async with asyncio.timeout(self.proxy.upstream_close_wait):
                            await up.wait_closed()
                    except TimeoutError:
                        log.warning("%s the host's connection did not finish closing within %.1f s: aborted",
                                    self.label, self.proxy.upstream_close_wait)
                        up.abort()
            if self.forwards is not None:
                self.forwards.close()
            if self.session is not None:
                await self.session.close(reason)
        finally:
            self.proxy.connections.discard(self)
            if not self._ready.done():
                self._ready.set_result(None)
            if not self._done.done():
                self._done.set_result(None)

    async def _cut_host(self, channels: list[ProxyChannel]) -> None:
        """Close the host connection (and with it every forward) once the host has closed the ended channels,
        or after 2 s: closing it drops what it has not sent yet, such as the kill of an exec's processes."""
        task = self._upstream
        if task is None or not task.done() or task.cancelled() or task.exception() is not None:
            return  # (a connect still in flight is closed by _shutdown once it is done)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                await asyncio.gather(*(ch.up.wait_closed() for ch in channels if ch.up is not None))
        task.result().close()

    async def finished(self) -> None:
        if self._ending is None:
            self.end("hoop shutting down")
        await asyncio.shield(self._done)
