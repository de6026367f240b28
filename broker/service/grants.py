"""Grants: break-glass, extend, revoke, expire, remind.

Ending a grant ends every active grant delegated from it, in one transaction that locks the
whole subtree, parents before children, before its first audit entry (see :meth:`GrantUseCases._end`).
"""

from __future__ import annotations

import logging
from datetime import datetime

from broker import credentials, lifecycle, policy
from broker.duration import format_duration, parse_duration
from broker.errors import Conflict, Denied, InvalidInput
from broker.events import GrantEnded, GrantExtended, GrantIssued, GrantReminder, RequestCreated
from broker.hints import connection_hints
from broker.model import AccessRequest, Grant, GrantStatus, Identity, RequestStatus
from broker.service.core import SYSTEM, ServiceCore, new_id
from broker.store import Tx

log = logging.getLogger(__name__)


class GrantUseCases(ServiceCore):
    """What happens to a grant after it is issued, and the break-glass grant issued without approval."""

    async def breakglass(self, who: Identity, resource: str, identity: str, duration: str,
                         reason: str) -> tuple[Grant, str]:
        """Issue a grant without approval. Admins only; audited and announced as break-glass."""
        if not policy.is_admin(self.config, who):
            raise Denied(f"break-glass is limited to members of {self.config.admins}", code="not_admin")
        self._resource(resource)
        if not reason.strip():
            raise InvalidInput("break-glass needs a reason", code="reason")
        length = policy.resolve_duration(self.config, resource, duration)
        now = self.clock.now()
        grant, secret = self._mint(identity.lower(), (who.email, identity.lower()) if who.email != identity.lower()
                                   else (identity.lower(),), (resource,), length, now, breakglass=True)
        async with self.store.tx() as tx:
            await tx.insert_grant(grant, secret_digest=credentials.digest(secret),
                                  scram_verifier=credentials.scram_verifier(secret))
            await tx.append_audit(at=now, actor=who.email, chain=who.chain, action="grant.breakglass",
                                  grant_id=grant.id, detail={"resource": resource, "identity": identity,
                                                             "duration": format_duration(length), "reason": reason})
        grant = await self._after_issue(grant)
        await self.publish([GrantIssued(grant=grant, request=None, secret=secret,
                                         hints=connection_hints(self.config, grant, secret),
                                         breakglass_by=who, breakglass_reason=reason)])
        return grant, secret

    async def extend(self, grant_id: str, who: Identity, duration: str, *,
                     expected_end: datetime | None = None) -> Grant | AccessRequest:
        """Extend now when policy allows it without approval; else open a re-approval request.
        ``expected_end``: extend only the end the caller saw (a reminder's button), to the second, checked
        under the grant's lock, so two clicks on one reminder, by anyone, extend it once (Conflict ``moved``)."""
        length = parse_duration(duration)
        now = self.clock.now()
        async with self.store.tx() as tx:
            grant = await self._get_grant(tx, grant_id, lock=True)
            if who.email.lower() != grant.identity.lower() and not policy.is_admin(self.config, who):
                raise Denied("only the grant's holder or an admin can extend it", code="not_holder")
            if expected_end is not None and int(grant.expires_at.timestamp()) != int(expected_end.timestamp()):
                raise Conflict(f"grant {grant.id} was extended after that; it now ends at "
                               f"{grant.expires_at:%H:%M} UTC", code="moved")
            if grant.status is not GrantStatus.ACTIVE or grant.expires_at <= now:
                raise Conflict(f"grant {grant.id} is {grant.status.value}; request new access instead",
                               code=grant.status.value)
            if grant.parent_id is not None:
                raise Conflict("a delegated grant cannot be extended; ask its parent for a new one", code="child")
            res = self.config.resource(grant.resources[0])
            assert res is not None
            if (overrun := policy.extension_overrun(self.config, grant, length, now)) is not None:
                raise InvalidInput(overrun, code="too_long")
            if not res.extension.requires_approval or not res.approval:
                grant = await self._extend_in(tx, grant, length, who, None)
                req = await self.request_for(tx, grant)
                extended = True
            else:
                # one at a time: each request is bounded against today's expiry, so two pending
                # ones could together pass max_duration (the decision checks again as well)
                if (pending := await tx.pending_extension(grant.id, now)) is not None:
                    raise Conflict(f"grant {grant.id} already has a pending extension request {pending.id}; "
                                   "wait for its decision or cancel it", code="extension_pending")
                req = AccessRequest(
                    id=new_id("r"), resource=res.name, requester=grant.identity, chain=grant.chain,
                    duration=length, reason=f"extend {grant.id} by {format_duration(length)}",
                    status=RequestStatus.PENDING, created_at=now, lapses_at=min(now + res.pending_ttl,
                                                                                grant.expires_at),
                    steps=policy.steps_of(res.approval), requester_slack_id=who.slack_id, extends_grant=grant.id)
                orig = await self.request_for(tx, grant)
                if orig is not None:
                    req.requester_slack_id = req.requester_slack_id or orig.requester_slack_id
                await tx.insert_request(req)
                await tx.append_audit(at=now, actor=who.email, chain=who.chain, action="request.created",
                                      request_id=req.id, grant_id=grant.id,
                                      detail={"extends": grant.id, "duration": format_duration(length)})
                extended = False
        if extended:
            await self._after_extend(grant)
            await self.publish([GrantExtended(grant=grant, request=req, by=who)])
            return grant
        assert req is not None
        await self.publish([RequestCreated(request=req, requester=who)])
        return req

    async def revoke(self, grant_id: str, who: Identity, reason: str = "") -> Grant:
        async with self.store.tx() as tx:
            grant = await self._get_grant(tx, grant_id)
        policy.may_revoke(self.config, who, grant)
        return await self._end(grant_id, "revoke", who, reason or "revoked")

    async def expire(self, grant_id: str) -> Grant:
        return await self._end(grant_id, "expire", SYSTEM, "expired")

    async def _end(self, grant_id: str, event: str, who: Identity, reason: str) -> Grant:
        """End a grant and every active grant delegated from it, however many, in one transaction.

        Every row of the subtree is locked, parents before children, before the first audit
        entry is appended. Appending takes the audit lock, and a delegation or an expiry holds a
        descendant's row while it waits for that lock; locking a descendant after it would
        deadlock with them. A locked parent also gets no new children meanwhile. An expiry of a
        grant that was extended after the scheduler read it is a no-op: it returns the grant,
        still active."""
        now = self.clock.now()
        async with self.store.tx() as tx:
            root = await self._get_grant(tx, grant_id, lock=True)
            if event == "expire" and root.status is GrantStatus.ACTIVE and root.expires_at > now:
                return root
            req = await self.request_for(tx, root)  # the whole subtree shares its top grant's request
            ended = [root]
            for parent in ended:  # breadth first: the list grows as it is walked
                ended.extend(await tx.list_grants(parent_id=parent.id, status=GrantStatus.ACTIVE, limit=None,
                                                  lock=True))
            await self._end_in(tx, root, event, who, reason, now)
            by_id = {root.id: root}
            for child in ended[1:]:
                parent = by_id[child.parent_id or ""]
                await self._end_in(tx, child, "revoke", who, f"parent grant {parent.id} ended "
                                                            f"({parent.end_reason})", now)
                by_id[child.id] = child
        # sessions are told first (a clear message to each client), then upstream roles go
        await self.publish([GrantEnded(grant=g, request=req) for g in ended])
        for grant in ended:
            try:
                await self.hooks.ended(grant)
            except Exception:
                log.exception("cleaning up after grant %s failed", grant.id)
        return root

    async def _end_in(self, tx: Tx, grant: Grant, event: str, who: Identity, reason: str, now: datetime) -> None:
        grant.status = lifecycle.step(lifecycle.GRANT, grant.status, event, what="grant")
        grant.ended_at, grant.end_reason = now, reason
        grant.ended_by = who.email if event == "revoke" else None
        await tx.update_grant(grant)
        await tx.append_audit(at=now, actor=who.email, chain=who.chain,
                              action="grant.revoked" if event == "revoke" else "grant.expired", grant_id=grant.id,
                              request_id=grant.request_id, detail={"reason": reason, "chain": list(grant.chain)})

    async def remind(self, grant_id: str) -> None:
        async with self.store.tx() as tx:
            grant = await self._get_grant(tx, grant_id, lock=True)
            if grant.status is not GrantStatus.ACTIVE or grant.reminded_at is not None:
                return
            grant.reminded_at = self.clock.now()
            await tx.update_grant(grant)
            req = await self.request_for(tx, grant)
        await self.publish([GrantReminder(grant=grant, request=req)])
