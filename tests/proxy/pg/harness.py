"""A real hoop PostgreSQL proxy in front of the session's throwaway cluster, for the tests and the bench."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.clock import Clock, SystemClock
from broker.config import parse_config
from broker.events import Broadcast, RecordingNotifier
from broker.model import Grant, Identity
from broker.service import GrantHooks, Service
from broker.store import Store
from proxy.access import Gate
from proxy.pg.server import PgProxy
from proxy.sessions import SessionHub
from tests.support.pgcluster import PgCluster

ROOT = Identity(email="root@example.com", groups=frozenset({"admins"}))
#: an admin who may decide reviews of the harness's grant (ROOT may not: it issued that break-glass grant)
OPS = Identity(email="ops@example.com", groups=frozenset({"admins"}))

SEED = """
CREATE TABLE users (id int PRIMARY KEY, name text, email text, card text, note text);
INSERT INTO users SELECT i, 'user' || i, 'user' || i || '@example.com', '4111 1111 1111 1111', 'n' || i
  FROM generate_series(1, 50) i;
CREATE TABLE big (id int, a text, b text, c text);
INSERT INTO big SELECT i, 'alice' || i || '@corp.example', 'x' || i, 'plain' FROM generate_series(1, 2000) i;
"""


def resource(cluster: PgCluster, database: str, **extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "prod-db", "kind": "postgres", "address": f"{cluster.host}:{cluster.port}", "database": database,
        "user": cluster.user, "credential": {"env": "PGPW"}, "sslmode": "disable",
        "request": {"groups": ["eng"], "max_duration": "4h", "default_duration": "30m"},
        "guardrails": {"rules": [
            {"name": "no-drop", "action": "block", "statements": ["drop", "truncate"]},
            {"name": "no-file-read", "action": "block", "functions": ["pg_read_file", "lo_export"]},
            {"name": "careful-delete", "action": "review", "statements": ["delete"]},
        ]},
        "masking": {"columns": [{"match": "users.note", "strategy": "redact"},
                                {"match": "card", "strategy": "partial"}]},
    }
    data.update(extra)
    return data


@dataclass
class Hoop:
    port: int
    proxy: PgProxy
    service: Service
    hub: SessionHub
    store: Store
    notifier: RecordingNotifier
    grant: Grant
    secret: str
    database: str
    cluster: PgCluster

    def dsn(self, secret: str | None = None, login: str | None = None, database: str = "prod-db") -> str:
        return (f"postgresql://{login or self.grant.login}:{secret or self.secret}@127.0.0.1:{self.port}/{database}"
                "?sslmode=disable")

    def env(self, secret: str | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(PGHOST="127.0.0.1", PGPORT=str(self.port), PGUSER=self.grant.login,
                   PGPASSWORD=secret or self.secret, PGDATABASE="prod-db", PGSSLMODE="disable")
        return env

    async def psql(self, *args: str, stdin: str | None = None, secret: str | None = None,
                   timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run psql without blocking the event loop the proxy runs on."""
        proc = await asyncio.create_subprocess_exec(
            str(self.cluster.bindir / "psql"), "-X", "-At", *args, env=self.env(secret),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            async with asyncio.timeout(timeout):
                out, err = await proc.communicate(stdin.encode() if stdin else b"")
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        return subprocess.CompletedProcess(["psql", *args], proc.returncode or 0, out.decode(), err.decode())

    async def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        await self.hub.flush()
        out = []
        async with self.store.tx() as tx:
            for s in await tx.list_sessions():
                for ev in await tx.events(s.id):
                    if kind is None or ev.kind == kind:
                        out.append(ev.data)
        return out


def seeded_database(cluster: PgCluster) -> str:
    db = cluster.create_database("pgproxy")
    cluster.psql(SEED, database=db)
    return db


@asynccontextmanager
async def running_hoop(cluster: PgCluster, database: str, tmp: Path, *, clock: Clock | None = None,
                       duration: str = "1h", hooks: GrantHooks | None = None,
                       config_extra: dict[str, Any] | None = None,
                       **resource_extra: Any) -> AsyncIterator[Hoop]:
    """hoop's PostgreSQL proxy for ``database``; ``resource_extra`` goes into the resource's config,
    ``config_extra`` into the top level (``tls``, say)."""
    from tests.conftest import base_config

    config = parse_config(base_config(resources=[resource(cluster, database, **resource_extra)],
                                      state_dir=str(tmp / "state"), **(config_extra or {})))
    store = Store.from_url(f"sqlite+aiosqlite:///{tmp / 'hoop.db'}")
    await store.migrate()
    clock = clock or SystemClock()
    notifier = RecordingNotifier()
    broadcast = Broadcast()
    service = Service(config, store, clock, broadcast, hooks)
    gate = Gate(service, clock)
    hub = SessionHub(service, clock, flush_every=0.05)
    for sub in (notifier, gate, hub):
        broadcast.add(sub)
    proxy = PgProxy(config, gate, hub, clock, {"PGPW": cluster.password}, hash_key=b"k" * 32)
    port = await proxy.start("127.0.0.1", 0)
    grant, secret = await service.breakglass(ROOT, "prod-db", "alice@example.com", duration, "tests")
    try:
        yield Hoop(port, proxy, service, hub, store, notifier, grant, secret, database, cluster)
    finally:
        await proxy.stop()
        await hub.close_all()
        await store.close()
