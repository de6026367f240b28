"""The grant's end against agent forwarding (ssh -A) and X11 forwarding (ssh -Y) in use.

On the host, a probe started before the deadline and detached from the session (``setsid``, so hoop's
kill of the exec's process group does not reach it) keeps asking the forwarded agent (or display),
both on a connection it opened before the deadline and on a fresh one, and logs each answer. After the
deadline neither may answer any more: the probe outlives its session, the forwarding must not.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.proxy.ssh.conftest import Env
from tests.proxy.ssh.deadline import (
    alive,
    env_for,
    expire_soon,
    finish,
    host_sshd,
    shared_dir,
    spawn,
    wait_live,
)
from tests.support.closing import close_reason
from tests.support.sshd import Sshd, ssh_agent

pytestmark = pytest.mark.ssh

# Run on the host, detached: ask the agent (or the X display) every 0.3 s for at most 60 s, on the connection
# opened at start ("held") and on a new one ("new"); log "TIME held=ok|no new=ok|no" lines after "pid PID".
PROBE = r"""
import os, socket, subprocess, sys, time

kind, log_path = sys.argv[1], sys.argv[2]

def line(s):
    got = b""
    while not got.endswith(b"\n"):
        more = s.recv(1)
        if not more:
            raise EOFError
        got += more
    return got

def exactly(s, n):
    got = b""
    while len(got) < n:
        more = s.recv(n - len(got))
        if not more:
            raise EOFError
        got += more
    return got

def connect():
    if kind == "agent":
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(2)
        s.connect(os.environ["SSH_AUTH_SOCK"])
        return s
    display = os.environ["DISPLAY"]
    host, rest = display.rsplit(":", 1)
    entry = subprocess.check_output(["xauth", "list", display], timeout=5).split()
    proto, data = entry[1], bytes.fromhex(entry[2].decode())
    pad = lambda b: b + b"\0" * (-len(b) % 4)
    s = socket.create_connection((host or "localhost", 6000 + int(rest.split(".")[0])), timeout=2)
    s.sendall(b"l\0" + (11).to_bytes(2, "little") + bytes(2) + len(proto).to_bytes(2, "little")
              + len(data).to_bytes(2, "little") + bytes(2) + pad(proto) + pad(data))
    if line(s) != b"setup-ok\n":
        raise EOFError
    return s

def ask(s):
    if kind == "agent":  # SSH2_AGENTC_REQUEST_IDENTITIES, answered by SSH2_AGENT_IDENTITIES_ANSWER
        s.sendall(b"\0\0\0\x01\x0b")
        return exactly(s, int.from_bytes(exactly(s, 4), "big"))[:1] == b"\x0c"
    s.sendall(b"ping\n")
    return line(s) == b"ping\n"

def attempt(get, close):
    try:
        s = get()
        ok = ask(s)
        if close:
            s.close()
        return "ok" if ok else "no"
    except Exception:
        return "no"

with open(log_path, "a", buffering=1) as log:
    log.write(f"pid {os.getpid()}\n")
    try:
        held = connect()
    except Exception:
        held = None
    end = time.monotonic() + 60
    while time.monotonic() < end:
        h = attempt(lambda: held, False) if held is not None else "no"
        n = attempt(connect, True)
        log.write(f"{time.time():.3f} held={h} new={n}\n")
        time.sleep(0.3)
"""


@pytest.fixture(scope="module")
def host() -> Iterator[Sshd]:
    with host_sshd(x11=True) as server:
        os.chmod(server.dir, 0o1777)  # sshd has the login user's xauth write XAUTHORITY there
        (shared_dir(server) / "probe.py").write_text(PROBE)
        yield server


@pytest.fixture
async def env(host: Sshd, tmp_path: Path) -> AsyncIterator[Env]:
    async for e in env_for(host, tmp_path, allow={"agent_forwarding": True, "x11": True}):
        yield e


@contextlib.asynccontextmanager
async def echo_display() -> AsyncIterator[int]:
    """A fake X server on 127.0.0.1:6000+N that, after the connection setup, echoes lines; yields N."""
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(90):
                prefix = await reader.readexactly(12)
                sizes = [int.from_bytes(prefix[i:i + 2], "little") for i in (6, 8)]
                await reader.readexactly(sum(n + (-n % 4) for n in sizes))
                writer.write(b"setup-ok\n")
                while got := await reader.readline():
                    writer.write(got)
                    await writer.drain()
        writer.close()

    for n in range(400, 500):  # sshd's own displays start at 10; test_agent_x11's fake ones at 300
        try:
            server = await asyncio.start_server(serve, "127.0.0.1", 6000 + n)
        except OSError:
            continue
        try:
            yield n
        finally:
            server.close()
            await server.wait_closed()
        return
    raise RuntimeError("no free X display port")


def _log(path: Path) -> tuple[int | None, list[tuple[float, str]]]:
    """The probe's PID and its ``(time, answers)`` lines."""
    pid, lines = None, []
    with contextlib.suppress(FileNotFoundError):
        for text in path.read_text().splitlines():
            word, _, rest = text.partition(" ")
            if word == "pid":
                pid = int(rest)
            elif rest:
                lines.append((float(word), rest))
    return pid, lines


async def _probe_across_the_deadline(env: Env, host: Sshd, kind: str, flag: str, client_env: dict[str, str],
                                     stalled: bool) -> None:
    """``stalled``: the client does not read its output, which the host's command has filled: so it cannot take
    in the end of its session channel, while its agent or display still answers on their own channels."""
    log = shared_dir(host) / f"probe-{kind}-{time.monotonic_ns()}.log"
    grant, secret = await env.grant()
    flood = "yes | head -c 8000000; " if stalled else ""
    proc = await spawn(env, grant.login, secret, flag,
                       f"setsid -f /usr/bin/python3 {shared_dir(host) / 'probe.py'} {kind} {log} "
                       f"</dev/null >/dev/null 2>&1; echo up >&2; {flood}sleep 900", extra_env=client_env)
    pid = None
    try:
        assert proc.stderr is not None
        async with asyncio.timeout(15):  # (xauth on the host may complain first)
            while (said := await proc.stderr.readline()) not in (b"up\n", b""):
                pass
        assert said == b"up\n"
        await wait_live(env)
        end = time.monotonic() + 15
        while not any(a == "held=ok new=ok" for _, a in _log(log)[1]) and time.monotonic() < end:
            await asyncio.sleep(0.1)
        pid, lines = _log(log)
        assert pid is not None and ("held=ok new=ok" in {a for _, a in lines}), lines
        deadline = time.time() + 0.5
        expire_soon(env, 0.5)
        assert await close_reason(env) == "access expired"
        await asyncio.sleep(2)
        assert alive(pid), "the probe should outlive its session (it left the process group)"
        after = [a for t, a in _log(log)[1] if t > deadline + 0.3]  # (an answer is a few ms)
        assert len(after) >= 2, after
        assert all(a == "held=no new=no" for a in after), f"the forwarding outlived the grant: {after}"
        await finish(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        if pid is not None and alive(pid):
            os.kill(pid, signal.SIGKILL)


CLIENTS = pytest.mark.parametrize("stalled", [False, True], ids=["client-reading", "client-stalled"])


@CLIENTS
async def test_a_forwarded_agent_stops_answering_on_the_host_at_the_deadline(env: Env, host: Sshd, tmp_path: Path,
                                                                              stalled: bool) -> None:
    async with ssh_agent(tmp_path, "client-agent-key") as agent:
        await _probe_across_the_deadline(env, host, "agent", "-A", {"SSH_AUTH_SOCK": agent}, stalled)


@CLIENTS
async def test_a_forwarded_display_stops_answering_on_the_host_at_the_deadline(env: Env, host: Sshd, tmp_path: Path,
                                                                                stalled: bool) -> None:
    async with echo_display() as display:
        await _probe_across_the_deadline(env, host, "x11", "-Y", {
            "DISPLAY": f"127.0.0.1:{display}", "XAUTHORITY": str(tmp_path / "client-xauthority")}, stalled)

