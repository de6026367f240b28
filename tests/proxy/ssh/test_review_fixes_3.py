"""End to end, with real clients, for the SSH review of refusals, cut-short execs and the shell guard.

The resource blocks ``touch``: a bypass shows up as a marker file in the test sshd's directory.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import asyncssh
import pytest

from broker.model import Grant
from broker.transcript import render
from proxy.access import Gate
from proxy.ssh.server import REFUSED_BANNER
from tests.proxy.ssh.conftest import ADMIN, Env, make_config, ssh_resource, start_env, stop_env
from tests.proxy.ssh.test_exec import _events
from tests.proxy.ssh.test_review_fixes import at_prompt, marker, prompt_after_refusal, pty_shell, refused
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


# -- item 7: a command that is not UTF-8 is refused with a reason -----------------------------------------
async def test_exec_of_a_command_that_is_not_utf8_is_refused_with_a_reason(genv: tuple[Env, CountingGate],
                                                                          request: pytest.FixtureRequest) -> None:
    env, _ = genv
    mark = marker(env, request)
    grant, secret = await env.grant()
    proc = await asyncio.create_subprocess_exec(*env.ssh_argv(grant.login), f"echo \xff; touch {mark}".encode(
        "latin-1"), stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "SSHPASS": secret})
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert (proc.returncode, out) == (126, b"")
    assert err == b"hoop: command refused: the command is not valid UTF-8, which hoop cannot check\n"
    assert not mark.exists()
    commands = await _events(env, "command")
    assert [(c["decision"], c["rule"], c["exit_status"], c["command"]) for c in commands] == [
        ("block", "not-utf8", 126, f"echo \ufffd; touch {mark}")]


# -- item 4: an exec cut short is recorded with how it ended -----------------------------------------------
async def _transcript(env: Env) -> str:
    for _ in range(100):
        async with env.service.store.tx() as tx:
            sessions = await tx.list_sessions()
            if sessions and sessions[0].closed_at is not None:
                events = await tx.events(sessions[0].id)
                return render(None, [(sessions[0], events)], max_bytes=100_000).text
        await asyncio.sleep(0.05)
    raise AssertionError("the session was not closed")


async def test_exec_cut_by_grant_expiry_is_recorded_as_ended(genv: tuple[Env, CountingGate]) -> None:
    env, _ = genv
    grant, secret = await env.grant()
    async with await env.client(grant.login, secret) as conn:
        proc = await conn.create_process("echo started; sleep 20")
        assert await asyncio.wait_for(proc.stdout.readline(), 10) == "started\n"
        live = env.hub.live("web")[0]
        live.deadline = env.service.clock.now() + timedelta(seconds=0.5)
        live.arm()
        await asyncio.wait_for(proc.wait_closed(), 10)
        assert proc.exit_status == 255
    commands = await _events(env, "command")
    assert [(c["command"], c["exit_status"], c.get("ended")) for c in commands] == [
        ("echo started; sleep 20", None, "access expired")]
    assert "$ echo started; sleep 20 → ended: access expired" in await _transcript(env)


async def test_exec_cut_by_the_client_leaving_is_recorded_as_ended(genv: tuple[Env, CountingGate]) -> None:
    env, _ = genv
    grant, secret = await env.grant()
    conn = await env.client(grant.login, secret)
    proc = await conn.create_process("echo started; sleep 20")
    assert await asyncio.wait_for(proc.stdout.readline(), 10) == "started\n"
    conn.abort()
    text = await _transcript(env)
    commands = await _events(env, "command")
    assert [(c["exit_status"], c.get("ended")) for c in commands] == [(None, "client disconnected")]
    assert "$ echo started; sleep 20 → ended: client disconnected" in text


async def test_exec_held_for_review_when_the_grant_ends_is_recorded(upstream: Sshd, tmp_path: Path) -> None:
    rules = {"review_timeout": 30, "rules": [{"name": "hold-wc", "action": "review", "commands": ["wc"]}]}
    env, store = await start_env(upstream, tmp_path, make_config(upstream, ssh_resource(upstream, guardrails=rules)))
    try:
        grant, secret = await env.grant()
        async with await env.client(grant.login, secret) as conn:
            proc = await conn.create_process("wc -c")
            assert "held for review" in await asyncio.wait_for(proc.stderr.readline(), 10)
            await env.service.revoke(grant.id, ADMIN, "incident over")
            await asyncio.wait_for(proc.wait_closed(), 10)
        commands = await _events(env, "command")
        assert [(c["decision"], c.get("ended")) for c in commands] == [("review", "access revoked: incident over")]
    finally:
        await stop_env(env, store)


# -- interactive shells expand history: a refused command must not come back through it --------------------
@pytest.mark.parametrize("recall", ["^echo ^", "!!:s/echo //"], ids=["caret", "substitute"])
async def test_history_expansion_cannot_rerun_a_blocked_command(genv: tuple[Env, CountingGate],
                                                                request: pytest.FixtureRequest,
                                                                recall: str) -> None:
    env, _ = genv
    mark = marker(env, request)
    conn, term = await pty_shell(env)
    async with conn:
        await at_prompt(term)
        await term.run(f"echo touch {mark}", f"touch {mark}\r\n")
        await at_prompt(term)
        term.proc.stdin.write(f"{recall}\r")
        await refused(term)
        assert "history" in term.buf.rsplit("line refused", 1)[1]
        await asyncio.sleep(0.5)  # what bash would have run has had time to run
    assert not mark.exists()


# -- the shell guard end to end: a bypass would create the marker on the host ------------------------------
BYPASSES = [
    "find {dir} -maxdepth 0 -exec touch {mark} ';'", "flock {dir}/lock -c 'touch {mark}'",
    "echo touch {mark} | xargs -I{{}} sh -c {{}}", "source <(printf 'touch %s' {mark})", "{{touch,{mark}}}",
    "/usr/bin/tou?h {mark}", "env 'BASH_FUNC_f%%=() {{ touch {mark}; }}' bash -c f",
    "x='a[$(touch {mark})]'; echo $((x))", "trap 'touch {mark}' EXIT", "timeout --sig KILL 5 touch {mark}",
    "shopt -s extglob\n/usr/bin/tou@(ch) {mark}", "mapfile -C 'touch {mark}' -c 1 x <<< a",
]


@pytest.mark.parametrize("line", BYPASSES, ids=[f"bypass{i}" for i in range(len(BYPASSES))])
async def test_guard_bypasses_are_refused_on_exec(genv: tuple[Env, CountingGate], request: pytest.FixtureRequest,
                                                  line: str) -> None:
    env, _ = genv
    mark = marker(env, request)
    grant, secret = await env.grant()
    code, out, err = await env.ssh(grant.login, secret, line.format(dir=env.up.dir, mark=mark))
    assert code == 126 and b"command refused" in err, (out, err)
    assert not mark.exists()


async def test_prompt_command_cannot_run_a_blocked_command(genv: tuple[Env, CountingGate],
                                                           request: pytest.FixtureRequest) -> None:
    env, _ = genv
    mark = marker(env, request)
    conn, term = await pty_shell(env)
    async with conn:
        await at_prompt(term)
        term.proc.stdin.write(f"PROMPT_COMMAND='touch {mark}'\r")
        await refused(term)
        await prompt_after_refusal(term)
        await term.run("echo next-$((2+2))", "next-4")
        await asyncio.sleep(0.3)
    assert not mark.exists()
