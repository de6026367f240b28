"""The object graph of a running hoop, built in one place (with ``broker.cli``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from broker.clock import Clock, SystemClock
from broker.config import HoopConfig, Settings
from broker.events import Broadcast
from broker.metrics import Metrics
from broker.scheduler import Scheduler
from broker.service import Service
from broker.store import Store
from broker.web import build_web

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    config: HoopConfig
    settings: Settings
    store: Store
    clock: Clock
    bus: Broadcast
    metrics: Metrics
    service: Service
    scheduler: Scheduler
    closers: list[Callable[[], Any]] = field(default_factory=list)

    async def close(self) -> None:
        self.scheduler.shutdown()
        for closer in reversed(self.closers):
            try:
                result = closer()
                if asyncio.iscoroutine(result):
                    await result
            except Exception:
                log.exception("closing %r failed", closer)
        await self.store.close()


def build_runtime(config: HoopConfig, settings: Settings, *, clock: Clock | None = None) -> Runtime:
    clock = clock or SystemClock()
    store = Store.from_url(settings.database_url)
    bus = Broadcast()
    metrics = Metrics()
    bus.add(metrics)
    service = Service(config, store, clock, bus)
    scheduler = Scheduler(service, clock)
    bus.add(scheduler)
    return Runtime(config=config, settings=settings, store=store, clock=clock, bus=bus, metrics=metrics,
                   service=service, scheduler=scheduler)


async def _listen(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    addresses = runner.addresses
    bound = addresses[0][1] if addresses else port
    return runner, int(bound)


async def serve_forever(config: HoopConfig, settings: Settings, say: Callable[[str], None]) -> None:
    """Run until SIGINT or SIGTERM, then stop cleanly."""
    rt = build_runtime(config, settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await rt.store.migrate()
        say(f"hoop: store {_redact_url(settings.database_url)} (schema up to date)")
        web_app = build_web(rt.store, rt.metrics)
        if settings.slack_bot_token and (settings.slack_signing_secret or settings.slack_app_token):
            say("hoop: Slack enabled")
        else:
            say("hoop: Slack disabled (set SLACK_BOT_TOKEN and SLACK_SIGNING_SECRET or SLACK_APP_TOKEN)")
        runner, port = await _listen(web_app, config.listen.host, config.listen.http)
        rt.closers.append(runner.cleanup)
        say(f"hoop: HTTP on http://{config.listen.host}:{port} (/healthz, /metrics)")
        report = await rt.scheduler.start()
        if report.expired or report.lapsed:
            say(f"hoop: reconciled {len(report.expired)} overdue grants and {len(report.lapsed)} lapsed requests")
        say("hoop: ready")
        await stop.wait()
        say("hoop: shutting down")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
        await rt.close()
    say("hoop: stopped")


def _redact_url(url: str) -> str:
    """Hide a password in a database URL before printing it."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}"
    return url
