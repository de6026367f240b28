"""Where an API requester collects its credential, once.

A request made in Slack gets its secret by DM. A request made through the API (an agent, a
CI job, ``hoop request --api``) has no DM, and approval usually happens later, in Slack, by
someone else. So :class:`SecretInbox`, subscribed to the broker's events, keeps the secret
of a grant issued for a request without a Slack requester, in memory only (never in the
store), until the requester collects it once (``POST /api/v1/requests/{id}/credential``), the
grant ends, or it expires. With several broker replicas the requester must reach the replica
that issued the grant; a restart loses uncollected secrets (the requester asks again).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from broker.clock import Clock
from broker.events import Event, GrantEnded, GrantIssued
from broker.model import AccessRequest, Grant

_CAP = 10_000


@dataclass(frozen=True)
class Held:
    grant: Grant
    secret: str = field(repr=False)
    hints: dict[str, str] = field(default_factory=dict, repr=False)


class SecretInbox:
    """A :class:`~broker.events.Notifier` holding API requesters' secrets until collected."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._held: dict[str, Held] = {}
        self._collected: set[str] = set()

    @staticmethod
    def wants(request: AccessRequest | None, grant: Grant) -> bool:
        return request is not None and request.requester_slack_id is None and grant.parent_id is None

    def offer(self, request: AccessRequest | None, grant: Grant, secret: str, hints: dict[str, str]) -> None:
        if request is None or not self.wants(request, grant) or request.id in self._collected:
            return
        self._prune()
        if len(self._held) < _CAP:
            self._held.setdefault(request.id, Held(grant=grant, secret=secret, hints=dict(hints)))

    async def publish(self, event: Event) -> None:
        if isinstance(event, GrantIssued):
            self.offer(event.request, event.grant, event.secret, event.hints)
        elif isinstance(event, GrantEnded) and event.request is not None:
            held = self._held.get(event.request.id)
            if held is not None and held.grant.id == event.grant.id:
                del self._held[event.request.id]

    def collect(self, request_id: str) -> Held | None:
        """The held credential, once; ``None`` when there is none (any more)."""
        self._prune()
        held = self._held.pop(request_id, None)
        if held is not None:
            self._collected.add(request_id)
            if len(self._collected) > _CAP:
                self._collected.clear()
        return held

    def was_collected(self, request_id: str) -> bool:
        return request_id in self._collected

    def _prune(self) -> None:
        now = self.clock.now()
        for key in [k for k, h in self._held.items() if h.grant.expires_at <= now]:
            del self._held[key]
