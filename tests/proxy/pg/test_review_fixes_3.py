"""Review 2 of the PostgreSQL proxy, findings 1, 4, 6 and 7, end to end through hoop.

- 1: ``UPDATE pg_settings`` is refused by ``hoop-lexer``; a text the server would read otherwise
  with ``standard_conforming_strings=off`` is refused, so a change made by a function cannot
  smuggle a pipelined statement through; the statements in flight when hoop ends a session are
  recorded.
- 4: common client start-up settings (``options``, ``search_path``, timeouts) are passed on.
- 6: ``RESET`` / ``TO DEFAULT`` of the settings hoop pins is allowed.
- 7: the ``max_row_bytes`` error names the message that was too long.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from pathlib import Path

import asyncpg
import pytest

from broker.errors import HoopError
from proxy.pg import codec
from proxy.pg.messages import Backend
from proxy.pg.params import parse_options, startup_params
from tests.proxy.pg.harness import Hoop, running_hoop
from tests.proxy.pg.test_cursors_and_prepare import Msg, Wire, errors
from tests.support.pgcluster import PgCluster

pytestmark = pytest.mark.postgres


async def _until_closed(c: Wire, ready: int = 0) -> list[Msg]:
    """Messages up to the ``ready``-th ReadyForQuery (0: until the connection closes or 5 s pass)."""
    out: list[Msg] = []
    with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError, TimeoutError):
        async with asyncio.timeout(5):
            while not ready or sum(t == Backend.READY_FOR_QUERY for t, _ in out) < ready:
                out.append(await c.message())
    with contextlib.suppress(ConnectionError):
        await c.close()
    return out


# ---- 1: standard_conforming_strings ------------------------------------------------------------------

async def test_a_setting_changed_behind_the_guard_cannot_change_how_a_pipelined_statement_is_read(
        pg: PgCluster, pgdb: str, hoop: Hoop) -> None:
    pg.psql("DROP TABLE IF EXISTS victim1; CREATE TABLE victim1 (id int)", database=pgdb)
    c = await Wire.connect(hoop)
    update = "UPDATE pg_settings SET setting = 'off' WHERE name = 'standard_conforming_strings'"
    c.writer.write(codec.encode_query(update) + codec.encode_query("SELECT 'x\\''; DROP TABLE victim1; --'"))
    msgs = await _until_closed(c, ready=2)
    assert [e["C"] for e in errors(msgs)] == ["42501", "42501"], errors(msgs)
    assert pg.psql("SELECT count(*) FROM victim1", database=pgdb) == "0"
    records = {e["sql"]: e for e in await hoop.events("statement")}
    refused = records[update]
    assert (refused["decision"], refused["rule"]) == ("block", "hoop-lexer")
    assert any("victim1" in s and e["decision"] == "block" for s, e in records.items())
    assert (await hoop.psql("-c", "SHOW standard_conforming_strings")).stdout.strip() == "on"


async def test_a_function_that_turns_the_setting_off_cannot_smuggle_a_pipelined_statement_and_both_are_recorded(
        pg: PgCluster, pgdb: str, hoop: Hoop) -> None:
    pg.psql("DROP TABLE IF EXISTS victim2; CREATE TABLE victim2 (id int); "
            "CREATE OR REPLACE FUNCTION scs_off() RETURNS text LANGUAGE sql AS "
            "$$ SELECT set_config('standard_conforming_strings', 'off', false) $$", database=pgdb)
    c = await Wire.connect(hoop)
    smuggle = "SELECT 'x\\''; DROP TABLE victim2; --'"
    c.writer.write(codec.encode_query("SELECT scs_off()") + codec.encode_query(smuggle))
    msgs = await _until_closed(c)
    fatal = [e for e in errors(msgs) if e.get("S") == "FATAL"]
    assert fatal and fatal[0]["C"] == "42501" and "standard_conforming_strings" in fatal[0]["M"], errors(msgs)
    assert pg.psql("SELECT count(*) FROM victim2", database=pgdb) == "0"  # not dropped
    records = {e["sql"]: e for e in await hoop.events("statement")}
    ran = records["SELECT scs_off()"]  # in flight when hoop ended the session
    assert ran["error"].startswith("session ended by hoop:") and "standard_conforming_strings" in ran["error"]
    assert (records[smuggle]["decision"], records[smuggle]["rule"]) == ("block", "on_unparsed")


async def test_a_regex_with_a_backslash_still_runs(hoop: Hoop) -> None:
    conn = await asyncpg.connect(hoop.dsn())
    try:
        assert await conn.fetchval("SELECT 'a1' ~ '^a\\d$'") is True
        assert await conn.fetchval("SELECT regexp_replace('a  b', '\\s+', ' ', 'g')") == "a b"
    finally:
        await conn.close()


# ---- 4: start-up settings -----------------------------------------------------------------------------

@pytest.mark.parametrize(("options", "settings"), [
    ("", []),
    ("  -c search_path=app  ", [("search_path", "app")]),
    ("-csearch_path=a\\ b --statement-timeout=5s", [("search_path", "a b"), ("statement_timeout", "5s")]),
    ("-c TimeZone=UTC\t-c enable_seqscan=off", [("TimeZone", "UTC"), ("enable_seqscan", "off")]),
    ("-c a\\\\b=c", [("a\\b", "c")]),
])
def test_parse_options(options: str, settings: list[tuple[str, str]]) -> None:
    assert parse_options(options) == settings


@pytest.mark.parametrize(("params", "passed"), [
    ({"options": "-c search_path=app -c statement_timeout=5s -c jit=off"},
     {"search_path": "app", "statement_timeout": "5s", "jit": "off"}),
    ({"options": "-c search_path=opt", "search_path": "explicit"}, {"search_path": "explicit"}),  # as the server
    ({"currentSchema": "x"}, None),  # pgjdbc sends it as search_path; the name itself is no setting
    ({"options": "-c standard_conforming_strings=off"}, "standard_conforming_strings"),
    ({"options": "-c client_encoding=SJIS"}, "client_encoding"),
    ({"options": "-c session_replication_role=replica"}, "session_replication_role"),
    ({"options": "-c app.tenant=1"}, "app.tenant"),
    ({"options": "-c role=admin"}, "role"),
    ({"options": "-F"}, "-F"),
    ({"options": "endpoint=ep-1"}, "endpoint=ep-1"),
    ({"options": "-c statement_timeout"}, "statement_timeout"),
])
def test_start_up_settings(params: dict[str, str], passed: dict[str, str] | str | None) -> None:
    if isinstance(passed, dict):
        assert startup_params({"user": "u", **params}) == passed
        return
    with pytest.raises(HoopError) as info:
        startup_params({"user": "u", **params})
    assert info.value.sqlstate == "42501" and (passed or next(iter(params))) in info.value.message


async def _psql(hoop: Hoop, pgoptions: str, sql: str) -> subprocess.CompletedProcess[str]:
    proc = await asyncio.create_subprocess_exec(
        str(hoop.cluster.bindir / "psql"), "-X", "-At", "-c", sql, env={**hoop.env(), "PGOPTIONS": pgoptions},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(30):
        out, err = await proc.communicate()
    return subprocess.CompletedProcess(["psql"], proc.returncode or 0, out.decode(), err.decode())


async def test_common_start_up_settings_are_accepted(hoop: Hoop) -> None:
    conn = await asyncpg.connect(hoop.dsn(), server_settings={"search_path": "public", "statement_timeout": "5s",
                                                              "jit": "off"})
    try:
        assert await conn.fetchval("SHOW statement_timeout") == "5s"
        assert await conn.fetchval("SHOW standard_conforming_strings") == "on"
    finally:
        await conn.close()
    r = await _psql(hoop, "-c search_path=public -c statement_timeout=7s", "SHOW statement_timeout")
    assert (r.returncode, r.stdout.strip()) == (0, "7s"), r.stderr
    r = await _psql(hoop, "-c default_transaction_read_only=off", "SELECT 1")
    assert r.returncode != 0 and "default_transaction_read_only" in r.stderr, r.stderr
    opened = await hoop.events("open")
    assert any(e.get("params", {}).get("statement_timeout") == "7s" for e in opened), opened


# ---- 6: back to the pinned value ----------------------------------------------------------------------

async def test_reset_of_a_pinned_setting_is_allowed(hoop: Hoop) -> None:
    c = await Wire.connect(hoop)
    try:
        for sql in ("RESET client_encoding", "SET client_encoding TO DEFAULT", "RESET standard_conforming_strings",
                    "SET standard_conforming_strings TO DEFAULT"):
            assert not errors(await c.query(sql)), sql
        refused = errors(await c.query("SET backslash_quote = safe_encoding"))
        assert refused and refused[0]["C"] == "42501" and "hoop-lexer" in refused[0]["M"]
    finally:
        await c.close()


# ---- 7: the max_row_bytes message ---------------------------------------------------------------------

async def test_the_max_row_bytes_error_names_the_message_that_was_too_long(pg: PgCluster, pgdb: str,
                                                                           tmp_path: Path) -> None:
    async with running_hoop(pg, pgdb, tmp_path, max_row_bytes=1 << 20) as hoop:
        # the error quotes the value: an ErrorResponse over the cap
        out = await hoop.psql("-v", "VERBOSITY=verbose", "-c", "SELECT repeat('x', 2000000)::int")
        assert out.returncode != 0 and "54000" in out.stderr and "ErrorResponse" in out.stderr, out.stderr
        assert "result row" not in out.stderr
        out = await hoop.psql("-c", "SELECT repeat('x', 2000000)")
        assert "result row (DataRow)" in out.stderr and "max_row_bytes" in out.stderr, out.stderr
