"""The grant's end decided elsewhere, against a live SSH session: a delegated grant whose parent is revoked,
and a grant extended shortly before its end.

The grant's real end is brought near with the service's clock (:class:`ShiftedClock`, the system's clock
plus an offset that the test moves), so the grant itself, not only the live session, ends seconds away.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from broker.delegation import delegate
from broker.model import Grant, Identity
from tests.proxy.ssh.conftest import ADMIN, Env, make_config, ssh_resource, start_env, stop_env
from tests.proxy.ssh.deadline import LOGIN, finish, gone, host_sshd, running, spawn, wait_live
from tests.support.closing import close_reason
from tests.support.lateclock import ShiftedClock, SlowExtendHooks
from tests.support.sshd import Sshd

pytestmark = pytest.mark.ssh

ALICE = Identity(email="alice@example.com", groups=frozenset({"eng"}))


@pytest.fixture(scope="module")
def host() -> Iterator[Sshd]:
    with host_sshd() as server:
        yield server


@pytest.fixture
def clock() -> ShiftedClock:
    return ShiftedClock()


@pytest.fixture
def hooks() -> SlowExtendHooks:
    return SlowExtendHooks()


@pytest.fixture
async def env(host: Sshd, tmp_path: Path, clock: ShiftedClock, hooks: SlowExtendHooks) -> AsyncIterator[Env]:
    e, store = await start_env(host, tmp_path, make_config(host, ssh_resource(host, user=LOGIN)), clock=clock,
                               hooks=hooks)
    try:
        yield e
    finally:
        await stop_env(e, store)


def _naptime() -> str:
    return f"{900 + secrets.randbelow(99)}.{secrets.randbelow(10**6):06d}"


async def _started(env: Env, proc: asyncio.subprocess.Process, naptime: str) -> None:
    assert proc.stdout is not None
    assert b"started" in await asyncio.wait_for(proc.stdout.readline(), 15)
    assert running(f"sleep {naptime}")
    await wait_live(env)


async def test_revoking_a_parent_grant_ends_the_ssh_session_of_a_grant_delegated_from_it(env: Env) -> None:
    parent, _ = await env.grant()
    child, _ = await delegate(env.service, parent, ALICE, ["web"], None, "ci-runner")
    grandchild, secret = await delegate(env.service, child, ALICE, ["web"], "10m", "migration")
    naptime = _naptime()
    proc = await spawn(env, grandchild.login, secret, f"echo started; sleep {naptime}; echo after")
    try:
        await _started(env, proc, naptime)
        assert env.hub.live()[0].grant.id == grandchild.id
        await env.service.revoke(parent.id, ADMIN, "incident")
        out, err = await finish(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    reason = f"access revoked: parent grant {child.id} ended (parent grant {parent.id} ended (incident))"
    assert reason.encode() in err and b"after" not in out
    assert await close_reason(env) == reason
    assert await gone(f"sleep {naptime}") == []


@pytest.mark.parametrize("announced", ["before", "after"], ids=["announced-before", "announced-after"])
async def test_a_grant_extended_shortly_before_its_end_keeps_its_ssh_session_until_the_new_end(
        env: Env, clock: ShiftedClock, hooks: SlowExtendHooks, announced: str) -> None:
    """``announced-after``: the extension is stored before the old end but announced only after it (its side
    effects took that long, or on another replica its notification came late)."""
    grant, secret = await env.grant(duration="30m")
    clock.offset = grant.expires_at - clock.now() - timedelta(seconds=2)  # the grant ends in 2 s
    naptime = _naptime()
    proc = await spawn(env, grant.login, secret, f"echo started; sleep {naptime}; echo after")
    try:
        await _started(env, proc, naptime)
        old_end = time.monotonic() + (grant.expires_at - clock.now()).total_seconds()
        assert old_end - time.monotonic() > 0.5
        await asyncio.sleep(old_end - time.monotonic() - 0.5)
        hooks.delay = 1.5 if announced == "after" else 0.0
        extended = await env.service.extend(grant.id, ADMIN, "4s")
        assert isinstance(extended, Grant) and extended.expires_at == grant.expires_at + timedelta(seconds=4)
        await asyncio.sleep(max(old_end + 1.5 - time.monotonic(), 0))
        assert env.hub.live() and running(f"sleep {naptime}"), "the session ended at the grant's old end"
        assert await close_reason(env, within=6) == "access expired"
        ended = time.monotonic()
        out, err = await finish(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert old_end + 4 - 0.1 < ended < old_end + 4 + 1.5, "the session did not end at the grant's new end"
    assert b"access expired" in err and b"after" not in out
    assert await gone(f"sleep {naptime}") == []
