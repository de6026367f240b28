"""Sealed credential pickup: a request made with a pickup key on one replica, approved on another,
is collected from a third, once; the store never holds the secret readable."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from sqlalchemy import text
from typer.testing import CliRunner

from broker import sealing
from broker.api import build_api
from broker.api_inbox import SecretInbox
from broker.apiclient import register
from broker.events import Broadcast
from broker.identity import HttpFetcher, TokenVerifier
from broker.service import Service
from broker.store import Store
from tests.api.conftest import Harness, harness, store_url


class OtherReplica:
    """A second API replica: its own store engine, service, event bus and in-memory inbox."""

    def __init__(self, h: Harness, url: str) -> None:
        self.h = h
        self.store = Store.from_url(url)
        self.fetcher = HttpFetcher()
        bus = Broadcast()
        self.service = Service(h.service.config, self.store, h.clock, bus)
        inbox = SecretInbox(h.clock, self.store)
        bus.add(inbox)
        self.app = build_api(self.service, h.service.config, TokenVerifier(h.service.config, self.fetcher, h.clock),
                             h.clock, inbox=inbox)
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> OtherReplica:
        root = web.Application()
        root.add_subapp("/api/v1", self.app)
        self.runner = web.AppRunner(root, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}/api/v1"
        return self

    async def call(self, method: str, path: str, who: str, json_body: Any = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.h.token(who)}"}
        async with aiohttp.ClientSession() as http, http.request(method, self.url + path, json=json_body,
                                                                 headers=headers) as resp:
            return resp.status, await resp.json(content_type=None)

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
        await self.fetcher.close()
        await self.store.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def pair(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[Harness, OtherReplica, str]]:
    url = store_url(request, tmp_path, "pickup")
    async with harness(url) as h:
        other = await OtherReplica(h, url).start()
        try:
            yield h, other, url
        finally:
            await other.close()


async def everything_stored(store: Store) -> str:
    """Every row of every table, as text: a secret must not be found in it."""
    dump = []
    async with store.engine.connect() as conn:
        for table in ("requests", "grants", "pickups", "audit_log", "approvals"):
            rows = (await conn.execute(text(f"SELECT * FROM {table}"))).all()
            dump.append(json.dumps([list(map(str, r)) for r in rows]))
    return "\n".join(dump)


async def test_sealed_pickup_from_any_replica_once(pair: tuple[Harness, OtherReplica, str]) -> None:
    h, other, _ = pair
    private, public = sealing.new_keypair()
    status, req = await h.call("POST", "/requests", "ci-runner",
                               json={"resource": "reports-db", "reason": "sealed", "pickup_key": public})
    assert status == 201, req
    status, body = await other.call("POST", f"/requests/{req['id']}/approve", "bob@example.com")
    assert status == 200 and body["granted"] is True  # approved on the other replica

    status, cred = await h.call("POST", f"/requests/{req['id']}/credential", "ci-runner")  # collected on the first
    assert status == 200 and cred["secret"] is None and cred["hints"] == {}, cred
    opened = json.loads(sealing.unseal(private, cred["sealed"], req["id"]))
    grant = await h.service.authenticate(cred["login"], opened["secret"], "reports-db")
    assert grant.id == body["grant"]["id"] and opened["hints"]
    assert opened["secret"] not in await everything_stored(h.store)

    for replica in (h.call, other.call):
        status, again = await replica("POST", f"/requests/{req['id']}/credential", "ci-runner")
        assert (status, again["error"]) == (409, "collected") and "already collected" in again["message"]


async def test_pickup_key_errors_and_the_memory_fallback(pair: tuple[Harness, OtherReplica, str]) -> None:
    h, other, _ = pair
    for bad, why in (("too-short", "not base64url"), ("AAAA", "32 bytes")):
        status, body = await h.call("POST", "/requests", "ci-runner",
                                    json={"resource": "reports-db", "reason": "x", "pickup_key": bad})
        assert (status, body["field"]) == (422, "pickup_key") and why in body["message"], body
    # without a pickup key, only the replica that issued the grant holds the credential
    _, req = await h.call("POST", "/requests", "ci-runner", json={"resource": "reports-db", "reason": "x"})
    await other.call("POST", f"/requests/{req['id']}/approve", "bob@example.com")
    status, body = await h.call("POST", f"/requests/{req['id']}/credential", "ci-runner")
    assert (status, body["error"]) == (409, "collected") and "pickup_key" in body["message"]
    status, cred = await other.call("POST", f"/requests/{req['id']}/credential", "ci-runner")
    assert status == 200 and cred["secret"].startswith("hoop_") and cred["sealed"] is None


async def test_a_box_whose_grant_ended_is_emptied(pair: tuple[Harness, OtherReplica, str]) -> None:
    h, other, _ = pair
    _, public = sealing.new_keypair()
    _, req = await h.call("POST", "/requests", "ci-runner",
                          json={"resource": "reports-db", "reason": "x", "pickup_key": public})
    _, body = await other.call("POST", f"/requests/{req['id']}/approve", "bob@example.com")
    status, _ = await other.call("POST", f"/grants/{body['grant']['id']}/revoke", "bob@example.com", {"reason": "no"})
    assert status == 200
    async with h.store.engine.connect() as conn:
        row = (await conn.execute(text("SELECT sealed FROM pickups WHERE request_id = :r"), {"r": req["id"]})).one()
    assert row[0] is None
    status, body = await h.call("POST", f"/requests/{req['id']}/credential", "ci-runner")
    assert status == 409


async def test_cli_request_then_collect_later_with_the_kept_key(pair: tuple[Harness, OtherReplica, str],
                                                                tmp_path: Path) -> None:
    h, other, _ = pair
    app = __import__("typer").Typer()
    register(app)
    keys = tmp_path / "keys"
    conn = ["--api", h.url, "--token", h.token("ci-runner"), "--pickup-dir", str(keys)]

    def cli(*args: str) -> Any:
        return CliRunner().invoke(app, list(args), catch_exceptions=False)

    result = await asyncio.to_thread(cli, "request", "reports-db", "20m", "later", *conn, "--json")
    assert result.exit_code == 0, result.output
    rid = json.loads(result.stdout)["request"]["id"]
    key_file = keys / f"{rid}.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    await other.call("POST", f"/requests/{rid}/approve", "bob@example.com")
    other_conn = ["--api", other.url, "--token", h.token("ci-runner"), "--pickup-dir", str(keys)]
    result = await asyncio.to_thread(cli, "status", rid, "--collect", *other_conn, "--json")
    assert result.exit_code == 0, result.output
    cred = json.loads(result.stdout)["credential"]
    assert (await h.service.authenticate(cred["login"], cred["secret"], "reports-db")).request_id == rid
    assert not key_file.exists()  # used once, then gone
    # a box sealed to a key this machine does not hold: a clear message, not a traceback
    _, public = sealing.new_keypair()
    _, req = await h.call("POST", "/requests", "ci-runner",
                          json={"resource": "reports-db", "reason": "x", "pickup_key": public})
    await h.call("POST", f"/requests/{req['id']}/approve", "bob@example.com")
    result = await asyncio.to_thread(cli, "status", req["id"], "--collect", *conn)
    assert result.exit_code == 1 and "sealed to a pickup key" in result.stderr


async def test_a_request_granted_at_once_is_sealed_at_issue(tmp_path: Path) -> None:
    # no approval steps: the grant is issued inside POST /requests, so the pickup key must be stored by then
    scratch = {"name": "scratch-db", "kind": "postgres", "address": "127.0.0.1:5432", "credential": {"env": "PGPW"},
               "request": {"groups": ["eng"]}, "approval": []}
    async with harness(f"sqlite+aiosqlite:///{tmp_path / 'hoop.db'}",
                       config_overrides={"resources": [scratch]}) as h:
        private, public = sealing.new_keypair()
        status, req = await h.call("POST", "/requests", "ci-runner",
                                   json={"resource": "scratch-db", "reason": "at once", "pickup_key": public})
        assert status == 201 and req["status"] == "approved", req
        async with h.store.engine.connect() as conn:
            row = (await conn.execute(text("SELECT sealed FROM pickups WHERE request_id = :r"),
                                      {"r": req["id"]})).one()
        assert row[0] is not None  # sealed when issued, not left waiting for ever
        status, cred = await h.call("POST", f"/requests/{req['id']}/credential", "ci-runner")
        assert status == 200 and cred["secret"] is None and cred["sealed"], cred
        opened = json.loads(sealing.unseal(private, cred["sealed"], req["id"]))
        assert (await h.service.authenticate(cred["login"], opened["secret"], "scratch-db")).request_id == req["id"]
        assert opened["secret"] not in await everything_stored(h.store)
