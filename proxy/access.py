"""The one gate every proxy calls: secret -> grant -> may this identity touch this resource now?

It delegates the decision to the broker's single access check (``Service.authenticate``) and
adds what a data path needs: a short cache for bearer credentials (HTTP requests arrive many
a second), evicted the moment a grant ends, and a SCRAM verifier lookup that answers for
unknown logins with a deterministic mock, so an unknown login costs and looks the same as a
wrong secret.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict

from broker.clock import Clock
from broker.credentials import digest
from broker.events import Event, GrantEnded, GrantExtended
from broker.model import Grant
from broker.service import Service
from proxy.pg.scram import mock_verifier

_CACHE_SECONDS = 5.0
_CACHE_MAX = 10_000


class Gate:
    def __init__(self, service: Service, clock: Clock) -> None:
        self.service = service
        self.clock = clock
        self._mock_key = secrets.token_bytes(32)
        self._bearer: OrderedDict[str, tuple[float, Grant]] = OrderedDict()

    async def authenticate(self, login: str, secret: str, resource: str) -> Grant:
        """Raises :class:`broker.errors.Denied` (code bad_credentials|expired|revoked|wrong_resource)."""
        return await self.service.authenticate(login, secret, resource)

    async def identify(self, login: str, secret: str) -> Grant:
        """The credential check alone (Denied ``bad_credentials``); then :meth:`authorize` per resource."""
        return await self.service.identify(login, secret)

    async def authenticate_bearer(self, secret: str, resource: str, *, key: str | None = None) -> Grant:
        """``key``: ``digest(secret)`` when the caller already has it (the HTTP proxy keeps it per connection)."""
        if key is None:
            key = digest(secret)
        hit = self._bearer.get(key)
        if hit is not None and time.monotonic() - hit[0] < _CACHE_SECONDS:
            return self.service.authorize(hit[1], resource)
        async with self.service.store.tx() as tx:
            grant = await tx.grant_by_digest(key)
        if grant is None:
            return await self.service.authenticate_secret(secret, resource)  # the uniform refusal
        self._bearer[key] = (time.monotonic(), grant)
        while len(self._bearer) > _CACHE_MAX:
            self._bearer.popitem(last=False)
        return self.service.authorize(grant, resource)

    async def scram_lookup(self, login: str) -> tuple[Grant | None, str]:
        grant, verifier = await self.service.scram_lookup(login)
        if grant is None or verifier is None:
            return None, str(mock_verifier(login, self._mock_key))
        return grant, verifier

    def authorize(self, grant: Grant, resource: str) -> Grant:
        return self.service.authorize(grant, resource)

    async def publish(self, event: Event) -> None:
        """Forget cached bearer credentials of a grant the moment it ends; take an extension at once (a
        cached copy with the old expiry would refuse the grant in the seconds after its old end)."""
        if isinstance(event, GrantEnded):
            for key, (_, grant) in list(self._bearer.items()):
                if grant.id == event.grant.id:
                    del self._bearer[key]
        elif isinstance(event, GrantExtended):
            for key, (at, grant) in list(self._bearer.items()):
                if grant.id == event.grant.id:
                    self._bearer[key] = (at, event.grant)
