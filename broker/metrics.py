"""Prometheus metrics, in a registry of our own (no global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from broker.events import Event, GrantEnded, GrantIssued, SessionClosed, SessionOpened


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.events = Counter("hoop_events_total", "Broker events published, by kind", ["kind"],
                              registry=self.registry)
        self.grants_active = Gauge("hoop_grants_active", "Grants issued and not yet ended by this process",
                                   registry=self.registry)
        self.sessions_open = Gauge("hoop_sessions_open", "Proxy sessions open", ["protocol"],
                                   registry=self.registry)
        self.statements = Counter("hoop_statements_total", "Statements/commands/requests seen by the proxies",
                                  ["protocol", "decision"], registry=self.registry)
        self.expiry_lag = Histogram("hoop_expiry_lag_seconds", "From expires_at to the session's socket closing",
                                    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5), registry=self.registry)

    async def publish(self, event: Event) -> None:
        self.events.labels(kind=type(event).__name__).inc()
        if isinstance(event, GrantIssued):
            self.grants_active.inc()
        elif isinstance(event, GrantEnded):
            self.grants_active.dec()
        elif isinstance(event, SessionOpened):
            self.sessions_open.labels(protocol=event.session.protocol).inc()
        elif isinstance(event, SessionClosed):
            self.sessions_open.labels(protocol=event.session.protocol).dec()

    def render(self) -> bytes:
        return generate_latest(self.registry)
