"""SSH proxy benchmark: bulk output and keystroke echo latency, direct vs through hoop, in one run.

* Bulk: OpenSSH ``ssh host cat <50 MB text file>`` to a throwaway sshd, directly and through
  hoop with masking off and on; MB/s from the first byte to EOF (connection setup excluded).
  The client's output is read in a process of its own, and the proxy process's CPU time per
  MB (all its threads, including the session recorder's SQLite writer) is reported too: on a
  shared machine it is steadier than MB/s. Best of ``BENCH_SSH_RUNS`` (3) runs per row.
* Interactive: an asyncssh client (in its own process) with a PTY types one character at a
  time into bash and waits for its echo; p50/p99 direct vs proxied, and the added latency.

Run: ``.venv/bin/python bench/ssh_proxy.py`` (prints, and writes bench/results/ssh_proxy.json).
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SIZE_MB = int(os.environ.get("BENCH_SSH_MB", "50"))
KEYS = 300
RUNS = int(os.environ.get("BENCH_SSH_RUNS", "3"))


def _text_file(path: Path) -> None:
    line = (b"2030-01-01T12:00:00Z INFO request handled path=/api/v1/orders status=200 "
            b"duration_ms=12 user=customer-481 region=eu-west-1 ok\n")
    with path.open("wb") as f:
        f.write(line * (SIZE_MB * 1024 * 1024 // len(line)))


def _cat_client(argv: list[str]) -> tuple[float, int]:
    """Run ``ssh … cat`` and read its stdout here (a process of its own, not the proxy's event loop)."""
    import subprocess

    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    first = os.read(fd, 65536)
    start, total = time.perf_counter(), len(first)
    while chunk := os.read(fd, 1 << 20):
        total += len(chunk)
    elapsed = time.perf_counter() - start
    proc.wait()
    return elapsed, total


async def _cat(argv: list[str], env: dict[str, str]) -> tuple[float, int, float]:
    """(seconds first byte to EOF, bytes, CPU seconds this process (the proxy) spent meanwhile)."""
    cpu = time.process_time()
    proc = await asyncio.create_subprocess_exec(sys.executable, __file__, "--cat-client", json.dumps(argv),
                                                stdout=asyncio.subprocess.PIPE, env=env)
    out, _ = await proc.communicate()
    elapsed, total = json.loads(out)
    return elapsed, total, time.process_time() - cpu


async def _echo_client(port: int, user: str, key: str | None, password: str | None) -> list[float]:
    import asyncssh

    keys = [asyncssh.read_private_key(key)] if key else None
    async with asyncssh.connect("127.0.0.1", port, username=user, client_keys=keys, password=password,
                                known_hosts=None, agent_path=None, config=None) as conn:
        proc = await conn.create_process(term_type="xterm", term_size=(200, 50), encoding=None)
        proc.stdin.write(b"export PS1='$ '\r")
        buf = b""
        while b"$ " not in buf[-4:]:
            buf += await proc.stdout.read(4096)
        samples = []
        for i in range(KEYS):
            if i % 50 == 49:
                proc.stdin.write(b"\x15")  # ^U: keep the line short
                await asyncio.sleep(0.05)
                while True:
                    try:
                        async with asyncio.timeout(0.05):
                            await proc.stdout.read(4096)
                    except TimeoutError:
                        break
                continue
            t = time.perf_counter()
            proc.stdin.write(b"a")
            got = b""
            while b"a" not in got:
                got += await proc.stdout.read(64)
            samples.append((time.perf_counter() - t) * 1000)
        proc.stdin.write(b"\x15exit\r")
        await proc.wait_closed()
    return samples


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))], 3)


async def _echo(port: int, user: str, key: str | None, password: str | None) -> dict[str, float]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--echo-client", str(port), user, key or "", password or "",
        stdout=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    out, _ = await proc.communicate()
    samples = json.loads(out)
    return {"p50_ms": _pct(samples, 0.5), "p99_ms": _pct(samples, 0.99), "mean_ms": round(statistics.mean(samples), 3)}


async def main() -> dict[str, Any]:
    from broker.clock import SystemClock
    from broker.config import parse_config
    from broker.events import Broadcast
    from broker.service import Service
    from broker.store import Store
    from proxy.access import Gate
    from proxy.sessions import SessionHub
    from proxy.ssh.server import SshProxy
    from tests.conftest import base_config
    from tests.proxy.ssh.conftest import ADMIN, ssh_resource
    from tests.support.sshd import sshd

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        with sshd(tmp / "sshd") as up:
            big = tmp / "big.txt"
            _text_file(big)
            data = base_config()
            data["resources"] = [ssh_resource(up, "web"),
                                 ssh_resource(up, "web-nomask", masking={"enabled": False})]
            config = parse_config(data)
            store = Store.from_url(f"sqlite+aiosqlite:///{tmp / 'hoop.db'}")
            await store.migrate()
            clock, bus = SystemClock(), Broadcast()
            service = Service(config, store, clock, bus)
            hub = SessionHub(service, clock, spool_dir=tmp / "spool")
            bus.add(hub)
            proxy = SshProxy(config, Gate(service, clock), hub, clock, {"UPKEY": up.client_key.read_text()},
                             tmp / "state")
            port = await proxy.start("127.0.0.1", 0)
            grants = {name: await service.breakglass(ADMIN, name, "bench@example.com", "1h", "bench")
                      for name in ("web", "web-nomask")}
            common = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
                      "-T"]
            direct = ["ssh", "-i", str(up.client_key), "-p", str(up.port), *common, f"{up.user}@127.0.0.1"]

            def via(name: str) -> tuple[list[str], dict[str, str]]:
                grant, secret = grants[name]
                return (["sshpass", "-e", "ssh", "-p", str(port), *common, "-o", "PubkeyAuthentication=no",
                         f"{grant.login}+{name}@127.0.0.1"], {**os.environ, "SSHPASS": secret})

            results: dict[str, Any] = {"size_mb": SIZE_MB, "bulk_mb_s": {}, "proxy_cpu_ms_per_mb": {}, "echo": {}}
            runs = {"direct": (direct, dict(os.environ)), "hoop_mask_off": via("web-nomask"),
                    "hoop_mask_on": via("web")}
            only = os.environ.get("BENCH_SSH_ONLY")
            for label, (argv, env) in runs.items():
                if only and label not in ("direct", only):
                    continue
                best, cpu_per_mb = 0.0, 0.0
                for _ in range(RUNS):
                    elapsed, total, cpu = await _cat([*argv, f"cat {big}"], env)
                    assert total >= SIZE_MB * 1024 * 1024 * 0.99, (label, total)
                    rate = total / 1024 / 1024 / elapsed
                    if rate > best:
                        best, cpu_per_mb = rate, cpu * 1000 / (total / 1024 / 1024)
                results["bulk_mb_s"][label] = round(best, 1)
                results["proxy_cpu_ms_per_mb"][label] = round(cpu_per_mb, 2)
                print(f"bulk {label:14s} {best:8.1f} MB/s   proxy process CPU {cpu_per_mb:5.2f} ms/MB", flush=True)
            if not only:
                results["echo"]["direct"] = await _echo(up.port, up.user, str(up.client_key), None)
                g, s = grants["web"]
                results["echo"]["hoop"] = await _echo(port, f"{g.login}+web", None, s)
                echo = results["echo"]
                for k in ("p50_ms", "p99_ms"):
                    echo[f"added_{k}"] = round(echo["hoop"][k] - echo["direct"][k], 3)
                print(f"echo direct {echo['direct']}  hoop {echo['hoop']}", flush=True)
                b = results["bulk_mb_s"]
                results["ratio_mask_off_vs_direct"] = round(b["hoop_mask_off"] / b["direct"], 3)
                results["targets"] = {"mask_off_ge_half_direct": results["ratio_mask_off_vs_direct"] >= 0.5,
                                      "mask_on_ge_50_mb_s": b["hoop_mask_on"] >= 50,
                                      "added_echo_p99_le_2ms": echo["added_p99_ms"] <= 2.0}
            await proxy.stop()
            await hub.close_all()
            await store.close()
    return results


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--cat-client":
        print(json.dumps(_cat_client(json.loads(sys.argv[2]))))
        sys.exit(0)
    if len(sys.argv) > 1 and sys.argv[1] == "--echo-client":
        port, user, key, password = sys.argv[2], sys.argv[3], sys.argv[4] or None, sys.argv[5] or None
        print(json.dumps(asyncio.run(_echo_client(int(port), user, key, password))))
        sys.exit(0)
    try:
        import uvloop
        result = uvloop.run(main())
    except ImportError:
        result = asyncio.run(main())
    result["machine"] = {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                         "load_avg_1m_at_end": round(os.getloadavg()[0], 2)}
    if os.environ.get("BENCH_SSH_ONLY"):  # a partial run (profiling): print, keep the stored results
        print(json.dumps(result, indent=2))
        sys.exit(0)
    out = ROOT / "bench" / "results" / "ssh_proxy.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
