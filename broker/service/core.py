"""What the use cases share: the service's collaborators, and the steps more than one use case takes.

Looking a request or grant up (``NotFound`` when missing), minting a grant and its secret,
the upstream set-up after issue, extending a grant inside a transaction, finding the request
behind a (possibly delegated) grant, and publishing events after commit.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Protocol

from broker import credentials, lifecycle
from broker.clock import Clock
from broker.config import HoopConfig
from broker.duration import format_duration
from broker.errors import HoopError, InvalidInput, NotFound
from broker.events import Event, Notifier
from broker.model import AccessRequest, Grant, GrantStatus, Identity
from broker.store import Store, Tx

log = logging.getLogger(__name__)
_ID = "abcdefghijkmnpqrstuvwxyz23456789"
SYSTEM = Identity(email="hoop", name="hoop", chain=("hoop",))


def new_id(prefix: str) -> str:
    return prefix + "".join(secrets.choice(_ID) for _ in range(8))


class GrantHooks(Protocol):
    """Side effects on upstream systems when a grant starts, moves or ends (ephemeral roles)."""

    async def issued(self, grant: Grant) -> str | None: ...
    async def extended(self, grant: Grant) -> None: ...
    async def ended(self, grant: Grant) -> None: ...


class NoHooks:
    async def issued(self, grant: Grant) -> str | None:
        return None

    async def extended(self, grant: Grant) -> None:
        return None

    async def ended(self, grant: Grant) -> None:
        return None


@dataclass(frozen=True)
class ApproveResult:
    request: AccessRequest
    grant: Grant | None = None
    secret: str | None = None



class ServiceCore:
    """The collaborators every use case needs, and the steps several of them share."""

    def __init__(self, config: HoopConfig, store: Store, clock: Clock, notifier: Notifier,
                 hooks: GrantHooks | None = None) -> None:
        self.config = config
        self.store = store
        self.clock = clock
        self.notifier = notifier
        self.hooks: GrantHooks = hooks or NoHooks()

    async def publish(self, events: Sequence[Event]) -> None:
        for ev in events:
            try:
                await self.notifier.publish(ev)
            except Exception:
                log.exception("publishing %s failed", type(ev).__name__)

    def _resource(self, name: str) -> None:
        if self.config.resource(name) is None:
            known = ", ".join(r.name for r in self.config.resources) or "none configured"
            raise InvalidInput(f"unknown resource {name!r} (known: {known})", code="unknown_resource")

    async def _get_request(self, tx: Tx, request_id: str, *, lock: bool = False) -> AccessRequest:
        req = await tx.get_request(request_id, lock=lock)
        if req is None:
            raise NotFound(f"no request {request_id!r}", code="no_request")
        return req

    async def _get_grant(self, tx: Tx, grant_id: str, *, lock: bool = False) -> Grant:
        grant = await tx.get_grant(grant_id, lock=lock)
        if grant is None:
            raise NotFound(f"no grant {grant_id!r}", code="no_grant")
        return grant

    def _mint(self, identity: str, chain: tuple[str, ...], resources: tuple[str, ...], length: timedelta,
              now: datetime, **extra: object) -> tuple[Grant, str]:
        secret = credentials.mint_secret()
        grant = Grant(id=new_id("g"), login=credentials.mint_login(identity), identity=identity, chain=chain,
                      resources=resources, status=GrantStatus.ACTIVE, created_at=now, expires_at=now + length,
                      **extra)  # type: ignore[arg-type]
        return grant, secret

    async def _after_issue(self, grant: Grant) -> Grant:
        try:
            role = await self.hooks.issued(grant)
        except HoopError as exc:
            log.error("grant=%s upstream set-up failed: %s", grant.id, exc.message)
            return grant
        if role is not None:
            async with self.store.tx() as tx:
                fresh = await self._get_grant(tx, grant.id, lock=True)
                fresh.db_role = role
                await tx.update_grant(fresh)
            grant = replace(grant, db_role=role)
        return grant

    async def _after_extend(self, grant: Grant) -> None:
        """Move the grant's upstream end (an ephemeral role's VALID UNTIL). The extension is stored already
        and stands: a failure is logged, and the extension is still announced."""
        try:
            await self.hooks.extended(grant)
        except HoopError as exc:
            log.error("grant=%s upstream update failed: %s", grant.id, exc.message)

    async def request_for(self, tx: Tx, grant: Grant) -> AccessRequest | None:
        root = grant
        while root.parent_id is not None:
            parent = await tx.get_grant(root.parent_id)
            if parent is None:
                break
            root = parent
        return await tx.get_request(root.request_id) if root.request_id else None

    async def _extend_in(self, tx: Tx, grant: Grant, length: timedelta, who: Identity,
                         req: AccessRequest | None) -> Grant:
        grant.status = lifecycle.step(lifecycle.GRANT, grant.status, "extend", what="grant")
        grant.expires_at += length
        grant.reminded_at = None
        await tx.update_grant(grant)
        await tx.append_audit(at=self.clock.now(), actor=who.email, chain=who.chain, action="grant.extended",
                              grant_id=grant.id, request_id=req.id if req else grant.request_id,
                              detail={"by": format_duration(length), "expires_at": grant.expires_at.isoformat()})
        return grant
