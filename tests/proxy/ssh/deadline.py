"""Helpers of the grant's-end tests: a host sshd that a non-root user logs in to, and what runs on it.

sshd delivers a signal to a session's processes only with privilege separation, which it drops after a
root login; so as root the tests log in to the host as the ``postgres`` user (:data:`LOGIN`), and look
for what keeps running on the host with pgrep, as that user.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

from tests.proxy.ssh.conftest import Env, make_config, ssh_resource, start_env, stop_env
from tests.support.sshd import Sshd, sshd

#: the host's login user
LOGIN = "postgres" if os.getuid() == 0 else pwd.getpwuid(os.getuid()).pw_name


#: the external sftp server the host runs with ``host_sshd(sftp_server=True)``
SFTP_SERVER = "/usr/lib/openssh/sftp-server"


@contextlib.contextmanager
def host_sshd(*, sftp_server: bool = False, **options: Any) -> Iterator[Sshd]:
    """A host sshd whose files the login user can read (pytest's tmp dirs are private to root); ``options``
    go to :func:`~tests.support.sshd.sshd`. ``<dir>/shared`` is a directory every user may write to.

    ``sftp_server``: the sftp subsystem is :data:`SFTP_SERVER` (a process of its own, unlike
    internal-sftp), started by a script that first appends its PID to ``shared/sftp-server.pids``."""
    base = Path(tempfile.mkdtemp(prefix="hoop-sshd-"))
    os.chmod(base, 0o755)
    shared = base / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    if sftp_server:
        script = base / "sftp-server"
        script.write_text(f'#!/bin/sh\necho $$ >> {shared / "sftp-server.pids"}\nexec {SFTP_SERVER} "$@"\n')
        os.chmod(script, 0o755)
        options["sftp"] = str(script)
    try:
        with sshd(base / "sshd", use_pam=LOGIN == "postgres", **options) as server:
            yield server
    finally:
        shutil.rmtree(base, ignore_errors=True)


def shared_dir(host: Sshd) -> Path:
    """The directory of ``host`` that the login user (and the tests) may write to."""
    return host.dir.parent / "shared"


async def env_for(host: Sshd, tmp: Path, **extra: Any) -> AsyncIterator[Env]:
    """hoop's SSH proxy on one resource ``web`` of ``host``, logging in as :data:`LOGIN`."""
    e, store = await start_env(host, tmp, make_config(host, ssh_resource(host, user=LOGIN, **extra)))
    try:
        yield e
    finally:
        await stop_env(e, store)


def running(pattern: str) -> list[str]:
    """The host's processes of the login user whose command line matches ``pattern``."""
    out = subprocess.run(["pgrep", "-u", LOGIN, "-af", pattern], capture_output=True, text=True,
                         timeout=10, check=False)
    return [line for line in out.stdout.splitlines() if "pgrep" not in line]


async def gone(pattern: str, within: float = 5) -> list[str]:
    """What still runs after ``within`` seconds; it is then killed by its PID (the test started it)."""
    end = time.monotonic() + within
    while (left := running(pattern)) and time.monotonic() < end:
        await asyncio.sleep(0.1)
    for line in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(line.split()[0]), signal.SIGKILL)
    return left


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


async def pids_gone(pids: list[int], within: float = 5) -> list[int]:
    """Which of ``pids`` still run after ``within`` seconds; they are then killed (the test started them)."""
    end = time.monotonic() + within
    while (left := [p for p in pids if alive(p)]) and time.monotonic() < end:
        await asyncio.sleep(0.1)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return left


async def wait_live(env: Env) -> None:
    for _ in range(200):
        if env.hub.live():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("no live session")


def expire_soon(env: Env, seconds: float = 0.5) -> None:
    """Move the live session's deadline (not the grant's) to ``seconds`` from now."""
    live = env.hub.live()[0]
    live.deadline = env.service.clock.now() + timedelta(seconds=seconds)
    live.arm()


async def spawn(env: Env, login: str, secret: str, *args: str, tty: bool = False,
                extra_env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    """OpenSSH ssh through hoop, with pipes on every stream."""
    return await asyncio.create_subprocess_exec(
        *env.ssh_argv(login, *args, tty=tty), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "SSHPASS": secret, **(extra_env or {})})


async def finish(proc: asyncio.subprocess.Process, within: float = 10) -> tuple[bytes, bytes]:
    """The rest of ``proc``'s output once it exits (killed if it has not within ``within`` seconds)."""
    try:
        async with asyncio.timeout(within):
            return await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
