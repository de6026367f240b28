"""The broker's own HTTP endpoints over real HTTP: /healthz and /metrics."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from broker.clock import FakeClock
from broker.config import HoopConfig
from broker.events import Broadcast
from broker.metrics import Metrics
from broker.model import Identity
from broker.service import Service
from broker.store import Store
from broker.web import build_web

ALICE = Identity(email="alice@example.com", groups=frozenset({"eng"}))
DANA = Identity(email="dana@example.com", groups=frozenset({"dba"}))
SAM = Identity(email="sam@example.com", groups=frozenset({"security"}))
ROOT = Identity(email="root@example.com", groups=frozenset({"admins"}))


@pytest.fixture
async def served(store: Store) -> AsyncIterator[tuple[str, Metrics]]:
    metrics = Metrics()
    runner = web.AppRunner(build_web(store, metrics), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", metrics
    finally:
        await runner.cleanup()


async def _gauge(url: str, name: str) -> float:
    async with aiohttp.ClientSession() as http, http.get(url + "/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    return float(next(line for line in text.splitlines() if line.startswith(name + " ")).split()[1])


async def test_active_grants_gauge_counts_the_store_not_this_process(
        served: tuple[str, Metrics], store: Store, config: HoopConfig, clock: FakeClock) -> None:
    """A grant issued by another replica (or before a restart) and ended here once made the gauge -1."""
    url, metrics = served
    elsewhere = Service(config, store, clock, Broadcast())
    here = Service(config, store, clock, Broadcast([metrics]))
    req = await elsewhere.request(ALICE, "prod-db", "30m", "fix invoice")
    await elsewhere.approve(req.id, DANA)
    result = await elsewhere.approve(req.id, SAM)
    assert result.grant is not None
    assert await _gauge(url, "hoop_grants_active") == 1
    await here.revoke(result.grant.id, ROOT, "done")
    assert await _gauge(url, "hoop_grants_active") == 0
