"""The connection from hoop to the resource's host, with the held credential and a pinned host key.

The private key (``credential``) or password (``password``) is resolved from its
:class:`~broker.config.SecretRef` at connect time and handed to asyncssh only; it never
reaches a log line or an error message. The host key is pinned: ``host_key`` in config, or
the entries for the host in a ``known_hosts`` file. hoop checks the key itself (asyncssh's
``validate_host_public_key`` hook) so that a refusal can name what was offered: an unknown
or changed key fails with :class:`~broker.errors.UpstreamError` code ``host_key``, whose
message gives the offered key's fingerprint and the pinned ones.

Received bytes reach asyncssh at most :data:`FEED` bytes at a time (:class:`_Feeder`, put in
place through asyncssh's ``tunnel`` hook, which opens the TCP connection itself). asyncssh
keeps its input as ``bytes`` and copies the unparsed rest after every packet, so a 256 KiB
socket read of eight 32 KiB packets was copied about nine times over; fed packet by packet it
is copied about twice (1.2 -> 0.1 ms per MB on the bench machine).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any, cast

import asyncssh

from broker.config import SshResource
from broker.errors import ConfigError, UpstreamError
from proxy.ssh import tuning

__all__ = ["FEED", "check_pinned", "client_key", "connect", "pinned_keys"]

log = logging.getLogger(__name__)

#: Largest piece of received data handed to asyncssh at once (a 32 KiB packet and its framing).
FEED = 33 << 10


class _Feeder(asyncio.Protocol):
    """The TCP protocol under the upstream SSH connection: passes everything through, data in pieces."""

    def __init__(self, inner: asyncio.Protocol) -> None:
        self.inner = inner
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport subclass
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if len(data) <= FEED:
            self.inner.data_received(data)
            return
        view = memoryview(data)
        for i in range(0, len(data), FEED):
            if self._transport is None or self._transport.is_closing():
                return
            self.inner.data_received(view[i:i + FEED])  # type: ignore[arg-type]  # asyncssh does bytes += view

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class _Direct:
    """asyncssh ``tunnel`` hook: a plain TCP connection to the host, with :class:`_Feeder` underneath."""

    async def create_connection(self, factory: Callable[[], asyncio.Protocol], host: str,
                                port: int) -> tuple[asyncio.Transport, asyncio.Protocol]:
        inner = factory()
        transport, _ = await asyncio.get_running_loop().create_connection(lambda: _Feeder(inner), host, port)
        return transport, inner

    def close(self) -> None:
        """Nothing to close: the SSH connection owns the TCP connection."""

    async def wait_closed(self) -> None:
        """Nothing to wait for."""


def pinned_keys(res: SshResource, host: str, port: int) -> list[asyncssh.SSHKey]:
    """The host keys ``res`` trusts for ``host:port``. Raises :class:`ConfigError` if unreadable."""
    keys: list[asyncssh.SSHKey] = []
    try:
        if res.host_key:
            keys.append(asyncssh.import_public_key(res.host_key))
        if res.known_hosts is not None:
            known = asyncssh.read_known_hosts(str(res.known_hosts))
            keys.extend(known.match(host, host, port)[0])
    except OSError as exc:
        raise ConfigError(f"resource {res.name}: pinned host key cannot be read: known_hosts {res.known_hosts}: "
                          f"{exc.strerror or exc}") from None
    except (asyncssh.KeyImportError, ValueError) as exc:
        raise ConfigError(f"resource {res.name}: pinned host key cannot be read: {exc}") from None
    return keys


def check_pinned(res: SshResource) -> None:
    """``res``'s pinned host key must be readable, and known_hosts must hold a key for its host: checked at
    start (and by ``hoop check``), not when the first user connects. Raises :class:`ConfigError` naming the
    resource."""
    address, port = res.host_port(22)
    if not pinned_keys(res, address, port):
        raise ConfigError(f"resource {res.name}: {res.known_hosts} has no key for {address}:{port}; "
                          "add the host's key there, or set host_key")


def client_key(res: SshResource, environ: Mapping[str, str]) -> asyncssh.SSHKey | None:
    """The private key hoop logs in with (``credential``), or None. :class:`ConfigError` names the reference
    when it cannot be resolved or is not a private key (without a passphrase); never the key."""
    if res.credential is None:
        return None
    try:
        return asyncssh.import_private_key(res.credential.resolve(environ))
    except (asyncssh.KeyImportError, ValueError):
        raise ConfigError(f"resource {res.name}: credential {res.credential.describe()} "
                          "is not a readable private key") from None


class _Client(asyncssh.SSHClient):
    def __init__(self, pinned: list[asyncssh.SSHKey]) -> None:
        self._pinned = {k.public_data for k in pinned}
        self.offered: str | None = None

    def validate_host_public_key(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
        self.offered = key.get_fingerprint()
        return key.public_data in self._pinned


async def connect(res: SshResource, environ: Mapping[str, str], *, timeout: float = 15.0,
                  context: str = "", agent_relay: str | None = None) -> asyncssh.SSHClientConnection:
    """Open the upstream SSH connection for ``res``. Raises UpstreamError or ConfigError.

    ``agent_relay``: the socket the host's agent channels are forwarded to (agent forwarding on).
    It is never used to log in: hoop authenticates with the held credential only (``agent_path=None``).
    """
    host, port = res.host_port(22)
    pinned = pinned_keys(res, host, port)
    if not pinned:
        raise UpstreamError(f"no pinned host key for {res.name} ({host}:{port}); refusing to connect",
                            code="host_key")
    client = _Client(pinned)
    key = client_key(res, environ)
    keys = [key] if key is not None else []
    password: str | None = None
    if res.password is not None:
        password = res.password.resolve(environ)
    algs = list(dict.fromkeys(a.decode() for k in pinned for a in k.sig_algorithms))
    try:
        tunnel: Any = _Direct()
        conn = await asyncssh.connect(
            host, port, tunnel=tunnel, username=res.user, client_factory=lambda: client, known_hosts=([], [], []),
            server_host_key_algs=algs, client_keys=keys or None, password=password,
            agent_path=None, agent_forwarding=agent_relay or False,
            preferred_auth=("publickey", "password", "keyboard-interactive"),
            connect_timeout=timeout, login_timeout=timeout, config=None,
            encryption_algs=tuning.UPSTREAM_CIPHERS, compression_algs=tuning.UPSTREAM_COMPRESSION)
    except asyncssh.HostKeyNotVerifiable:
        pins = ", ".join(k.get_fingerprint() for k in pinned)
        log.error("%s upstream=%s host key %s does not match the pinned key (%s): refusing", context,
                  res.name, client.offered, pins)
        raise UpstreamError(f"the host key of {res.name} ({host}:{port}) is {client.offered or 'unknown'}, "
                            f"which does not match the pinned key {pins}; refusing to connect "
                            "(update host_key / known_hosts if the change is expected)",
                            code="host_key") from None
    except asyncssh.PermissionDenied:
        log.error("%s upstream=%s refused hoop's held credential", context, res.name)
        raise UpstreamError(f"{res.name} refused hoop's held credential", code="upstream_auth") from None
    except (OSError, asyncssh.Error, TimeoutError) as exc:
        log.error("%s upstream=%s connect failed: %s", context, res.name, type(exc).__name__)
        raise UpstreamError(f"cannot reach {res.name} ({host}:{port}): {type(exc).__name__}",
                            code="upstream_unreachable") from None
    return conn
