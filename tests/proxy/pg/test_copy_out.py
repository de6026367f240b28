"""``COPY … TO STDOUT`` and column rules: rows carry no column names, so hoop masks the fields of
a COPY that names its columns (as pg_dump writes it) and refuses one it cannot attribute.

The harness's rules: ``users.note`` (redact) and ``card`` (partial, any table)."""

from __future__ import annotations

import asyncio
import csv
import io
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import psycopg
import pytest

from tests.proxy.pg.harness import Hoop, running_hoop
from tests.support.pgcluster import PgCluster

pytestmark = pytest.mark.postgres

# values the COPY formats must escape or quote; the server writes them, hoop must read them back
TRICKY = ["plain", "tab\there", "new\nline", "back\\slash", 'quote"d', "it's", "comma,semi;colon", "crlf\r\n", "",
          "ünïcødé ✓", "\\N", "none", "ends with backslash\\"]


def _lit(v: str) -> str:
    return "E'" + v.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n").replace("\r", "\\r") + "'"


def _partial(v: str) -> str:
    return "*" * len(v) if len(v) <= 4 else "*" * (len(v) - 4) + v[-4:]


@pytest.fixture(scope="module")
def copydb(pg: PgCluster) -> str:
    db = pg.create_database("copyout")
    rows = ", ".join(f"({i}, {_lit(v)}, {_lit(v)})" for i, v in enumerate(TRICKY))
    pg.psql("CREATE TABLE users (id int PRIMARY KEY, name text, email text, card text, note text);"
            "INSERT INTO users SELECT i, 'user' || i, 'user' || i || '@example.com', '4111 1111 1111 ' || (1000 + i),"
            " 'n' || i FROM generate_series(1, 5) i;"
            f"CREATE TABLE tricky (id int, card text, other text); INSERT INTO tricky VALUES {rows}, (99, NULL, NULL);",
            database=db)
    return db


@pytest.fixture
async def hoop(pg: PgCluster, copydb: str, tmp_path: Path) -> AsyncIterator[Hoop]:
    async with running_hoop(pg, copydb, tmp_path) as h:
        yield h


async def _direct(hoop: Hoop, sql: str) -> str:
    """What the server itself writes, without hoop (psql straight to the cluster)."""
    proc = await asyncio.create_subprocess_exec(
        str(hoop.cluster.bindir / "psql"), "-X", "-d", hoop.database, "-c", sql, env=hoop.cluster.env(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def test_copy_with_a_column_list_is_masked_field_by_field(hoop: Hoop) -> None:
    out = await hoop.psql("-c", "COPY users (id, email, card, note) TO STDOUT")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [f"{i}\t[email]\t***************{1000 + i}\t[masked]" for i in range(1, 6)]
    out = await hoop.psql("-c", "\\copy users (id, note) to stdout with (format csv, header)")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["id,note"] + [f'{i},"[masked]"' for i in range(1, 6)]
    rec = [e for e in await hoop.events("statement") if e["sql"].startswith("COPY users (id, email")]
    assert rec and rec[0]["decision"] == "allow" and rec[0]["error"] is None and rec[0]["rows"] == 5, rec


OPTIONS = [
    "",
    "(FORMAT text, DELIMITER ',')",
    "(FORMAT text, NULL 'none', HEADER)",
    "(FORMAT csv)",
    "(FORMAT csv, HEADER true, DELIMITER ';', QUOTE '''', ESCAPE '|')",
    "(FORMAT csv, FORCE_QUOTE *, NULL 'none')",
]


@pytest.mark.parametrize("options", OPTIONS)
async def test_escaped_and_quoted_values_keep_their_fields(hoop: Hoop, options: str) -> None:
    sql = f"COPY tricky (id, card, other) TO STDOUT {options}"
    proxied = await hoop.psql("-c", sql)
    assert proxied.returncode == 0, proxied.stderr
    server = await _direct(hoop, sql)
    got, want = _parse(proxied.stdout, options), _parse(server, options)
    header = int("HEADER" in options)
    assert len(got) == len(want) == len(TRICKY) + 1 + header
    if header:
        assert got[0] == want[0] == ["id", "card", "other"]  # the header line is not masked
    for g, w in zip(got[header:], want[header:], strict=True):
        assert (g[0], g[2]) == (w[0], w[2])  # unmasked fields: the same values
        if w[0] == "99" or ("csv" not in options and "NULL 'none'" in options and w[1] == "none"):
            assert g[1] == w[1]  # NULL, or a text-format value that reads as NULL: left as the server wrote it
        else:
            assert g[1] == _partial(w[1]), (g, w)
    null_line = [line for line in server.split("\n") if line.lstrip("\"'").startswith("99")]
    assert null_line and null_line[0] in proxied.stdout.split("\n")  # NULLs stay NULL, byte for byte


def _parse(text: str, options: str) -> list[list[str]]:
    """Read COPY output as a client would (the csv module; text-format unescaping), to compare values."""
    if "csv" in options:
        semi = "DELIMITER ';'" in options
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=";" if semi else ",",
                            quotechar="'" if semi else '"', escapechar="|" if semi else None,
                            doublequote=not semi, strict=True)
        return list(reader)
    delim = "," if "DELIMITER ','" in options else "\t"
    return [[_unescape(raw) for raw in _split_text(line, delim)] for line in text.split("\n")[:-1]]


def _split_text(line: str, delim: str) -> list[str]:
    fields, cur, i = [], "", 0
    while i < len(line):
        if line[i] == "\\" and i + 1 < len(line):
            cur += line[i:i + 2]
            i += 2
        elif line[i] == delim:
            fields.append(cur)
            cur = ""
            i += 1
        else:
            cur += line[i]
            i += 1
    return [*fields, cur]


def _unescape(raw: str) -> str:
    table = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}
    out, i = "", 0
    while i < len(raw):
        if raw[i] == "\\" and i + 1 < len(raw):
            out += table.get(raw[i + 1], raw[i + 1])
            i += 2
        else:
            out += raw[i]
            i += 1
    return out


@pytest.mark.parametrize(("sql", "why"), [
    ("COPY users TO STDOUT", "name the columns"),
    ("COPY tricky TO STDOUT", "name the columns"),  # "card" masks a column of any table
    ("COPY (SELECT id, note FROM users) TO STDOUT", "SELECT it instead"),
    ("COPY (SELECT t.* FROM tricky t) TO STDOUT", "SELECT it instead"),
    ("COPY users (id, note) TO STDOUT (FORMAT binary)", "binary"),
    ("COPY users (id, note) TO STDOUT (ENCODING 'LATIN1')", "encoding"),
    ("COPY users (id, note) TO STDOUT; SELECT 1", "query of its own"),
])
async def test_copy_that_cannot_be_attributed_is_refused(hoop: Hoop, sql: str, why: str) -> None:
    out = await hoop.psql("-c", sql)
    assert out.returncode != 0 and "hoop-masked-columns" in out.stderr and why in out.stderr, out.stderr
    assert "n1" not in out.stdout and "[masked]" not in out.stdout
    assert (await hoop.psql("-c", "SELECT 1")).stdout.strip() == "1"


async def test_copy_of_unmasked_columns_passes(hoop: Hoop) -> None:
    out = await hoop.psql("-c", "COPY users (id, name, email) TO STDOUT")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "1\tuser1\t[email]"  # detectors still apply
    out = await hoop.psql("-c", "COPY (SELECT id, name FROM users WHERE note = 'n2') TO STDOUT")
    assert out.returncode == 0 and out.stdout == "2\tuser2\n", out.stderr


async def test_drivers_copy_out(hoop: Hoop) -> None:
    conn = await asyncpg.connect(hoop.dsn())
    try:
        buf = io.BytesIO()
        await conn.copy_from_table("users", columns=["id", "note", "card"], output=buf)
        assert buf.getvalue().decode().splitlines()[0] == "1\t[masked]\t***************1001"
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="name the columns"):
            await conn.copy_from_table("users", output=io.BytesIO())
    finally:
        await conn.close()
    async with await psycopg.AsyncConnection.connect(hoop.dsn(), autocommit=True) as pconn:
        cur = pconn.cursor()
        async with cur.copy("COPY users (id, note) TO STDOUT (FORMAT csv)") as copy:
            data = b"".join([bytes(chunk) async for chunk in copy])
        assert data.decode().splitlines()[:2] == ['1,"[masked]"', '2,"[masked]"']
