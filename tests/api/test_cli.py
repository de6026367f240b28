"""``hoop request|status|revoke --api URL --token …``: the CLI talking to the API over HTTP."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import typer
from typer.testing import CliRunner, Result

from broker.apiclient import register
from tests.api.conftest import Harness


def cli() -> typer.Typer:
    app = typer.Typer()

    @app.command("revoke")
    def local_revoke() -> None:  # stands in for the local `hoop revoke --as`
        raise AssertionError("not called")

    register(app, revoke_name="revoke-api")
    register(app)  # a taken name is skipped, not duplicated
    return app


async def run(args: list[str]) -> Result:
    return await asyncio.to_thread(CliRunner().invoke, cli(), args, catch_exceptions=False)


async def test_request_wait_collect_status_and_revoke(h: Harness, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    conn = ["--api", h.url.removesuffix("/api/v1"), "--token", h.token("ci-runner")]
    waiting = asyncio.create_task(run(["request", "reports-db", "20m", "nightly", "migration", *conn,
                                       "--pickup-dir", str(keys),
                                       "--wait", "--poll", "0.05", "--timeout", "30", "--json"]))
    for _ in range(400):
        async with h.store.tx() as tx:
            pending = await tx.list_requests(requester="ci-runner")
        if pending:
            break
        await asyncio.sleep(0.01)
    assert pending and pending[0].reason == "nightly migration"
    status, _ = await h.call("POST", f"/requests/{pending[0].id}/approve", "bob@example.com")
    assert status == 200
    result = await waiting
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["request"]["chain"] == ["alice@example.com", "ci-runner"]
    cred = data["credential"]
    grant = await h.service.authenticate(cred["login"], cred["secret"], "reports-db")
    assert grant.id == data["request"]["grant_id"]
    assert list(keys.iterdir()) == []  # collected: the pickup key is gone

    result = await run(["status", *conn, "--json"])
    assert result.exit_code == 0, result.output
    listed = json.loads(result.stdout)
    assert [g["id"] for g in listed["grants"]] == [grant.id] and listed["requests"][0]["status"] == "approved"
    result = await run(["status", pending[0].id, *conn])
    assert result.exit_code == 0 and "alice@example.com → ci-runner" in result.stdout

    result = await run(["revoke-api", grant.id, *conn, "--reason", "done"])
    assert result.exit_code == 0 and f"grant {grant.id} revoked" in result.stdout
    async with h.store.tx() as tx:
        stored = await tx.get_grant(grant.id)
    assert stored is not None and stored.status.value == "revoked" and stored.end_reason == "done"


async def test_cli_errors_are_messages_not_tracebacks(h: Harness) -> None:
    conn = ["--api", h.url, "--token", h.token("carol@example.com")]
    result = await run(["request", "nope-db", "30m", "why", *conn])
    assert result.exit_code == 1 and "unknown resource 'nope-db'" in result.stderr
    result = await run(["request", "prod-db", "30m", "why", "--api", h.url, "--token", "garbage"])
    assert result.exit_code == 1 and "not a signed JWT" in result.stderr
    result = await run(["status", "--api", "http://127.0.0.1:9", "--token", "t"])
    assert result.exit_code == 1 and "cannot reach the hoop API" in result.stderr
    result = await run(["status"])
    assert result.exit_code == 2 and "--api" in result.stderr


async def test_a_wait_that_times_out_can_still_be_collected(h: Harness, tmp_path: Path) -> None:
    """The credential is sealed to this run's pickup key: when `--wait` gives up (or is interrupted),
    the key must outlive it, or the approved credential can never be opened."""
    keys = tmp_path / "keys"
    conn = ["--api", h.url, "--token", h.token("ci-runner"), "--pickup-dir", str(keys)]
    result = await run(["request", "reports-db", "20m", "slow", "approver", *conn,
                        "--wait", "--poll", "0.05", "--timeout", "0.2"])
    assert result.exit_code == 1 and "still pending after 0.2s" in result.stderr
    async with h.store.tx() as tx:
        (req,) = await tx.list_requests(requester="ci-runner")
    assert f"hoop status {req.id} --collect" in " ".join(result.stderr.split())
    status, _ = await h.call("POST", f"/requests/{req.id}/approve", "bob@example.com")
    assert status == 200
    result = await run(["status", req.id, "--collect", *conn, "--json"])
    assert result.exit_code == 0, result.output
    cred = json.loads(result.stdout)["credential"]
    assert (await h.service.authenticate(cred["login"], cred["secret"], "reports-db")).id == cred["grant"]["id"]
    assert list(keys.iterdir()) == []


async def test_an_unusable_pickup_folder_is_a_message_before_any_request(h: Harness, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    conn = ["--api", h.url, "--token", h.token("ci-runner"), "--pickup-dir", str(tmp_path / "file" / "keys")]
    result = await run(["request", "reports-db", "20m", "x", *conn])
    assert result.exit_code == 1 and "cannot use pickup folder" in result.stderr
    async with h.store.tx() as tx:
        assert await tx.list_requests(requester="ci-runner") == []


async def test_status_prints_the_apis_text_escaped_on_one_line(h: Harness) -> None:
    """A chain's names (an agent's, an identity provider's email) reach `hoop status` from the API: printed
    raw, an escape sequence or a bidi override in one would rewrite the terminal, a line feed fake a line."""
    from datetime import timedelta

    from broker.model import AccessRequest, RequestStatus, StepSpec

    now = h.clock.now()
    chain = ("carol@example.com", "bot\x1b]0;owned\x07\u202eexe", "next\nr9  prod-db  approved")
    async with h.store.tx() as tx:
        await tx.insert_request(AccessRequest(
            id="r1", resource="prod-db", requester="carol@example.com", chain=chain, duration=timedelta(minutes=30),
            reason="x", status=RequestStatus.PENDING, created_at=now, lapses_at=now + timedelta(hours=1),
            steps=(StepSpec("dba", 1),)))
    conn = ["--api", h.url, "--token", h.token("carol@example.com")]
    result = await run(["status", *conn])
    assert result.exit_code == 0, result.output
    (line,) = result.stdout.splitlines()
    assert line.startswith("r1  prod-db  pending  30m  [dba 0/1]  ")
    assert "bot\\x1b]0;owned\\x07\\u202eexe → next; r9  prod-db  approved  grant=-" in line
    exact = json.loads((await run(["status", *conn, "--json"])).stdout)
    assert exact["requests"][0]["chain"] == list(chain)


async def test_an_apis_error_message_is_one_escaped_line(tmp_path: Path) -> None:
    """The API's error message is another party's text: shown on one line, its controls escaped."""
    from aiohttp import web

    async def refuse(_: web.Request) -> web.Response:
        return web.json_response({"error": "denied", "message": "no:\n\x1b[2J\x1b[Hall clear\u202e " + "x" * 200},
                                 status=403)

    app = web.Application()
    app.router.add_get("/api/v1/requests", refuse)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        result = await run(["status", "--api", f"http://127.0.0.1:{port}", "--token", "t"])
    finally:
        await runner.cleanup()
    assert result.exit_code == 1
    assert result.stderr == "error: no:; \\x1b[2J\\x1b[Hall clear\\u202e " + "x" * 200 + "\n"
