"""A throwaway PostgreSQL cluster: initdb in a temporary directory, scram auth, loopback only.

Used by the tests and by the benchmarks. PostgreSQL refuses to run as root, so as root the
cluster runs as the ``postgres`` system user (created by the Debian package).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


def pg_bindir() -> Path:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]))
    for d in reversed(candidates):
        if Path(d, "initdb").exists():
            return Path(d)
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    raise RuntimeError("PostgreSQL server binaries not found: run scripts/test.sh, which installs them")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PgCluster:
    datadir: Path
    port: int
    user: str
    password: str
    bindir: Path
    runas: str | None
    pid: int | None = None
    options: str = ""

    host = "127.0.0.1"

    def dsn(self, database: str = "postgres", user: str | None = None, password: str | None = None) -> str:
        return f"postgresql://{user or self.user}:{password or self.password}@{self.host}:{self.port}/{database}"

    def sqlalchemy_url(self, database: str) -> str:
        return f"postgresql+asyncpg://{self.user}:{self.password}@{self.host}:{self.port}/{database}"

    def env(self) -> dict[str, str]:
        return {**os.environ, "PGHOST": self.host, "PGPORT": str(self.port), "PGUSER": self.user,
                "PGPASSWORD": self.password, "PGDATABASE": "postgres"}

    def psql(self, sql: str, database: str = "postgres") -> str:
        out = subprocess.run([str(self.bindir / "psql"), "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-d", database,
                              "-c", sql], env=self.env(), capture_output=True, text=True, timeout=60, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"psql failed: {out.stderr.strip()}")
        return out.stdout.strip()

    def create_database(self, prefix: str = "t") -> str:
        name = f"{prefix}_{secrets.token_hex(4)}"
        self.psql(f"CREATE DATABASE {name}")
        return name

    def _cmd(self, *args: str) -> list[str]:
        return ["runuser", "-u", self.runas, "--", *args] if self.runas else list(args)

    def start(self) -> None:
        sockdir = self.datadir.parent / "sock"
        sockdir.mkdir(exist_ok=True)
        if self.runas:
            shutil.chown(sockdir, self.runas)
        subprocess.run(self._cmd(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-w", "-t", "60",
                                 "-l", str(self.datadir.parent / "postgres.log"),
                                 "-o", f"-p {self.port} -c listen_addresses=127.0.0.1 "
                                       f"-c unix_socket_directories={sockdir} -c max_connections=400 "
                                       "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                                       f"-c shared_buffers=128MB {self.options}",
                                 "start"), check=True, capture_output=True, timeout=90)
        self.pid = int((self.datadir / "postmaster.pid").read_text().split()[0])

    def stop(self) -> None:
        if self.pid is None:
            return
        subprocess.run(self._cmd(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", "fast", "-w",
                                 "-t", "30", "stop"), capture_output=True, timeout=60, check=False)
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, 0)
            os.kill(self.pid, 9)
        self.pid = None


@contextlib.contextmanager
def pg_cluster(*, hba_extra: str = "", tls: tuple[Path, Path] | None = None) -> Iterator[PgCluster]:
    """Start a cluster that requires scram-sha-256 over TCP; stop it (by PID) on exit.

    ``tls=(cert, key)`` turns on TLS with that pair (``hba_extra`` can then refuse plain TCP)."""
    bindir = pg_bindir()
    runas = None
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            subprocess.run(["useradd", "--system", "--no-create-home", "postgres"], check=True)
        runas = "postgres"
    base = Path(tempfile.mkdtemp(prefix="hoop-pg-"))
    if runas:
        shutil.chown(base, runas)
        base.chmod(0o700)
    datadir = base / "data"
    password = secrets.token_urlsafe(18)
    pwfile = base / "pw"
    pwfile.write_text(password)
    if runas:
        shutil.chown(pwfile, runas)
    try:
        subprocess.run([*(["runuser", "-u", runas, "--"] if runas else []), str(bindir / "initdb"), "-D",
                        str(datadir), "-U", "postgres", "--pwfile", str(pwfile), "--auth=scram-sha-256",
                        "-E", "UTF8", "--no-sync", "--locale=C"],
                       check=True, capture_output=True, timeout=120)
        if hba_extra:
            hba = datadir / "pg_hba.conf"
            hba.write_text(hba_extra + "\n" + hba.read_text())
        options = ""
        if tls is not None:
            for src, name in ((tls[0], "server.crt"), (tls[1], "server.key")):
                dst = datadir / name
                shutil.copyfile(src, dst)
                dst.chmod(0o600)
                if runas:
                    shutil.chown(dst, runas)
            options = "-c ssl=on -c ssl_cert_file=server.crt -c ssl_key_file=server.key"
        cluster = PgCluster(datadir=datadir, port=free_port(), user="postgres", password=password,
                            bindir=bindir, runas=runas, options=options)
        deadline = time.monotonic() + 30
        while True:
            try:
                cluster.start()
                break
            except subprocess.CalledProcessError:
                if time.monotonic() > deadline:
                    raise
                cluster.port = free_port()
        try:
            yield cluster
        finally:
            cluster.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)
