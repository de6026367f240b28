"""End to end, with real clients, for the SSH review of refusals, cut-short execs and the shell guard.

The resource blocks ``touch``: a bypass shows up as a marker file in the test sshd's directory.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import asyncssh
import pytest

from broker.model import Grant
from proxy.access import Gate
from proxy.ssh.server import REFUSED_BANNER
from tests.proxy.ssh.conftest import ADMIN, Env, make_config, ssh_resource, start_env, stop_env
from tests.support.sshd import Sshd

pytestmark = pytest.mark.ssh


class CountingGate:
    """The real gate, counting the credential checks made through it (an injection point, not a mock)."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        self.checks = 0

    async def authenticate(self, login: str, secret: str, resource: str) -> Grant:
        self.checks += 1
        return await self.gate.authenticate(login, secret, resource)

    async def identify(self, login: str, secret: str) -> Grant:
        self.checks += 1
        return await self.gate.identify(login, secret)

    def authorize(self, grant: Grant, resource: str) -> Grant:
        return self.gate.authorize(grant, resource)


@pytest.fixture
async def genv(upstream: Sshd, tmp_path: Path) -> AsyncIterator[tuple[Env, CountingGate]]:
    gates: list[CountingGate] = []

    def wrap(gate: Gate) -> CountingGate:
        gates.append(CountingGate(gate))
        return gates[0]

    rules = {"rules": [{"name": "no-touch", "action": "block", "commands": ["touch"]}]}
    config = make_config(upstream, ssh_resource(upstream, guardrails=rules), ssh_resource(upstream, "web2"))
    e, store = await start_env(upstream, tmp_path, config, wrap_gate=wrap)
    try:
        yield e, gates[0]
    finally:
        await stop_env(e, store)


class _Banner(asyncssh.SSHClient):
    def __init__(self, banners: list[str]) -> None:
        self.banners = banners

    def auth_banner_received(self, msg: str, lang: str) -> None:
        self.banners.append(msg)


async def _refused_login(env: Env, login: str, secret: str) -> list[str]:
    banners: list[str] = []
    with pytest.raises(asyncssh.PermissionDenied):
        await asyncssh.connect("127.0.0.1", env.port, username=login, password=secret, known_hosts=None,
                               client_keys=None, agent_path=None, config=None, preferred_auth=("password",),
                               client_factory=lambda: _Banner(banners))
    return banners


# -- item 5: every refused login reads the same and costs one credential check -----------------------------
@pytest.mark.parametrize("case", ["unknown-login", "wrong-secret", "expired", "revoked", "other-kind",
                                  "unknown-resource", "other-ssh-resource"])
async def test_refused_logins_look_and_cost_the_same(genv: tuple[Env, CountingGate], case: str) -> None:
    env, gate = genv
    grant, secret = await env.grant()
    login = grant.login
    if case == "unknown-login":
        login = "nobody.zzzzz"
    elif case == "wrong-secret":
        secret = secret[:-4] + "AAAA"
    elif case == "expired":
        async with env.service.store.tx() as tx:
            await tx.update_grant(replace(grant, expires_at=env.service.clock.now()))
        await env.service.expire(grant.id)
    elif case == "revoked":
        await env.service.revoke(grant.id, ADMIN, "done")
    elif case == "other-kind":
        other, secret = await env.service.breakglass(ADMIN, "prod-db", "alice@example.com", "30m", "test")
        login = other.login
    elif case == "unknown-resource":
        login += "+nosuch"
    else:
        login += "+web2"
    gate.checks = 0
    assert await _refused_login(env, login, secret) == [REFUSED_BANNER]
    assert gate.checks == 1


async def test_the_refusal_banner_reaches_openssh(genv: tuple[Env, CountingGate]) -> None:
    env, _ = genv
    argv = [a.replace("LogLevel=ERROR", "LogLevel=INFO") for a in env.ssh_argv("nobody.zzzzz")]
    proc = await asyncio.create_subprocess_exec(*argv, "true", stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                                                env={**os.environ, "SSHPASS": "hoop_wrong"})
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 5 and REFUSED_BANNER.strip().encode() in err


async def test_a_grant_for_the_second_resource_is_checked_once(genv: tuple[Env, CountingGate]) -> None:
    env, gate = genv
    grant, secret = await env.grant("web2")
    gate.checks = 0
    async with await env.client(grant.login, secret) as conn:
        result = await conn.run("echo in-web2", check=True)
    assert result.stdout == "in-web2\n" and gate.checks == 1
