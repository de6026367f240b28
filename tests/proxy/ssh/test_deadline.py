"""The grant's end against SSH sessions that are busy: an exec running ``sleep``, an interactive shell,
a ``-L`` forward with an open TCP stream, a ``-R`` forward. Every one must end at the deadline, and
nothing it started may keep running on the host (checked with pgrep, as the host's login user)."""

from __future__ import annotations

import asyncio
import secrets
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.proxy.ssh.conftest import Env
from tests.proxy.ssh.deadline import (
    env_for,
    expire_soon,
    finish,
    gone,
    host_sshd,
    running,
    spawn,
    wait_live,
)
from tests.support.closing import close_reason
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


@pytest.fixture
async def fenv(host: Sshd, tmp_path: Path) -> AsyncIterator[Env]:
    """hoop's SSH proxy on a resource that allows port forwarding."""
    async for e in env_for(host, tmp_path, allow={"port_forwarding": True}):
        yield e


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("tty", [False, True], ids=["exec", "exec-tty"])
async def test_an_exec_running_at_the_deadline_dies_on_the_host(env: Env, tty: bool) -> None:
    """Closing the channel is not enough: without a PTY, sshd leaves the command running when its channel
    closes, and it ran on for as long as it liked after the grant ended."""
    naptime = f"{900 + secrets.randbelow(99)}.{secrets.randbelow(10**6):06d}"
    grant, secret = await env.grant()
    proc = await spawn(env, grant.login, secret, f"echo started; sleep {naptime}; echo after", tty=tty)
    try:
        assert proc.stdout is not None
        assert b"started" in await asyncio.wait_for(proc.stdout.readline(), 10)
        assert running(f"sleep {naptime}")
        await wait_live(env)
        expire_soon(env)
        out, err = await finish(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert b"access expired" in (out if tty else err) and b"after" not in out  # (a PTY has no stderr)
    assert await close_reason(env) == "access expired"
    assert await gone(f"sleep {naptime}") == []


async def test_an_interactive_shell_running_a_command_at_the_deadline_dies_on_the_host(env: Env) -> None:
    naptime = f"{900 + secrets.randbelow(99)}.{secrets.randbelow(10**6):06d}"
    grant, secret = await env.grant()
    proc = await spawn(env, grant.login, secret, tty=True)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(f"sleep {naptime}\n".encode())
        await proc.stdin.drain()
        end = time.monotonic() + 10
        while not running(f"sleep {naptime}") and time.monotonic() < end:
            await asyncio.sleep(0.1)
        assert running(f"sleep {naptime}")
        expire_soon(env)
        out, _ = await finish(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert b"access expired" in out
    assert await close_reason(env) == "access expired"
    assert await gone(f"sleep {naptime}") == []


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
    proc = await spawn(fenv, grant.login, secret, "-N", "-o", "ExitOnForwardFailure=yes",
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
        expire_soon(fenv)
        async with asyncio.timeout(10):  # the stream ends: EOF, or a reset
            try:
                while await reader.read(4096):
                    pass
            except ConnectionError:
                pass
        writer.close()
        await finish(proc)
        assert proc.returncode != 0
        assert await close_reason(fenv) == "access expired"
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
    proc = await spawn(fenv, grant.login, secret, "-o", "ExitOnForwardFailure=yes",
                        "-R", f"127.0.0.1:{remote}:127.0.0.1:{target}", "echo up; read x")
    try:
        assert proc.stdout is not None
        assert await asyncio.wait_for(proc.stdout.readline(), 10) == b"up\n"  # the host listens
        reader, writer = await asyncio.open_connection("127.0.0.1", remote)
        writer.write(b"ping\n")
        assert await asyncio.wait_for(reader.readline(), 10) == b"ping\n"
        expire_soon(fenv)
        async with asyncio.timeout(10):
            try:
                while await reader.read(4096):
                    pass
            except ConnectionError:
                pass
        writer.close()
        assert await close_reason(fenv) == "access expired"
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
        proc = await spawn(env, grant.login, secret, f"sleep {naptime}")
    else:
        proc = await spawn(env, grant.login, secret)
        assert proc.stdin is not None
        proc.stdin.write(f"sleep {naptime}\n".encode())
        await proc.stdin.drain()
    try:
        end = time.monotonic() + 10
        while not running(f"sleep {naptime}") and time.monotonic() < end:
            await asyncio.sleep(0.1)
        assert running(f"sleep {naptime}")
    finally:
        proc.kill()
        await proc.wait()
    assert await close_reason(env) == "client disconnected"
    assert await gone(f"sleep {naptime}") == []


async def _answered(host: str, port: int, held: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> list[str]:
    """Ping over the ``held`` stream and over a fresh connection to ``host:port``; which of them answered."""
    answered = []
    for name in ("held", "new"):
        writer = None
        try:
            async with asyncio.timeout(0.5):
                reader, writer = held if name == "held" else await asyncio.open_connection(host, port)
                writer.write(b"ping\n")
                if await reader.readline() == b"ping\n":
                    answered.append(name)
        except (OSError, TimeoutError):
            pass
        finally:
            if name == "new" and writer is not None:
                writer.close()
    return answered


@pytest.mark.parametrize("forward", ["-L", "-R"])
async def test_the_port_forwards_of_a_client_that_stopped_reading_end_at_the_deadline(fenv: Env,
                                                                                      forward: str) -> None:
    """The client does not read its session's output, which the host filled: it cannot take in the end of the
    session channel, and hoop waits up to 2 s for it before disconnecting; its forwards end at the deadline."""
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    port = _free_port()
    grant, secret = await fenv.grant()
    target = int(server.sockets[0].getsockname()[1])
    proc = await spawn(fenv, grant.login, secret, "-o", "ExitOnForwardFailure=yes",
                       forward, f"127.0.0.1:{port}:127.0.0.1:{target}",
                       "echo up >&2; yes | head -c 8000000; sleep 900")
    try:
        assert proc.stderr is not None
        assert await asyncio.wait_for(proc.stderr.readline(), 10) == b"up\n"  # (stdout is never read)
        held = await asyncio.open_connection("127.0.0.1", port)
        assert await _answered("127.0.0.1", port, held) == ["held", "new"]
        deadline = time.monotonic() + 0.5
        expire_soon(fenv, 0.5)
        late = []
        while time.monotonic() < deadline + 3:
            answered = await _answered("127.0.0.1", port, held)
            if answered and time.monotonic() > deadline + 0.3:
                late.append(answered)
            await asyncio.sleep(0.1)
        held[1].close()
        assert late == [], "the forward outlived the grant"
        assert await close_reason(fenv) == "access expired"
        await finish(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        server.close()
        await server.wait_closed()
