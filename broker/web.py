"""The broker's HTTP server: health, metrics; the Slack bot and the REST API mount here too."""

from __future__ import annotations

from aiohttp import web

from broker.metrics import Metrics
from broker.store import Store

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


async def metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS_KEY].render()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


def build_web(store: Store, metrics_: Metrics) -> web.Application:
    app = web.Application(client_max_size=2 * 1024 * 1024)
    app[STORE_KEY] = store
    app[METRICS_KEY] = metrics_
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    return app
