"""The grant's end against SSH sessions that are busy: an exec running ``sleep``, an interactive shell,
a ``-L`` forward with an open TCP stream, a ``-R`` forward. Every one must end at the deadline, and
nothing it started may keep running on the host (checked with pgrep, as the host's login user)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from broker.model import SessionStatus
from tests.proxy.ssh.conftest import Env, make_config, ssh_resource, start_env, stop_env
from tests.support.sshd import Sshd, sshd

pytestmark = pytest.mark.ssh


#: the host's login user: sshd delivers a signal to a session's processes only with privilege separation,
#: which it drops after a root login; so as root the tests log in to the host as the ``postgres`` user
LOGIN = "postgres" if os.getuid() == 0 else pwd.getpwuid(os.getuid()).pw_name


@pytest.fixture(scope="module")
def host() -> Iterator[Sshd]:
    """A host sshd whose files the non-root login user can read (pytest's tmp dirs are private to root)."""
    base = Path(tempfile.mkdtemp(prefix="hoop-sshd-"))
    os.chmod(base, 0o755)
    try:
        with sshd(base / "sshd", use_pam=LOGIN == "postgres") as server:
            yield server
    finally:
        shutil.rmtree(base, ignore_errors=True)


async def _env(host: Sshd, tmp: Path, **extra: Any) -> AsyncIterator[Env]:
    e, store = await start_env(host, tmp, make_config(host, ssh_resource(host, user=LOGIN, **extra)))
    try:
        yield e
    finally:
        await stop_env(e, store)


@pytest.fixture
async def env(host: Sshd, tmp_path: Path) -> AsyncIterator[Env]:
    async for e in _env(host, tmp_path):
        yield e


@pytest.fixture
async def fenv(host: Sshd, tmp_path: Path) -> AsyncIterator[Env]:
    """hoop's SSH proxy on a resource that allows port forwarding."""
    async for e in _env(host, tmp_path, allow={"port_forwarding": True}):
        yield e


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _running(pattern: str) -> list[str]:
    """The host's processes of the login user whose command line matches ``pattern``."""
    out = subprocess.run(["pgrep", "-u", LOGIN, "-af", pattern], capture_output=True, text=True,
                         timeout=10, check=False)
    return [line for line in out.stdout.splitlines() if "pgrep" not in line]


async def _gone(pattern: str, within: float = 5) -> list[str]:
    """What still runs after ``within`` seconds; it is then killed by its PID (the test started it)."""
    end = time.monotonic() + within
    while (left := _running(pattern)) and time.monotonic() < end:
        await asyncio.sleep(0.1)
    for line in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(line.split()[0]), signal.SIGKILL)
    return left


async def _wait_live(env: Env) -> None:
    for _ in range(200):
        if env.hub.live():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("no live session")


def _expire_soon(env: Env, seconds: float = 0.5) -> None:
    live = env.hub.live()[0]
    live.deadline = env.service.clock.now() + timedelta(seconds=seconds)
    live.arm()


async def _close_reason(env: Env, within: float = 10) -> str | None:
    end = time.monotonic() + within
    while time.monotonic() < end:
        async with env.service.store.tx() as tx:
            sessions = await tx.list_sessions()
        if sessions and sessions[0].status is SessionStatus.CLOSED:
            return sessions[0].close_reason
        await asyncio.sleep(0.05)
    return None


async def _spawn(env: Env, login: str, secret: str, *args: str, tty: bool = False) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *env.ssh_argv(login, *args, tty=tty), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "SSHPASS": secret})


async def _finish(proc: asyncio.subprocess.Process, within: float = 10) -> tuple[bytes, bytes]:
    try:
        async with asyncio.timeout(within):
            return await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.parametrize("tty", [False, True], ids=["exec", "exec-tty"])
async def test_an_exec_running_at_the_deadline_dies_on_the_host(env: Env, tty: bool) -> None:
    """Closing the channel is not enough: without a PTY, sshd leaves the command running when its channel
    closes, and it ran on for as long as it liked after the grant ended."""
    naptime = f"{900 + secrets.randbelow(99)}.{secrets.randbelow(10**6):06d}"
    grant, secret = await env.grant()
    proc = await _spawn(env, grant.login, secret, f"echo started; sleep {naptime}; echo after", tty=tty)
    try:
        assert proc.stdout is not None
        assert b"started" in await asyncio.wait_for(proc.stdout.readline(), 10)
        assert _running(f"sleep {naptime}")
        await _wait_live(env)
        _expire_soon(env)
        out, err = await _finish(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert b"access expired" in (out if tty else err) and b"after" not in out  # (a PTY has no stderr)
    assert await _close_reason(env) == "access expired"
    assert await _gone(f"sleep {naptime}") == []


async def test_an_interactive_shell_running_a_command_at_the_deadline_dies_on_the_host(env: Env) -> None:
    naptime = f"{900 + secrets.randbelow(99)}.{secrets.randbelow(10**6):06d}"
    grant, secret = await env.grant()
    proc = await _spawn(env, grant.login, secret, tty=True)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(f"sleep {naptime}\n".encode())
        await proc.stdin.drain()
        end = time.monotonic() + 10
        while not _running(f"sleep {naptime}") and time.monotonic() < end:
            await asyncio.sleep(0.1)
        assert _running(f"sleep {naptime}")
        _expire_soon(env)
        out, _ = await _finish(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert b"access expired" in out
    assert await _close_reason(env) == "access expired"
    assert await _gone(f"sleep {naptime}") == []


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(4096):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


async def test_a_local_forward_with_an_open_stream_is_cut_at_the_deadline(fenv: Env) -> None:
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    local = _free_port()
    grant, secret = await fenv.grant()
    target = int(server.sockets[0].getsockname()[1])
    proc = await _spawn(fenv, grant.login, secret, "-N", "-o", "ExitOnForwardFailure=yes",
                        "-L", f"127.0.0.1:{local}:127.0.0.1:{target}")
    try:
        reader = writer = None
        for _ in range(200):  # until ssh listens
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", local)
                break
            except OSError:
                await asyncio.sleep(0.05)
        assert reader is not None and writer is not None
        writer.write(b"ping\n")
        assert await asyncio.wait_for(reader.readline(), 10) == b"ping\n"
        _expire_soon(fenv)
        async with asyncio.timeout(10):  # the stream ends: EOF, or a reset
            try:
                while await reader.read(4096):
                    pass
            except ConnectionError:
                pass
        writer.close()
        await _finish(proc)
        assert proc.returncode != 0
        assert await _close_reason(fenv) == "access expired"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        server.close()
        await server.wait_closed()


async def test_a_remote_forward_stops_listening_on_the_host_at_the_deadline(fenv: Env) -> None:
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    remote = _free_port()
    grant, secret = await fenv.grant()
    target = int(server.sockets[0].getsockname()[1])
    proc = await _spawn(fenv, grant.login, secret, "-o", "ExitOnForwardFailure=yes",
                        "-R", f"127.0.0.1:{remote}:127.0.0.1:{target}", "echo up; read x")
    try:
        assert proc.stdout is not None
        assert await asyncio.wait_for(proc.stdout.readline(), 10) == b"up\n"  # the host listens
        reader, writer = await asyncio.open_connection("127.0.0.1", remote)
        writer.write(b"ping\n")
        assert await asyncio.wait_for(reader.readline(), 10) == b"ping\n"
        _expire_soon(fenv)
        async with asyncio.timeout(10):
            try:
                while await reader.read(4096):
                    pass
            except ConnectionError:
                pass
        writer.close()
        assert await _close_reason(fenv) == "access expired"
        end = time.monotonic() + 5
        while time.monotonic() < end:
            try:
                _, w = await asyncio.open_connection("127.0.0.1", remote)
            except OSError:
                break
            w.close()
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the host still listens for the remote forward after the grant ended")
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("command", ["exec", "shell-without-pty"])
async def test_a_command_whose_client_vanished_dies_on_the_host(env: Env, command: str) -> None:
    """The ssh client killed mid-command: hoop records the session closed, and nothing it ran keeps going
    on the host (plain OpenSSH would leave a command without a PTY running)."""
    naptime = f"{900 + secrets.randbelow(99)}.{secrets.randbelow(10**6):06d}"
    grant, secret = await env.grant()
    if command == "exec":
        proc = await _spawn(env, grant.login, secret, f"sleep {naptime}")
    else:
        proc = await _spawn(env, grant.login, secret)
        assert proc.stdin is not None
        proc.stdin.write(f"sleep {naptime}\n".encode())
        await proc.stdin.drain()
    try:
        end = time.monotonic() + 10
        while not _running(f"sleep {naptime}") and time.monotonic() < end:
            await asyncio.sleep(0.1)
        assert _running(f"sleep {naptime}")
    finally:
        proc.kill()
        await proc.wait()
    assert await _close_reason(env) == "client disconnected"
    assert await _gone(f"sleep {naptime}") == []
