"""The API over real HTTP: a local OIDC issuer, a real Service over SQLite (or PostgreSQL),
and the API mounted on the broker's own web app, all on 127.0.0.1 port 0."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from broker.api import api_of, build_api
from broker.clock import FakeClock
from broker.config import HoopConfig, parse_config
from broker.events import Broadcast, RecordingNotifier
from broker.identity import HttpFetcher, TokenVerifier
from broker.metrics import Metrics
from broker.service import Service
from broker.store import Store
from broker.web import build_web
from tests.conftest import base_config
from tests.support.oidc import AUDIENCE, LocalIssuer

AGENTS = [
    {"subject": "client-ci-runner", "name": "ci-runner", "acts_for": "alice@example.com", "groups": ["eng"]},
    {"subject": "client-migration", "name": "migration-script"},
    {"subject": "client-third", "name": "third-hop"},
    {"subject": "client-stranger", "name": "stranger-bot", "groups": ["eng"]},
    {"subject": "client-dba-team", "name": "dba-team-bot", "acts_for": "dba", "groups": ["eng"]},
]


def api_config(issuer_url: str, **overrides: Any) -> HoopConfig:
    data = base_config()
    data["resources"] = [*data["resources"], {
        "name": "reports-db", "kind": "postgres", "address": "127.0.0.1:5432", "credential": {"env": "PGPW"},
        "request": {"groups": ["eng"], "max_duration": "4h"}, "approval": [{"from": "eng", "count": 1}],
    }]
    data["oidc"] = {"issuer": issuer_url, "audience": AUDIENCE, "agents": AGENTS}
    data.update(overrides)
    return parse_config(data)


@dataclass
class Harness:
    url: str
    issuer: LocalIssuer
    service: Service
    store: Store
    clock: FakeClock
    verifier: TokenVerifier
    events: RecordingNotifier
    http: aiohttp.ClientSession
    app: web.Application

    def token(self, who: str, **kw: Any) -> str:
        """``who`` is an email (a person) or an agent name from AGENTS."""
        for agent in AGENTS:
            if agent["name"] == who:
                return self.issuer.mint(agent["subject"], **kw)
        return self.issuer.mint(f"user-{who}", email=who, **kw)

    async def call(self, method: str, path: str, who: str | None = None, *, json: Any = None,
                   headers: dict[str, str] | None = None, data: bytes | None = None) -> tuple[int, Any]:
        h = dict(headers or {})
        if who is not None:
            h["Authorization"] = f"Bearer {self.token(who)}"
        async with self.http.request(method, self.url + path, json=json, data=data, headers=h) as resp:
            body = await resp.json(content_type=None)
            return resp.status, body


def store_url(request: pytest.FixtureRequest, tmp_path: Path, prefix: str) -> str:
    """The store URL for a fixture parametrised with ``sqlite`` / ``postgres``."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'hoop.db'}"
    cluster = request.getfixturevalue("pg")
    return str(cluster.sqlalchemy_url(cluster.create_database(prefix)))


@contextlib.asynccontextmanager
async def harness(database_url: str, *, config_overrides: dict[str, Any] | None = None) -> AsyncIterator[Harness]:
    clock = FakeClock()
    issuer = await LocalIssuer(clock).start()
    store = Store.from_url(database_url)
    await store.migrate()
    fetcher = HttpFetcher()
    runner: web.AppRunner | None = None
    http = aiohttp.ClientSession()
    try:
        config = api_config(issuer.url, **(config_overrides or {}))
        events = RecordingNotifier()
        service = Service(config, store, clock, Broadcast([events]))
        verifier = TokenVerifier(config, fetcher, clock)
        web_app = build_web(store, Metrics())
        api = build_api(service, config, verifier, clock)
        web_app.add_subapp("/api/v1", api)
        runner = web.AppRunner(web_app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/api/v1"
        assert api_of(api).inbox is not None
        yield Harness(url=url, issuer=issuer, service=service, store=store, clock=clock, verifier=verifier,
                      events=events, http=http, app=api)
    finally:
        await http.close()
        if runner is not None:
            await runner.cleanup()
        await fetcher.close()
        await store.close()
        await issuer.close()


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    async with harness(f"sqlite+aiosqlite:///{tmp_path / 'hoop.db'}") as hh:
        yield hh
