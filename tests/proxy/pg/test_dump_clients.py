"""pg_dump through the proxy: it must work (it sends a ``set_config`` over ``pg_settings`` that
looks computed) and what it writes is masked like any other result."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.proxy.pg.harness import Hoop

pytestmark = pytest.mark.postgres


async def _pg_dump(hoop: Hoop, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        str(hoop.cluster.bindir / "pg_dump"), *args, env=hoop.env(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    return proc.returncode or 0, out.decode(), err.decode()


async def test_pg_dump_inserts_are_masked(hoop: Hoop) -> None:
    rc, out, err = await _pg_dump(hoop, "-t", "users", "--inserts")
    assert rc == 0, err
    assert "INSERT INTO public.users VALUES (7, 'user7', '[email]', '***************1111', '[masked]');" in out
    assert "@example.com" not in out and "4111 1111" not in out
    # pg_dump (since the August 2024 releases) sets this through a pg_settings row: allowed by its name
    settings = [e for e in await hoop.events("statement") if "restrict_nonsystem_relation_kind" in e["sql"]]
    assert settings and all(e["decision"] == "allow" for e in settings), settings


async def test_pg_dump_copy_blocks_are_masked(hoop: Hoop) -> None:
    rc, out, err = await _pg_dump(hoop, "-t", "users")  # data as COPY ... TO stdout, column by column
    assert rc == 0, err
    assert "COPY public.users (id, name, email, card, note) FROM stdin;" in out
    assert "7\tuser7\t[email]\t***************1111\t[masked]\n" in out
    assert "@example.com" not in out and "4111 1111" not in out and "\tn7\n" not in out


async def test_pg_dump_custom_format_to_a_file(hoop: Hoop, tmp_path: Path) -> None:
    target = tmp_path / "users.dump"
    rc, _, err = await _pg_dump(hoop, "-Fc", "-t", "users", "-f", str(target))
    assert rc == 0, err
    assert target.stat().st_size > 0
    restore = await asyncio.create_subprocess_exec(
        str(hoop.cluster.bindir / "pg_restore"), "-f", "-", str(target), stdout=asyncio.subprocess.PIPE)
    text, _ = await restore.communicate()
    assert restore.returncode == 0 and b"COPY public.users" in text
    assert b"@example.com" not in text and b"4111 1111" not in text and b"\tn7\n" not in text
    assert b"7\tuser7\t[email]\t***************1111\t[masked]\n" in text
