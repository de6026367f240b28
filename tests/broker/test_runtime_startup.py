"""``hoop serve`` restarting on PostgreSQL: the replica takes the scheduler lead at start-up and
acts at once on what fell due while hoop was down. Everything that must hear those events (the
Slack notifier above all: the credential DM is shown once) is on the bus before that happens."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from broker.clock import FakeClock
from broker.config import Settings, parse_config
from broker.errors import ConfigError, StoreUnavailable
from broker.events import Broadcast
from broker.model import Approval, Identity
from broker.runtime import build_runtime, serve_forever
from broker.service import Service
from broker.store import Store
from broker.store.urls import engine_args, redact_url
from tests.conftest import base_config
from tests.support.fakeslack import FakeSlack
from tests.support.pgcluster import PgCluster
from tests.support.pgwire import auth_asked

pytestmark = pytest.mark.postgres

ALICE = Identity(email="alice@example.com", groups=frozenset({"eng"}), slack_id="UALICE")
DANA = Identity(email="dana@example.com", groups=frozenset({"dba"}), slack_id="UDANA")
SAM = Identity(email="sam@example.com", groups=frozenset({"security"}), slack_id="USAM")


async def _left_by_the_last_process(url: str, config_data: dict[str, object]) -> None:
    """An overdue grant (card 100.1) and a request whose quorum was committed but not yet
    decided when the process stopped (card 200.1)."""
    config = parse_config(config_data)
    past = FakeClock(datetime.now(UTC) - timedelta(hours=2))
    store = Store.from_url(url)
    await store.migrate()
    try:
        svc = Service(config, store, past, Broadcast())
        r1 = await svc.request(ALICE, "prod-db", "30m", "r1")
        await svc.set_card(r1.id, "C1", "100.1")
        await svc.approve(r1.id, DANA)
        await svc.approve(r1.id, SAM)  # granted for 30 minutes, two hours ago
        past.set(datetime.now(UTC) - timedelta(minutes=5))
        r2 = await svc.request(ALICE, "prod-db", "30m", "r2")
        await svc.set_card(r2.id, "C1", "200.1")
        async with store.tx() as tx:
            for who, groups in ((DANA, ("dba",)), (SAM, ("security",))):
                await tx.add_approval(r2.id, Approval(approver=who.email, groups=groups, at=past.now(),
                                                      via="reaction", chain=who.chain))
    finally:
        await store.close()


@contextlib.asynccontextmanager
async def _serving(data: dict[str, object], settings: Settings) -> AsyncIterator[list[str]]:
    """``hoop serve`` (``serve_forever``) until the block ends: the lines it said, once it is ready."""
    said: list[str] = []
    ready, stop = asyncio.Event(), asyncio.Event()

    def say(line: str) -> None:
        said.append(line)
        if line == "hoop: ready":
            ready.set()

    task = asyncio.create_task(serve_forever(parse_config(data), settings, say, stop=stop))
    try:
        await asyncio.wait_for(ready.wait(), 60)
        yield said
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


async def test_leader_catch_up_at_start_reaches_slack(pg: PgCluster, tmp_path: Path) -> None:
    url = pg.sqlalchemy_url(pg.create_database("startup"))
    data = base_config(state_dir=str(tmp_path / "state"), listen={"http": 0, "postgres": 0, "ssh": 0,
                                                                 "http_proxy": 0})
    await _left_by_the_last_process(url, data)
    fake = await FakeSlack(users={"UALICE": {"email": "alice@example.com", "name": "Alice"}}).start()
    settings = Settings(database_url=url, slack_bot_token="xoxb-t", slack_signing_secret="s",
                        slack_api_url=fake.api_url, environ={"PGPW": "pw"})
    try:
        async with _serving(data, settings) as said:
            assert "hoop: this replica is now the scheduler leader" in said
    finally:
        await fake.stop()

    posts = fake.of("chat.postMessage")
    dms = [c for c in posts if c.params.get("channel") == "DUALICE"]
    assert [c.params["users"] for c in fake.of("conversations.open")] == ["UALICE"]
    assert len(dms) == 1 and "Access granted" in dms[0].params["text"]
    assert any("Granted until" in str(c.params.get("text")) for c in posts if c.params.get("thread_ts") == "200.1")
    assert any("Expired" in str(c.params.get("text")) for c in posts if c.params.get("thread_ts") == "100.1")
    updated = {c.params["ts"]: json.dumps(c.params) for c in fake.of("chat.update")}
    assert "Approved" in updated["200.1"] and "hoop_approve" not in updated["200.1"]
    assert "Expired" in updated["100.1"]


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql+asyncpg://hoop:s3cret@db/hoop", "postgresql+asyncpg://hoop:***@db/hoop"),
    ("postgresql+asyncpg://db/hoop?user=hoop&password=s3cret&ssl=require",
     "postgresql+asyncpg://db/hoop?user=hoop&password=***&ssl=require"),
    ("postgresql+asyncpg://hoop@db/hoop?sslpassword=s3cret", "postgresql+asyncpg://hoop:***@db/hoop?sslpassword=***"),
    ("sqlite+aiosqlite:///hoop.db", "sqlite+aiosqlite:///hoop.db"),
])
def test_the_printed_store_url_hides_every_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown


@pytest.mark.parametrize("url", ["postgresql+asyncpg://hoop:s3cret@db:54x2/hoop", "postgres://hoop:s3cret@db:54x2/hoop",
                                 "hoop:s3cret@db", "mysql://hoop:s3cret@db/hoop", "sqlite:///hoop.db"])
def test_an_unusable_store_url_is_a_config_error_naming_the_variable(url: str, tmp_path: Path) -> None:
    """Once a traceback (ValueError, ArgumentError, ModuleNotFoundError) at every command; a sync driver
    (``sqlite:///``, the URL a SQLite user writes first) still was: InvalidRequestError."""
    config = parse_config(base_config(state_dir=str(tmp_path / "state")))
    with pytest.raises(ConfigError) as exc:
        build_runtime(config, Settings(database_url=url, environ={"PGPW": "pw"}))
    assert exc.value.message.startswith("HOOP_DATABASE_URL ") and "s3cret" not in exc.value.message


def test_a_libpq_style_store_url_is_handed_to_asyncpg_whole() -> None:
    assert engine_args("postgres://u:p@h/db") == ("postgresql+asyncpg://u:p@h/db", {})
    url = "postgresql://u:p@h:5/db?sslmode=verify-full&sslrootcert=/ca.pem&prepared_statement_cache_size=0"
    assert engine_args(url) == ("postgresql+asyncpg://u:p@h:5/db?prepared_statement_cache_size=0",
            {"dsn": "postgresql://?sslmode=verify-full&sslrootcert=%2Fca.pem"})
    assert engine_args("postgresql+asyncpg://u:p@h/db?ssl=require") == \
        ("postgresql+asyncpg://u:p@h/db", {"dsn": "postgresql://?sslmode=require"})
    assert engine_args("sqlite+aiosqlite:///hoop.db") == ("sqlite+aiosqlite:///hoop.db", {})


async def test_a_store_url_as_a_cloud_console_prints_it_works(pg: PgCluster) -> None:
    """``postgresql://…?sslmode=…&application_name=…``: the dialect passed every query parameter to asyncpg
    as a keyword argument, and ``sslmode`` (on nearly every managed PostgreSQL's URL) was a TypeError
    traceback at every command. libpq's parameters now reach asyncpg as a DSN, read as libpq reads them."""
    database = pg.create_database("libpqurl")
    plain = pg.sqlalchemy_url(database).replace("postgresql+asyncpg://", "postgresql://")
    store = Store.from_url(plain + "?sslmode=disable&application_name=hoop-store-test")
    try:
        await store.migrate()
        async with store.tx() as tx:
            assert await tx.list_sessions() == []
            names = (await tx.conn.exec_driver_sql("SELECT application_name FROM pg_stat_activity "
                                                   "WHERE pid = pg_backend_pid()")).scalar_one()
        assert names == "hoop-store-test"
    finally:
        await store.close()
    away = Store.from_url(plain.replace("postgresql://", "postgres://") + "?sslmode=require")  # no TLS here
    try:
        with pytest.raises(StoreUnavailable) as exc:
            await away.reachable()
        assert "cannot reach the store" in exc.value.message and pg.password not in exc.value.message
    finally:
        await away.close()


@pytest.mark.parametrize("cleartext", [False, True])
async def test_tls_cleartext_in_tls_reaches_the_postgresql_proxy(tmp_path: Path, cleartext: bool) -> None:
    """``tls.cleartext_in_tls`` is read by ``hoop serve`` and handed to the PostgreSQL proxy: inside TLS a
    client is then asked for a cleartext password (its secret is protected by TLS), else for SCRAM."""
    data = base_config(state_dir=str(tmp_path / "state"),
                       listen={"host": "127.0.0.1", "http": 0, "postgres": 0, "ssh": 0, "http_proxy": 0})
    data["tls"] = {"cleartext_in_tls": cleartext}
    settings = Settings(database_url=f"sqlite+aiosqlite:///{tmp_path / 'hoop.db'}", environ={"PGPW": "pw"})
    async with _serving(data, settings) as said:
        port = int(next(line for line in said if line.startswith("hoop: PostgreSQL proxy on")).rsplit(":", 1)[1])
        code = await auth_asked(port, "alice.nobody", tls=True)
    assert code == (3 if cleartext else 10)  # AuthenticationCleartextPassword, else AuthenticationSASL
