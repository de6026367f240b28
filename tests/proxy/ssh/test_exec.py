"""exec through hoop with OpenSSH ssh and asyncssh: exit status, guard, masking, refusals."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import asyncssh
import pytest

from broker.model import SessionStatus
from tests.proxy.ssh.conftest import ADMIN, Env

pytestmark = pytest.mark.ssh


async def _events(env: Env, kind: str | None = None) -> list[dict[str, Any]]:
    await env.hub.flush()
    async with env.service.store.tx() as tx:
        sessions = await tx.list_sessions()
        out = []
        for s in sessions:
            out += [e.data | {"_kind": e.kind} for e in await tx.events(s.id) if kind is None or e.kind == kind]
    return out


async def test_exec_exit_status_with_openssh(env: Env) -> None:
    grant, secret = await env.grant()
    code, out, err = await env.ssh(grant.login, secret, "echo hello-$((40+2)); echo oops >&2; exit 7")
    assert (code, out) == (7, b"hello-42\n"), err
    assert err == b"oops\n"
    commands = await _events(env, "command")
    assert any(c["exit_status"] == 7 and c["decision"] == "allow" for c in commands)


async def test_exec_exit_signal_with_asyncssh(env: Env) -> None:
    grant, secret = await env.grant()
    async with await env.client(grant.login, secret) as conn:
        result = await conn.run("kill -TERM $$", check=False)
        assert result.exit_signal is not None and result.exit_signal[0] == "TERM"
        result = await conn.run("printf abc; exit 3", check=False)
        assert (result.exit_status, result.stdout) == (3, "abc")


async def test_blocked_exec_gets_126_and_never_runs(env: Env) -> None:
    grant, secret = await env.grant()
    marker = env.up.dir / "touched"
    # the test sshd runs as root on this machine: --preserve-root keeps a guard regression harmless
    code, out, err = await env.ssh(grant.login, secret, f"touch {marker}; sudo rm -rf --preserve-root /")
    assert code == 126
    assert b"no-rm-root" in err and out == b""
    assert not marker.exists()
    commands = await _events(env, "command")
    assert any(c["decision"] == "block" and c["exit_status"] == 126 and c["rule"] == "no-rm-root"
               for c in commands)


async def test_secret_printed_by_cat_is_masked_for_client_and_recording(env: Env) -> None:
    grant, secret = await env.grant()
    code, out, _ = await env.ssh(grant.login, secret, f"cat {env.up.dir / 'secret.txt'}")
    assert code == 0
    assert b"4111" not in out and b"alice@example.com" not in out
    assert b"[card]" in out and b"[email]" in out
    recorded = "".join(e["data"] for e in await _events(env, "output"))
    assert "[card]" in recorded and "4111 1111" not in recorded and "alice@example.com" not in recorded


async def test_a_secret_on_stderr_is_masked_for_client_and_recording(env: Env) -> None:
    grant, secret = await env.grant()
    code, out, err = await env.ssh(grant.login, secret, f"cat {env.up.dir / 'secret.txt'} >&2")
    assert code == 0 and out == b""
    assert b"4111" not in err and b"alice@example.com" not in err
    assert b"[card]" in err and b"[email]" in err
    recorded = "".join(e["data"] for e in await _events(env, "output"))
    assert "[card]" in recorded and "4111 1111" not in recorded and "alice@example.com" not in recorded


async def test_value_split_across_chunks_is_masked(env: Env) -> None:
    grant, secret = await env.grant()
    script = "printf 'card 4111 1111'; sleep 0.02; printf ' 1111 1111 end\\n'"
    code, out, _ = await env.ssh(grant.login, secret, script)
    assert code == 0 and b"4111" not in out and b"[card] end" in out


@pytest.mark.parametrize("case", ["wrong", "expired", "other-resource"])
async def test_bad_secret_is_a_plain_auth_failure(env: Env, case: str) -> None:
    grant, secret = await env.grant()
    if case == "wrong":
        secret = secret[:-4] + "AAAA"
    elif case == "expired":  # its time is up (an expiry before then is a no-op), and the scheduler ends it
        async with env.service.store.tx() as tx:
            await tx.update_grant(replace(grant, expires_at=env.service.clock.now()))
        await env.service.expire(grant.id)
    else:
        grant, secret = await env.service.breakglass(ADMIN, "prod-db", "alice@example.com", "30m", "test")
    code, out, _ = await env.ssh(grant.login, secret, "echo no")
    assert code == 5 and out == b""  # sshpass: the server refused the password
    with pytest.raises(asyncssh.PermissionDenied):
        await env.client(grant.login, secret)


async def test_sessions_are_recorded_and_closed(env: Env) -> None:
    grant, secret = await env.grant()
    await env.ssh(grant.login, secret, "true")
    for _ in range(50):
        async with env.service.store.tx() as tx:
            sessions = await tx.list_sessions()
        if sessions and sessions[0].status is SessionStatus.CLOSED:
            break
        await asyncio.sleep(0.05)
    assert sessions[0].status is SessionStatus.CLOSED and sessions[0].grant_id == grant.id


async def test_the_session_is_recorded_with_who_from_where_and_why_it_closed(env: Env) -> None:
    grant, secret = await env.grant()
    async with await env.client(grant.login, secret) as conn:
        host, port = conn.get_extra_info("sockname")[:2]
        assert (await conn.run("true", check=False)).exit_status == 0
    local = f"{host}:{port}"  # the client's address, as hoop sees it
    for _ in range(100):
        async with env.service.store.tx() as tx:
            (session,) = await tx.list_sessions()
        if session.status is SessionStatus.CLOSED:
            break
        await asyncio.sleep(0.05)
    chain = ("root@example.com", "alice@example.com")  # a break-glass grant: the admin who issued it, then alice
    assert (session.login, session.chain, session.client_addr) == (grant.login, chain, local)
    assert session.close_reason == "client disconnected"
    opened = (await _events(env, "open"))[0]
    assert (opened["chain"], opened["client"], opened["login"]) == (list(chain), local, grant.login)
    assert [c["reason"] for c in await _events(env, "close")] == ["client disconnected"]


async def test_keyboard_interactive_login_with_openssh(env: Env) -> None:
    grant, secret = await env.grant()
    argv = [a if a != "password,keyboard-interactive" else "keyboard-interactive" for a in env.ssh_argv(grant.login)]
    proc = await asyncio.create_subprocess_exec(*argv, "echo kbd-ok", stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
                                                env={**__import__("os").environ, "SSHPASS": secret})
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert (proc.returncode, out) == (0, b"kbd-ok\n")
