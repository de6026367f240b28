"""Slack flow benchmark: prints figures and writes bench/results/slack_flow.json.

200 request-and-approve flows through a running hoop (signed HTTP to ``/slack/events``,
SQLite store) against the fake Slack Web API on loopback:

- slash command posted -> request card posted (``chat.postMessage`` arrives at the fake);
- final approval posted (the second approver's button click) -> DM with the secret sent.

Reference, in the same run: the same request + two approvals called on the Service directly
with an in-memory notifier (no Slack, no HTTP), so the difference is the bot's own cost.

Run: .venv/bin/python bench/slack_flow.py [flows]
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the fake Slack lives under tests/

from broker.clock import FakeClock
from broker.events import RecordingNotifier
from broker.model import Identity
from broker.service import Service
from broker.store import Store
from tests.bot.harness import Hoop, bot_config, fake_slack

TARGET_P99_MS = 100.0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(values: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values]
    return {"p50_ms": round(statistics.median(ms), 2), "p99_ms": round(pct(ms, 0.99), 2),
            "max_ms": round(max(ms), 2), "mean_ms": round(statistics.fmean(ms), 2)}


async def slack_flows(n: int, workdir: Path) -> tuple[list[float], list[float]]:
    fake = await fake_slack().start()
    hoop = await Hoop(fake=fake, db=workdir / "slack.db", clock=FakeClock()).start()
    to_card: list[float] = []
    to_dm: list[float] = []
    try:
        for i in range(n + 5):  # the first 5 warm caches and connections
            fake.clear()
            t0 = time.perf_counter()
            await hoop.command(f"request prod-db 30m bench flow {i}", settle=False)
            await hoop.bot.drain()
            card = next(c for c in fake.of("chat.postMessage") if c.params["channel"] == "C1")
            channel, ts = "C1", str(card.response["ts"])
            async with hoop.store.tx() as tx:
                req = await tx.request_by_card(channel, ts)
            assert req is not None
            await hoop.react("UDANA", channel, ts)
            t1 = time.perf_counter()
            await hoop.click("hoop_approve", req.id, "USAM", channel, ts)
            dm = next(c for c in fake.of("chat.postMessage") if c.params["channel"] == "DUALICE")
            if i >= 5:
                to_card.append(card.at - t0)
                to_dm.append(dm.at - t1)
    finally:
        await hoop.close()
        await fake.stop()
    return to_card, to_dm


async def reference_flows(n: int, workdir: Path) -> tuple[list[float], list[float]]:
    store = Store.from_url(f"sqlite+aiosqlite:///{workdir / 'ref.db'}")
    await store.migrate()
    config = bot_config()
    service = Service(config, store, FakeClock(), RecordingNotifier())
    alice = Identity(email="alice@example.com", groups=frozenset({"eng"}))
    dana = Identity(email="dana@example.com", groups=frozenset({"dba"}))
    sam = Identity(email="sam@example.com", groups=frozenset({"security"}))
    req_t: list[float] = []
    grant_t: list[float] = []
    try:
        for i in range(n + 5):
            t0 = time.perf_counter()
            req = await service.request(alice, "prod-db", "30m", f"bench flow {i}")
            t1 = time.perf_counter()
            await service.approve(req.id, dana)
            t2 = time.perf_counter()
            result = await service.approve(req.id, sam)
            t3 = time.perf_counter()
            assert result.secret is not None
            if i >= 5:
                req_t.append(t1 - t0)
                grant_t.append(t3 - t2)
    finally:
        await store.close()
    return req_t, grant_t


async def main(n: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        card, dm = await slack_flows(n, workdir)
        ref_req, ref_grant = await reference_flows(n, workdir)
    out = {
        "flows": n,
        "store": "sqlite",
        "slack": {"command_to_card": summary(card), "final_approval_to_dm": summary(dm)},
        "reference_service_only": {"request": summary(ref_req), "final_approval_to_grant": summary(ref_grant)},
        "target_p99_ms": TARGET_P99_MS,
    }
    out["meets_target"] = (out["slack"]["command_to_card"]["p99_ms"] < TARGET_P99_MS  # type: ignore[index]
                           and out["slack"]["final_approval_to_dm"]["p99_ms"] < TARGET_P99_MS)  # type: ignore[index]
    return out


if __name__ == "__main__":
    flows = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    result = asyncio.run(main(flows))
    print(f"{flows} flows through the fake Slack (SQLite store), p50 / p99 ms:")
    print(f"{'':34}{'p50':>8}{'p99':>8}   reference (service only) p50 / p99")
    rows = [("slash command -> card posted", result["slack"]["command_to_card"],
             result["reference_service_only"]["request"]),
            ("final approval -> DM sent", result["slack"]["final_approval_to_dm"],
             result["reference_service_only"]["final_approval_to_grant"])]
    for name, s, r in rows:
        print(f"{name:34}{s['p50_ms']:8.2f}{s['p99_ms']:8.2f}   {r['p50_ms']:8.2f} / {r['p99_ms']:.2f}")
    print(f"target p99 < {TARGET_P99_MS:.0f} ms: {'met' if result['meets_target'] else 'NOT met'}")
    path = Path(__file__).parent / "results" / "slack_flow.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path}")
