"""Signals the client sends on a session channel reach the process on the host.

sshd delivers a ``signal`` request only with privilege separation, which it drops after a root login,
so the host is logged in to as a non-root user (:mod:`tests.proxy.ssh.deadline`)."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.proxy.ssh.conftest import Env
from tests.proxy.ssh.deadline import env_for, gone, host_sshd, running
from tests.support.sshd import Sshd

pytestmark = pytest.mark.ssh


@pytest.fixture(scope="module")
def host() -> Iterator[Sshd]:
    with host_sshd() as server:
        yield server


@pytest.fixture
async def env(host: Sshd, tmp_path: Path) -> AsyncIterator[Env]:
    async for e in env_for(host, tmp_path):
        yield e


@pytest.mark.parametrize("tty", [False, True], ids=["exec", "exec-tty"])
async def test_a_signal_from_the_client_reaches_the_command_on_the_host(env: Env, tty: bool) -> None:
    naptime = f"{900 + secrets.randbelow(99)}.{secrets.randbelow(10**6):06d}"
    grant, secret = await env.grant()
    async with await env.client(grant.login, secret) as conn:
        proc = await conn.create_process(
            f"trap 'kill $!; echo caught-INT; exit 5' INT; echo started; sleep {naptime} & wait",
            term_type="xterm" if tty else None)
        async with asyncio.timeout(10):
            assert "started" in await proc.stdout.readline()
            proc.send_signal("INT")
            rest = await proc.stdout.read()
            await proc.wait_closed()
        assert "caught-INT" in rest and proc.exit_status == 5
        proc = await conn.create_process(f"exec sleep {naptime}", term_type="xterm" if tty else None)
        for _ in range(200):  # until the host's sleep runs
            if running(f"sleep {naptime}"):
                break
            await asyncio.sleep(0.05)
        proc.send_signal("TERM")
        async with asyncio.timeout(10):
            await proc.wait_closed()
        assert proc.exit_signal is not None and proc.exit_signal[0] == "TERM"
    assert await gone(f"sleep {naptime}") == []
