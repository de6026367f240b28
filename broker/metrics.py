"""Prometheus metrics, in a registry of our own (no global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from broker.events import Event, SessionClosed, SessionOpened


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.events = Counter("hoop_events_total", "Broker events published, by kind", ["kind"],
                              registry=self.registry)
        # set from the store at each scrape (broker/web.py): counted from this process's events, it went
        # negative after a restart or when another replica had issued the grant this one ended
        self.grants_active = Gauge("hoop_grants_active", "Grants active in the store (all replicas)",
                                   registry=self.registry)
        self.sessions_open = Gauge("hoop_sessions_open", "Proxy sessions open", ["protocol"],
                                   registry=self.registry)
        self.statements = Counter("hoop_statements_total", "Statements/commands/requests seen by the proxies",
                                  ["protocol", "decision"], registry=self.registry)
        self.expiry_lag = Histogram("hoop_expiry_lag_seconds", "From expires_at to the session's socket closing",
                                    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5), registry=self.registry)

    async def publish(self, event: Event) -> None:
        self.events.labels(kind=type(event).__name__).inc()
        if isinstance(event, SessionOpened):
            self.sessions_open.labels(protocol=event.session.protocol).inc()
        elif isinstance(event, SessionClosed):
            self.sessions_open.labels(protocol=event.session.protocol).dec()

    def render(self) -> bytes:
        return generate_latest(self.registry)
