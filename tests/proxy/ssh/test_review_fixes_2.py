"""End to end, with real clients, for the SSH review's findings M4 and L1-L3.

The resource blocks ``touch`` and holds ``wc`` for review: a bypass shows up as a marker file
on the host.
"""

from __future__ import annotations

import asyncio
import os
import signal
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from broker.errors import Conflict
from broker.events import ReviewRequested
from proxy.ssh.lineedit import LINE_MAX, LineEditor
from tests.proxy.ssh.conftest import ADMIN, OPS, Env, make_config, ssh_resource, start_env, stop_env
from tests.proxy.ssh.test_exec import _events
from tests.proxy.ssh.test_review_fixes import at_prompt, exec_dash, marker, pty_shell, refused, run
from tests.support.sshd import Sshd

pytestmark = pytest.mark.ssh


@pytest.fixture
async def renv(upstream: Sshd, tmp_path: Path) -> AsyncIterator[Env]:
    res = ssh_resource(upstream, guardrails={"review_timeout": 30, "rules": [
        {"name": "no-touch", "action": "block", "commands": ["touch"]},
        {"name": "hold-wc", "action": "review", "commands": ["wc"]}]})
    e, store = await start_env(upstream, tmp_path, make_config(upstream, res))
    try:
        yield e
    finally:
        await stop_env(e, store)


async def _held(env: Env) -> ReviewRequested:
    async with asyncio.timeout(15):
        while not env.notifier.of(ReviewRequested):
            await asyncio.sleep(0.02)
    event: ReviewRequested = env.notifier.of(ReviewRequested)[0]
    return event


# -- M4: input sent while a command is held is not piled up in hoop -------------------------------
async def test_input_while_held_for_review_is_not_buffered(renv: Env) -> None:
    grant, secret = await renv.grant()
    size = 16 << 20
    async with await renv.client(grant.login, secret) as conn:
        proc = await conn.create_process("wc -c", encoding=None)
        event = await _held(renv)
        proc.stdin.write(b"x" * size)
        # hoop stopped reading: the client's window fills and most of the input waits in the client
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(proc.stdin.drain(), 2)
        await renv.hub.reviews.decide(event.review.id, OPS, True)
        await asyncio.wait_for(proc.stdin.drain(), 30)
        proc.stdin.write_eof()
        out = await asyncio.wait_for(proc.stdout.read(), 30)
        await proc.wait_closed()
    assert out.strip() == str(size).encode()  # nothing lost on the way


async def test_piped_line_longer_than_the_cap_is_refused(renv: Env) -> None:
    grant, secret = await renv.grant()
    async with await renv.client(grant.login, secret) as conn:
        proc = await conn.create_process(encoding=None)
        proc.stdin.write(b"echo " + b"y" * (1 << 20))  # no newline yet: hoop keeps only LINE_MAX of it
        proc.stdin.write(b"\necho ok-$((1+1))\n")
        proc.stdin.write_eof()
        out = await asyncio.wait_for(proc.stdout.read(), 30)
        err = await asyncio.wait_for(proc.stderr.read(), 30)
        await proc.wait_closed()
    assert out == b"ok-2\n"
    assert b"line refused" in err and b"longer than 64 KiB" in err
    commands = await _events(renv, "command")
    assert any(c["rule"] == "line-length" and c["decision"] == "block" for c in commands)


@pytest.mark.parametrize("enter_apart", [False, True])
async def test_typed_line_longer_than_the_cap_is_refused(renv: Env, request: pytest.FixtureRequest,
                                                         enter_apart: bool) -> None:
    """Keys past LINE_MAX are not forwarded, also when the Enter comes in the chunk that crosses the cap
    (the editor had moved on to a fresh line, and that chunk went out). What reached the host is counted
    by ``cat`` into a file, the terminal in non-canonical mode, so every forwarded byte lands there."""
    sink = marker(renv, request)
    conn, term = await pty_shell(renv)
    async with conn:
        # dash, not bash: readline redraws a 64 KiB line in steps that grow with it (seconds of CPU on a busy
        # machine)
        await exec_dash(term)
        await run(term, f"stty -icanon -echo; echo CAT$((2+2)); cat > {sink}", "CAT4")
        term.proc.stdin.write("z" * (LINE_MAX - 10))
        await asyncio.sleep(0.2)
        term.proc.stdin.write("z" * 1010 + ("" if enter_apart else "\r"))
        if enter_apart:
            await asyncio.sleep(0.2)
            term.proc.stdin.write("\r")
        await refused(term)
        await at_prompt(term, term.buf.index("line refused"))  # hoop's ^C ended cat
        await run(term, "stty sane; echo AFTER$((3+3))", "AFTER6")
    assert 0 < sink.stat().st_size <= LINE_MAX  # not forwarded past the cap


def test_line_editor_memory_is_bounded() -> None:
    ed = LineEditor()
    chunk = ("\u00e9\u4e2d" * 2048).encode()  # characters no CPython cache holds
    tracemalloc.start()
    try:
        for _ in range(128):  # 1.5 MiB typed without an Enter
            assert ed.feed(chunk)[1] is None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    assert ed.overlong and len(ed.text) == LINE_MAX
    _, line, _ = ed.feed(b"\r")
    assert line is not None and line.overlong and line.opaque


# -- L1: an approval that comes after the grant ended opens nothing on the host --------------------
async def test_exec_approved_after_revocation_does_not_run(renv: Env, request: pytest.FixtureRequest) -> None:
    mark = marker(renv, request)
    grant, secret = await renv.grant()
    proc = await asyncio.create_subprocess_exec(
        *renv.ssh_argv(grant.login, f"wc -c /dev/null; echo > {mark}"),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "SSHPASS": secret})
    event = await _held(renv)
    # ssh (sshpass's child) stops: it does not answer the channel close, and hoop waits up to 2 s for that
    ssh = int(Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()[0])
    os.kill(ssh, signal.SIGSTOP)
    try:
        await renv.service.revoke(grant.id, ADMIN, "test")
        await asyncio.sleep(0.3)
        with pytest.raises(Conflict, match="ended"):  # an Allow after the grant's end does not count
            await renv.hub.reviews.decide(event.review.id, OPS, True)
        await asyncio.sleep(1)
    finally:
        os.kill(ssh, signal.SIGCONT)
        await asyncio.wait_for(proc.communicate(), 30)
    assert not mark.exists()


# -- L2: only locale and terminal variables reach the host, and what was sent is recorded ---------
async def test_environment_is_filtered_and_recorded(renv: Env) -> None:
    grant, secret = await renv.grant()
    env = {"LANG": "C.UTF-8", "LC_PAYLOAD": "$(id)", "LC_TIME": "C", "BASH_ENV": "/tmp/x", "FOO": "bar"}
    async with await renv.client(grant.login, secret) as conn:
        result = await conn.run('echo "[$LANG][$LC_TIME][$LC_PAYLOAD][$FOO]"', env=env, check=False)
    assert result.stdout == "[C.UTF-8][C][][]\n"
    (recorded,) = await _events(renv, "env")
    assert recorded["passed"] == {"LANG": "C.UTF-8", "LC_TIME": "C"}
    assert sorted(recorded["dropped"]) == ["BASH_ENV", "FOO", "LC_PAYLOAD"]
    headers = await _events(renv, "asciicast")
    assert headers[0]["header"]["env"]["LANG"] == "C.UTF-8"


# -- L3: a NUL byte in a command ----------------------------------------------------------------------
async def test_exec_with_nul_is_refused(renv: Env) -> None:
    grant, secret = await renv.grant()
    async with await renv.client(grant.login, secret) as conn:
        result = await conn.run("echo hi\0there", check=False)
    assert result.exit_status == 126
    commands = await _events(renv, "command")
    assert any(c["rule"] == "nul-byte" and c["decision"] == "block" for c in commands)


async def test_piped_line_with_nul_is_refused(renv: Env, request: pytest.FixtureRequest) -> None:
    mark = marker(renv, request)
    grant, secret = await renv.grant()
    async with await renv.client(grant.login, secret) as conn:
        proc = await conn.create_process(encoding=None)
        proc.stdin.write(b"\0touch " + str(mark).encode() + b"\n")  # the shell drops the NUL and runs touch
        proc.stdin.write_eof()
        await asyncio.wait_for(proc.wait_closed(), 30)
    assert not mark.exists()
