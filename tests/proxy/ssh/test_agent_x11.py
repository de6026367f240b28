"""Agent forwarding (ssh -A) and X11 forwarding (ssh -Y) through hoop with OpenSSH: allowed per resource.

The upstream is a real sshd with X11Forwarding on; the client's agent is a real ssh-agent; the
client's display is a fake X server on a loopback port (it reads the X11 connection prefix and
the bytes after it, and answers).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.config import SshResource
from broker.errors import UpstreamError
from proxy.ssh import upstream as upstream_mod
from proxy.ssh.agentx11 import xauth_entry
from tests.proxy.ssh.conftest import Env, make_config, ssh_resource, start_env, stop_env
from tests.support.sshd import Sshd, ssh_agent, sshd

pytestmark = pytest.mark.ssh

# Run on the host: connect to $DISPLAY with the cookie sshd put in $XAUTHORITY, send a line, print the answer.
X_CLIENT = r"""
import os, socket, subprocess
display = os.environ["DISPLAY"]
host, rest = display.rsplit(":", 1)
entry = subprocess.check_output(["xauth", "list", display]).split()
proto, data = entry[1], bytes.fromhex(entry[2].decode())
pad = lambda b: b + b"\0" * (-len(b) % 4)
s = socket.create_connection((host or "localhost", 6000 + int(rest.split(".")[0])), timeout=10)
s.sendall(b"l\0" + (11).to_bytes(2, "little") + bytes(2) + len(proto).to_bytes(2, "little")
          + len(data).to_bytes(2, "little") + bytes(2) + pad(proto) + pad(data))
answers = s.makefile("rb")
print("setup:", answers.readline().decode().strip())  # like a real X client, wait for the server's setup
s.sendall(b"hello-x11\n")
print("answer:", answers.readline().decode().strip())
"""


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    """This module's sshd: X11Forwarding yes (overrides the conftest one)."""
    with sshd(tmp_path_factory.mktemp("sshd-x11"), x11=True) as server:
        (server.dir / "xclient.py").write_text(X_CLIENT)
        yield server


@contextlib.asynccontextmanager
async def fake_x_server() -> AsyncIterator[tuple[int, list[bytes]]]:
    """A fake X server on 127.0.0.1:6000+N; yields (N, what each connection sent).

    It reads the connection prefix and the cookie, answers a line, reads a line and answers again.
    """
    received: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(10):
                prefix = await reader.readexactly(12)
                sizes = [int.from_bytes(prefix[i:i + 2], "little") for i in (6, 8)]
                auth = await reader.readexactly(sum(n + (-n % 4) for n in sizes))
                writer.write(b"setup-ok\n")
                hello = await reader.readuntil(b"hello-x11\n")
                received.append(prefix + auth + hello)
                writer.write(b"x11-reply\n")
                await writer.drain()
        writer.close()

    for n in range(300, 400):  # sshd's own displays start at 10
        try:
            server = await asyncio.start_server(serve, "127.0.0.1", 6000 + n)
        except OSError:
            continue
        try:
            yield n, received
        finally:
            server.close()
            await server.wait_closed()
        return
    raise RuntimeError("no free X display port")


async def run_ssh(env: Env, login: str, secret: str, *args: str, extra_env: dict[str, str],
                  tty: bool = False) -> tuple[int, str, str]:
    argv = env.ssh_argv(login, *args, tty=tty)
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                                                env={**os.environ, "SSHPASS": secret, **extra_env})
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def events(env: Env, resource: str) -> list[tuple[str, dict[str, Any]]]:
    await env.hub.flush()
    async with env.service.store.tx() as tx:
        sessions = await tx.list_sessions(resource=resource)
        return [(e.kind, e.data) for s in sessions for e in await tx.events(s.id)]


@pytest.fixture
async def two(upstream: Sshd, tmp_path: Path) -> AsyncIterator[Env]:
    """One proxy, two resources on the same host: ``web`` allows agent and X11 forwarding, ``db`` nothing."""
    config = make_config(upstream, ssh_resource(upstream, "web", allow={"agent_forwarding": True, "x11": True}),
                         ssh_resource(upstream, "db"))
    env, store = await start_env(upstream, tmp_path, config)
    try:
        yield env
    finally:
        await stop_env(env, store)


async def test_agent_forwarded_to_the_clients_agent(two: Env, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    async with ssh_agent(tmp_path, "client-agent-key") as client_agent, \
            ssh_agent(tmp_path, "hoop-own-key") as hoop_agent:
        monkeypatch.setenv("SSH_AUTH_SOCK", hoop_agent)  # hoop's own agent must stay out of it
        grant, secret = await two.grant("web")
        code, out, err = await run_ssh(two, grant.login, secret, "-A", "ssh-add -l",
                                       extra_env={"SSH_AUTH_SOCK": client_agent})
        assert code == 0, err
        assert "client-agent-key" in out and "hoop-own-key" not in out
        assert "hoop:" not in err
        # Without -A the host finds no agent behind its socket, although the resource allows it.
        _, out, _ = await run_ssh(two, grant.login, secret, "ssh-add -l; echo rc=$?",
                                     extra_env={"SSH_AUTH_SOCK": client_agent})
        assert "client-agent-key" not in out and "rc=0" not in out
    recorded = await events(two, "web")
    assert ("forward", {"what": "agent forwarding", "channel": 1}) in recorded
    assert sum(1 for kind, data in recorded if kind == "forward" and data == {"what": "agent"}) == 1


async def test_agent_refused_per_resource(two: Env, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="proxy.ssh.server")
    async with ssh_agent(tmp_path, "client-agent-key") as client_agent:
        grant, secret = await two.grant("db")
        code, out, err = await run_ssh(two, grant.login, secret, "-A", "ssh-add -l; echo sock=${SSH_AUTH_SOCK:-none}",
                                       extra_env={"SSH_AUTH_SOCK": client_agent})
    assert code == 0 and "sock=none" in out and "client-agent-key" not in out
    assert "hoop: agent forwarding (db) refused: allow.agent_forwarding is off on this resource" in err
    assert "agent forwarding to db refused: allow.agent_forwarding is off" in caplog.text
    recorded = await events(two, "db")
    assert ("blocked", {"what": "agent forwarding", "target": "db", "reason": "allow.agent_forwarding is off",
                        "text": "agent forwarding (db): allow.agent_forwarding is off",
                        "rule": "allow.agent_forwarding"}) in recorded
    assert not any(kind == "forward" for kind, _ in recorded)


async def test_upstream_login_never_uses_the_forwarded_agent(upstream: Sshd, tmp_path: Path) -> None:
    """Only the agent's key is authorized on the host: hoop, holding another key, must be refused."""
    keys = upstream.dir / "authorized_keys"
    saved = keys.read_text()
    wrong = tmp_path / "wrong_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(wrong)], check=True,
                   stdout=subprocess.DEVNULL)
    res = make_config(upstream).resources[-1]
    assert isinstance(res, SshResource)
    async with ssh_agent(tmp_path, "agent-only-key") as agent:
        keys.write_text((tmp_path / "agent-only-key.pub").read_text())
        try:
            # The agent's key does log in to the host (so a leak into hoop's login would be seen).
            probe = subprocess.run(
                ["ssh", "-p", str(upstream.port), "-o", "StrictHostKeyChecking=no",
                 "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", f"IdentityAgent={agent}",
                 "-o", "IdentityFile=/dev/null",
                 f"{upstream.user}@127.0.0.1", "true"], capture_output=True, timeout=30)
            assert probe.returncode == 0, probe.stderr
            with pytest.raises(UpstreamError) as info:
                conn = await upstream_mod.connect(res, {"UPKEY": wrong.read_text()}, agent_relay=agent)
                conn.close()
            assert info.value.code == "upstream_auth"
        finally:
            keys.write_text(saved)


async def test_x11_relayed_to_the_clients_display(two: Env, tmp_path: Path) -> None:
    async with fake_x_server() as (display, received):
        grant, secret = await two.grant("web")
        code, out, err = await run_ssh(
            two, grant.login, secret, "-Y", f"{sys.executable} {two.up.dir / 'xclient.py'}; echo display=$DISPLAY",
            extra_env={"DISPLAY": f"127.0.0.1:{display}", "XAUTHORITY": str(tmp_path / "client-xauthority")})
    assert code == 0, err
    assert "setup: setup-ok\nanswer: x11-reply\n" in out and "display=localhost:" in out, (out, err)
    assert len(received) == 1 and received[0].endswith(b"hello-x11\n")
    assert received[0][:1] == b"l" and received[0][12:30] == b"MIT-MAGIC-COOKIE-1"
    recorded = await events(two, "web")
    assert ("forward", {"what": "X11 forwarding", "channel": 1}) in recorded
    assert ("forward", {"what": "x11"}) in recorded


async def test_x11_refused_per_resource(two: Env, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="proxy.ssh.server")
    async with fake_x_server() as (display, received):
        grant, secret = await two.grant("db")
        code, out, err = await run_ssh(
            two, grant.login, secret, "-Y", "echo display=${DISPLAY:-none}",
            extra_env={"DISPLAY": f"127.0.0.1:{display}", "XAUTHORITY": str(tmp_path / "client-xauthority")})
    assert code == 0 and "display=none" in out
    assert "X11 forwarding request failed" in err
    assert "hoop: X11 forwarding (db) refused: allow.x11 is off on this resource" in err
    assert "X11 forwarding to db refused: allow.x11 is off" in caplog.text
    assert received == []
    recorded = await events(two, "db")
    assert ("blocked", {"what": "X11 forwarding", "target": "db", "reason": "allow.x11 is off",
                        "text": "X11 forwarding (db): allow.x11 is off", "rule": "allow.x11"}) in recorded


def test_xauth_entry_is_read_by_xauth(tmp_path: Path) -> None:
    path = tmp_path / "xauthority"
    path.write_bytes(xauth_entry(b"MIT-MAGIC-COOKIE-1", bytes(range(16))))
    listed = subprocess.run(["xauth", "-f", str(path), "list"], capture_output=True, text=True, check=True).stdout
    assert listed.split()[1:] == ["MIT-MAGIC-COOKIE-1", bytes(range(16)).hex()]
    assert listed.split()[0].endswith(":0")


async def test_relays_private_and_removed_at_the_end(two: Env, tmp_path: Path) -> None:
    async with ssh_agent(tmp_path, "client-agent-key") as client_agent:
        grant, secret = await two.grant("web")
        proc = await asyncio.create_subprocess_exec(
            *two.ssh_argv(grant.login, "-A", "echo up; read x; echo display=${DISPLAY:-none}"),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "SSHPASS": secret, "SSH_AUTH_SOCK": client_agent})
        assert proc.stdin is not None and proc.stdout is not None
        try:
            assert await asyncio.wait_for(proc.stdout.readline(), 30) == b"up\n"
            (conn,) = two.proxy.connections
            assert conn.forwards is not None and conn.forwards.agent_relay is not None
            relay_dir = Path(conn.forwards.agent_relay).parent
            assert relay_dir.stat().st_mode & 0o777 == 0o700
            assert sorted(p.name for p in relay_dir.iterdir()) == ["agent", "x11:0"]
            proc.stdin.write(b"\n")
            out, _ = await asyncio.wait_for(proc.communicate(), 30)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert out == b"display=none\n"  # X11 is allowed on web, but this client did not ask for it
    for _ in range(100):
        if not relay_dir.exists():
            break
        await asyncio.sleep(0.05)
    assert not relay_dir.exists()


async def test_refusal_told_on_the_terminal(two: Env, tmp_path: Path) -> None:
    async with ssh_agent(tmp_path, "client-agent-key") as client_agent:
        grant, secret = await two.grant("db")
        code, out, _ = await run_ssh(two, grant.login, secret, "-A", "echo done",
                                     extra_env={"SSH_AUTH_SOCK": client_agent}, tty=True)
    assert code == 0
    assert "hoop: agent forwarding (db) refused: allow.agent_forwarding is off on this resource\r\n" in out
    assert out.rstrip().endswith("done")
