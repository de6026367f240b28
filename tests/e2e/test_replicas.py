"""Two real `hoop serve` replicas on one PostgreSQL store: psql's Ctrl-C that a balancer sends to
the replica not holding the session still cancels the query; `hoop revoke` in a third process
cuts a live psql session held open by the replica that did not revoke, at once (LISTEN/NOTIFY);
exactly one replica leads the scheduler, and the other takes over when the leader stops; replicas
sharing one state_dir recover only their own spool after a crash."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from broker.model import Session, SessionStatus
from broker.store import Store
from tests.conftest import base_config
from tests.e2e.test_restart import run, start_serve, stop_serve
from tests.support.balancer import RoundRobin
from tests.support.pgcluster import PgCluster, free_port

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


async def wait_for_text(path: Path, text: str, seconds: float) -> None:
    for _ in range(int(seconds / 0.05)):
        if text in path.read_text():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{text!r} not in {path.name}:\n{path.read_text()}")


async def test_revocation_reaches_a_session_on_another_replica(pg: PgCluster, tmp_path: Path) -> None:
    upstream = pg.create_database("e2e_up")
    pg.psql("CREATE TABLE t (id int); INSERT INTO t VALUES (1)", database=upstream)
    store_db = pg.create_database("e2e_store")
    data: dict[str, Any] = base_config()
    data["resources"][0].update(address=f"127.0.0.1:{pg.port}", database=upstream, user=pg.user,
                                credential={"env": "PGPW"}, sslmode="disable")
    data["masking_key"] = {"env": "MASKKEY"}  # replicas share it (hoop state init): cancel digests are keyed by it
    replicas: list[tuple[Path, dict[str, str], int]] = []
    for name in ("a", "b"):
        home = tmp_path / name
        home.mkdir()
        (home / "hoop.yaml").write_text(yaml.safe_dump(data))
        # every listener on a port chosen here: a port-0 listener of replica a could otherwise take the
        # ephemeral port just picked for replica b
        pg_port = free_port()
        env = {**os.environ, "HOOP_DATABASE_URL": pg.sqlalchemy_url(store_db), "PGPW": pg.password, "MASKKEY": "m" * 32,
               "HOOP_HTTP_PORT": str(free_port()), "HOOP_PG_PORT": str(pg_port),
               "HOOP_SSH_PORT": str(free_port()), "HOOP_HTTP_PROXY_PORT": str(free_port()),
               "PYTHONPATH": str(Path(__file__).parents[2])}
        for key in ("SLACK_APP_TOKEN", "SLACK_BOT_TOKEN", "SLACK_SIGNING_SECRET"):
            env.pop(key, None)
        replicas.append((home, env, pg_port))
    (home_a, env_a, port_a), (home_b, env_b, port_b) = replicas
    await run("db", "upgrade", env=env_a, cwd=home_a)
    procs: list[asyncio.subprocess.Process] = []
    psql: asyncio.subprocess.Process | None = None
    try:
        procs.append((await start_serve(env_a, home_a, int(env_a["HOOP_HTTP_PORT"]), "serve.log"))[0])
        procs.append((await start_serve(env_b, home_b, int(env_b["HOOP_HTTP_PORT"]), "serve.log"))[0])
        assert "(scheduler leader)" in (home_a / "serve.log").read_text()
        assert "follower" in (home_b / "serve.log").read_text()

        grant = json.loads(await run("breakglass", "--resource", "prod-db", "--identity", "root@example.com",
                                     "--duration", "1h", "--reason", "replicas", "--json", env=env_a, cwd=home_a))
        psql = await asyncio.create_subprocess_exec(
            "psql", "-X", "-At", f"host=127.0.0.1 port={port_b} user={grant['login']} dbname=prod-db sslmode=disable",
            env={**os.environ, "PGPASSWORD": grant["secret"]}, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        assert psql.stdin is not None and psql.stdout is not None and psql.stderr is not None
        psql.stdin.write(b"SELECT id FROM t;\n")
        await psql.stdin.drain()
        assert (await asyncio.wait_for(psql.stdout.readline(), 20)).strip() == b"1"

        # psql's Ctrl-C through a balancer: the session is on b, the CancelRequest lands on a
        lb = RoundRobin([port_b, port_a])
        await lb.start()
        try:
            sleeper = await asyncio.create_subprocess_exec(
                "psql", "-X", "-At", "-c", "SELECT pg_sleep(30)",
                f"host=127.0.0.1 port={lb.port} user={grant['login']} dbname=prod-db sslmode=disable",
                env={**os.environ, "PGPASSWORD": grant["secret"]}, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE)
            await asyncio.sleep(1.5)  # let the query start upstream
            sleeper.send_signal(signal.SIGINT)
            began = time.monotonic()
            _, err = await asyncio.wait_for(sleeper.communicate(), 10)
            assert b"canceling statement due to user request" in err, err
            assert time.monotonic() - began < 3.0
            assert lb.routed == [port_b, port_a]
        finally:
            await lb.close()

        began = time.monotonic()
        await run("revoke", grant["grant"], "--as", "root@example.com", "--reason", "replica test",
                  env=env_a, cwd=home_a)
        store = Store.from_url(env_a["HOOP_DATABASE_URL"])
        closed: Session | None = None
        try:
            for _ in range(200):
                async with store.tx() as tx:
                    rows = await tx.list_sessions(status=SessionStatus.CLOSED)
                # not the Ctrl-C session above, which its client closed
                closed = next((r for r in rows if r.grant_id == grant["grant"]
                               and r.close_reason != "client closed the connection"), None)
                if closed is not None:
                    break
                await asyncio.sleep(0.05)
        finally:
            await store.close()
        cut = time.monotonic() - began
        assert closed is not None and "access revoked" in (closed.close_reason or ""), closed
        # well inside the 5 s resync sweep: the notification did it (the CLI's start-up included)
        assert cut < 4.5, cut
        psql.stdin.write(b"SELECT id FROM t;\n")
        psql.stdin.close()
        out, err = await asyncio.wait_for(psql.communicate(), 20)
        assert out == b"" and b"access revoked" in err, (out, err)

        await stop_serve(procs[0])  # the leader goes away; b takes the advisory lock
        await wait_for_text(home_b / "serve.log", "this replica is now the scheduler leader", 15)
    finally:
        if psql is not None and psql.returncode is None:
            psql.kill()
            await psql.wait()
        for proc in procs:
            await stop_serve(proc)


async def _psql(port: int, grant: dict[str, Any]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        "psql", "-X", "-At", f"host=127.0.0.1 port={port} user={grant['login']} dbname=prod-db sslmode=disable",
        env={**os.environ, "PGPASSWORD": grant["secret"]}, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


async def _select(psql: asyncio.subprocess.Process) -> bytes:
    assert psql.stdin is not None and psql.stdout is not None
    psql.stdin.write(b"SELECT id FROM t;\n")
    await psql.stdin.drain()
    return (await asyncio.wait_for(psql.stdout.readline(), 20)).strip()


async def test_a_replica_killed_mid_session_on_a_shared_state_dir(pg: PgCluster, tmp_path: Path) -> None:
    """Two replicas on one host share one state_dir, as `hoop state init` makes it. The leader is killed
    (SIGKILL) with a session open: the other leads at once; the killed one, restarted, recovers its own
    session's spool and closes it, but leaves alone the session the other replica is still serving (it
    once closed that one too and deleted its spool, while its client went on working)."""
    upstream = pg.create_database("e2e_up")
    pg.psql("CREATE TABLE t (id int); INSERT INTO t VALUES (1)", database=upstream)
    store_db = pg.create_database("e2e_store")
    data: dict[str, Any] = base_config(state_dir=str(tmp_path / "state"))
    data["resources"][0].update(address=f"127.0.0.1:{pg.port}", database=upstream, user=pg.user,
                                credential={"env": "PGPW"}, sslmode="disable")
    (tmp_path / "hoop.yaml").write_text(yaml.safe_dump(data))
    envs = []
    for _ in range(2):
        env = {**os.environ, "HOOP_DATABASE_URL": pg.sqlalchemy_url(store_db), "PGPW": pg.password,
               "HOOP_HTTP_PORT": str(free_port()), "HOOP_PG_PORT": str(free_port()),
               "HOOP_SSH_PORT": str(free_port()), "HOOP_HTTP_PROXY_PORT": str(free_port()),
               "PYTHONPATH": str(Path(__file__).parents[2])}
        for key in ("SLACK_APP_TOKEN", "SLACK_BOT_TOKEN", "SLACK_SIGNING_SECRET"):
            env.pop(key, None)
        envs.append(env)
    env_a, env_b = envs
    await run("db", "upgrade", env=env_a, cwd=tmp_path)
    await run("state", "init", env=env_a, cwd=tmp_path)
    procs: list[asyncio.subprocess.Process] = []
    clients: list[asyncio.subprocess.Process] = []
    store = Store.from_url(env_a["HOOP_DATABASE_URL"])
    try:
        a = (await start_serve(env_a, tmp_path, int(env_a["HOOP_HTTP_PORT"]), "a.log"))[0]
        procs.append(a)
        procs.append((await start_serve(env_b, tmp_path, int(env_b["HOOP_HTTP_PORT"]), "b.log"))[0])
        assert "(scheduler leader)" in (tmp_path / "a.log").read_text()
        grant = json.loads(await run("breakglass", "--resource", "prod-db", "--identity", "root@example.com",
                                     "--duration", "1h", "--reason", "shared state", "--json", env=env_a,
                                     cwd=tmp_path))
        on_a, on_b = await _psql(int(env_a["HOOP_PG_PORT"]), grant), await _psql(int(env_b["HOOP_PG_PORT"]), grant)
        clients += [on_a, on_b]
        assert await _select(on_a) == b"1" and await _select(on_b) == b"1"
        assert len(list((tmp_path / "state" / "spool").glob("*.jsonl"))) == 2

        a.kill()
        await a.wait()
        await wait_for_text(tmp_path / "b.log", "this replica is now the scheduler leader", 15)
        procs.append((await start_serve(env_a, tmp_path, int(env_a["HOOP_HTTP_PORT"]), "a2.log"))[0])
        assert "recovered the recordings of 1 session(s)" in (tmp_path / "a2.log").read_text()
        assert await _select(on_b) == b"1"  # still served by b, and still recorded
        async with store.tx() as tx:
            rows = await tx.list_sessions()
        assert len(rows) == 2
        closed = [r for r in rows if r.status is SessionStatus.CLOSED]
        (dead,) = closed
        assert dead.close_reason == "hoop stopped while the session was open"
        assert [r.status for r in rows if r is not dead] == [SessionStatus.OPEN]
        async with store.tx() as tx:
            events = await tx.events(dead.id)
        assert events[-1].kind == "close" and dead.closed_at == events[-1].at
        assert len(list((tmp_path / "state" / "spool").glob("*.jsonl"))) == 1  # b's, still written
    finally:
        await store.close()
        for client in clients:
            if client.returncode is None:
                client.kill()
                await client.wait()
        for proc in procs:
            await stop_serve(proc)
