"""End to end, with real clients, for the SSH review's findings H1-H5, M1 and M2.

The resource blocks ``touch``: a bypass shows up as a marker file on the host, not as a real
``reboot``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path

import asyncssh
import pytest

from broker.cli import _root
from tests.proxy.ssh.conftest import Env, make_config, ssh_resource, start_env, stop_env
from tests.proxy.ssh.test_exec import _events
from tests.proxy.ssh.test_shell import Term, shell
from tests.support.sshd import Sshd

pytestmark = pytest.mark.ssh

TOKEN = "Xq7Lm2Rt9Vb4Nz8Kc3Wd6Hf1Jk5"


@pytest.fixture
async def renv(upstream: Sshd, tmp_path: Path) -> AsyncIterator[Env]:
    res = ssh_resource(upstream, guardrails={"rules": [
        {"name": "no-touch", "action": "block", "commands": ["touch"]}]})
    e, store = await start_env(upstream, tmp_path, make_config(upstream, res))
    try:
        yield e
    finally:
        await stop_env(e, store)


def marker(env: Env, request: pytest.FixtureRequest) -> Path:
    path = env.up.dir / f"ran-{request.node.name.replace('[', '-').replace(']', '')}"
    path.unlink(missing_ok=True)
    return path


async def pty_shell(env: Env) -> tuple[asyncssh.SSHClientConnection, Term]:
    grant, secret = await env.grant()
    conn = await env.client(grant.login, secret)
    return conn, await shell(conn)


async def refused(term: Term, count: int = 1) -> None:
    try:
        async with asyncio.timeout(10):
            while term.buf.count("line refused") < count:
                chunk = await term.proc.stdout.read(4096)
                if not chunk:
                    raise EOFError(term.buf)
                term.buf += chunk
    except TimeoutError:
        raise AssertionError(f"no refusal in {term.buf[-300:]!r}") from None


async def at_prompt(term: Term, since: int = 0, *, after: str = "", timeout: float = 15) -> None:
    """Wait until the shell shows a prompt after ``since`` (and after ``after``, when given): what is typed
    next is read as a new line, not typed ahead (a typed-ahead line may be flushed by a ^C or a shell's
    terminal reset)."""
    try:
        async with asyncio.timeout(timeout):
            while not (term.buf[since:].endswith("$ ") and after in term.buf[since:]
                       and term.buf.rindex("$ ") > term.buf.find(after, since)):
                chunk = await term.proc.stdout.read(4096)
                if not chunk:
                    raise EOFError(term.buf)
                term.buf += chunk
    except TimeoutError:
        raise AssertionError(f"no prompt in {term.buf[-400:]!r}") from None


async def prompt_after_refusal(term: Term) -> None:
    """Wait for the shell's fresh prompt after the last refusal. hoop kills the remote line with
    ^E^U^C; when part of the typed line reaches the host's terminal only after the ^C flushed its input,
    bash shows that remnant and no prompt (hoop keeps the refused text checked in front of the next line
    meanwhile). A user presses ^C then, and so does this helper."""
    since = term.buf.rindex("line refused")
    try:
        await at_prompt(term, since, timeout=3)
    except AssertionError:
        term.proc.stdin.write("\x03")
        await at_prompt(term, since)


async def exec_dash(term: Term) -> None:
    """Replace the shell with dash and wait for dash's own prompt. (Not ``run(term, "exec dash", "$ ")``:
    the buffer already holds an earlier "$ ", and a line typed before dash starts is flushed with the
    terminal settings bash restores on exec.)"""
    await at_prompt(term)
    start = len(term.buf)
    term.proc.stdin.write("exec dash\r")
    try:
        async with asyncio.timeout(15):
            while not re.search(r"exec dash\r\n(\x1b\[\?2004l\r)?\$ ", term.buf[start:]):
                chunk = await term.proc.stdout.read(4096)
                if not chunk:
                    raise EOFError(term.buf)
                term.buf += chunk
    except TimeoutError:
        raise AssertionError(f"no dash prompt in {term.buf[-400:]!r}") from None


async def run(term: Term, line: str, marker: str) -> None:
    try:
        await term.run(line, marker)
    except TimeoutError:
        raise AssertionError(f"no {marker!r} in {term.buf[-400:]!r}") from None


# -- H1: an exec of a shell would read unchecked commands from its input -----------------------------
@pytest.mark.parametrize(("command", "tty"), [("sh", False), ("bash", True), ("exec bash -i", False),
                                              ("env FOO=1 sh -s", False), ("python3", False)])
async def test_exec_of_a_shell_is_refused(renv: Env, request: pytest.FixtureRequest, command: str,
                                          tty: bool) -> None:
    mark = marker(renv, request)
    grant, secret = await renv.grant()
    code, out, err = await renv.ssh(grant.login, secret, command, stdin=f"touch {mark}\n".encode(), tty=tty)
    assert code == 126, (out, err)
    assert b"interactive session" in (out + err)
    assert not mark.exists()
    commands = await _events(renv, "command")
    assert any(c["rule"] == "interactive-exec" and c["decision"] == "block" for c in commands)


async def test_exec_with_a_command_string_still_runs(renv: Env) -> None:
    grant, secret = await renv.grant()
    code, out, _ = await renv.ssh(grant.login, secret, "sh -c 'echo ok-$((1+2))'")
    assert (code, out) == (0, b"ok-3\n")


# -- H2: keys that make the remote side run the line ------------------------------------------------
async def test_ctrl_o_in_bash_is_decided_like_enter(renv: Env, request: pytest.FixtureRequest) -> None:
    mark = marker(renv, request)
    conn, term = await pty_shell(renv)
    async with conn:
        term.proc.stdin.write(f"touch {mark}\x0f")
        await refused(term)
        await prompt_after_refusal(term)
        await run(term, "echo STILL$((1+1))", "STILL2")
    assert not mark.exists()


@pytest.mark.parametrize("keys", ["touch {m} #\x1b[\r", "touch {m} #\x1b\r", "\x1b[200~\rtouch {m}\r"],
                         ids=["esc-bracket-cr", "esc-cr", "fake-paste"])
async def test_canonical_mode_enter_inside_escape_or_fake_paste(renv: Env, request: pytest.FixtureRequest,
                                                                keys: str) -> None:
    mark = marker(renv, request)
    conn, term = await pty_shell(renv)
    async with conn:
        await exec_dash(term)  # canonical mode: any CR ends the line
        await run(term, "echo DASH$((2+2))", "DASH4")
        term.proc.stdin.write(keys.format(m=mark))
        await refused(term)
        await prompt_after_refusal(term)
        await run(term, "echo AFTER$((3+3))", "AFTER6")
    assert not mark.exists()


async def test_refusal_with_remapped_kill_and_no_interrupt(renv: Env, request: pytest.FixtureRequest) -> None:
    mark = marker(renv, request)
    conn, term = await pty_shell(renv)
    async with conn:
        await exec_dash(term)
        await run(term, "stty kill '^X' -isig; echo SET$((1+1))", "SET2")
        term.proc.stdin.write(f"touch {mark} #\r")  # ^E^U^C no longer clear the line upstream
        await refused(term)
        await asyncio.sleep(2.5)  # no fresh line: hoop keeps the refused text as a prefix
        term.proc.stdin.write("\r")
        await refused(term, 2)
    assert not mark.exists()


async def test_ctrl_c_without_isig_keeps_the_line(renv: Env, request: pytest.FixtureRequest) -> None:
    mark = marker(renv, request)
    conn, term = await pty_shell(renv)
    async with conn:
        await exec_dash(term)  # bash's readline clears the line on ^C even without isig
        await run(term, "stty -isig; echo SET$((1+1))", "SET2")
        term.proc.stdin.write(f"touch {mark} #")
        await asyncio.sleep(0.3)
        term.proc.stdin.write("\x03")
        await asyncio.sleep(0.3)
        term.proc.stdin.write("\r")
        await refused(term)
    assert not mark.exists()


# -- H3: a password-like prompt neither switches the guard off nor applies without a terminal ------
async def test_line_after_password_prompt_is_still_checked(renv: Env, request: pytest.FixtureRequest) -> None:
    mark = marker(renv, request)
    conn, term = await pty_shell(renv)
    async with conn:
        await run(term, "PS1='Password: '", "Password: ")
        await asyncio.sleep(0.3)
        term.proc.stdin.write(f"touch {mark}\r")  # typed ahead of the echo: recorded as [hidden]
        await refused(term)
    assert not mark.exists()
    commands = await _events(renv, "command")
    assert any(c["command"] == "[hidden]" and c["decision"] == "block" for c in commands), (commands, term.buf[-200:])
    inputs = "".join(e["data"] for e in await _events(renv, "input"))
    assert "[hidden]" in inputs and str(mark) not in inputs


async def _piped_touch_after(renv: Env, first: str, shown: str, mark: Path) -> None:
    """Without a terminal: run ``first``, see ``shown`` in its output, then pipe ``touch mark``."""
    grant, secret = await renv.grant()
    async with await renv.client(grant.login, secret) as conn:
        proc = await conn.create_process()
        proc.stdin.write(first + "\n")
        async with asyncio.timeout(10):
            assert shown in await proc.stdout.read(100)
        proc.stdin.write(f"touch {mark}\n")
        proc.stdin.write_eof()
        await asyncio.wait_for(proc.wait_closed(), 10)


async def test_password_prompt_does_nothing_without_a_terminal(renv: Env, request: pytest.FixtureRequest) -> None:
    mark = marker(renv, request)
    await _piped_touch_after(renv, "printf 'Password: '", "Password:", mark)
    assert not mark.exists()
    commands = await _events(renv, "command")
    assert any(c["decision"] == "block" and str(mark) in c["command"] for c in commands)


# -- H5: no alternate screen without a terminal ---------------------------------------------------
async def test_piped_shell_ignores_alternate_screen(renv: Env, request: pytest.FixtureRequest) -> None:
    mark = marker(renv, request)
    await _piped_touch_after(renv, "printf '\\033[?1049h'", "\x1b[?1049h", mark)
    assert not mark.exists()


# -- M1: the exec command is masked in the recording and not logged in clear -----------------------
async def test_exec_command_is_masked_in_header_and_logs(renv: Env, caplog: pytest.LogCaptureFixture) -> None:
    level = logging.getLogger("asyncssh").level
    try:
        _root()  # the CLI's logging setup
        caplog.set_level(logging.INFO)
        grant, secret = await renv.grant()
        code, _, _ = await renv.ssh(grant.login, secret, f"echo {TOKEN} >/dev/null")
        assert code == 0
        events = await _events(renv)
        assert events and all(TOKEN not in json.dumps(e) for e in events)
        assert TOKEN not in caplog.text
    finally:
        logging.getLogger("asyncssh").setLevel(level)


# -- M2: allow.sftp off also refuses file transfer servers started by exec ------------------------
@pytest.mark.parametrize("command", ["sudo scp -t /tmp", "exec scp -pt /tmp", "env scp -f /etc/hostname",
                                     "/usr/lib/openssh/sftp-server", "sh -c '/usr/lib/openssh/sftp-server'",
                                     "sftp -s /usr/lib/openssh/sftp-server x", "rsync --server -e.Lsfx . /tmp"])
async def test_file_transfer_servers_are_refused_by_exec(renv: Env, command: str) -> None:
    grant, secret = await renv.grant()
    code, out, err = await renv.ssh(grant.login, secret, command)
    assert code == 126 and out == b"", err
    assert b"allow.sftp" in err or b"interactive session" in err
    commands = await _events(renv, "command")
    assert any(c["rule"] in ("allow.sftp", "interactive-exec") for c in commands)  # sftp -s: both apply
