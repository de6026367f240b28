"""SFTP, scp and port forwarding refused by default and allowed by config; upstream host-key pinning."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import asyncssh
import pytest

from broker.config import Guardrails
from broker.errors import ConfigError
from broker.recap import session_transcript
from proxy.shellguard import ShellGuard
from proxy.ssh.context import transfer_server
from tests.proxy.ssh.conftest import SECRET_TEXT, Env, make_config, ssh_resource, start_env, stop_env
from tests.support.sshd import Sshd

pytestmark = pytest.mark.ssh


async def test_sftp_refused_by_default(env: Env) -> None:
    grant, secret = await env.grant()
    async with await env.client(grant.login, secret) as conn:
        with pytest.raises(asyncssh.SFTPError):
            await conn.start_sftp_client()
    code, _, err = await env.ssh(grant.login, secret, f"scp -f {env.up.dir / 'secret.txt'}")
    assert code == 126 and b"allow.sftp" in err


@pytest.mark.parametrize(("subsystem", "reason"), [("sftp", "allow.sftp is off on this resource"),
                                                   ("netconf", "hoop relays no other subsystem")])
async def test_refused_subsystem_gets_its_reason_and_126(env: Env, subsystem: str, reason: str) -> None:
    grant, secret = await env.grant()
    async with await env.client(grant.login, secret) as conn:
        proc = await conn.create_process(subsystem=subsystem, encoding=None)
        err = await asyncio.wait_for(proc.stderr.read(), 10)
        await proc.wait_closed()
    assert (proc.exit_status, err) == (126, f"hoop: subsystem {subsystem} refused: {reason}\n".encode())
    argv = env.ssh_argv(grant.login, tty=False)
    proc2 = await asyncio.create_subprocess_exec(*argv[:-1], "-s", argv[-1], subsystem,
                                                 stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                                                 stderr=asyncio.subprocess.PIPE, env={**os.environ, "SSHPASS": secret})
    _, err2 = await asyncio.wait_for(proc2.communicate(), 30)
    assert proc2.returncode == 126 and reason.encode() in err2
    await env.hub.flush()
    async with env.service.store.tx() as tx:
        events = [e for s in await tx.list_sessions() for e in await tx.events(s.id) if e.kind == "blocked"]
    assert len(events) == 2 and all(reason in e.data["text"] for e in events)


async def test_sftp_allowed_by_config(upstream: Sshd, tmp_path: Path) -> None:
    env, store = await start_env(upstream, tmp_path, make_config(upstream, ssh_resource(
        upstream, allow={"sftp": True})))
    try:
        grant, secret = await env.grant()
        async with await env.client(grant.login, secret) as conn, conn.start_sftp_client() as sftp:
            path = str(tmp_path / "up.txt")
            async with sftp.open(path, "w") as f:
                await f.write("through hoop\n")
            async with sftp.open(path) as f:
                assert await f.read() == "through hoop\n"
    finally:
        await stop_env(env, store)


async def _scp(env: Env, secret: str, *args: str) -> tuple[int, bytes]:
    argv = ["sshpass", "-e", "scp", "-P", str(env.port), "-o", "StrictHostKeyChecking=no", "-o",
            "UserKnownHostsFile=/dev/null", "-o", "PubkeyAuthentication=no", "-o", "LogLevel=ERROR", *args]
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE, env={**os.environ, "SSHPASS": secret})
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, err


@pytest.mark.parametrize(("command", "raw"), [
    ("scp -f /srv/a.txt", True),
    ("rsync --server . #'\nid #'", False),  # a quote in a comment hid a second command
    ('/usr/lib/openssh/sftp-server #"\nid #"', False),
    ("scp -t -- /srv", True),
    ("scp -r -p -t '/srv/dir with space'", True),
    ("/usr/lib/openssh/sftp-server", True),
    ("rsync --server --sender -vlogDtpre.iLsfxCIvu . /srv", True),
    ("scp /srv/a.txt other:/tmp", False),  # a client: its output is text
    ("sftp -s /usr/lib/openssh/sftp-server other", False),
    ("scp -f a; cat /etc/shadow", False),
    ("scp -f a && cat b", False),
    ("scp -f a | tee b", False),
    ("scp -f a > /dev/null", False),
    ("scp -f $(cat list)", False),
    ("scp -f `cat list`", False),
    ("sudo scp -f a", False),  # a wrapper may print too
    ("FOO=1 scp -f a", False),
    ("sh -c 'scp -f a'", False),
    ("cat a", False),
    ("scp -f 'unterminated", False),
    ("/usr/bin/scp -f /srv/a.txt", True),
    ("/usr/libexec/openssh/sftp-server", True),
    # a program by that name anywhere else may be one the user uploaded: its output is masked as any exec's
    ("./scp -f x", False),
    ("/tmp/evil/scp -t .", False),
    ("~/scp -f x", False),
    ("bin/rsync --server --sender . /srv", False),
    ("./sftp-server", False),
    ("/usr/bin/../../tmp/scp -f x", False),
    ("rsync --server --daemon .", False),  # runs what an rsyncd.conf says, before and around transfers
    ("rsync --server --dae .", False),  # (an abbreviation of it)
    ("rsync --server --config=/tmp/x --sender . /srv", False),
    ("rsync --server -M--x . /srv", False),
    ("rsync --sender --server . /srv", False),  # not as a client starts it
    # an scp that would act as a client runs a program of the user's choosing: never a transfer server
    ("scp -S/tmp/evil a h:b", False),
    ("scp '-oProxyCommand=id >&2; echo x' a nohost:b", False),
    ("scp -3 -S/tmp/evil h1:a h2:b", False),
    ("scp -t -S/x /srv", False),
    ("scp -F/tmp/cfg -t /srv", False),
    ("scp -tf /srv", False),
    ("scp -f", False),
    ("scp -v -d -t -- /srv/in", True),
    # rsync's real arguments may come on its input (-s), and the host's shell expands what the guard reads
    # literally: neither is ever taken for a transfer server
    ("rsync --server -s .", False),
    ("rsync --server -slogDtpre.iLsfxCIvu . /srv", False),
    ("rsync --server --protect-args .", False),
    ("rsync --server --secluded-args .", False),
    ("rsync --server $HOOPNOPE--daemon $HOOPNOPE--config=/tmp/c .", False),
    ("rsync --server --dae[m]on .", False),
    ("rsync --server --rsh=/tmp/x .", False),
    ("rsync --server --sender --delete --partial -vlogDtpre.iLsfxCIvu . /srv", True),
    ("scp -t ~/in", False),
    ("scp -f $HOME/x", False),
    ("scp -f /srv/a\\ b", False),
])
def test_only_a_plain_transfer_server_command_is_relayed_as_bytes(command: str, raw: bool) -> None:
    assert transfer_server(ShellGuard(Guardrails()), command) is raw


@pytest.mark.parametrize("legacy", [False, True], ids=["sftp-protocol", "scp-protocol"])
async def test_scp_allowed_by_config_copies_files_byte_for_byte(upstream: Sshd, tmp_path: Path, legacy: bool) -> None:
    """``scp -O`` (and scp before OpenSSH 9) runs ``scp -f``/``-t`` by exec, whose output hoop masked: a file
    holding an email or a card changed length under the scp protocol's byte count and the copy hung."""
    env, store = await start_env(upstream, tmp_path, make_config(upstream, ssh_resource(
        upstream, allow={"sftp": True})))
    try:
        grant, secret = await env.grant()
        flags = ["-O"] if legacy else []
        code, err = await _scp(env, secret, *flags, f"{grant.login}@127.0.0.1:{upstream.dir / 'secret.txt'}",
                               str(tmp_path / "down.txt"))
        assert code == 0, err
        assert (tmp_path / "down.txt").read_text() == SECRET_TEXT
        (tmp_path / "up.txt").write_text(SECRET_TEXT)
        code, err = await _scp(env, secret, *flags, str(tmp_path / "up.txt"), f"{grant.login}@127.0.0.1:"
                               f"{tmp_path / 'landed.txt'}")
        assert code == 0, err
        assert (tmp_path / "landed.txt").read_text() == SECRET_TEXT
        # a line that does more than transfer files is masked as any exec is
        code, out, _ = await env.ssh(grant.login, secret, f"scp -f /nonexistent; cat {upstream.dir / 'secret.txt'}")
        assert b"alice@example.com" not in out and b"[email]" in out
        await env.hub.flush()
        async with env.service.store.tx() as tx:
            events = [e for s in await tx.list_sessions() for e in await tx.events(s.id)]
        recorded = str([e.data for e in events if e.kind != "open"])  # (alice is also the grant's holder)
        assert "alice@example.com" not in recorded and "4111 1111" not in recorded
        if legacy:
            transfers = [e.data["command"] for e in events if e.kind == "sftp"]
            assert len(transfers) == 2 and all(c.startswith("scp -") for c in transfers), transfers
            assert sum(e.data["exit_status"] == 0 for e in events if e.kind == "command") >= 2
    finally:
        await stop_env(env, store)


async def test_a_program_named_like_a_transfer_server_elsewhere_is_masked(upstream: Sshd, tmp_path: Path) -> None:
    """With allow.sftp a user can upload a script named ``scp`` and run it by its path: its output must not
    be relayed as a transfer's (unmasked, unrecorded)."""
    env, store = await start_env(upstream, tmp_path, make_config(upstream, ssh_resource(
        upstream, allow={"sftp": True})))
    try:
        grant, secret = await env.grant()
        fake = tmp_path / "bin" / "scp"
        fake.parent.mkdir()
        fake.write_text(f"#!/bin/sh\ncat {upstream.dir / 'secret.txt'}\n")
        fake.chmod(0o755)
        code, out, _ = await env.ssh(grant.login, secret, f"{fake} -f x")
        assert code == 0 and b"alice@example.com" not in out and b"[email]" in out
        await env.hub.flush()
        async with env.service.store.tx() as tx:
            events = [e for s in await tx.list_sessions() for e in await tx.events(s.id)]
        assert not [e for e in events if e.kind == "sftp"]  # not taken for a transfer
        assert "[email]" in str([e.data for e in events if e.kind == "output"])  # its output is recorded, masked
    finally:
        await stop_env(env, store)


async def _rsync(env: Env, secret: str, *args: str) -> tuple[int, bytes]:
    shell = (f"ssh -p {env.port} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
             "-o PubkeyAuthentication=no -o LogLevel=ERROR")
    proc = await asyncio.create_subprocess_exec(
        "sshpass", "-e", "rsync", "-e", shell, *args, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={**os.environ, "SSHPASS": secret})
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, err


async def test_rsync_through_hoop_copies_files_byte_for_byte_when_sftp_is_allowed(upstream: Sshd,
                                                                                  tmp_path: Path) -> None:
    """rsync runs ``rsync --server`` by exec: with allow.sftp it is relayed as bytes both ways (masking its
    stream would break rsync's protocol, as it broke scp's); without it, it is refused like scp."""
    env, store = await start_env(upstream, tmp_path, make_config(upstream, ssh_resource(
        upstream, allow={"sftp": True})))
    try:
        grant, secret = await env.grant()
        remote = f"{grant.login}@127.0.0.1:"
        code, err = await _rsync(env, secret, "-a", f"{remote}{upstream.dir / 'secret.txt'}", str(tmp_path / "down"))
        assert code == 0, err
        assert (tmp_path / "down").read_text() == SECRET_TEXT
        (tmp_path / "tree").mkdir()
        (tmp_path / "tree" / "a.txt").write_text(SECRET_TEXT * 1000)
        code, err = await _rsync(env, secret, "-az", str(tmp_path / "tree") + "/", f"{remote}{tmp_path / 'landed'}")
        assert code == 0, err
        assert (tmp_path / "landed" / "a.txt").read_text() == SECRET_TEXT * 1000
        await env.hub.flush()
        async with env.service.store.tx() as tx:
            events = [e for s in await tx.list_sessions() for e in await tx.events(s.id)]
        transfers = [e.data["command"] for e in events if e.kind == "sftp"]
        assert len(transfers) == 2 and all(c.startswith("rsync --server") for c in transfers), transfers
    finally:
        await stop_env(env, store)


async def test_a_transfer_servers_stderr_is_masked_and_recorded(upstream: Sshd, tmp_path: Path) -> None:
    """A transfer server's stdout is its protocol and passes as bytes; its stderr carries none, so it is masked
    and recorded like any exec's (what a program started before or instead of the protocol could print)."""
    env, store = await start_env(upstream, tmp_path, make_config(upstream, ssh_resource(
        upstream, allow={"sftp": True})))
    try:
        grant, secret = await env.grant()
        code, _, err = await env.ssh(grant.login, secret, "rsync --server --max-size=alice@example.com . /tmp")
        assert code != 0 and b"is invalid" in err
        assert b"alice@example.com" not in err and b"[email]" in err
        await env.hub.flush()
        async with env.service.store.tx() as tx:
            events = [e for s in await tx.list_sessions() for e in await tx.events(s.id)]
        assert [e.data["command"] for e in events if e.kind == "sftp"]  # taken for a transfer server
        assert "[email]" in str([e.data for e in events if e.kind == "output"])
        assert "alice@example.com" not in str([e.data for e in events if e.kind != "open"])
    finally:
        await stop_env(env, store)


async def test_rsync_is_refused_without_allow_sftp(env: Env, tmp_path: Path) -> None:
    grant, secret = await env.grant()
    code, err = await _rsync(env, secret, "-a", f"{grant.login}@127.0.0.1:{env.up.dir / 'secret.txt'}",
                             str(tmp_path / "down"))
    assert code != 0 and b"allow.sftp" in err and not (tmp_path / "down").exists()


async def test_an_sftp_server_started_by_exec_copies_files_byte_for_byte(upstream: Sshd, tmp_path: Path) -> None:
    """``sftp -s /path/to/sftp-server`` (for a host without an sftp subsystem) runs the server by exec: its
    packets are relayed as bytes, as the subsystem's are."""
    env, store = await start_env(upstream, tmp_path, make_config(upstream, ssh_resource(
        upstream, allow={"sftp": True})))
    try:
        grant, secret = await env.grant()
        argv = ["sshpass", "-e", "sftp", "-P", str(env.port), "-o", "StrictHostKeyChecking=no", "-o",
                "UserKnownHostsFile=/dev/null", "-o", "PubkeyAuthentication=no", "-o", "LogLevel=ERROR",
                "-s", "/usr/lib/openssh/sftp-server", f"{grant.login}@127.0.0.1"]
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "SSHPASS": secret})
        _, err = await asyncio.wait_for(proc.communicate(
            f"get {upstream.dir / 'secret.txt'} {tmp_path / 'down.txt'}\n".encode()), 30)
        assert proc.returncode == 0, err
        assert (tmp_path / "down.txt").read_text() == SECRET_TEXT
        await env.hub.flush()
        async with env.service.store.tx() as tx:
            events = [e for s in await tx.list_sessions() for e in await tx.events(s.id)]
        assert [e.data["command"] for e in events if e.kind == "sftp"] == ["/usr/lib/openssh/sftp-server"]
    finally:
        await stop_env(env, store)


async def test_an_sftp_session_records_its_file_operations_masked(upstream: Sshd, tmp_path: Path) -> None:
    """The SFTP bytes pass unchanged, but which files were read, written, renamed and removed is recorded,
    paths masked, and is in the transcript."""
    env, store = await start_env(upstream, tmp_path, make_config(upstream, ssh_resource(
        upstream, allow={"sftp": True})))
    try:
        grant, secret = await env.grant()
        work = tmp_path / "work"
        work.mkdir()
        (tmp_path / "local.txt").write_text(SECRET_TEXT)
        batch = "\n".join([f"put {tmp_path / 'local.txt'} {work / 'alice@example.com.txt'}",
                            f"get {upstream.dir / 'secret.txt'} {tmp_path / 'got.txt'}",
                            f"rename {work / 'alice@example.com.txt'} {work / 'renamed.txt'}",
                            f"mkdir {work / 'sub'}", f"rmdir {work / 'sub'}", f"rm {work / 'renamed.txt'}"]) + "\n"
        argv = ["sshpass", "-e", "sftp", "-P", str(env.port), "-o", "StrictHostKeyChecking=no", "-o",
                "UserKnownHostsFile=/dev/null", "-o", "PubkeyAuthentication=no", "-o", "LogLevel=ERROR",
                f"{grant.login}@127.0.0.1"]
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "SSHPASS": secret})
        _, err = await asyncio.wait_for(proc.communicate(batch.encode()), 30)
        assert proc.returncode == 0, err
        assert (tmp_path / "got.txt").read_text() == SECRET_TEXT  # unchanged: SFTP bytes are not masked
        assert not (work / "renamed.txt").exists() and not (work / "sub").exists()
        await env.hub.flush()
        async with env.service.store.tx() as tx:
            sessions = await tx.list_sessions()
            events = [e for s in sessions for e in await tx.events(s.id)]
        moved = [(e.data["path"], e.data["read"], e.data["written"])
                 for e in events if e.kind == "sftp_op" and e.data["op"] == "transferred"]
        size = len(SECRET_TEXT)
        assert moved == [(f"{work}/[email]", 0, size), (str(upstream.dir / "secret.txt"), size, 0)], moved
        ops = [(e.data["op"], e.data["path"], e.data.get("to"), e.data.get("mode"))
               for e in events if e.kind == "sftp_op" and e.data["op"] not in ("list", "transferred")]
        assert ops == [
            ("open", f"{work}/[email]", None, "write,create,truncate"),
            ("open", str(upstream.dir / "secret.txt"), None, "read"),
            ("rename", f"{work}/[email]", str(work / "renamed.txt"), None),
            ("mkdir", str(work / "sub"), None, None),
            ("rmdir", str(work / "sub"), None, None),
            ("remove", str(work / "renamed.txt"), None, None),
        ], ops
        assert "alice@example.com" not in str([e.data for e in events if e.kind == "sftp_op"])
        _, transcript = await session_transcript(env.service, sessions[0].id)
        assert f"sftp rename {work}/[email] → {work / 'renamed.txt'}" in transcript.text
        assert f"sftp {upstream.dir / 'secret.txt'}: read {size} B" in transcript.text
    finally:
        await stop_env(env, store)


async def test_a_file_left_open_when_the_client_goes_is_still_counted(upstream: Sshd, tmp_path: Path) -> None:
    env, store = await start_env(upstream, tmp_path, make_config(upstream, ssh_resource(
        upstream, allow={"sftp": True})))
    try:
        grant, secret = await env.grant()
        conn = await env.client(grant.login, secret)
        sftp = await conn.start_sftp_client()
        f = await sftp.open(str(upstream.dir / "secret.txt"), "rb")
        assert await f.read(10) == SECRET_TEXT.encode()[:10]
        conn.abort()  # gone without closing the file
        for _ in range(50):
            await env.hub.flush()
            async with env.service.store.tx() as tx:
                events = [e for s in await tx.list_sessions() for e in await tx.events(s.id)]
            moved = [e.data for e in events if e.kind == "sftp_op" and e.data["op"] == "transferred"]
            if moved:
                break
            await asyncio.sleep(0.1)
        assert [{k: v for k, v in m.items() if k != "channel"} for m in moved] == [
            {"op": "transferred", "path": str(upstream.dir / "secret.txt"), "mode": "read", "read": 10, "written": 0,
             "unclosed": True}], moved
    finally:
        await stop_env(env, store)


async def test_port_forwarding_refused(env: Env) -> None:
    grant, secret = await env.grant()
    async with await env.client(grant.login, secret) as conn:
        with pytest.raises(asyncssh.ChannelOpenError) as info:
            await conn.open_connection("127.0.0.1", env.up.port)
        assert "not allowed" in info.value.reason
        with pytest.raises(asyncssh.ChannelListenError):
            await conn.forward_remote_port("127.0.0.1", 0, "127.0.0.1", 9)
    code, _, err = await env.ssh(grant.login, secret, "-o", "ExitOnForwardFailure=yes", "-W",
                                 f"127.0.0.1:{env.up.port}")
    assert code == 255 and b"forwarding failed" in err


async def test_port_forwarding_allowed_by_config(upstream: Sshd, tmp_path: Path) -> None:
    env, store = await start_env(upstream, tmp_path, make_config(upstream, ssh_resource(
        upstream, allow={"port_forwarding": True})))
    try:
        grant, secret = await env.grant()
        async with await env.client(grant.login, secret) as conn:
            reader, writer = await conn.open_connection("127.0.0.1", upstream.port)
            assert (await reader.readline()).startswith(b"SSH-2.0-OpenSSH")
            writer.close()
    finally:
        await stop_env(env, store)


async def test_upstream_host_key_mismatch_refused(upstream: Sshd, tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    other = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
    env, store = await start_env(upstream, tmp_path, make_config(upstream, ssh_resource(upstream, host_key=other)))
    try:
        grant, secret = await env.grant()
        code, out, err = await env.ssh(grant.login, secret, "echo should-not-run")
        assert code == 255 and out == b"", (code, out, err)
        assert b"does not match the pinned key" in err
        assert "does not match the pinned key" in caplog.text
    finally:
        await stop_env(env, store)


async def test_known_hosts_file_pins_the_key(upstream: Sshd, tmp_path: Path) -> None:
    res = ssh_resource(upstream, known_hosts=str(upstream.known_hosts_file()))
    del res["host_key"]
    env, store = await start_env(upstream, tmp_path, make_config(upstream, res))
    try:
        grant, secret = await env.grant()
        code, out, _ = await env.ssh(grant.login, secret, "echo pinned")
        assert (code, out) == (0, b"pinned\n")
    finally:
        await stop_env(env, store)


@pytest.mark.parametrize("case", ["no entry for the host", "no such file"])
async def test_a_known_hosts_without_the_hosts_key_stops_the_proxy_at_start(upstream: Sshd, tmp_path: Path,
                                                                            case: str) -> None:
    """Once found only when the first user connected; now the proxy does not start, naming the resource."""
    known = tmp_path / "known_hosts"
    if case == "no entry for the host":
        known.write_text(upstream.known_hosts_file().read_text().replace("127.0.0.1", "10.9.9.9"))
    res = ssh_resource(upstream, known_hosts=str(known))
    del res["host_key"]
    with pytest.raises(ConfigError) as exc:
        await start_env(upstream, tmp_path, make_config(upstream, res))
    expected = (f"resource web: {known} has no key for {upstream.address}" if case == "no entry for the host"
                else "resource web: pinned host key cannot be read")
    assert expected in exc.value.message, exc.value.message


async def test_host_key_persists_across_restarts(upstream: Sshd, tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="proxy.ssh")
    env, store = await start_env(upstream, tmp_path, make_config(upstream))
    first = env.proxy.fingerprint
    await stop_env(env, store)
    env, store = await start_env(upstream, tmp_path, make_config(upstream))
    try:
        assert env.proxy.fingerprint == first and first.startswith("SHA256:")
        # the fingerprint clients are shown is the one logged, at each start; the key is made once
        grant, secret = await env.grant()
        async with await env.client(grant.login, secret) as conn:
            assert conn.get_server_host_key().get_fingerprint() == first
    finally:
        await stop_env(env, store)
    assert caplog.text.count(f"host key {first}") == 2 and caplog.text.count("generated SSH host key") == 1
