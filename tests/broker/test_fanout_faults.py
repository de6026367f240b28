"""The fan-out connection dying silently: a TCP proxy that stops forwarding stands for a NAT entry
that expired or a failover that sent no RST. NOTIFY must not hang the bus, and a leader that can
no longer reach PostgreSQL must give up the lead so that another replica can take it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from broker.clock import FakeClock
from broker.events import GrantEnded, RecordingNotifier
from broker.fanout import LEADER_LOCK, asyncpg_dsn
from tests.broker.test_fanout import Replica, breakglass, config_without_extension_approval, eventually
from tests.support.pgcluster import PgCluster
from tests.support.tcpproxy import StallingProxy

pytestmark = pytest.mark.postgres


@pytest.fixture
async def behind_proxy(pg: PgCluster) -> AsyncIterator[tuple[Replica, Replica, StallingProxy, PgCluster]]:
    """``a`` leads and reaches PostgreSQL through the proxy for its fan-out; ``b`` follows, direct."""
    db = pg.create_database("faults")
    url = pg.sqlalchemy_url(db)
    dsn = asyncpg_dsn(url)
    assert dsn is not None
    proxy = StallingProxy(pg.host, pg.port)
    await proxy.start()
    config = config_without_extension_approval()
    clock = FakeClock()
    # op_timeout: short, so a stall is found quickly, but with room for a loaded machine (a healthy probe
    # slower than it counts as a lost connection and drops the lead)
    timing = {"retry_every": 0.2, "resync_every": 3600, "op_timeout": 1.0}
    a = Replica(config, url, dsn.replace(f":{pg.port}/", f":{proxy.port}/"), clock, **timing)
    b = Replica(config, url, dsn, clock, **timing)
    await a.store.migrate()
    await a.replicas.start()
    await b.replicas.start()
    assert a.replicas.is_leader and not b.replicas.is_leader
    try:
        yield a, b, proxy, pg
    finally:
        await a.close()
        await b.close()
        await proxy.close()


async def the_server_notices(pg: PgCluster, pid: int) -> None:
    """What the server's TCP keepalives do to a vanished peer's backend (about 30 s in production)."""
    pg.psql(f"SELECT pg_terminate_backend({pid})")


async def test_notify_on_a_stalled_connection_does_not_block_the_bus(
        behind_proxy: tuple[Replica, Replica, StallingProxy, PgCluster]) -> None:
    a, b, proxy, pg = behind_proxy
    grant = await breakglass(a, a.service.config)
    after = RecordingNotifier()  # hub, gate and the Slack notifier come after the fan-out on the bus
    a.bus.add(after)
    pid = a.replicas._conn.get_server_pid()
    proxy.stall()
    started = time.monotonic()
    await asyncio.wait_for(a.bus.publish(GrantEnded(grant=grant, request=None)), 5)
    assert time.monotonic() - started < 2.5
    assert after.of(GrantEnded) and not a.replicas.is_leader
    await eventually(lambda: not a.replicas.connected, seconds=3)  # dropped, reconnecting
    assert not b.replicas.is_leader  # the stalled backend still holds the lock, until the server notices
    await the_server_notices(pg, pid)
    await eventually(lambda: b.replicas.is_leader)
    assert b.led == 1 and not a.replicas.is_leader


async def test_a_leader_whose_connection_stalls_gives_up_the_lead(
        behind_proxy: tuple[Replica, Replica, StallingProxy, PgCluster]) -> None:
    a, b, proxy, pg = behind_proxy
    pid = a.replicas._conn.get_server_pid()
    proxy.stall()
    await eventually(lambda: not a.replicas.is_leader, seconds=3)  # no publish needed: the probe finds it
    await the_server_notices(pg, pid)
    await eventually(lambda: b.replicas.is_leader)
    await asyncio.sleep(0.5)
    assert b.replicas.is_leader and not a.replicas.is_leader and b.led == 1


async def test_a_leader_that_no_longer_holds_the_lock_gives_up_the_lead(
        behind_proxy: tuple[Replica, Replica, StallingProxy, PgCluster]) -> None:
    a, b, _proxy, _pg = behind_proxy
    await asyncio.sleep(0.5)  # several probes: a healthy leader keeps the lead
    assert a.replicas.is_leader and a.led == 1
    async with a.replicas._conn_busy:
        await a.replicas._conn.execute("SELECT pg_advisory_unlock($1)", LEADER_LOCK)
    # a gives up the lead and reconnects; then whichever replica takes the free lock first leads (on a loaded
    # machine a's reconnect can win the race with b: that is a fresh lead, counted, not a kept one)
    await eventually(lambda: b.replicas.is_leader or a.led == 2)
    await asyncio.sleep(0.5)
    assert a.replicas.is_leader != b.replicas.is_leader  # one leader
    assert (b.led, a.led) in ((1, 1), (0, 2))


async def test_the_fan_out_connection_asks_the_server_for_keepalives(
        behind_proxy: tuple[Replica, Replica, StallingProxy, PgCluster]) -> None:
    _a, b, _proxy, _pg = behind_proxy
    async with b.replicas._conn_busy:
        settings = [await b.replicas._conn.fetchval(f"SHOW {name}") for name in
                    ("tcp_keepalives_idle", "tcp_keepalives_interval", "tcp_keepalives_count", "tcp_user_timeout")]
    assert settings == ["10", "5", "3", "30000"]  # as sent: the server shows them so
