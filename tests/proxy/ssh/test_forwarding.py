"""Remote port forwarding (ssh -R) and agent forwarding through hoop with OpenSSH, refused by default."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.proxy.ssh.conftest import Env, make_config, ssh_resource, start_env, stop_env
from tests.support.sshd import Sshd, ssh_agent

pytestmark = pytest.mark.ssh


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _pong(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    line = await reader.readline()
    writer.write(b"pong " + line)
    await writer.drain()
    writer.close()


@pytest.fixture
async def listener() -> AsyncIterator[int]:
    """A local TCP service the client's forward points at; yields its port."""
    server = await asyncio.start_server(_pong, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        await server.wait_closed()


async def _ping(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"ping\n")
        return await asyncio.wait_for(reader.readline(), 10)
    finally:
        writer.close()
        await writer.wait_closed()


async def test_remote_forwarding_refused_by_default(env: Env, listener: int,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="proxy.ssh.server")
    grant, secret = await env.grant()
    remote = _free_port()
    code, _, err = await env.ssh(grant.login, secret, "-o", "ExitOnForwardFailure=yes",
                                 "-R", f"127.0.0.1:{remote}:127.0.0.1:{listener}", "echo no")
    assert code == 255 and b"remote port forwarding failed" in err
    code, out, err = await env.ssh(grant.login, secret, "-R", f"127.0.0.1:{remote}:127.0.0.1:{listener}",
                                   "echo still-runs")
    assert (code, out) == (0, b"still-runs\n")
    assert b"hoop: remote port forwarding (127.0.0.1:" in err and b"allow.port_forwarding is off" in err
    assert "remote port forwarding to 127.0.0.1" in caplog.text and "allow.port_forwarding is off" in caplog.text
    with pytest.raises(OSError):
        await _ping(remote)  # nothing listens on the host


async def test_remote_forwarding_allowed_by_config(upstream: Sshd, tmp_path: Path, listener: int) -> None:
    env, store = await start_env(upstream, tmp_path, make_config(upstream, ssh_resource(
        upstream, allow={"port_forwarding": True})))
    try:
        grant, secret = await env.grant()
        remote = _free_port()
        proc = await asyncio.create_subprocess_exec(
            *env.ssh_argv(grant.login, "-o", "ExitOnForwardFailure=yes", "-R",
                          f"127.0.0.1:{remote}:127.0.0.1:{listener}", "echo up; read x; echo bye"),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "SSHPASS": secret})
        assert proc.stdin is not None and proc.stdout is not None
        try:
            assert await asyncio.wait_for(proc.stdout.readline(), 30) == b"up\n"
            # The host (sshd on 127.0.0.1) listens on `remote`; a connection there comes back to `listener`.
            assert await _ping(remote) == b"pong ping\n"
            assert await _ping(remote) == b"pong ping\n"
            proc.stdin.write(b"\n")
            out, err = await asyncio.wait_for(proc.communicate(), 30)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert (proc.returncode, out) == (0, b"bye\n"), err
        await env.hub.flush()
        async with env.service.store.tx() as tx:
            events = await tx.events((await tx.list_sessions())[0].id)
        forwards = [e.data for e in events if e.kind == "forward"]
        assert {"listen": f"127.0.0.1:{remote}"} in forwards
        assert sum(1 for f in forwards if f.get("remote") == f"127.0.0.1:{remote}") == 2
    finally:
        await stop_env(env, store)


async def test_remote_forwarding_port_zero_with_asyncssh(upstream: Sshd, tmp_path: Path, listener: int) -> None:
    env, store = await start_env(upstream, tmp_path, make_config(upstream, ssh_resource(
        upstream, allow={"port_forwarding": True})))
    try:
        grant, secret = await env.grant()
        async with await env.client(grant.login, secret) as conn:
            fwd = await conn.forward_remote_port("127.0.0.1", 0, "127.0.0.1", listener)
            port = fwd.get_port()
            assert port != 0
            assert await _ping(port) == b"pong ping\n"
            fwd.close()
            await fwd.wait_closed()
    finally:
        await stop_env(env, store)


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[str]:
    async with ssh_agent(tmp_path, "agent-key") as sock:
        yield sock


async def test_agent_forwarding_refused_by_default(env: Env, agent: str) -> None:
    grant, secret = await env.grant()
    argv = env.ssh_argv(grant.login, "-A", "ssh-add -l; echo sock=${SSH_AUTH_SOCK:-none}")
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                                                env={**os.environ, "SSHPASS": secret, "SSH_AUTH_SOCK": agent})
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert b"sock=none" in out and b"agent-key" not in out


async def test_x11_refused_by_default(env: Env) -> None:
    grant, secret = await env.grant()
    argv = env.ssh_argv(grant.login, "-X", "echo display=${DISPLAY:-none}")
    argv[argv.index("LogLevel=ERROR")] = "LogLevel=INFO"
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                                                env={**os.environ, "SSHPASS": secret, "DISPLAY": ":99"})
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0 and b"display=none" in out
    assert b"X11 forwarding request failed" in err
