"""Requests and approvals: request, approve (and the decision once the quorum is met), withdraw,
deny, cancel, lapse.

A met quorum is decided in its own transaction (:meth:`RequestUseCases._decide`), which locks
the request again and acts only if it is still pending, so the decision happens exactly once
whichever approval, or the scheduler, gets there first. Approving an extension request extends
its grant instead of issuing one.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta

from broker import credentials, lifecycle, policy
from broker.duration import format_duration
from broker.errors import Conflict, Denied, NotFound
from broker.events import (
    ApprovalAdded,
    ApprovalWithdrawn,
    Event,
    GrantExtended,
    GrantIssued,
    RequestCancelled,
    RequestCreated,
    RequestDenied,
    RequestLapsed,
)
from broker.hints import connection_hints
from broker.model import AccessRequest, Approval, Grant, GrantStatus, Identity, RequestStatus
from broker.service.core import SYSTEM, ApproveResult, ServiceCore, new_id


class RequestUseCases(ServiceCore):
    """The life of an access request, from ``pending`` to its decision."""

    async def request(self, who: Identity, resource: str, duration: str | None, reason: str, *,
                      pickup_key: str | None = None) -> AccessRequest:
        """Record a request (and, for an API requester, its ``pickup_key`` in the same transaction:
        a resource without approval steps is granted inside this call, and the credential is sealed
        to the key only if the key is stored by then). Raises :class:`Denied` or :class:`InvalidInput`."""
        self._resource(resource)
        policy.may_request(self.config, who, resource)
        length = policy.resolve_duration(self.config, resource, duration)
        policy.check_reason(self.config, resource, reason)
        res = self.config.resource(resource)
        assert res is not None
        now = self.clock.now()
        req = AccessRequest(
            id=new_id("r"), resource=resource, requester=who.email, chain=who.chain, duration=length,
            reason=reason.strip(), status=RequestStatus.PENDING, created_at=now, lapses_at=now + res.pending_ttl,
            steps=policy.steps_of(res.approval), requester_slack_id=who.slack_id,
        )
        async with self.store.tx() as tx:
            await tx.insert_request(req)
            if pickup_key is not None:
                await tx.insert_pickup(req.id, pickup_key, now)
            await tx.append_audit(at=now, actor=who.email, chain=who.chain, action="request.created",
                                  request_id=req.id, detail={"resource": resource, "duration": format_duration(length),
                                                             "reason": req.reason})
        events: list[Event] = [RequestCreated(request=req, requester=who)]
        if not req.steps:  # no approval configured: granted at once (hoop check warns about this)
            result = await self._decide(req.id, SYSTEM, "auto")
            return result.request
        await self.publish(events)
        return req

    async def set_card(self, request_id: str, channel: str, ts: str) -> None:
        async with self.store.tx() as tx:
            req = await self._get_request(tx, request_id, lock=True)
            req.card_channel, req.card_ts = channel, ts
            await tx.update_request(req)

    async def approve(self, request_id: str, who: Identity, via: str = "slack") -> ApproveResult:
        """Count ``who``'s approval; when the quorum is met, grant. Raises :class:`Denied` with
        the reason when this approval does not count."""
        now = self.clock.now()
        async with self.store.tx() as tx:
            req = await self._get_request(tx, request_id, lock=True)
            if req.status is not RequestStatus.PENDING:
                raise Conflict(f"request {req.id} is already {req.status.value}", code=req.status.value)
            if now >= req.lapses_at:
                raise Conflict(f"request {req.id} has lapsed", code="lapsed")
            groups = policy.assign(req, who, policy.team_members(self.config))
            approval = Approval(approver=who.email.lower(), groups=groups, at=now, via=via, chain=who.chain)
            await tx.add_approval(req.id, approval)
            req.approvals.append(approval)
            await tx.append_audit(at=now, actor=who.email, chain=who.chain, action="request.approval",
                                  request_id=req.id, detail={"groups": list(groups), "via": via})
        await self.publish([ApprovalAdded(request=req, approver=who, via=via)])
        if policy.is_met(req.steps, req.approvals):
            return await self._decide(req.id, who, via)
        return ApproveResult(request=req)

    async def _decide(self, request_id: str, who: Identity, via: str) -> ApproveResult:
        """Move a met request to approved and issue (or extend) its grant, exactly once."""
        now = self.clock.now()
        events: list[Event] = []
        async with self.store.tx() as tx:
            req = await self._get_request(tx, request_id, lock=True)
            if req.status is not RequestStatus.PENDING or not policy.is_met(req.steps, req.approvals):
                return ApproveResult(request=req)  # another approval got here first
            grant = await self._get_grant(tx, req.extends_grant, lock=True) if req.extends_grant else None
            refusal = self._cannot_extend(grant, req.duration, now) if grant is not None else None
            if refusal is not None:
                req.status = lifecycle.step(lifecycle.REQUEST, req.status, "deny", what="request")
                req.decided_at, req.decided_by, req.decision_reason = now, SYSTEM.email, refusal
                await tx.update_request(req)
                await tx.append_audit(at=now, actor=SYSTEM.email, chain=SYSTEM.chain, action="request.denied",
                                      request_id=req.id, grant_id=req.extends_grant, detail={"reason": refusal})
                result = ApproveResult(request=req)
                events.append(RequestDenied(request=req, by=SYSTEM, reason=refusal))
            elif grant is not None:
                req.status = lifecycle.step(lifecycle.REQUEST, req.status, "approve", what="request")
                req.decided_at, req.decided_by = now, who.email
                req.grant_id = grant.id
                await tx.update_request(req)
                await tx.append_audit(at=now, actor=who.email, chain=who.chain, action="request.approved",
                                      request_id=req.id, grant_id=grant.id, detail={"via": via})
                grant = await self._extend_in(tx, grant, req.duration, who, req)
                events.append(GrantExtended(grant=grant, request=req, by=who))
                result = ApproveResult(request=req, grant=grant)
            else:
                req.status = lifecycle.step(lifecycle.REQUEST, req.status, "approve", what="request")
                req.decided_at, req.decided_by = now, who.email
                grant, secret = self._mint(req.requester, req.chain, (req.resource,), req.duration, now,
                                           request_id=req.id)
                req.grant_id = grant.id
                await tx.update_request(req)
                await tx.insert_grant(grant, secret_digest=credentials.digest(secret),
                                      scram_verifier=credentials.scram_verifier(secret))
                await tx.append_audit(at=now, actor=who.email, chain=who.chain, action="request.approved",
                                      request_id=req.id, grant_id=grant.id, detail={"via": via})
                await tx.append_audit(at=now, actor=req.requester, chain=req.chain, action="grant.issued",
                                      request_id=req.id, grant_id=grant.id,
                                      detail={"login": grant.login, "expires_at": grant.expires_at.isoformat()})
                result = ApproveResult(request=req, grant=grant, secret=secret)
        if result.secret is not None and result.grant is not None:
            secret = result.secret
            grant = await self._after_issue(result.grant)
            result = replace(result, grant=grant)
            events.append(GrantIssued(grant=grant, request=req, secret=secret,
                                      hints=connection_hints(self.config, grant, secret)))
        elif result.grant is not None:
            await self._after_extend(result.grant)
        await self.publish(events)
        return result

    def _cannot_extend(self, grant: Grant, length: timedelta, now: datetime) -> str | None:
        """Why an approved extension of ``grant`` (locked) cannot be applied now, or ``None``."""
        if grant.status is not GrantStatus.ACTIVE or grant.expires_at <= now:
            state = grant.status.value if grant.status is not GrantStatus.ACTIVE else "expired"
            return f"grant {grant.id} is {state}; request new access instead"
        return policy.extension_overrun(self.config, grant, length, now)

    async def decide_met(self, request_id: str) -> ApproveResult:
        """Decide a pending request whose quorum is already met: the process that took its last
        approval stopped between committing it and deciding. Exactly once, as :meth:`approve`."""
        return await self._decide(request_id, SYSTEM, "scheduler")

    async def withdraw(self, request_id: str, who: Identity, via: str | None = None) -> AccessRequest:
        """Take back ``who``'s approval; with ``via``, only one given that way (un-reacting does
        not take back an approval given by button)."""
        now = self.clock.now()
        async with self.store.tx() as tx:
            req = await self._get_request(tx, request_id, lock=True)
            if req.status is not RequestStatus.PENDING:
                raise Conflict(f"request {req.id} is already {req.status.value}", code=req.status.value)
            if not await tx.remove_approval(req.id, who.email.lower(), via=via):
                raise NotFound("you have no approval on this request to withdraw", code="no_approval")
            req.approvals = [a for a in req.approvals if a.approver != who.email.lower()]
            await tx.append_audit(at=now, actor=who.email, chain=who.chain, action="request.approval_withdrawn",
                                  request_id=req.id)
        await self.publish([ApprovalWithdrawn(request=req, approver=who)])
        return req

    async def deny(self, request_id: str, who: Identity, reason: str = "") -> AccessRequest:
        now = self.clock.now()
        async with self.store.tx() as tx:
            req = await self._get_request(tx, request_id, lock=True)
            if who.email.lower() == req.requester.lower():
                raise Denied(f"you cannot deny your own request; cancel it instead (`/hoop cancel {req.id}` in "
                             f"Slack, POST /api/v1/requests/{req.id}/cancel in the API)", code="self_deny")
            if not any(s.group in who.groups for s in req.steps) and not policy.is_admin(self.config, who):
                groups = ", ".join(sorted({s.group for s in req.steps})) or "admins"
                raise Denied(f"only members of {groups} can deny this request", code="not_approver")
            req.status = lifecycle.step(lifecycle.REQUEST, req.status, "deny", what="request")
            req.decided_by, req.decided_at, req.decision_reason = who.email, now, reason.strip() or None
            await tx.update_request(req)
            await tx.append_audit(at=now, actor=who.email, chain=who.chain, action="request.denied",
                                  request_id=req.id, detail={"reason": reason})
        await self.publish([RequestDenied(request=req, by=who, reason=reason)])
        return req

    async def cancel(self, request_id: str, who: Identity) -> AccessRequest:
        now = self.clock.now()
        async with self.store.tx() as tx:
            req = await self._get_request(tx, request_id, lock=True)
            if who.email.lower() != req.requester.lower() and not policy.is_admin(self.config, who):
                raise Denied("only the requester or an admin can cancel a request", code="not_requester")
            req.status = lifecycle.step(lifecycle.REQUEST, req.status, "cancel", what="request")
            req.decided_by, req.decided_at = who.email, now
            await tx.update_request(req)
            await tx.append_audit(at=now, actor=who.email, chain=who.chain, action="request.cancelled",
                                  request_id=req.id)
        await self.publish([RequestCancelled(request=req, by=who)])
        return req

    async def lapse(self, request_id: str) -> AccessRequest:
        now = self.clock.now()
        async with self.store.tx() as tx:
            req = await self._get_request(tx, request_id, lock=True)
            req.status = lifecycle.step(lifecycle.REQUEST, req.status, "lapse", what="request")
            req.decided_at = now
            await tx.update_request(req)
            await tx.append_audit(at=now, actor=SYSTEM.email, chain=SYSTEM.chain, action="request.lapsed",
                                  request_id=req.id)
        await self.publish([RequestLapsed(request=req)])
        return req
