"""Start-up parameters, and the settings that decide how the server reads SQL (client_encoding,
standard_conforming_strings) or whether a read-only resource can write again.

The guard reads SQL with pglast, as UTF-8 with ``standard_conforming_strings=on``; a session
where the server reads it otherwise runs statements the guard never saw. Scenarios are sent
with a raw wire client so that the exact bytes reach hoop."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from pathlib import Path

import asyncpg
import psycopg
import pytest

from broker.errors import HoopError
from proxy.pg import codec
from proxy.pg.messages import decode_authentication, decode_fields
from proxy.pg.replies import unsafe_parameter
from proxy.pg.scram import ScramClient
from proxy.pg.server import startup_params
from tests.proxy.pg.harness import Hoop, running_hoop
from tests.support.pgcluster import PgCluster

pytestmark = pytest.mark.postgres

Msg = tuple[str, bytes]


class Raw:
    """A minimal wire client: SCRAM login, then raw messages in, messages out up to ReadyForQuery."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, hoop: Hoop, **params: str) -> Raw:
        reader, writer = await asyncio.open_connection("127.0.0.1", hoop.port)
        self = cls(reader, writer)
        writer.write(codec.encode_startup({"user": hoop.grant.login, "database": "prod-db", **params}))
        scram: ScramClient | None = None
        while True:
            t, body = await self.message()
            if t == "R":
                auth = decode_authentication(body)
                if auth.code == 10:
                    scram = ScramClient(hoop.secret, offered=auth.mechanisms)
                    writer.write(codec.encode_sasl_initial_response(scram.mechanism, scram.client_first()))
                elif auth.code == 11 and scram is not None:
                    writer.write(codec.encode_sasl_response(scram.handle_server_first(auth.data)))
                elif auth.code == 12 and scram is not None:
                    scram.handle_server_final(auth.data)
            elif t == "E":
                await self.close()
                raise RuntimeError(decode_fields(body))
            elif t == "Z":
                return self

    async def message(self) -> Msg:
        head = await self.reader.readexactly(5)
        t, n = struct.unpack("!Bi", head)
        return chr(t), await self.reader.readexactly(n - 4)

    async def query(self, sql: bytes) -> list[Msg]:
        """Send one Query (raw bytes); the messages up to ReadyForQuery, or up to the close."""
        self.writer.write(codec.frame(0x51, sql + b"\0"))
        out: list[Msg] = []
        while True:
            try:
                msg = await asyncio.wait_for(self.message(), 10)
            except (asyncio.IncompleteReadError, ConnectionError):
                out.append(("EOF", b""))
                return out
            out.append(msg)
            if msg[0] == "Z":
                return out

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await self.writer.wait_closed()


def _errors(msgs: list[Msg]) -> list[dict[str, str]]:
    return [decode_fields(body) for t, body in msgs if t == "E"]


async def _psql(hoop: Hoop, sql: str, **env: str) -> tuple[int, bytes, bytes]:
    """psql through hoop with extra libpq environment variables: (return code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(str(hoop.cluster.bindir / "psql"), "-X", "-At", "-c", sql,
                                                env={**hoop.env(), **env}, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    return proc.returncode or 0, out, err


def _exists(hoop: Hoop, table: str) -> bool:
    return hoop.cluster.psql(f"SELECT to_regclass('{table}') IS NOT NULL", database=hoop.database) == "t"


# ---- scenario A: standard_conforming_strings=off -------------------------------------------------


async def test_standard_conforming_strings_off_cannot_smuggle_a_statement(hoop: Hoop) -> None:
    hoop.cluster.psql("CREATE TABLE IF NOT EXISTS victim_scs (x int)", database=hoop.database)
    c = await Raw.connect(hoop)
    try:
        refused = _errors(await c.query(b"SET standard_conforming_strings = off"))
        assert refused and refused[0]["C"] == "42501" and "hoop-lexer" in refused[0]["M"], refused
        # pglast: one SELECT of '\'. A server with scs off: a string '\'; -- ', then DROP TABLE.
        await c.query(b"SELECT '\\'; -- '; DROP TABLE victim_scs; --")
        shown = await c.query(b"SHOW standard_conforming_strings")
        assert ("D", b"\x00\x01\x00\x00\x00\x02on") in shown
    finally:
        await c.close()
    assert _exists(hoop, "victim_scs")


async def test_lexer_settings_as_start_up_parameters_are_refused(hoop: Hoop) -> None:
    for settings in ({"standard_conforming_strings": "off"}, {"client_encoding": "SJIS"},
                     {"backslash_quote": "on"}):
        with pytest.raises(asyncpg.PostgresError) as info:
            conn = await asyncpg.connect(hoop.dsn(), server_settings=settings)
            await conn.close()
        assert info.value.sqlstate == "42501" and next(iter(settings)) in str(info.value)


# ---- scenario B: a client encoding whose second bytes can be a backslash -------------------------


async def test_client_encoding_sjis_cannot_smuggle_a_statement(hoop: Hoop) -> None:
    hoop.cluster.psql("CREATE TABLE IF NOT EXISTS victim_sjis (x int)", database=hoop.database)
    c = await Raw.connect(hoop)
    try:
        for sql in (b"SET client_encoding = 'SJIS'", b"SET NAMES 'BIG5'", b"SET client_encoding = 'SQL_ASCII'",
                    b"SELECT set_config('client_encoding', 'GBK', false)",
                    b"SELECT set_config('client_' || 'encoding', 'SJIS', false)"):
            refused = _errors(await c.query(sql))
            assert refused and refused[0]["C"] == "42501" and "hoop-lexer" in refused[0]["M"], (sql, refused)
        # UTF-8: E'ß\'; DROP ...--' is one string. SJIS: 0x9F 0x5C is one character, and DROP TABLE runs.
        await c.query(b"SELECT E'\xc3\x9f\\'; DROP TABLE victim_sjis; --'")
        assert _errors(await c.query(b"SET client_encoding = 'UTF8'")) == []  # what hoop pins anyway
    finally:
        await c.close()
    assert _exists(hoop, "victim_sjis")
    with pytest.raises(RuntimeError, match="client_encoding"):
        await Raw.connect(hoop, client_encoding="SJIS")


@pytest.mark.parametrize(("setting", "value"), [("client_encoding", "SJIS"), ("standard_conforming_strings", "off")])
async def test_a_setting_changed_behind_the_guard_ends_the_session(hoop: Hoop, setting: str, value: str) -> None:
    # a function's body is not seen by the guard: the server's ParameterStatus is the backstop
    fn = f"hoop_set_{setting}"
    hoop.cluster.psql(f"CREATE OR REPLACE FUNCTION {fn}() RETURNS text LANGUAGE sql "
                      f"AS $$ SELECT set_config('{setting}', '{value}', false) $$", database=hoop.database)
    c = await Raw.connect(hoop)
    try:
        msgs = await c.query(f"SELECT {fn}()".encode())
    finally:
        await c.close()
    fatal = _errors(msgs)
    assert fatal and fatal[-1]["S"] == "FATAL" and fatal[-1]["C"] == "42501" and setting in fatal[-1]["M"], msgs
    assert msgs[-1][0] == "EOF"
    assert not any(t == "S" and value.encode() in body for t, body in msgs)


# ---- read-only resources -------------------------------------------------------------------------


async def test_read_only_turned_off_behind_the_guard_ends_the_session(pg: PgCluster, pgdb: str,
                                                                     tmp_path: Path) -> None:
    # a function made outside hoop turns writes back on; the server reports the change (PostgreSQL 14+)
    pg.psql("CREATE OR REPLACE FUNCTION hoop_writes_on() RETURNS text LANGUAGE sql "
            "AS $$ SELECT set_config('default_transaction_read_only', 'off', false) $$", database=pgdb)
    async with running_hoop(pg, pgdb, tmp_path, guardrails={"read_only": True}) as h:
        c = await Raw.connect(h)
        try:
            msgs = await c.query(b"SELECT hoop_writes_on()")
        finally:
            await c.close()
        fatal = _errors(msgs)
        assert fatal and fatal[-1]["S"] == "FATAL" and fatal[-1]["C"] == "42501", msgs
        assert "default_transaction_read_only" in fatal[-1]["M"] and msgs[-1][0] == "EOF"
    (tmp_path / "rw").mkdir()
    async with running_hoop(pg, pgdb, tmp_path / "rw") as h:  # where writes are allowed, nothing to catch
        conn = await asyncpg.connect(h.dsn())
        try:
            assert await conn.fetchval("SELECT hoop_writes_on()") == "off"
        finally:
            await conn.close()



async def test_read_only_cannot_be_undone(pg: PgCluster, pgdb: str, tmp_path: Path) -> None:
    async with running_hoop(pg, pgdb, tmp_path, guardrails={"read_only": True}) as h:
        for name in ("default_transaction_read_only", "transaction_read_only"):
            with pytest.raises(asyncpg.PostgresError) as info:
                conn = await asyncpg.connect(h.dsn(), server_settings={name: "off"})
                await conn.close()
            assert info.value.sqlstate == "42501" and name in str(info.value)
        conn = await asyncpg.connect(h.dsn())
        try:
            assert await conn.fetchval("SHOW default_transaction_read_only") == "on"
            # each of these slipped past the former textual check
            for sql in ("BEGIN READ --x\n WRITE", "SET SESSION CHARACTERISTICS AS TRANSACTION READ/**/WRITE",
                        'SET U&"default_transaction_read_onl\\0079" = off',
                        "SET default_transaction_read_only TO DEFAULT",
                        "SELECT set_config('default_transaction_' || 'read_only', 'off', false)",
                        "SELECT pg_catalog.set_config('transaction_read_only'::text, 'off', true)"):
                with pytest.raises(asyncpg.InsufficientPrivilegeError, match=r"read_only|hoop-lexer"):
                    await conn.execute(sql)
            assert await conn.fetchval("SHOW default_transaction_read_only") == "on"
            assert await conn.fetchval("SHOW transaction_read_only") == "on"
            # turning it on, or reading, is fine
            await conn.execute("SET default_transaction_read_only = on")
            await conn.execute("BEGIN READ ONLY; SET TRANSACTION READ ONLY")
            assert await conn.fetchval("SELECT count(*) FROM users") == 50
            await conn.execute("COMMIT")
        finally:
            await conn.close()


# ---- start-up parameters in general --------------------------------------------------------------

LOGIN = {"user": "u", "database": "d"}


@pytest.mark.parametrize(("params", "passed"), [
    ({}, {}),
    ({"application_name": "x", "DateStyle": "ISO", "timezone": "UTC", "IntervalStyle": "sql_standard",
      "extra_float_digits": "3"},
     {"application_name": "x", "DateStyle": "ISO", "timezone": "UTC", "IntervalStyle": "sql_standard",
      "extra_float_digits": "3"}),
    ({"client_encoding": "'utf-8'"}, {}),  # asyncpg's spelling; served by the pin
    ({"client_encoding": "UNICODE", "replication": "false", "options": " ", "_pq_.x": "1"}, {}),
    ({"client_encoding": "SQL_ASCII"}, {}),  # libpq's "auto" in the C locale: no conversion asked
    ({"client_encoding": "SJIS"}, None),
    ({"client_encoding": "LATIN1"}, None),
    ({"standard_conforming_strings": "on"}, None),
    ({"Default_Transaction_Read_Only": "off"}, None),
    ({"options": "-c search_path=x"}, {"search_path": "x"}),
    ({"search_path": "x", "Statement_Timeout": "5s", "enable_seqscan": "off"},
     {"search_path": "x", "Statement_Timeout": "5s", "enable_seqscan": "off"}),
    ({"options": "-c default_transaction_read_only=off"}, None),
    ({"role": "x"}, None),
    ({"session_authorization": "x"}, None),
    ({"backslash_quote": "on"}, None),
])
def test_startup_params(params: dict[str, str], passed: dict[str, str] | None) -> None:
    if passed is None:
        with pytest.raises(HoopError) as info:
            startup_params({**LOGIN, **params})
        assert info.value.sqlstate == "42501" and next(iter(params)).lower() in info.value.message.lower()
    else:
        assert startup_params({**LOGIN, **params}) == passed


def test_unsafe_parameter() -> None:
    assert unsafe_parameter("client_encoding", "UTF8") is None
    assert unsafe_parameter("standard_conforming_strings", "on") is None
    assert unsafe_parameter("TimeZone", "UTC") is None
    assert "client_encoding" in (unsafe_parameter("client_encoding", "SJIS") or "")
    assert "standard_conforming_strings" in (unsafe_parameter("standard_conforming_strings", "off") or "")


async def test_session_changing_start_up_parameters_are_refused(hoop: Hoop) -> None:
    for settings in ({"role": "postgres"}, {"session_authorization": "postgres"},
                     {"default_transaction_read_only": "off"}, {"myapp.tenant": "1"}):
        with pytest.raises(asyncpg.PostgresError) as info:
            conn = await asyncpg.connect(hoop.dsn(), server_settings=settings)
            await conn.close()
        assert info.value.sqlstate == "42501" and next(iter(settings)) in str(info.value), str(info.value)
    rc, _, err = await _psql(hoop, "SELECT 1", PGOPTIONS="-c search_path=public -c role=postgres")
    assert rc != 0 and b"options" in err and b'"role"' in err, err


async def test_ordinary_clients_connect_with_harmless_parameters(hoop: Hoop) -> None:
    settings = {"application_name": "asyncpg-test", "DateStyle": "ISO, DMY", "TimeZone": "UTC",
                "extra_float_digits": "3", "IntervalStyle": "iso_8601"}
    conn = await asyncpg.connect(hoop.dsn(), server_settings=settings)
    try:
        assert await conn.fetchval("SHOW DateStyle") == "ISO, DMY"
        assert await conn.fetchval("SHOW application_name") == "asyncpg-test"
        assert await conn.fetchval("SHOW client_encoding") == "UTF8"
        assert await conn.fetchval("SHOW standard_conforming_strings") == "on"
        assert await conn.fetchval("SELECT $1::text", "grüße") == "grüße"
    finally:
        await conn.close()
    opened = await hoop.events("open")
    assert any(e.get("params") == settings for e in opened), opened

    async with await psycopg.AsyncConnection.connect(hoop.dsn(), autocommit=True, client_encoding="utf8",
                                                     application_name="psycopg-test") as pconn:
        cur = await pconn.execute("SELECT current_setting('application_name'), current_setting('client_encoding')")
        assert await cur.fetchone() == ("psycopg-test", "UTF8")

    rc, out, err = await _psql(hoop, "SELECT current_setting('application_name')", PGCLIENTENCODING="UTF8",
                               PGAPPNAME="psql-test")
    assert rc == 0 and out.strip() == b"psql-test", err
    rc, out, err = await _psql(hoop, "SELECT 1", PGCLIENTENCODING="LATIN1")
    assert rc != 0 and b"UTF8" in err, err
