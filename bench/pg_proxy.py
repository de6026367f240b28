"""PostgreSQL proxy benchmark: direct vs pgbouncer vs hoop (no rules) vs hoop (everything on).

Run from the repository root: ``.venv/bin/python -m bench.pg_proxy``. It starts a throwaway
cluster, pgbouncer (session pooling, its own temp config, stopped by PID) and two hoop proxy
processes (uvloop), then runs pgbench -S (simple and extended, 1/4/16 clients) and two large
results read by a minimal client (so client cost does not hide proxy cost): 500k rows with two
masked columns, and 500k rows with nothing to mask. Each workload runs on the four targets
back to back (interleaved), so load from other processes shifts a row's columns alike; large
results take the best of 3. Proxy CPU per query is the proxy process's CPU time delta (user
and system, split) divided by the transactions pgbench counted; pgbouncer's is measured too,
as the floor a relay pays in the kernel. Prints a table and writes bench/results/pg_proxy.json.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from broker.config import PostgresResource
from proxy.pg import codec, upstream
from tests.support.pgcluster import PgCluster, free_port, pg_cluster

ROWS = 500_000
SECONDS = 3
CLIENTS = (1, 4, 16)
MODES = ("simple", "extended")
RESULTS = Path(__file__).parent / "results" / "pg_proxy.json"

EVERYTHING = {
    "guardrails": {"rules": [{"name": "no-drop", "action": "block", "statements": ["drop", "truncate"]},
                             {"name": "no-file", "action": "block", "functions": ["pg_read_file"]},
                             {"name": "careful", "action": "review", "statements": ["delete_without_where"]}]},
    "masking": {"columns": [{"match": "email", "strategy": "redact"}, {"match": "card", "strategy": "partial"}]},
}
NO_RULES = {"guardrails": {}, "masking": {"enabled": False}}


# ---- the hoop server process ------------------------------------------------------------

async def _serve(spec: dict[str, Any]) -> None:
    from broker.clock import SystemClock
    from broker.config import parse_config
    from broker.events import Broadcast
    from broker.service import Service
    from broker.store import Store
    from proxy.access import Gate
    from proxy.pg.server import PgProxy
    from proxy.sessions import SessionHub
    from tests.conftest import base_config
    from tests.proxy.pg.harness import ROOT

    tmp = Path(spec["tmp"])
    res = {"name": "prod-db", "kind": "postgres", "address": spec["address"], "database": spec["database"],
           "user": spec["user"], "credential": {"env": "PGPW"}, "sslmode": "disable",
           "request": {"groups": ["eng"], "max_duration": "4h"}, **spec["resource"]}
    config = parse_config(base_config(resources=[res], state_dir=str(tmp / "state")))
    store = Store.from_url(f"sqlite+aiosqlite:///{tmp / 'hoop.db'}")
    await store.migrate()
    clock = SystemClock()
    broadcast = Broadcast()
    service = Service(config, store, clock, broadcast)
    gate = Gate(service, clock)
    hub = SessionHub(service, clock, spool_dir=tmp / "spool")
    broadcast.add(gate)
    broadcast.add(hub)
    proxy = PgProxy(config, gate, hub, clock, {"PGPW": spec["password"]}, hash_key=b"k" * 32)
    port = await proxy.start("127.0.0.1", 0)
    grant, secret = await service.breakglass(ROOT, "prod-db", "bench@example.com", "4h", "bench")
    gc.freeze()  # as broker.runtime.serve_forever does once started
    print(json.dumps({"port": port, "login": grant.login, "secret": secret}), flush=True)
    profiler = None
    if spec.get("profile"):
        import cProfile

        profiler = cProfile.Profile(time.thread_time)  # CPU, not wall: the box is shared
        profiler.enable()
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(spec["profile"])
    await proxy.stop()
    await hub.close_all()
    await store.close()


# ---- helpers ------------------------------------------------------------------------------

def _cpu(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def _child(pid: int) -> int:
    """The process ``runuser`` started (pgbouncer itself), or ``pid`` when it has no child."""
    for _ in range(50):
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if kids:
            return int(kids[0])
        if Path(f"/proc/{pid}/comm").read_text().strip() != "runuser":
            return pid
        time.sleep(0.1)
    return pid


def _pgbench(cluster: PgCluster, env: dict[str, str], clients: int, mode: str, seconds: int) -> tuple[float, int]:
    out = subprocess.run([str(cluster.bindir / "pgbench"), "-n", "-S", "-T", str(seconds), "-c", str(clients),
                          "-j", str(min(clients, 2)), "-M", mode], env=env, capture_output=True, text=True,
                         check=True, timeout=120).stdout
    tps = float(re.search(r"tps = ([\d.]+)", out).group(1))  # type: ignore[union-attr]
    n = int(re.search(r"actually processed: (\d+)", out).group(1))  # type: ignore[union-attr]
    return tps, n


class _Sink(asyncio.Protocol):
    def __init__(self) -> None:
        self.bytes = 0
        self.tail = b""
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.bytes += len(data)
        self.tail = (self.tail + data)[-6:]
        if self.tail[:1] == b"Z" and self.tail[1:5] == b"\0\0\0\5" and not self.done.done():
            self.done.set_result(None)


async def _big(host: str, port: int, database: str, user: str, password: str, sql: str) -> tuple[float, int]:
    res = PostgresResource(name="b", kind="postgres", address=f"{host}:{port}", database=database, sslmode="disable")
    up = await upstream.connect(res, user, password, {})
    sink = _Sink()
    up.transport.set_protocol(sink)
    t0 = time.perf_counter()
    up.transport.write(codec.encode_query(sql))
    await sink.done
    wall = time.perf_counter() - t0
    up.transport.write(codec.TERMINATE)
    up.transport.close()
    return wall, sink.bytes


def _start_pgbouncer(cluster: PgCluster, database: str, base: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    d = base / "pgbouncer"
    d.mkdir()
    (d / "userlist.txt").write_text(f'"{cluster.user}" "{cluster.password}"\n')
    (d / "pgbouncer.ini").write_text(
        f"[databases]\n{database} = host={cluster.host} port={cluster.port} dbname={database}\n"
        f"[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nauth_type = scram-sha-256\n"
        f"auth_file = {d / 'userlist.txt'}\npool_mode = session\nmax_client_conn = 200\n"
        f"default_pool_size = 40\nunix_socket_dir =\nlogfile = {d / 'pgbouncer.log'}\n")
    cmd = ["pgbouncer", str(d / "pgbouncer.ini")]
    if cluster.runas:
        shutil.chown(base, cluster.runas)
        for p in (d, d / "userlist.txt", d / "pgbouncer.ini"):
            shutil.chown(p, cluster.runas)
        cmd = ["runuser", "-u", cluster.runas, "--", *cmd]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    return proc, port


def _start_hoop(cluster: PgCluster, database: str, base: Path, resource: dict[str, Any],
                name: str, profile: str | None = None,
                tree: str | None = None) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    tmp = base / name
    tmp.mkdir()
    spec = {"tmp": str(tmp), "address": f"{cluster.host}:{cluster.port}", "database": database,
            "user": cluster.user, "password": cluster.password, "resource": resource, "profile": profile}
    env = {**os.environ, "PYTHONPATH": tree} if tree else None
    proc = subprocess.Popen([sys.executable, "-m", "bench.pg_proxy", "--serve", json.dumps(spec)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=tree, env=env)
    assert proc.stdout is not None
    info = json.loads(proc.stdout.readline())
    return proc, info


# ---- the run ------------------------------------------------------------------------------

def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.pg_proxy", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=SECONDS, help="length of each pgbench run (default %(default)s)")
    ap.add_argument("--clients", type=lambda v: tuple(int(c) for c in v.split(",")), default=CLIENTS,
                    help="pgbench client counts, comma-separated (default 1,4,16)")
    ap.add_argument("--modes", type=lambda v: tuple(v.split(",")), default=MODES,
                    help="pgbench query modes, comma-separated (default simple,extended)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the pgbench matrix this many times, interleaved; each cell keeps its median")
    ap.add_argument("--no-large", action="store_true", help="skip the 500k-row results")
    ap.add_argument("--no-plain", action="store_true", help="skip hoop with no rules")
    ap.add_argument("--baseline", metavar="TREE",
                    help="also run hoop everything-on from another source tree (e.g. an export of the "
                         "previous commit), as the target hoop-baseline: before/after in one run")
    ap.add_argument("--profile", metavar="FILE", help="cProfile the everything-on hoop process into FILE")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results file (default %(default)s)")
    return ap.parse_args()


def main() -> None:
    args = _args()
    results: dict[str, Any] = {"seconds_per_pgbench_run": args.seconds, "rows": ROWS, "configs": {},
                               "loadavg_start": os.getloadavg()}
    with pg_cluster() as cluster:
        database = cluster.create_database("bench")
        subprocess.run([str(cluster.bindir / "pgbench"), "-i", "-s", "1", "-q", database], env=cluster.env(),
                       check=True, capture_output=True)
        cluster.psql(f"CREATE TABLE big AS SELECT i AS id, 'user' || i || '@example.com' AS email, "
                     f"'4111111111111111' AS card, 'note ' || i AS note FROM generate_series(1, {ROWS}) i",
                     database=database)
        cluster.psql("VACUUM ANALYZE big", database=database)
        base = Path(tempfile.mkdtemp(prefix="hoop-bench-"))
        bouncer, bport = _start_pgbouncer(cluster, database, base)
        targets: dict[str, tuple[int, str, str, str, int | None]] = {
            "direct": (cluster.port, database, cluster.user, cluster.password, None),
            "pgbouncer": (bport, database, cluster.user, cluster.password, _child(bouncer.pid)),
        }
        hoops: list[subprocess.Popen[str]] = []
        plan = [] if args.no_plain else [("hoop-no-rules", NO_RULES, None, None)]
        if args.baseline:
            plan.append(("hoop-baseline", EVERYTHING, None, args.baseline))
        plan.append(("hoop-everything", EVERYTHING, args.profile, None))
        for name, resource, profile, tree in plan:
            proc, info = _start_hoop(cluster, database, base, resource, name, profile, tree)
            hoops.append(proc)
            targets[name] = (info["port"], "prod-db", info["login"], info["secret"], proc.pid)
        envs = {name: {**os.environ, "PGHOST": "127.0.0.1", "PGPORT": str(port), "PGUSER": user,
                       "PGPASSWORD": password, "PGDATABASE": db, "PGSSLMODE": "disable"}
                for name, (port, db, user, password, _) in targets.items()}
        rows: dict[str, dict[str, Any]] = {name: {} for name in targets}
        try:
            # interleaved: each workload runs on every target back to back, so load from other
            # processes on the machine shifts all four columns of a row alike
            samples: dict[tuple[str, str], list[dict[str, Any]]] = {}
            for _ in range(args.rounds):
                for mode in args.modes:
                    for clients in args.clients:
                        for name, (_, _, _, _, pid) in targets.items():
                            cpu0 = _cpu(pid) if pid else (0.0, 0.0)
                            tps, n = _pgbench(cluster, envs[name], clients, mode, args.seconds)
                            entry: dict[str, Any] = {"tps": round(tps)}
                            if pid:
                                user, system = _cpu(pid)
                                entry["proxy_user_us_per_query"] = round((user - cpu0[0]) / max(n, 1) * 1e6, 1)
                                entry["proxy_sys_us_per_query"] = round((system - cpu0[1]) / max(n, 1) * 1e6, 1)
                                entry["proxy_cpu_us_per_query"] = round(entry["proxy_user_us_per_query"]
                                                                        + entry["proxy_sys_us_per_query"], 1)
                            samples.setdefault((name, f"pgbench_S_{mode}_c{clients}"), []).append(entry)
            for (name, key), got in samples.items():
                per_round = [e["tps"] for e in got]  # (in round order, before the sort)
                got.sort(key=lambda x: x["tps"])
                rows[name][key] = {**got[len(got) // 2], "tps_per_round": per_round}
            for name in targets:  # each round's ratio to pgbouncer, to show how much a cell moves
                for key, cell in rows[name].items():
                    ref = rows["pgbouncer"][key]["tps_per_round"]
                    cell["x_pgbouncer_per_round"] = [round(a / b, 3) for a, b in zip(cell["tps_per_round"], ref,
                                                                                      strict=True)]
            large = () if args.no_large else (("masked_500k", "SELECT id, email, card FROM big"),
                                              ("nothing_to_mask_500k", "SELECT id, note FROM big"))
            for label, sql in large:
                walls: dict[str, list[tuple[float, int]]] = {name: [] for name in targets}
                for _ in range(3):
                    for name, (port, db, user, password, _) in targets.items():
                        walls[name].append(asyncio.run(_big("127.0.0.1", port, db, user, password, sql)))
                for name in targets:
                    best = min(walls[name])
                    rows[name][label] = {"wall_s": round(best[0], 3), "rows_per_s": round(ROWS / best[0]),
                                         "bytes": best[1]}
            results["configs"] = rows
            results["loadavg_end"] = os.getloadavg()
        finally:
            for proc in hoops:
                assert proc.stdin is not None
                proc.stdin.close()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            bouncer.terminate()
            bouncer.wait(timeout=10)
            shutil.rmtree(base, ignore_errors=True)
    _report(results, args.out)


def _report(results: dict[str, Any], out: Path) -> None:
    configs = results["configs"]
    direct = configs["direct"]
    bouncer = configs["pgbouncer"]
    keys = [k for k in direct if k.startswith("pgbench")]
    print(f"\n{'workload':<28}" + "".join(f"{n:>18}" for n in configs))
    for k in keys:
        print(f"{k + ' tps':<28}" + "".join(f"{c[k]['tps']:>18}" for c in configs.values()))
    for k in keys:
        cells = [f"{c[k].get('proxy_cpu_us_per_query', '-')!s:>18}" for c in configs.values()]
        print(f"{k + ' cpu µs/q':<28}" + "".join(cells))
    for k in keys:
        cells = [f"{c[k].get('proxy_sys_us_per_query', '-')!s:>18}" for c in configs.values()]
        print(f"{k + ' of it sys':<28}" + "".join(cells))
    large = [k for k in ("masked_500k", "nothing_to_mask_500k") if k in direct]
    for k in large:
        print(f"{k + ' wall s':<28}" + "".join(f"{c[k]['wall_s']:>18}" for c in configs.values()))
        print(f"{k + ' x direct':<28}" + "".join(f"{c[k]['wall_s'] / direct[k]['wall_s']:>18.2f}"
                                                for c in configs.values()))
    for k in keys:
        print(f"{k + ' x pgbouncer':<28}" + "".join(f"{c[k]['tps'] / bouncer[k]['tps']:>18.2f}"
                                                   for c in configs.values()))
    if any(len(c[k].get("x_pgbouncer_per_round", ())) > 1 for c in configs.values() for k in keys):
        for k in keys:
            cells = [c[k].get("x_pgbouncer_per_round", []) for c in configs.values()]
            print(f"{k + ' rounds':<28}" + "".join(f"{f'{min(r):.2f}-{max(r):.2f}' if r else '-':>18}"
                                                  for r in cells))
    summary: dict[str, Any] = {}
    for name in [n for n in configs if n.startswith("hoop")]:
        c = configs[name]
        summary[name] = {
            "tps_vs_pgbouncer_min": round(min(c[k]["tps"] / bouncer[k]["tps"] for k in keys), 3),
            "cpu_us_per_query_max": max(c[k]["proxy_cpu_us_per_query"] for k in keys),
        }
        if large:
            summary[name].update({
                "masked_wall_vs_direct": round(c["masked_500k"]["wall_s"] / direct["masked_500k"]["wall_s"], 2),
                "masked_rows_per_s": c["masked_500k"]["rows_per_s"],
                "nothing_to_mask_wall_vs_direct": round(c["nothing_to_mask_500k"]["wall_s"]
                                                        / direct["nothing_to_mask_500k"]["wall_s"], 2),
            })
    summary["pgbouncer"] = {"cpu_us_per_query_max": max(bouncer[k].get("proxy_cpu_us_per_query", 0.0) for k in keys),
                            "cpu_us_per_query_min": min(bouncer[k].get("proxy_cpu_us_per_query", 0.0) for k in keys)}
    results["summary"] = summary
    print("\n" + json.dumps(summary, indent=2))
    print(f"load average: start {results['loadavg_start']}, end {results['loadavg_end']}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--serve":
        import uvloop

        uvloop.run(_serve(json.loads(sys.argv[2])))
    else:
        main()
