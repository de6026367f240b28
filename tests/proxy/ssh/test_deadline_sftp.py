"""The grant's end against an SFTP transfer in progress, with OpenSSH's sftp client through hoop.

The transfer is slowed by the client (``sftp -l``) so that it is still running at the deadline. At the
deadline it must stop: the file being written (on the host for a put, on the client for a get) stops
growing, the client fails, the session is recorded closed with "access expired", and the host's
sftp-server process (an external one here, so it has a PID of its own) is gone.
"""

from __future__ import annotations

import asyncio
import os
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
    pids_gone,
    shared_dir,
    wait_live,
)
from tests.support.closing import close_reason
from tests.support.sshd import Sshd

pytestmark = pytest.mark.ssh

#: the file's size; at the client's limit (4 Mbit/s) the transfer takes about half a minute
SIZE = 16 << 20
LIMIT_KBITS = "4000"


@pytest.fixture(scope="module")
def host() -> Iterator[Sshd]:
    with host_sshd(sftp_server=True) as server:
        yield server


@pytest.fixture
async def env(host: Sshd, tmp_path: Path) -> AsyncIterator[Env]:
    async for e in env_for(host, tmp_path, allow={"sftp": True}):
        yield e


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return -1


async def _growing(path: Path, within: float = 15) -> int:
    """Wait until ``path`` holds some bytes; its size."""
    end = time.monotonic() + within
    while _size(path) <= 0 and time.monotonic() < end:
        await asyncio.sleep(0.05)
    assert _size(path) > 0, f"{path} did not start growing"
    return _size(path)


def _sftp_pids(host: Sshd) -> list[int]:
    try:
        text = (shared_dir(host) / "sftp-server.pids").read_text()
    except FileNotFoundError:
        return []
    return [int(word) for word in text.split()]


@pytest.mark.parametrize("direction", ["put", "get"])
async def test_an_sftp_transfer_in_progress_stops_at_the_deadline(env: Env, host: Sshd, tmp_path: Path,
                                                                  direction: str) -> None:
    local, remote = tmp_path / f"local-{direction}.bin", shared_dir(host) / f"remote-{direction}.bin"
    source, target = (local, remote) if direction == "put" else (remote, local)
    source.write_bytes(os.urandom(SIZE))
    os.chmod(source, 0o644)
    known = set(_sftp_pids(host))
    grant, secret = await env.grant()
    argv = ["sshpass", "-e", "sftp", "-P", str(env.port), "-l", LIMIT_KBITS, *env.ssh_argv(grant.login)[5:-2],
            f"{grant.login}@127.0.0.1"]  # (ssh's options, without -p and -T)
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "SSHPASS": secret})
    try:
        assert proc.stdin is not None
        proc.stdin.write(f"{direction} {source if direction == 'put' else remote} {target}\n".encode())
        await proc.stdin.drain()
        await wait_live(env)
        await _growing(target)
        servers = [pid for pid in _sftp_pids(host) if pid not in known]
        assert len(servers) == 1 and alive(servers[0])
        expire_soon(env)
        assert await close_reason(env) == "access expired"
        proc.stdin.close()
        _, err = await finish(proc, 15)
        size = _size(target)
        await asyncio.sleep(1.5)  # (at the client's limit, 750 KB more would arrive meanwhile)
        assert _size(target) == size < SIZE, "the file kept growing after the grant ended"
        assert proc.returncode != 0 or b"access expired" in err, err
        assert await pids_gone(servers) == [], "the host's sftp-server outlived the session"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
