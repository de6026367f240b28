"""Statement and command reviews: a proxy holds a risky statement until an eligible approver
allows it in the request's thread, or until the review times out (then it is refused).

The proxy waits on an in-process future, resolved by :meth:`Reviews.decide`. As a fallback
for a decision taken by another replica, the waiter also re-reads the review from the store
once a second. Whatever happens, the wait is bounded by the review's deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import datetime, timedelta

from broker import policy
from broker.errors import Conflict, Denied, NotFound
from broker.events import ReviewDecided, ReviewRequested
from broker.model import Grant, GrantStatus, Identity, Review, Session, SessionStatus
from broker.service import Service, new_id

_POLL_SECONDS = 1.0


class Reviews:
    def __init__(self, service: Service) -> None:
        self.service = service
        self._waiters: dict[str, asyncio.Future[bool]] = {}

    async def open(self, *, session_id: str, grant: Grant, resource: str, text: str, rule: str,
                   timeout: timedelta) -> Review:
        """Record a held statement (``text`` already masked) and ask the thread to decide."""
        now = self.service.clock.now()
        review = Review(id=new_id("v"), session_id=session_id, grant_id=grant.id, resource=resource, text=text,
                        rule=rule, requested_by=grant.identity, created_at=now, deadline=now + timeout)
        self._waiters[review.id] = asyncio.get_running_loop().create_future()
        async with self.service.store.tx() as tx:
            await tx.insert_review(review)
            await tx.append_audit(at=now, actor=grant.identity, chain=grant.chain, action="review.requested",
                                  grant_id=grant.id, request_id=grant.request_id,
                                  detail={"review": review.id, "rule": rule, "text": text[:2000]})
            request = await self.service.request_for(tx, grant)
        await self.service.publish([ReviewRequested(review=review, request=request)])
        return review

    async def wait(self, review: Review) -> bool:
        """True when allowed; False when refused or timed out (and then marked timed_out). A
        decision another replica stored after the last poll, before the deadline, is returned.
        A waiter that is cancelled marks the review timed out too."""
        fut = self._waiters.get(review.id)
        clock = self.service.clock
        try:
            for _ in range(100_000):
                remaining = (review.deadline - clock.now()).total_seconds()
                if remaining <= 0:
                    break
                if fut is not None:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(min(remaining, _POLL_SECONDS)):
                            return await asyncio.shield(fut)
                else:
                    await asyncio.sleep(min(remaining, _POLL_SECONDS))
                async with self.service.store.tx() as tx:
                    current = await tx.get_review(review.id)
                if current is not None and current.status != "pending":
                    return current.status == "allowed"
            try:
                await self._finish(review.id, "timed_out", None)
            except Conflict:
                # decided after the last poll, before the deadline: that decision stands
                async with self.service.store.tx() as tx:
                    current = await tx.get_review(review.id)
                return current is not None and current.status == "allowed"
            return False
        except asyncio.CancelledError:
            # the proxy stopped waiting (the client left, the session closed): close the review, so
            # its message stops offering Allow for a statement that can no longer run
            with contextlib.suppress(Conflict, NotFound):
                await asyncio.shield(self._finish(review.id, "timed_out", None))
            raise
        finally:
            self._waiters.pop(review.id, None)

    async def decide(self, review_id: str, who: Identity, allow: bool) -> Review:
        """An eligible approver (a member of one of the resource's approval groups, or an admin)
        who is not behind the statement decides. Raises :class:`Denied` otherwise.

        Behind it are the grant's holder and its whole chain: the human an agent acts for, and
        everyone who delegated to a sub-agent. They are compared with everyone ``who`` speaks
        for (:func:`policy.principals`), so nobody allows their own statement through an agent.
        """
        async with self.service.store.tx() as tx:
            review = await tx.get_review(review_id)
            grant = await tx.get_grant(review.grant_id) if review is not None else None
            session = await tx.get_session(review.session_id) if review is not None else None
        if review is None:
            raise NotFound(f"no review {review_id!r}", code="no_review")
        if who.email.lower() == review.requested_by.lower():
            raise Denied("you cannot review your own statement", code="self_approval")
        behind = {review.requested_by.lower()}
        if grant is not None:
            behind |= {grant.identity.lower(), *(c.lower() for c in grant.chain)}
        if shared := policy.principals(who) & behind:
            raise Denied(f"{', '.join(sorted(shared))} is behind this statement's grant "
                         f"({grant.chain_text() if grant else review.requested_by}), so you cannot review it",
                         code="in_chain")
        if teams := policy.teams_behind(who, behind):
            raise Denied(f"this statement's grant ({grant.chain_text() if grant else review.requested_by}) acts for "
                         f"{', '.join(sorted(teams))}, which you are a member of, so you cannot review it",
                         code="in_chain")
        members = policy.team_members(self.service.config)
        if shared := policy.speaks_for(who, members) & policy.with_members(behind, members):
            raise Denied(f"you speak for {', '.join(sorted(shared))}, who is behind this statement's grant (through "
                         "a team), so you cannot review it", code="in_chain")
        config = self.service.config
        if not policy.is_approver_of(config, who, review.resource) and not policy.is_admin(config, who):
            raise Denied(f"only approvers of {review.resource} can decide this review", code="not_approver")
        gone = self._gone(session, grant, self.service.clock.now())
        if review.status == "pending" and gone is not None:
            # nothing waits on it any more: close it as the waiter would have, and allow nothing
            with contextlib.suppress(Conflict):
                await self._finish(review_id, "timed_out", None)
            raise Conflict(f"nothing waits on review {review_id} any more: {gone}, so the statement did not run",
                           code="gone")
        return await self._finish(review_id, "allowed" if allow else "refused", who)

    @staticmethod
    def _gone(session: Session | None, grant: Grant | None, now: datetime) -> str | None:
        """Why the proxy that held a statement no longer waits for its review, or None. (Ending a
        grant closes its sessions; until the close is recorded, the proxy refuses the statement.)
        A grant past its end counts as ended before the scheduler or the proxy's timer acts on it:
        an Allow given in that moment must not run the statement after the grant's end."""
        if session is not None and session.status is SessionStatus.CLOSED:
            why = f" ({session.close_reason})" if session.close_reason else ""
            return f"session `{session.id}` closed{why}"
        if grant is not None and grant.status is not GrantStatus.ACTIVE:
            return f"its grant `{grant.id}` ended ({grant.status.value})"
        if grant is not None and grant.expires_at <= now:
            return f"its grant `{grant.id}` ended at {grant.expires_at:%H:%M:%S} UTC"
        return None

    async def _finish(self, review_id: str, status: str, who: Identity | None) -> Review:
        """Record a decision, or the timeout (``who`` None). A decision taken at or after the
        deadline records the timeout instead and raises :class:`Conflict`: the waiter may notice
        its deadline up to a poll late, or not at all if its process died, and must not then
        find the statement allowed."""
        now = self.service.clock.now()
        late = False
        async with self.service.store.tx() as tx:
            review = await tx.get_review(review_id, lock=True)  # a decision and the timeout: one wins
            if review is None:
                raise NotFound(f"no review {review_id!r}", code="no_review")
            if review.status != "pending":
                raise Conflict(f"review {review_id} is already {review.status}", code=review.status)
            if who is not None and now >= review.deadline:
                status, who, late = "timed_out", None, True
            review.status = status  # type: ignore[assignment]
            review.decided_by = who.email if who else None
            await tx.update_review(review)
            grant = await tx.get_grant(review.grant_id)
            await tx.append_audit(at=now, actor=who.email if who else "hoop", chain=who.chain if who else ("hoop",),
                                  action=f"review.{status}", grant_id=review.grant_id,
                                  request_id=grant.request_id if grant else None, detail={"review": review.id})
            request = await self.service.request_for(tx, grant) if grant else None
        fut = self._waiters.get(review_id)
        if fut is not None and not fut.done():
            fut.set_result(status == "allowed")
        await self.service.publish([ReviewDecided(review=review, request=request)])
        if late:
            raise Conflict(f"review {review_id} timed out at {review.deadline:%H:%M:%S} UTC, so the statement "
                           "was refused", code="timed_out")
        return review

    async def get(self, review_id: str) -> Review | None:
        async with self.service.store.tx() as tx:
            return await tx.get_review(review_id)

    async def set_message(self, review_id: str, channel: str, ts: str) -> None:
        async with self.service.store.tx() as tx:
            review = await tx.get_review(review_id)
            if review is not None:
                review.channel, review.ts = channel, ts
                await tx.update_review(review)

    async def by_message(self, channel: str, ts: str) -> Review | None:
        async with self.service.store.tx() as tx:
            return await tx.review_by_message(channel, ts)
