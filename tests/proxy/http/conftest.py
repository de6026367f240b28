"""Fixtures: an aiohttp upstream, the broker on SQLite, the real gate and session hub, the HTTP proxy."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from broker import policy
from broker.clock import FakeClock
from broker.config import HoopConfig, parse_config
from broker.events import Broadcast, RecordingNotifier
from broker.model import Grant, Identity
from broker.service import GrantHooks, Service
from broker.store import Store
from proxy.access import Gate
from proxy.http import HttpProxy
from proxy.sessions import SessionHub
from tests.conftest import base_config
from tests.proxy.http.upstream import Upstream

UPSTREAM_TOKEN = "upstream-held-token-0123456789"


@dataclass
class Env:
    config: HoopConfig
    service: Service
    hub: SessionHub
    clock: FakeClock
    notifier: RecordingNotifier
    upstream: Upstream
    proxy: HttpProxy
    port: int

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def who(self, email: str) -> Identity:
        return Identity(email=email, groups=policy.groups_of(self.config, email))

    async def grant(self, resource: str = "k8s", duration: str = "30m") -> tuple[Grant, str]:
        return await self.service.breakglass(self.who("root@example.com"), resource, "alice@example.com",
                                             duration, "testing the http proxy")


def http_resources(address: str) -> list[dict[str, Any]]:
    return [
        {"name": "k8s", "kind": "http", "address": address, "credential": {"env": "K8S_TOKEN"},
         "guardrails": {"rules": [
             {"name": "no-namespace-delete", "action": "block", "methods": ["DELETE"],
              "paths": ["/api/v1/namespaces/*"]},
             {"name": "patch-needs-review", "action": "review", "methods": ["PATCH"],
              "paths": ["/api/v1/namespaces/*"]},
         ], "review_timeout": "2s"},
         "masking": {"json_keys": [{"match": "password"}, {"match": "*token*", "strategy": "partial"}]},
         "max_body_record": 4096},
        {"name": "basic-api", "kind": "http", "address": address, "auth": "basic", "username": "svc",
         "credential": {"env": "K8S_TOKEN"}},
        {"name": "header-api", "kind": "http", "address": address + "/", "auth": "header", "header": "X-Api-Key",
         "credential": {"env": "K8S_TOKEN"}, "masking": {"enabled": False}},
        {"name": "unset-api", "kind": "http", "address": address, "credential": {"env": "UNSET_TOKEN"}},
    ]


async def make_env(tmp_path: Path, *, upstream_tls: ssl.SSLContext | None = None,
                   resources: Callable[[str], list[dict[str, Any]]] = http_resources,
                   clock: FakeClock | None = None, hooks: GrantHooks | None = None,
                   **proxy_kw: Any) -> AsyncIterator[Env]:
    """The whole HTTP path; ``upstream_tls`` serves the upstream over https, ``resources`` makes the
    HTTP resources from its base URL."""
    upstream = Upstream()
    address = await upstream.start(upstream_tls)
    data = base_config()
    data["groups"]["admins"]["members"] = [*data["groups"]["admins"]["members"], "ops@example.com"]
    data["resources"] = data["resources"] + resources(address)
    config = parse_config(data)
    store = Store.from_url(f"sqlite+aiosqlite:///{tmp_path / 'hoop.db'}")
    await store.migrate()
    clock = clock or FakeClock()
    recorder = RecordingNotifier()
    bus = Broadcast([recorder])
    service = Service(config, store, clock, bus, hooks)
    gate = Gate(service, clock)
    hub = SessionHub(service, clock, spool_dir=tmp_path / "spool", flush_every=0.05)
    bus.add(gate)
    bus.add(hub)
    proxy = HttpProxy(config, gate, hub, clock, {"K8S_TOKEN": UPSTREAM_TOKEN}, **proxy_kw)
    port = await proxy.start("127.0.0.1", 0)
    try:
        yield Env(config, service, hub, clock, recorder, upstream, proxy, port)
    finally:
        await proxy.stop()
        await hub.close_all()
        await upstream.stop()
        await store.close()


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    async for e in make_env(tmp_path):
        yield e


async def curl(*args: str, timeout: float = 30.0) -> tuple[int, bytes, bytes]:
    """Run curl; returns (exit status, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec("curl", "-sS", *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out, err


async def answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """The status and body of one HTTP/1.1 answer with a Content-Length, read from a raw connection."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    status = int(head.split(b" ", 2)[1])
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    return status, await asyncio.wait_for(reader.readexactly(length), 10)
