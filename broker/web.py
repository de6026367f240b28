"""The broker's HTTP server: health, metrics; the Slack bot and the REST API mount here too.

Two health endpoints, for two questions. ``/healthz`` (readiness) answers 503 while the store is
unreachable: this replica cannot let anyone in then. ``/livez`` (liveness) only says the process
answers: restarting every replica because the store is away would end every live session, which
the proxies keep enforcing (and ending at their grants' expiry) on their own."""

from __future__ import annotations

import logging

from aiohttp import web

from broker.metrics import Metrics
from broker.model import GrantStatus
from broker.store import Store

log = logging.getLogger(__name__)

METRICS_KEY = web.AppKey("metrics", Metrics)
STORE_KEY = web.AppKey("store", Store)


async def healthz(request: web.Request) -> web.Response:
    store = request.app[STORE_KEY]
    try:
        async with store.tx() as tx:
            await tx.audit_entries(limit=1)
    except Exception:
        return web.json_response({"status": "unhealthy", "store": "unreachable"}, status=503)
    return web.json_response({"status": "ok"})


async def livez(request: web.Request) -> web.Response:
    """The event loop answers; the store is not asked (see the module's docstring)."""
    return web.json_response({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    metrics_ = request.app[METRICS_KEY]
    try:
        async with request.app[STORE_KEY].tx() as tx:
            metrics_.grants_active.set(await tx.count_grants(status=GrantStatus.ACTIVE))
    except Exception:  # the other metrics still help while the store is away; /healthz reports it
        log.warning("metrics: the store is unreachable; hoop_grants_active keeps its last value")
    body = metrics_.render()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


def build_web(store: Store, metrics_: Metrics) -> web.Application:
    app = web.Application(client_max_size=2 * 1024 * 1024)
    app[STORE_KEY] = store
    app[METRICS_KEY] = metrics_
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/livez", livez)
    app.router.add_get("/metrics", metrics)
    return app
