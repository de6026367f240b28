"""The connection from hoop to the resource's host, with the held credential and a pinned host key.

The private key (``credential``) or password (``password``) is resolved from its
:class:`~broker.config.SecretRef` at connect time and handed to asyncssh only; it never
reaches a log line or an error message. The host key is pinned: ``host_key`` in config, or
the entries for the host in a ``known_hosts`` file. hoop checks the key itself (asyncssh's
``validate_host_public_key`` hook) so that a refusal can name what was offered: an unknown
or changed key fails with :class:`~broker.errors.UpstreamError` code ``host_key``, whose
message gives the offered key's fingerprint and the pinned ones.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import asyncssh

from broker.config import SshResource
from broker.errors import ConfigError, UpstreamError
from proxy.ssh import tuning

__all__ = ["connect", "pinned_keys"]

log = logging.getLogger(__name__)


def pinned_keys(res: SshResource, host: str, port: int) -> list[asyncssh.SSHKey]:
    """The host keys ``res`` trusts for ``host:port``. Raises :class:`ConfigError` if unreadable."""
    keys: list[asyncssh.SSHKey] = []
    try:
        if res.host_key:
            keys.append(asyncssh.import_public_key(res.host_key))
        if res.known_hosts is not None:
            known = asyncssh.read_known_hosts(str(res.known_hosts))
            keys.extend(known.match(host, host, port)[0])
    except (OSError, asyncssh.KeyImportError, ValueError) as exc:
        raise ConfigError(f"resource {res.name}: pinned host key cannot be read: {exc}") from None
    return keys


class _Client(asyncssh.SSHClient):
    def __init__(self, pinned: list[asyncssh.SSHKey]) -> None:
        self._pinned = {k.public_data for k in pinned}
        self.offered: str | None = None

    def validate_host_public_key(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
        self.offered = key.get_fingerprint()
        return key.public_data in self._pinned


async def connect(res: SshResource, environ: Mapping[str, str], *, timeout: float = 15.0,
                  context: str = "") -> asyncssh.SSHClientConnection:
    """Open the upstream SSH connection for ``res``. Raises UpstreamError or ConfigError."""
    host, port = res.host_port(22)
    pinned = pinned_keys(res, host, port)
    if not pinned:
        raise UpstreamError(f"no pinned host key for {res.name} ({host}:{port}); refusing to connect",
                            code="host_key")
    client = _Client(pinned)
    keys: list[asyncssh.SSHKey] = []
    password: str | None = None
    if res.credential is not None:
        try:
            keys.append(asyncssh.import_private_key(res.credential.resolve(environ)))
        except (asyncssh.KeyImportError, ValueError):
            raise ConfigError(f"resource {res.name}: credential {res.credential.describe()} "
                              "is not a readable private key") from None
    if res.password is not None:
        password = res.password.resolve(environ)
    algs = list(dict.fromkeys(a.decode() for k in pinned for a in k.sig_algorithms))
    try:
        conn = await asyncssh.connect(
            host, port, username=res.user, client_factory=lambda: client, known_hosts=([], [], []),
            server_host_key_algs=algs, client_keys=keys or None, password=password,
            agent_path=None, preferred_auth=("publickey", "password", "keyboard-interactive"),
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
