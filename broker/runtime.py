"""The object graph of a running hoop, built in one place (with ``broker.cli``)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from sqlalchemy.exc import ArgumentError, InvalidRequestError

from broker.clock import Clock, SystemClock
from broker.config import HoopConfig, PostgresResource, Settings
from broker.errors import ConfigError, HoopError
from broker.events import Broadcast
from broker.fanout import Replicas, asyncpg_dsn
from broker.keyfiles import hex_key
from broker.metrics import Metrics
from broker.model import Grant
from broker.roles import EphemeralRoles
from broker.roles import load_key as load_role_key
from broker.scheduler import Scheduler
from broker.service import GrantHooks, Service
from broker.store import Store
from broker.store.urls import redact_url
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
    replicas: Replicas
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


def open_store(settings: Settings) -> Store:
    """The store at ``HOOP_DATABASE_URL``, for every command alike: a URL that cannot be used is a
    :class:`ConfigError` naming it (password hidden), not a driver's traceback."""
    try:
        return Store.from_url(settings.database_url)
    except (ArgumentError, InvalidRequestError, ValueError, ImportError) as exc:
        # a malformed URL, a bad port, an unknown driver, or a driver that is not async
        # (sqlite:///hoop.db loads pysqlite, which the asyncio engine refuses)
        raise ConfigError(f"HOOP_DATABASE_URL {redact_url(settings.database_url)} is not a usable store URL "
                          f"({type(exc).__name__}: {exc}); e.g. postgresql+asyncpg://USER:PASSWORD@HOST/DB "
                          "or sqlite+aiosqlite:///hoop.db") from None


def build_runtime(config: HoopConfig, settings: Settings, *, clock: Clock | None = None,
                  hooks: GrantHooks | None = None) -> Runtime:
    """The broker's object graph; every command (serve, breakglass, revoke, ...) uses the same one, so
    ephemeral roles are created and dropped whichever command issues or ends a grant."""
    clock = clock or SystemClock()
    if hooks is None:
        hooks = EphemeralRoles(config, settings.environ, load_role_key(config.state_dir))
    store = open_store(settings)
    bus = Broadcast()
    metrics = Metrics()
    bus.add(metrics)
    service = Service(config, store, clock, bus, hooks=hooks)
    # every command tells the other replicas (hoop serve) about the grants it ends or extends
    replicas = Replicas(store, asyncpg_dsn(settings.database_url), targets=[])
    bus.add(replicas)
    scheduler = Scheduler(service, clock, leader=lambda: replicas.is_leader)
    bus.add(scheduler)
    return Runtime(config=config, settings=settings, store=store, clock=clock, bus=bus, metrics=metrics,
                   service=service, scheduler=scheduler, replicas=replicas)


@contextlib.contextmanager
def _listening(key: str, host: str, port: int) -> Iterator[None]:
    """A listener that cannot bind is a clear start-up error naming the setting, not a traceback."""
    try:
        yield
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        raise ConfigError(f"{key}: cannot listen on {host}:{port}: {why} (another process may hold the port; "
                          f"choose another in the config or with its HOOP_*_PORT variable)") from None


async def _listen(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    addresses = runner.addresses
    bound = addresses[0][1] if addresses else port
    return runner, int(bound)


MASKING_KEY_FILE = "masking.key"


def load_masking_key(config: HoopConfig, environ: Mapping[str, str]) -> bytes:
    """The key behind ``hash`` masking: configured, or generated once in ``state_dir`` so hashed
    values stay stable across restarts and proxies."""
    if config.masking_key is not None:
        return config.masking_key.resolve(environ).encode()
    return hex_key(config.state_dir, MASKING_KEY_FILE)


class ResourceCredentials:
    """Upstream login for the PostgreSQL proxy: the per-grant role on ephemeral resources,
    the configured user and held secret otherwise."""

    def __init__(self, static: Any, roles: EphemeralRoles) -> None:
        self.static = static
        self.roles = roles

    async def for_grant(self, resource: PostgresResource, grant: Grant | None) -> tuple[str, str]:
        if resource.credentials == "ephemeral" and grant is not None:
            return await self.roles.for_grant(resource, grant)
        result: tuple[str, str] = await self.static.for_grant(resource, grant)
        return result


async def serve_forever(config: HoopConfig, settings: Settings, say: Callable[[str], None], *,
                        stop: asyncio.Event | None = None) -> None:
    """Run until SIGINT or SIGTERM (or until ``stop`` is set), then stop cleanly."""
    from bot.app import SlackBot
    from broker.api import build_api
    from broker.api_inbox import SecretInbox
    from broker.identity import HttpFetcher, TokenVerifier
    from broker.recap import Recap
    from broker.reviews import Reviews
    from proxy.access import Gate
    from proxy.http.server import PLAIN_HTTP, HttpProxy
    from proxy.pg.server import PgProxy
    from proxy.pg.upstream import StaticCredentials
    from proxy.sessions import SessionHub
    from proxy.ssh.server import SshProxy

    environ = settings.environ
    roles = EphemeralRoles(config, environ, load_role_key(config.state_dir))
    rt = build_runtime(config, settings, hooks=roles)
    stop = stop if stop is not None else asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await rt.store.migrate()
        say(f"hoop: store {redact_url(settings.database_url)} (schema up to date)")
        masking_key = load_masking_key(config, environ)
        reviews = Reviews(rt.service)
        hub = SessionHub(rt.service, rt.clock, spool_dir=config.state_dir / "spool", reviews=reviews,
                         metrics=rt.metrics)
        recovered = await hub.recover()
        if recovered:
            say(f"hoop: recovered the recordings of {recovered} session(s) open when hoop stopped")
        gate = Gate(rt.service, rt.clock)
        recap = Recap(rt.service)
        replicas = rt.replicas
        replicas.targets = [hub, gate]
        replicas.live = lambda: [s.grant for s in hub.live()]
        replicas.on_deadline = rt.scheduler.at

        async def lead() -> None:
            say("hoop: this replica is now the scheduler leader")
            await rt.scheduler.kick()

        for sub in (hub, gate, recap):
            rt.bus.add(sub)
        rt.closers.append(recap.drain)
        rt.closers.append(replicas.close)  # here, so shutdown closes it after the Slack bot, as before

        web_app = build_web(rt.store, rt.metrics)
        if config.oidc is not None:
            fetcher = HttpFetcher()
            rt.closers.append(fetcher.close)
            inbox = SecretInbox(rt.clock, rt.store)
            rt.bus.add(inbox)
            web_app.add_subapp("/api/v1", build_api(rt.service, config, TokenVerifier(config, fetcher, rt.clock),
                                                    rt.clock, inbox=inbox))
            say(f"hoop: REST API at /api/v1 (OIDC issuer {config.oidc.issuer})")
        else:
            say("hoop: REST API disabled (no oidc: section in the config)")
        if settings.slack_bot_token and (settings.slack_signing_secret or settings.slack_app_token):
            bot = SlackBot(config, settings, rt.service, rt.clock, reviews)
            await bot.start(web_app)
            rt.bus.add(bot.notifier)
            rt.closers.append(bot.stop)
            say("hoop: Slack enabled (" + ("Socket Mode" if settings.slack_app_token else "HTTP mode at /slack/events")
                + ")")
        else:
            say("hoop: Slack disabled (set SLACK_BOT_TOKEN and SLACK_SIGNING_SECRET or SLACK_APP_TOKEN)")

        # Only now, with every subscriber on the bus: a replica that takes the lead here acts at
        # once on what fell due while hoop was down (grants issued for met quorums, expiries,
        # lapses, reminders), and an event published before the Slack notifier is on the bus is
        # lost for good (the credential DM is shown once).
        replicas.on_leader = lead
        await replicas.start()
        if replicas.dsn is not None:
            say("hoop: replica fan-out on PostgreSQL LISTEN/NOTIFY ("
                + ("scheduler leader" if replicas.is_leader else "follower; another replica leads the scheduler")
                + ")")
        with _listening("listen.http", config.listen.host, config.listen.http):
            runner, port = await _listen(web_app, config.listen.host, config.listen.http)
        rt.closers.append(runner.cleanup)
        say(f"hoop: HTTP on http://{config.listen.host}:{port} (/healthz, /livez, /metrics)")

        kinds = {r.kind for r in config.resources}
        proxies: list[tuple[str, Any, int]] = []
        if "postgres" in kinds:
            creds = ResourceCredentials(StaticCredentials(environ), roles)
            pg_proxy = PgProxy(config, gate, hub, rt.clock, environ, credentials=creds, hash_key=masking_key,
                               allow_cleartext=config.tls.cleartext_in_tls, peers=replicas)
            # a CancelRequest that reached another replica is for a session here, if any
            replicas.on_cancel = pg_proxy.cancel_by_digest
            proxies.append(("PostgreSQL", pg_proxy, config.listen.postgres))
        if "ssh" in kinds:
            proxies.append(("SSH", SshProxy(config, gate, hub, rt.clock, environ, config.state_dir,
                                            hash_key=masking_key),
                            config.listen.ssh))
        if "http" in kinds:
            https = None
            if config.tls.http_proxy:
                from proxy.pg.tls import server_tls

                https = server_tls(config.tls, config.state_dir).context
                https.set_alpn_protocols(["http/1.1"])  # HTTP/2 clients (kubectl) fall back to 1.1
            else:
                say(f"hoop: warning: {PLAIN_HTTP}")
            proxies.append(("HTTP", HttpProxy(config, gate, hub, rt.clock, environ, hash_key=masking_key,
                                              tls=https), config.listen.http_proxy))
        keys = {"PostgreSQL": "listen.postgres", "SSH": "listen.ssh", "HTTP": "listen.http_proxy"}
        for name, proxy, want in proxies:
            with _listening(keys[name], config.listen.host, want):
                bound = await proxy.start(config.listen.host, want)
            rt.closers.append(proxy.stop)
            say(f"hoop: {name} proxy on {config.listen.host}:{bound}")
        rt.closers.append(hub.close_all)

        try:
            dropped = await roles.reconcile(rt.store)
            if dropped:
                say(f"hoop: dropped {len(dropped)} ephemeral role(s) of grants that ended while hoop was down")
        except HoopError as exc:
            say(f"hoop: ephemeral role reconciliation failed: {exc.message}")
        report = await rt.scheduler.start()
        if report.expired or report.lapsed:
            say(f"hoop: reconciled {len(report.expired)} overdue grant(s) and {len(report.lapsed)} lapsed request(s)")
        # What start-up built lives as long as the process: keep full collections from walking
        # it again and again (they cost the PostgreSQL proxy ~3-6 us per statement otherwise).
        gc.freeze()
        say("hoop: ready")
        await stop.wait()
        say("hoop: shutting down")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
        await rt.close()
    say("hoop: stopped")
