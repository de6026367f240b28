"""hoop logs in to a host with a held password (``password``) instead of a private key.

The host is an asyncssh server on a loopback port that accepts one user's password and answers every exec
with what it was asked to run: the test sshd takes keys only, and giving an account on this machine a
password is not a test's business."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from broker.config import parse_config
from tests.conftest import base_config
from tests.proxy.ssh.conftest import Env, start_env, stop_env
from tests.support.sshd import Sshd

pytestmark = pytest.mark.ssh

PASSWORD = "held-host-password-5c1e"


class _Host(asyncssh.SSHServer):
    def begin_auth(self, username: str) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return True

    def validate_password(self, username: str, password: str) -> bool:
        return username == "deploy" and password == PASSWORD


def _run(process: asyncssh.SSHServerProcess[str]) -> None:
    process.stdout.write(f"host ran: {process.command}\n")
    process.exit(0)


@pytest.fixture
async def host() -> AsyncIterator[tuple[int, str]]:
    key = asyncssh.generate_private_key("ssh-ed25519")
    server = await asyncssh.create_server(_Host, "127.0.0.1", 0, server_host_keys=[key], process_factory=_run)
    try:
        yield server.sockets[0].getsockname()[1], key.export_public_key().decode().strip()
    finally:
        server.close()
        await server.wait_closed()


async def _env(upstream: Sshd, tmp_path: Path, host: tuple[int, str], password: str) -> tuple[Env, Any]:
    port, host_key = host
    data = base_config()
    data["resources"] = [*data["resources"], {
        "name": "pwhost", "kind": "ssh", "address": f"127.0.0.1:{port}", "user": "deploy",
        "password": {"env": "HOSTPW"}, "host_key": host_key, "channel": "C1",
        "request": {"groups": ["eng"], "max_duration": "4h", "default_duration": "30m"}}]
    return await start_env(upstream, tmp_path, parse_config(data), environ={"HOSTPW": password})


async def test_hoop_logs_in_with_the_held_password(upstream: Sshd, tmp_path: Path, host: tuple[int, str]) -> None:
    env, store = await _env(upstream, tmp_path, host, PASSWORD)
    try:
        grant, secret = await env.grant("pwhost")
        code, out, err = await env.ssh(grant.login, secret, "echo through hoop")
        assert (code, out) == (0, b"host ran: echo through hoop\n"), err
    finally:
        await stop_env(env, store)


async def test_a_wrong_held_password_is_refused_without_showing_it(upstream: Sshd, tmp_path: Path,
                                                                   host: tuple[int, str],
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="proxy")
    env, store = await _env(upstream, tmp_path, host, "not-the-host-password")
    try:
        grant, secret = await env.grant("pwhost")
        code, out, err = await env.ssh(grant.login, secret, "echo through hoop")
        assert code == 255 and out == b"" and b"pwhost refused hoop's held credential" in err, err
        assert b"not-the-host-password" not in err and "not-the-host-password" not in caplog.text
    finally:
        await stop_env(env, store)
