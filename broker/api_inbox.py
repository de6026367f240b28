"""Where an API requester collects its credential, once.

A request made in Slack gets its secret by DM. A request made through the API (an agent, a
CI job, ``hoop request --api``) has no DM, and approval usually happens later, in Slack, by
someone else, possibly on another broker replica. :class:`SecretInbox`, subscribed to the
broker's events, catches the grant issued for such a request and keeps its secret until the
requester collects it once (``POST /api/v1/requests/{id}/credential``), the grant ends, or it
expires.

Two ways to keep it:
- **Sealed, in the store** (the request carried a ``pickup_key``, as ``hoop request --api``
  sends): the credential is encrypted to the requester's public key (:mod:`broker.sealing`),
  so any replica can hand it out, a restart loses nothing, and the store never holds it
  readable. Collecting empties the box in the same transaction, so it is shown once.
- **In memory** (no ``pickup_key``): only on the replica that issued the grant, lost on restart.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

from broker import sealing
from broker.clock import Clock
from broker.errors import HoopError
from broker.events import Event, GrantEnded, GrantIssued
from broker.model import AccessRequest, Grant
from broker.store import Store

log = logging.getLogger(__name__)
_CAP = 10_000


@dataclass(frozen=True)
class Held:
    """A collected credential: ``secret`` and ``hints`` in the clear (kept in memory), or
    ``sealed`` (a box only the requester's private key opens, which holds both)."""

    secret: str | None = field(default=None, repr=False)
    hints: dict[str, str] = field(default_factory=dict, repr=False)
    sealed: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class _Memory:
    grant: Grant
    secret: str = field(repr=False)
    hints: dict[str, str] = field(default_factory=dict, repr=False)


class SecretInbox:
    """A :class:`~broker.events.Notifier` keeping API requesters' credentials until collected."""

    def __init__(self, clock: Clock, store: Store | None = None) -> None:
        self.clock = clock
        self.store = store
        self._held: dict[str, _Memory] = {}
        self._collected: set[str] = set()

    @staticmethod
    def wants(request: AccessRequest | None, grant: Grant) -> bool:
        return request is not None and request.requester_slack_id is None and grant.parent_id is None

    async def offer(self, request: AccessRequest | None, grant: Grant, secret: str, hints: dict[str, str]) -> None:
        if request is None or not self.wants(request, grant) or request.id in self._collected:
            return
        if await self._seal(request, grant, secret, hints):
            return
        self._prune()
        if len(self._held) < _CAP:
            self._held.setdefault(request.id, _Memory(grant=grant, secret=secret, hints=dict(hints)))

    async def _seal(self, request: AccessRequest, grant: Grant, secret: str, hints: dict[str, str]) -> bool:
        """Seal to the requester's pickup key when it gave one; True when the store holds the box."""
        if self.store is None:
            return False
        try:
            async with self.store.tx() as tx:
                key = await tx.pickup_key(request.id)
                if key is None:
                    return False
                box = sealing.seal(key, json.dumps({"secret": secret, "hints": hints}).encode(), request.id)
                await tx.seal_pickup(request.id, grant.id, box, grant.expires_at)  # False: sealed already
                return True
        except HoopError as exc:
            log.warning("request %s: its pickup key is unusable (%s); holding the credential in memory",
                        request.id, exc.message)
            return False

    async def publish(self, event: Event) -> None:
        if isinstance(event, GrantIssued):
            await self.offer(event.request, event.grant, event.secret, event.hints)
        elif isinstance(event, GrantEnded) and event.request is not None:
            held = self._held.get(event.request.id)
            if held is not None and held.grant.id == event.grant.id:
                del self._held[event.request.id]
            if self.store is not None and event.grant.parent_id is None:
                async with self.store.tx() as tx:
                    await tx.drop_pickup(event.request.id)

    async def collect(self, request_id: str) -> tuple[str, Held | None]:
        """``("ok", held)`` once; otherwise ``(why, None)`` with why in collected|expired|absent."""
        if self.store is not None:
            async with self.store.tx() as tx:
                state, box = await tx.take_pickup(request_id, self.clock.now())
            if state == "sealed" and box is not None:
                return "ok", Held(sealed=box)
            if state in ("collected", "expired"):
                return state, None
        self._prune()
        memory = self._held.pop(request_id, None)
        if memory is not None:
            self._collected.add(request_id)
            if len(self._collected) > _CAP:
                self._collected.clear()
            return "ok", Held(secret=memory.secret, hints=memory.hints)
        return ("collected" if request_id in self._collected else "absent"), None

    def _prune(self) -> None:
        now = self.clock.now()
        for key in [k for k, h in self._held.items() if h.grant.expires_at <= now]:
            del self._held[key]
