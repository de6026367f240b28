"""Use cases: request, approve, deny, cancel, lapse, grant, extend, revoke, expire, break-glass,
delegate, and the single access check the proxies call.

Every use case is one store transaction that changes state through ``lifecycle.step``,
appends an audit entry, and, after commit, publishes events to the :class:`Notifier`.
Secrets are minted here and leave only inside :class:`GrantIssued` (and the return value).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Protocol

from broker import credentials, lifecycle, policy
from broker.clock import Clock
from broker.config import HoopConfig
from broker.duration import format_duration, parse_duration
from broker.errors import Conflict, Denied, HoopError, InvalidInput, NotFound
from broker.events import (
    ApprovalAdded,
    ApprovalWithdrawn,
    Event,
    GrantEnded,
    GrantExtended,
    GrantIssued,
    GrantReminder,
    Notifier,
    RequestCancelled,
    RequestCreated,
    RequestDenied,
    RequestLapsed,
)
from broker.hints import connection_hints
from broker.model import AccessRequest, Approval, Grant, GrantStatus, Identity, RequestStatus
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


class Service:
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

    # -- requests ---------------------------------------------------------------------------
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

    async def _get_request(self, tx: Tx, request_id: str, *, lock: bool = False) -> AccessRequest:
        req = await tx.get_request(request_id, lock=lock)
        if req is None:
            raise NotFound(f"no request {request_id!r}", code="no_request")
        return req

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
            groups = policy.assign(req, who)
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
            await self.hooks.extended(result.grant)
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

    # -- grants -----------------------------------------------------------------------------
    async def _get_grant(self, tx: Tx, grant_id: str, *, lock: bool = False) -> Grant:
        grant = await tx.get_grant(grant_id, lock=lock)
        if grant is None:
            raise NotFound(f"no grant {grant_id!r}", code="no_grant")
        return grant

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

    async def request_for(self, tx: Tx, grant: Grant) -> AccessRequest | None:
        root = grant
        while root.parent_id is not None:
            parent = await tx.get_grant(root.parent_id)
            if parent is None:
                break
            root = parent
        return await tx.get_request(root.request_id) if root.request_id else None

    async def extend(self, grant_id: str, who: Identity, duration: str) -> Grant | AccessRequest:
        """Extend now when policy allows it without approval; else open a re-approval request."""
        length = parse_duration(duration)
        now = self.clock.now()
        async with self.store.tx() as tx:
            grant = await self._get_grant(tx, grant_id, lock=True)
            if who.email.lower() != grant.identity.lower() and not policy.is_admin(self.config, who):
                raise Denied("only the grant's holder or an admin can extend it", code="not_holder")
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
            await self.hooks.extended(grant)
            await self.publish([GrantExtended(grant=grant, request=req, by=who)])
            return grant
        assert req is not None
        await self.publish([RequestCreated(request=req, requester=who)])
        return req

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

    # -- the single access check ------------------------------------------------------------
    async def authenticate(self, login: str, secret: str, resource: str) -> Grant:
        """Secret + login + resource + now -> the grant, or :class:`Denied` with a reason code:
        ``bad_credentials`` (unknown login or wrong secret: indistinguishable), ``expired``,
        ``revoked``, ``wrong_resource``."""
        return self.authorize(await self.identify(login, secret), resource)

    async def identify(self, login: str, secret: str) -> Grant:
        """The credential check alone: the grant whose login and secret these are, whatever its state.

        Raises :class:`Denied` ``bad_credentials``. An unknown login costs the same lookup and digest
        comparison as a wrong secret; :meth:`authorize` then decides state and resource without I/O.
        """
        async with self.store.tx() as tx:
            found = await tx.grant_by_login(login)
        ok = credentials.matches(secret, found[1] if found else credentials.digest(""))
        if found is None or not ok:
            raise Denied(f"authentication failed for {login!r}", code="bad_credentials")
        return found[0]

    async def authenticate_secret(self, secret: str, resource: str) -> Grant:
        """For bearer credentials (HTTP proxy, API): the secret alone identifies the grant."""
        async with self.store.tx() as tx:
            grant = await tx.grant_by_digest(credentials.digest(secret))
        if grant is None:
            raise Denied("authentication failed: unknown credential", code="bad_credentials")
        return self.authorize(grant, resource)

    async def scram_lookup(self, login: str) -> tuple[Grant | None, str | None]:
        """For SCRAM: the grant and its stored verifier, or ``(None, None)`` for an unknown login."""
        async with self.store.tx() as tx:
            found = await tx.grant_by_login(login)
        return (found[0], found[2]) if found else (None, None)

    def authorize(self, grant: Grant, resource: str) -> Grant:
        now = self.clock.now()
        if grant.status is GrantStatus.REVOKED:
            raise Denied(f"access for {grant.login} was revoked", code="revoked")
        if grant.status is GrantStatus.EXPIRED or now >= grant.expires_at:
            raise Denied(f"access for {grant.login} has expired", code="expired")
        if resource not in grant.resources:
            raise Denied(f"{grant.login} has no access to {resource!r}", code="wrong_resource")
        return grant
