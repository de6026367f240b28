"""A throwaway OpenSSH ``sshd`` on a loopback port, for tests and the SSH benchmark.

It runs in a temporary directory with its own host key, its own ``authorized_keys`` for a
freshly generated client key, ``UsePAM no`` and ``StrictModes no``, logging to a file. The
login user is the user running the tests (root in CI is fine for sshd). It is stopped by
its own PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Sshd:
    dir: Path
    port: int
    user: str
    host_key_line: str  # "ssh-ed25519 AAAA..." (the pinned upstream host key)
    client_key: Path  # private key accepted by this sshd
    proc: subprocess.Popen[bytes]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def known_hosts_file(self) -> Path:
        path = self.dir / "known_hosts"
        path.write_text(f"[127.0.0.1]:{self.port} {self.host_key_line}\n")
        return path

    def log(self) -> str:
        try:
            return (self.dir / "sshd.log").read_text(errors="replace")
        except OSError:
            return ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _keygen(path: Path, kind: str = "ed25519") -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-f", str(path)], check=True,
                   stdout=subprocess.DEVNULL)


def _ready(port: int, proc: subprocess.Popen[bytes], deadline: float) -> bool:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.settimeout(2)
            if s.recv(8).startswith(b"SSH-"):
                return True
        time.sleep(0.05)
    return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def sshd(base: Path, *, x11: bool = False, use_pam: bool = False, sftp: str = "internal-sftp") -> Iterator[Sshd]:
    """Start sshd under ``base``; yield it; stop it by PID.

    ``x11``: ``X11Forwarding yes`` (needs ``xauth``), with sessions' ``XAUTHORITY`` under ``base``
    (so the test user's own ``~/.Xauthority`` is left alone). ``use_pam``: ``UsePAM yes``, without which
    sshd refuses a login to an account whose password is locked (a system account such as ``postgres``).
    ``sftp``: the program of the sftp subsystem (an external server runs as a process of its own).
    """
    binary = shutil.which("sshd") or "/usr/sbin/sshd"
    base.mkdir(parents=True, exist_ok=True)
    os.chmod(base, 0o755)
    host_key, client_key = base / "host_ed25519", base / "client_ed25519"
    _keygen(host_key)
    _keygen(client_key)
    (base / "authorized_keys").write_text((base / "client_ed25519.pub").read_text())
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # privilege separation directory
    user = pwd.getpwuid(os.getuid()).pw_name
    last_log = ""
    for _attempt in range(5):
        port = _free_port()
        cfg = base / "sshd_config"
        cfg.write_text("\n".join([
            f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {host_key}",
            f"AuthorizedKeysFile {base / 'authorized_keys'}", f"UsePAM {'yes' if use_pam else 'no'}", "StrictModes no",
            "PermitRootLogin prohibit-password", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes", f"PidFile {base / 'sshd.pid'}", f"Subsystem sftp {sftp}",
            "MaxStartups 300", "MaxSessions 100", "PrintMotd no", "PrintLastLog no", "LogLevel ERROR",
            "AllowTcpForwarding yes", "UseDNS no", "AcceptEnv LANG LC_*",
            *(["X11Forwarding yes", "X11UseLocalhost yes", f"SetEnv XAUTHORITY={base / 'Xauthority'}"] if x11
              else ["X11Forwarding no"]),
            "",
        ]))
        log = base / "sshd.log"
        proc = subprocess.Popen([binary, "-D", "-e", "-f", str(cfg), "-E", str(log)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if _ready(port, proc, time.monotonic() + 10):
            pub = (base / "host_ed25519.pub").read_text().split()
            try:
                yield Sshd(dir=base, port=port, user=user, host_key_line=f"{pub[0]} {pub[1]}",
                           client_key=client_key, proc=proc)
            finally:
                _stop(proc)
            return
        _stop(proc)
        last_log = log.read_text(errors="replace") if log.exists() else ""
    raise RuntimeError(f"sshd did not start: {last_log[-2000:]}")


@contextlib.asynccontextmanager
async def ssh_agent(tmp: Path, name: str) -> AsyncIterator[str]:
    """An ssh-agent holding one generated key commented ``name``; yields its socket; stopped by its PID."""
    sock = str(tmp / f"{name}.sock")
    proc = await asyncio.create_subprocess_exec("ssh-agent", "-D", "-a", sock, stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.DEVNULL)
    try:
        for _ in range(250):
            if os.path.exists(sock):
                break
            await asyncio.sleep(0.02)
        key = tmp / name
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(key)], check=True,
                       stdout=subprocess.DEVNULL)
        subprocess.run(["ssh-add", "-q", str(key)], check=True, env={**os.environ, "SSH_AUTH_SOCK": sock},
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        yield sock
    finally:
        proc.terminate()
        await proc.wait()
