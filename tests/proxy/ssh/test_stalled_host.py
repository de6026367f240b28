"""The end of a session whose host stops answering, or whose host connection does not finish closing.

The host is the real test sshd; a :class:`StallingProxy` between hoop and it freezes the TCP connection
(a host behind a dead NAT). The end of the session, and hoop's stop, must not wait on the host for longer
than hoop's bounds: 2 s for the host to close the ended channels, then ``upstream_close_wait`` for its
connection to close, which is then aborted.

asyncssh's ``close()`` drops the socket itself, so a stalled host alone does not hold ``wait_closed()``;
the second test makes that wait never finish (on asyncssh's connection object, not on hoop's code) to
check that the bound is there.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncssh
import pytest

from tests.proxy.ssh.conftest import Env, make_config, ssh_resource, start_env, stop_env
from tests.proxy.ssh.deadline import wait_live
from tests.support.closing import close_reason
from tests.support.sshd import Sshd
from tests.support.tcpproxy import StallingProxy

pytestmark = pytest.mark.ssh

#: the bound the tests give the host's connection to close
CLOSE_WAIT = 0.5


@pytest.fixture
async def stalling(upstream: Sshd) -> AsyncIterator[StallingProxy]:
    proxy = StallingProxy("127.0.0.1", upstream.port)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


@pytest.fixture
async def senv(upstream: Sshd, stalling: StallingProxy, tmp_path: Path) -> AsyncIterator[Env]:
    """hoop's SSH proxy on a resource reached through ``stalling``."""
    config = make_config(upstream, ssh_resource(upstream, address=f"127.0.0.1:{stalling.port}"))
    e, store = await start_env(upstream, tmp_path, config)
    e.proxy.upstream_close_wait = CLOSE_WAIT
    try:
        yield e
    finally:
        await stop_env(e, store)


async def _open(env: Env) -> tuple[asyncssh.SSHClientConnection, asyncssh.SSHClientConnection]:
    """A client with an exec running on the host (``cat``, which ends with its connection); and the host
    connection hoop holds for it."""
    grant, secret = await env.grant()
    client = await env.client(grant.login, secret)
    proc = await client.create_process("echo ready; exec cat")
    assert await asyncio.wait_for(proc.stdout.readline(), 10) == "ready\n"
    await wait_live(env)
    (conn,) = env.proxy.connections
    return client, await conn.upstream()


async def _end(env: Env, within: float) -> float:
    """End the (only) connection's session as the grant's end does; how long until it was all done."""
    (conn,) = env.proxy.connections
    started = time.monotonic()
    conn.end("access revoked")
    async with asyncio.timeout(within):
        await conn.finished()
    return time.monotonic() - started


async def test_a_host_that_stops_answering_does_not_hold_the_end_of_the_session(
        senv: Env, stalling: StallingProxy) -> None:
    client, _ = await _open(senv)
    try:
        stalling.stall()
        took = await _end(senv, within=10)
    finally:
        client.close()
    assert took < 2 + CLOSE_WAIT + 1.5, f"the end of the session took {took:.1f} s"
    assert await close_reason(senv) == "access revoked"


async def test_a_host_connection_that_never_finishes_closing_is_aborted_after_the_bound(
        senv: Env, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its ``wait_closed()`` held the end of the session, and hoop's stop, for good."""
    caplog.set_level(logging.INFO, logger="proxy.ssh.server")
    client, up = await _open(senv)
    released = asyncio.Event()  # (lets the test's teardown through, if hoop waits unbounded)

    async def never_closed() -> None:
        await released.wait()

    monkeypatch.setattr(up, "wait_closed", never_closed)
    label = next(iter(senv.proxy.connections)).label
    try:
        took = await _end(senv, within=CLOSE_WAIT + 5)
    finally:
        released.set()
        client.close()
    assert took < CLOSE_WAIT + 1.5, f"the end of the session took {took:.1f} s"
    aborted = [r.getMessage() for r in caplog.records if "did not finish closing" in r.getMessage()]
    assert aborted == [f"{label} the host's connection did not finish closing within {CLOSE_WAIT:.1f} s: aborted"]
    assert await close_reason(senv) == "access revoked"
