"""HTTP proxy benchmark: requests/s and latency direct vs through the proxy, masking off and on.

Three processes, so the proxy does not share a Python process with the load: an aiohttp
upstream, the proxy (with the real gate, session hub and a SQLite store), and this load
generator (aiohttp client, bounded concurrency, fixed duration, keep-alive). Each run GETs a
~1.2 KB JSON document with emails and key-pattern values. "masking off" goes through a
resource with masking disabled, "masking on" through one with detectors and JSON key rules.

    .venv/bin/python bench/http_proxy.py [--seconds 15] [--rounds 5] [--concurrency 8,32]

Each run is made at two numbers of connections. With 8, on a 2-core machine the round trip
through three processes bounds the run (each process often sleeps between requests): it
shows the latency a client sees and what each request costs. With 32 the proxy is saturated
and batches its work: it shows what the proxy can carry. In both the aiohttp load generator is
itself what bounds the direct run (one core at ~45 µs per request), so a ratio here compares
with a Python client's ceiling, not with the upstream's. The 1-minute load average is recorded
per run, since the machine may be shared. The three runs are interleaved in rounds (direct,
off, on; ``--seconds`` split over ``--rounds``): each figure is the median over the rounds,
and a ratio is the median of the ratios within each round, so a change in the machine's
load between runs moves direct and proxy alike. When nginx is installed it runs as the reference
reverse proxy (one worker, keep-alive upstream connections, no access log), as pgbouncer does for the
PostgreSQL bench. CPU per request is measured for the process in the middle (hoop or nginx), the
upstream and the load generator, from /proc. Prints a table per number of connections and
writes bench/results/http_proxy.json (``levels``: the figures per number of connections).
Targets: masking off >= 0.5x and masking on >= 0.4x the direct requests/s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TOKEN = "bench-upstream-token"
DOC = json.dumps({"items": [{"name": f"user {i}", "email": f"user{i}@example.com", "password": f"pw-{i}-secret",
                             "role": "viewer", "created": "2030-01-01T12:00:00Z", "id": i} for i in range(10)]})


def _loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:  # pragma: no cover
        return asyncio.new_event_loop()


async def _upstream(port_file: Path) -> None:
    from aiohttp import web

    body = DOC.encode()

    async def handler(request: web.BaseRequest) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    runner = web.ServerRunner(web.Server(handler, access_log=None), handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port_file.write_text(str(runner.addresses[0][1]))
    await asyncio.Event().wait()


async def _proxy(upstream_port: int, state: Path, port_file: Path) -> None:
    from broker.clock import SystemClock
    from broker.config import parse_config
    from broker.events import Broadcast
    from broker.model import Identity
    from broker.service import Service
    from broker.store import Store
    from proxy.access import Gate
    from proxy.http import HttpProxy
    from proxy.sessions import SessionHub

    address = f"http://127.0.0.1:{upstream_port}"
    config = parse_config({
        "admins": "admins", "groups": {"admins": {"members": ["root@example.com"]}},
        "resources": [
            {"name": "raw", "kind": "http", "address": address, "credential": {"env": "TOKEN"},
             "masking": {"enabled": False}},
            {"name": "masked", "kind": "http", "address": address, "credential": {"env": "TOKEN"},
             "masking": {"json_keys": [{"match": "password"}]}},
        ]})
    store = Store.from_url(f"sqlite+aiosqlite:///{state / 'hoop.db'}")
    await store.migrate()
    clock = SystemClock()
    bus = Broadcast()
    service = Service(config, store, clock, bus)
    gate = Gate(service, clock)
    hub = SessionHub(service, clock, spool_dir=state / "spool")
    bus.add(gate)
    bus.add(hub)
    root = Identity(email="root@example.com", groups=frozenset({"admins"}))
    secrets = {}
    for name in ("raw", "masked"):
        _, secrets[name] = await service.breakglass(root, name, "bench@example.com", "1h", "benchmark")
    proxy = HttpProxy(config, gate, hub, clock, {"TOKEN": TOKEN})
    port = await proxy.start("127.0.0.1", 0)
    gc.freeze()  # as broker.runtime.serve_forever does once started
    port_file.write_text(json.dumps({"port": port, "secrets": secrets}))
    await asyncio.Event().wait()


async def _load(url: str, headers: dict[str, str], seconds: float, concurrency: int) -> dict[str, Any]:
    import aiohttp

    latencies: list[float] = []
    errors = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as http:
        for _ in range(concurrency):  # warm the connections
            async with http.get(url, headers=headers) as r:
                await r.read()
        stop = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                async with http.get(url, headers=headers) as r:
                    await r.read()
                    if r.status != 200:
                        errors += 1
                latencies.append(time.perf_counter() - t0)

        start = time.perf_counter()
        async with asyncio.TaskGroup() as tg:
            for _ in range(concurrency):
                tg.create_task(worker())
        elapsed = time.perf_counter() - start
    latencies.sort()
    return {"requests": len(latencies), "errors": errors, "rps": round(len(latencies) / elapsed, 1),
            "p50_ms": round(statistics.median(latencies) * 1000, 3),
            "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 3)}


def _cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def _cpu_seconds(pid: int) -> float:
    return sum(_cpu_times(pid))


def _self_cpu() -> float:
    t = os.times()
    return t.user + t.system


def _median_of(rounds: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """One run's figures over the rounds: the median of each, the sum of requests and errors."""
    runs = [rnd[name] for rnd in rounds]
    out: dict[str, Any] = {"requests": sum(r["requests"] for r in runs), "errors": sum(r["errors"] for r in runs)}
    for key in ("rps", "p50_ms", "p99_ms", "loadavg_1m", "cpu_us_per_request_proxy", "cpu_us_per_request_upstream",
                "cpu_us_per_request_proxy_system",
                "cpu_us_per_request_client"):
        out[key] = round(statistics.median(r[key] for r in runs), 3)
    out["rps_per_round"] = [r["rps"] for r in runs]
    return out


def _nginx(state: Path, up_port: int) -> tuple[subprocess.Popen[bytes], int] | None:
    """nginx as the reference reverse proxy (one worker, keep-alive to the upstream, no access log),
    as pgbouncer is for the PostgreSQL proxy; None (the run is left out) when nginx is not installed."""
    binary = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if binary is None:
        print("nginx not found (apt-get install nginx-light): the nginx reference run is left out")
        return None
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    prefix = state / "nginx"
    (prefix / "logs").mkdir(parents=True)
    conf = prefix / "nginx.conf"
    conf.write_text(f"""daemon off; master_process off; worker_processes 1; pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {prefix}/body; proxy_temp_path {prefix}/proxy;
  upstream up {{ server 127.0.0.1:{up_port}; keepalive 32; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{ proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; }}
  }}
}}
""")
    proc = subprocess.Popen([binary, "-p", str(prefix), "-c", str(conf)], stderr=subprocess.DEVNULL)
    for _ in range(100):
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return proc, port
        time.sleep(0.05)
    proc.terminate()
    print("nginx did not start: the nginx reference run is left out")
    return None


def _spawn(role: str, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, __file__, "--role", role, *args], cwd=ROOT)


def _wait_file(path: Path, proc: subprocess.Popen[bytes]) -> str:
    for _ in range(600):
        if path.exists() and path.read_text():
            return path.read_text()
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args!r} exited with {proc.returncode}")
        time.sleep(0.05)
    raise SystemExit(f"{proc.args!r} did not start")


TARGETS = {"proxy_masking_off": 0.5, "proxy_masking_on": 0.4}


def _rounds(loop: asyncio.AbstractEventLoop, runs: dict[str, tuple[str, dict[str, str], int | None]], up_pid: int,
            seconds: float, n_rounds: int, concurrency: int) -> list[dict[str, Any]]:
    """The runs interleaved in rounds at one concurrency, so a change in the machine's load hits all alike."""
    rounds: list[dict[str, Any]] = []
    for _ in range(n_rounds):
        rnd: dict[str, Any] = {}
        for name, (url, headers, middle) in runs.items():
            proxy_before = _cpu_times(middle) if middle else (0.0, 0.0)
            before = (_cpu_seconds(up_pid), sum(proxy_before), _self_cpu())
            rnd[name] = res = loop.run_until_complete(_load(url, headers, seconds / n_rounds, concurrency))
            proxy_after = _cpu_times(middle) if middle else (0.0, 0.0)
            after = (_cpu_seconds(up_pid), sum(proxy_after), _self_cpu())
            res["loadavg_1m"] = round(os.getloadavg()[0], 2)
            done = max(res["requests"], 1)
            for label, b, a in zip(("upstream", "proxy", "client"), before, after, strict=True):
                res[f"cpu_us_per_request_{label}"] = round((a - b) * 1e6 / done, 1)
            res["cpu_us_per_request_proxy_system"] = round((proxy_after[1] - proxy_before[1]) * 1e6 / done, 1)
        rounds.append(rnd)
    return rounds


def _summary(runs: dict[str, Any], rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One concurrency's figures: medians over the rounds, ratios to direct, and the targets met."""
    results = {name: _median_of(rounds, name) for name in runs}
    direct = results["direct"]
    for name in [n for n in runs if n != "direct"]:
        r = results[name]
        # the median of the ratios within each round (direct and proxy measured seconds apart)
        r["ratio_vs_direct"] = round(statistics.median(rnd[name]["rps"] / rnd["direct"]["rps"] for rnd in rounds), 3)
        r["ratio_per_round"] = [round(rnd[name]["rps"] / rnd["direct"]["rps"], 3) for rnd in rounds]
        r["added_p50_ms"] = round(r["p50_ms"] - direct["p50_ms"], 3)
    results["proxy_masking_on"]["ratio_vs_masking_off"] = round(statistics.median(
        rnd["proxy_masking_on"]["rps"] / rnd["proxy_masking_off"]["rps"] for rnd in rounds), 3)
    return {"results": results,
            "met": {name: results[name]["ratio_vs_direct"] >= target for name, target in TARGETS.items()}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--role", default="bench", choices=["bench", "upstream", "proxy"])
    parser.add_argument("--seconds", type=float, default=15.0, help="per run (direct, off, on), over all rounds")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=lambda v: [int(x) for x in v.split(",")], default=[8, 32],
                        help="connections of the load generator, one run per value (default 8,32)")
    parser.add_argument("--port-file", type=Path)
    parser.add_argument("--state", type=Path)
    parser.add_argument("--upstream-port", type=int)
    parser.add_argument("--no-nginx", action="store_true", help="leave out the nginx reference run")
    args = parser.parse_args()
    if args.role == "upstream":
        _loop().run_until_complete(_upstream(args.port_file))
        return
    if args.role == "proxy":
        import logging

        logging.disable(logging.WARNING)
        _loop().run_until_complete(_proxy(args.upstream_port, args.state, args.port_file))
        return

    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp)
        try:
            up = _spawn("upstream", "--port-file", str(state / "up.port"))
            procs.append(up)
            up_port = int(_wait_file(state / "up.port", up))
            px = _spawn("proxy", "--upstream-port", str(up_port), "--state", str(state),
                        "--port-file", str(state / "proxy.json"))
            procs.append(px)
            info = json.loads(_wait_file(state / "proxy.json", px))
            base = f"http://127.0.0.1:{info['port']}"
            # name -> (url, headers, the process in the middle whose CPU is counted as "proxy")
            runs: dict[str, tuple[str, dict[str, str], int | None]] = {
                "direct": (f"http://127.0.0.1:{up_port}/api/v1/users", {}, None),
                "proxy_masking_off": (f"{base}/raw/api/v1/users",
                                      {"Authorization": f"Bearer {info['secrets']['raw']}"}, px.pid),
                "proxy_masking_on": (f"{base}/masked/api/v1/users",
                                     {"Authorization": f"Bearer {info['secrets']['masked']}"}, px.pid),
            }
            nginx = None if args.no_nginx else _nginx(state, up_port)
            if nginx is not None:
                procs.append(nginx[0])
                runs["nginx"] = (f"http://127.0.0.1:{nginx[1]}/api/v1/users", {}, nginx[0].pid)
            load_before = os.getloadavg()[0]
            levels: dict[str, dict[str, Any]] = {}
            loop = _loop()
            try:
                for concurrency in args.concurrency:
                    rounds = _rounds(loop, runs, up.pid, args.seconds, args.rounds, concurrency)
                    levels[str(concurrency)] = _summary(runs, rounds)
            finally:
                loop.close()
        finally:
            for p in procs:
                p.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=5)
    out = {"benchmark": "http_proxy", "seconds": args.seconds, "rounds": args.rounds,
           "concurrency": args.concurrency, "body_bytes": len(DOC), "cpus": os.cpu_count(),
           "loadavg_1m_before": round(load_before, 2), "targets": TARGETS, "levels": levels}
    for concurrency, level in levels.items():
        print(f"\n{concurrency} connections")
        print(f"{'run':<20}{'rps':>10}{'p50 ms':>10}{'p99 ms':>10}{'x direct':>10}{'+p50 ms':>10}"
              f"{'proxy us':>10}{'(sys)':>8}{'upstr us':>10}{'client us':>10}")
        for name, r in level["results"].items():
            print(f"{name:<20}{r['rps']:>10}{r['p50_ms']:>10}{r['p99_ms']:>10}"
                  f"{r.get('ratio_vs_direct', 1.0):>10}{r.get('added_p50_ms', 0.0):>10}"
                  f"{r['cpu_us_per_request_proxy']:>10}{r['cpu_us_per_request_proxy_system']:>8}"
                  f"{r['cpu_us_per_request_upstream']:>10}"
                  f"{r['cpu_us_per_request_client']:>10}")
        print("targets met:", level["met"])
    dest = ROOT / "bench" / "results" / "http_proxy.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
