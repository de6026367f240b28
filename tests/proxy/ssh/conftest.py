"""Fixtures for the SSH proxy: a real OpenSSH sshd upstream, the real gate and session hub,
hoop's SSH proxy on a loopback port, and helpers to run OpenSSH ``ssh`` against it."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from broker.clock import Clock, SystemClock
from broker.config import HoopConfig, parse_config
from broker.events import Broadcast, RecordingNotifier
from broker.model import Grant, Identity
from broker.service import GrantHooks, Service
from broker.store import Store
from proxy.access import Gate
from proxy.contracts import AccessGate
from proxy.sessions import SessionHub
from proxy.ssh.server import SshProxy
from tests.conftest import base_config
from tests.support.sshd import Sshd, sshd

pytestmark = pytest.mark.ssh

ADMIN = Identity(email="root@example.com", groups=frozenset({"admins"}))
#: another admin, who may decide reviews of the grants ADMIN issues (ADMIN may not: it is behind them)
OPS = Identity(email="ops@example.com", groups=frozenset({"admins"}))
SECRET_TEXT = "card 4111 1111 1111 1111 mail alice@example.com\n"


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    with sshd(tmp_path_factory.mktemp("sshd")) as server:
        (server.dir / "secret.txt").write_text(SECRET_TEXT)
        yield server


def ssh_resource(up: Sshd, name: str = "web", **extra: Any) -> dict[str, Any]:
    res: dict[str, Any] = {
        "name": name, "kind": "ssh", "address": up.address, "user": up.user, "credential": {"env": "UPKEY"},
        "host_key": up.host_key_line, "channel": "C1",
        "request": {"groups": ["eng"], "max_duration": "4h", "default_duration": "30m"},
        "guardrails": {"rules": [
            {"name": "no-rm-root", "action": "block", "commands": ["rm -rf /"]},
            {"name": "no-shutdown", "action": "block", "commands": ["shutdown", "reboot"]},
        ]},
    }
    res.update(extra)
    return res


def make_config(up: Sshd, *resources: dict[str, Any]) -> HoopConfig:
    data = base_config()
    data["resources"] = [*data["resources"], *(resources or (ssh_resource(up),))]
    return parse_config(data)


@dataclass
class Env:
    up: Sshd
    config: HoopConfig
    service: Service
    hub: SessionHub
    proxy: SshProxy
    port: int
    state: Path
    notifier: RecordingNotifier

    async def grant(self, resource: str = "web", duration: str = "30m") -> tuple[Grant, str]:
        return await self.service.breakglass(ADMIN, resource, "alice@example.com", duration, "test")

    def ssh_argv(self, login: str, *args: str, tty: bool = False) -> list[str]:
        return ["sshpass", "-e", "ssh", "-p", str(self.port), "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "PubkeyAuthentication=no", "-o", "LogLevel=ERROR",
                "-o", "PreferredAuthentications=password,keyboard-interactive",
                "-tt" if tty else "-T", f"{login}@127.0.0.1", *args]

    async def ssh(self, login: str, secret: str, *args: str, stdin: bytes = b"",
                  tty: bool = False) -> tuple[int, bytes, bytes]:
        proc = await asyncio.create_subprocess_exec(
            *self.ssh_argv(login, *args, tty=tty), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env={**os.environ, "SSHPASS": secret})
        out, err = await asyncio.wait_for(proc.communicate(stdin), 30)
        assert proc.returncode is not None
        return proc.returncode, out, err

    async def client(self, login: str, secret: str) -> asyncssh.SSHClientConnection:
        return await asyncssh.connect("127.0.0.1", self.port, username=login, password=secret, known_hosts=None,
                                      client_keys=None, agent_path=None, config=None,
                                      preferred_auth=("password",))


async def start_env(up: Sshd, tmp: Path, config: HoopConfig,
                    wrap_gate: Callable[[Gate], AccessGate] | None = None, *, clock: Clock | None = None,
                    hooks: GrantHooks | None = None, environ: dict[str, str] | None = None) -> tuple[Env, Store]:
    """Start hoop's SSH proxy against ``up``; ``wrap_gate`` puts a test's gate around the real one; ``clock``
    (the system's by default) and ``hooks`` go to the service; ``environ`` adds to the proxy's environment
    (where credential references are resolved)."""
    store = Store.from_url(f"sqlite+aiosqlite:///{tmp / 'hoop.db'}")
    await store.migrate()
    clock = clock or SystemClock()
    bus = Broadcast()
    notifier = RecordingNotifier()
    bus.add(notifier)
    service = Service(config, store, clock, bus, hooks)
    hub = SessionHub(service, clock, spool_dir=tmp / "spool", flush_every=0.05)
    gate = Gate(service, clock)
    bus.add(hub)
    bus.add(gate)
    proxy = SshProxy(config, wrap_gate(gate) if wrap_gate else gate, hub, clock,
                     {"UPKEY": up.client_key.read_text(), **(environ or {})}, tmp / "state")
    try:
        port = await proxy.start("127.0.0.1", 0)
    except BaseException:
        await hub.close_all()
        await store.close()
        raise
    return Env(up, config, service, hub, proxy, port, tmp / "state", notifier), store


async def stop_env(env: Env, store: Store) -> None:
    await env.proxy.stop()
    await env.hub.close_all()
    await store.close()


@pytest.fixture
async def env(upstream: Sshd, tmp_path: Path) -> AsyncIterator[Env]:
    e, store = await start_env(upstream, tmp_path, make_config(upstream))
    try:
        yield e
    finally:
        await stop_env(e, store)
