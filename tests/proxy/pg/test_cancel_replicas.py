"""Cross-replica cancel: two real hoop PostgreSQL proxies, each with its own broker replica and
LISTEN/NOTIFY fan-out on one real PostgreSQL store, behind a round-robin balancer. A client's
CancelRequest that lands on the replica not holding its session still cancels the query; a
wrong key cancels nothing and is answered with nothing; a flood of forged CancelRequests is
bounded before it becomes NOTIFYs."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from broker.clock import SystemClock
from broker.config import parse_config
from broker.events import Broadcast
from broker.fanout import CHANNEL, Replicas, asyncpg_dsn
from broker.model import Grant
from broker.service import Service
from broker.store import Store
from proxy.access import Gate
from proxy.pg import codec
from proxy.pg.server import PgProxy
from proxy.sessions import SessionHub
from tests.conftest import base_config
from tests.proxy.pg.harness import ROOT, resource
from tests.support.balancer import RoundRobin
from tests.support.pgcluster import PgCluster

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

CANCEL_RATE, CANCEL_BURST = 5.0, 10


@dataclass
class Node:
    store: Store
    service: Service
    hub: SessionHub
    replicas: Replicas
    proxy: PgProxy
    port: int

    async def close(self) -> None:
        await self.proxy.stop()
        await self.hub.close_all()
        await self.replicas.close()
        await self.store.close()


async def start_node(config: Any, url: str, password: str) -> Node:
    clock = SystemClock()
    store = Store.from_url(url)
    bus = Broadcast()
    service = Service(config, store, clock, bus)
    gate = Gate(service, clock)
    hub = SessionHub(service, clock, flush_every=0.05)
    for sub in (gate, hub):
        bus.add(sub)
    replicas = Replicas(store, asyncpg_dsn(url), [hub, gate], live=lambda: [s.grant for s in hub.live()],
                        retry_every=0.2, resync_every=3600, cancel_rate=CANCEL_RATE, cancel_burst=CANCEL_BURST)
    bus.add(replicas)
    # the same hash key on both, as `hoop state init` shares the masking key between replicas
    proxy = PgProxy(config, gate, hub, clock, {"PGPW": password}, hash_key=b"k" * 32, peers=replicas)
    replicas.on_cancel = proxy.cancel_by_digest
    await replicas.start()
    port = await proxy.start("127.0.0.1", 0)
    return Node(store, service, hub, replicas, proxy, port)


@dataclass
class Pair:
    a: Node
    b: Node
    lb: RoundRobin
    grant: Grant
    secret: str
    heard: list[dict[str, Any]]
    pg: PgCluster

    def dsn(self) -> str:
        return (f"host=127.0.0.1 port={self.lb.port} user={self.grant.login} password={self.secret} "
                "dbname=prod-db sslmode=disable gssencmode=disable")

    def cancels(self) -> list[dict[str, Any]]:
        return [m for m in self.heard if m.get("k") == "cancel"]


@pytest.fixture
async def pair(pg: PgCluster, pgdb: str, tmp_path: Path) -> AsyncIterator[Pair]:
    config = parse_config(base_config(resources=[resource(pg, pgdb)], state_dir=str(tmp_path / "state")))
    url = pg.sqlalchemy_url(pg.create_database("cancel_store"))
    first = Store.from_url(url)
    await first.migrate()
    await first.close()
    a = await start_node(config, url, pg.password)
    b = await start_node(config, url, pg.password)
    heard: list[dict[str, Any]] = []
    listener = await asyncpg.connect(asyncpg_dsn(url))
    await listener.add_listener(CHANNEL, lambda _c, _p, _ch, payload: heard.append(json.loads(payload)))
    lb = RoundRobin([a.port, b.port])  # the session goes to a, the client's CancelRequest to b
    await lb.start()
    grant, secret = await a.service.breakglass(ROOT, "prod-db", "alice@example.com", "1h", "tests")
    try:
        yield Pair(a, b, lb, grant, secret, heard, pg)
    finally:
        await lb.close()
        await listener.close()
        await a.close()
        await b.close()


async def running(cluster: PgCluster, query: str) -> None:
    """Wait until ``query`` runs upstream."""
    conn = await asyncpg.connect(cluster.dsn())
    try:
        for _ in range(200):
            if await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query = $1",
                                   query):
                return
            await asyncio.sleep(0.05)
    finally:
        await conn.close()
    raise AssertionError(f"{query!r} never started upstream")


async def raw_cancel(port: int, pid: int, key: bytes) -> bytes:
    """Send one CancelRequest; returns all the proxy answered before closing."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(codec.encode_cancel_request(pid, key))
        await writer.drain()
        async with asyncio.timeout(5):
            return await reader.read()
    finally:
        writer.close()


async def cancel_through_b(p: Pair) -> float:
    """Run pg_sleep(30) on replica a, cancel it with psycopg through the balancer (so on b);
    returns how long the query took to end after the cancel."""
    conn = await psycopg.AsyncConnection.connect(p.dsn(), autocommit=True)
    try:
        sql = "SELECT pg_sleep(30)"
        query = asyncio.create_task(conn.execute(sql))
        await running(p.pg, sql)
        began = time.monotonic()
        await conn.cancel_safe(timeout=10)
        with pytest.raises(psycopg.errors.QueryCanceled) as info:
            async with asyncio.timeout(10):
                await query
        took = time.monotonic() - began
        assert info.value.sqlstate == "57014"
        assert (await (await conn.execute("SELECT 1")).fetchone()) == (1,)  # the session goes on
    finally:
        await conn.close()
    return took


async def test_cancel_sent_to_another_replica_cancels_the_query(pair: Pair,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="proxy.pg.server")
    took = await cancel_through_b(pair)
    assert took < 2.0, took
    assert pair.lb.routed[:2] == [pair.a.port, pair.b.port]  # the session on a, the cancel on b
    [sent] = pair.cancels()
    assert sent["r"] == pair.b.replicas.replica and set(sent) == {"k", "d", "f", "r"}
    assert len(bytes.fromhex(sent["d"])) == 32  # a digest, never (pid, key)
    assert "cancel request received by another replica" in caplog.text


async def test_wrong_key_on_another_replica_cancels_nothing(pair: Pair) -> None:
    conn = await psycopg.AsyncConnection.connect(pair.dsn(), autocommit=True)
    try:
        sql = "SELECT pg_sleep(1.5)"
        query = asyncio.create_task(conn.execute(sql))
        await running(pair.pg, sql)
        pid, wrong = conn.info.backend_pid, b"\x01\x02\x03\x04"
        # like PostgreSQL, no answer at all: the connection just closes
        assert await raw_cancel(pair.b.port, pid, wrong) == b""
        assert await raw_cancel(pair.b.port, pid, bytes(32)) == b""  # a 3.2-size key: hoop never issues one
        assert await raw_cancel(pair.b.port, 0, wrong) == b""  # nor pid 0
        async with asyncio.timeout(10):
            cur = await query
        assert await cur.fetchone() == ("",)  # ran to its end: nothing was cancelled
    finally:
        await conn.close()
    [sent] = pair.cancels()  # only the 4-byte key went out, and only as a digest
    assert wrong.hex() not in json.dumps(sent) and str(pid) not in json.dumps(sent)


async def test_unknown_key_flood_is_bounded(pair: Pair, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="broker.fanout")
    began = time.monotonic()
    answers = await asyncio.gather(*(raw_cancel(pair.b.port, 1000 + i, b"evil") for i in range(150)))
    elapsed = time.monotonic() - began
    assert set(answers) == {b""}
    await asyncio.sleep(0.5)  # let the NOTIFYs that went out arrive
    sent = len(pair.cancels())
    assert CANCEL_BURST <= sent <= CANCEL_BURST + CANCEL_RATE * elapsed + 1, (sent, elapsed)
    assert "not passed on to the other replicas" in caplog.text
    # the bound refills: a real cancel through b works again
    await asyncio.sleep(1 / CANCEL_RATE)
    assert await cancel_through_b(pair) < 2.0


async def test_a_replica_with_another_masking_key_is_logged_once(pair: Pair,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="proxy.pg.server")
    # a digest from a replica whose masking key differs: it can never match, so say so (once)
    for _ in range(3):
        pair.a.proxy.cancel_by_digest(bytes(32), "0badf00d")
    assert caplog.text.count("their masking keys differ") == 1
