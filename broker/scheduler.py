"""Deadlines: lapse pending requests, send reminders, expire grants; and decide any request
whose quorum was met but which was left pending.

:meth:`Scheduler.run_due` is the whole logic: it reads the store, compares with the
``Clock`` and acts. Tests advance a fake clock and call it; they never sleep. In production
APScheduler fires ``run_due`` at each known deadline (date jobs, so expiry is on time to the
millisecond) plus a periodic sweep that catches anything another replica scheduled. The
scheduler learns new deadlines by subscribing to the broker's events, and other replicas'
deadlines through :mod:`broker.fanout`. With several replicas only the leader (``leader()``)
acts; the others keep their jobs and skip them, so a new leader has the schedule at hand.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TypeVar

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from broker import policy
from broker.clock import Clock
from broker.errors import HoopError
from broker.events import Event, GrantExtended, GrantIssued, RequestCreated
from broker.model import AccessRequest, Grant, GrantStatus, RequestStatus
from broker.service import Service
from broker.store.repo import Tx

log = logging.getLogger(__name__)

_T = TypeVar("_T")
#: rows read per query when the scheduler walks pending requests or grants, and the most pages one walk
#: reads (a million rows; the rest wait for the next sweep, which a warning says)
_PAGE = 1000
_MAX_PAGES = 1000
#: Slack retries an event for minutes (3 times, the last about 5 minutes on): the ids of processed events
#: are kept a day, then forgotten, at most once an hour
KEEP_EVENT_IDS = timedelta(days=1)
_PRUNE_EVERY = timedelta(hours=1)


@dataclass
class DueReport:
    lapsed: list[str] = field(default_factory=list)
    #: met requests left pending (their approver's process stopped before deciding), now decided
    decided: list[str] = field(default_factory=list)
    expired: list[str] = field(default_factory=list)
    reminded: list[str] = field(default_factory=list)

    def summary(self, most: int = 20) -> str:
        """One line for the log (an operator asks what the leader did after a restart or a take-over)."""
        parts = []
        for what, ids in (("expired grant", self.expired), ("lapsed request", self.lapsed),
                          ("decided met request", self.decided), ("reminded grant", self.reminded)):
            if ids:
                more = f" and {len(ids) - most} more" if len(ids) > most else ""
                parts.append(f"{what}(s) {', '.join(ids[:most])}{more}")
        return "; ".join(parts)


class Scheduler:
    def __init__(self, service: Service, clock: Clock, *, sweep_every: timedelta = timedelta(seconds=15),
                 settle_after: timedelta = timedelta(seconds=30), leader: Callable[[], bool] = lambda: True,
                 page: int = _PAGE) -> None:
        self.service = service
        self.clock = clock
        self.sweep_every = sweep_every
        #: how long a met request is left to the approval that met it before the scheduler decides it
        self.settle_after = settle_after
        #: with several replicas only the leader acts on deadlines (see broker/fanout.py)
        self.leader = leader
        self._aps: AsyncIOScheduler | None = None
        self._pruned_at: datetime | None = None
        #: the earliest a reminder is due before its grant's end, over every resource (5 min: a removed one)
        self._remind_ahead = max([r.reminder_before for r in service.config.resources] + [timedelta(minutes=5)])
        self.page = page

    async def _walk(self, read: Callable[[Tx, int], Awaitable[list[_T]]], what: str) -> list[_T]:
        """Every row ``read`` gives, page by page in one transaction (a row another replica changes meanwhile
        may be read twice, which the actions tolerate, or missed until the next sweep)."""
        out: list[_T] = []
        async with self.service.store.tx() as tx:
            for page in range(_MAX_PAGES):
                rows = await read(tx, page * self.page)
                out.extend(rows)
                if len(rows) < self.page:
                    return out
        log.warning("scheduler: more than %d %s; the rest wait for the next sweep", len(out), what)
        return out

    async def _pending(self) -> list[AccessRequest]:
        return await self._walk(lambda tx, offset: tx.list_requests(
            status=RequestStatus.PENDING, limit=self.page, offset=offset), "pending requests")

    async def _active(self, expires_by: datetime | None = None) -> list[Grant]:
        return await self._walk(lambda tx, offset: tx.list_grants(
            status=GrantStatus.ACTIVE, expires_by=expires_by, limit=self.page, offset=offset), "active grants")

    async def run_due(self) -> DueReport:
        """Act on every deadline that has passed. Safe to call at any time, from any replica."""
        now = self.clock.now()
        report = DueReport()
        pending = await self._pending()
        active = await self._active(expires_by=now + self._remind_ahead)  # due to end, or to be reminded
        for req in pending:
            if policy.is_met(req.steps, req.approvals):
                # approved, but the process that took the last approval may have stopped before
                # deciding. Give it settle_after to decide itself, then decide it here (exactly
                # once, under the request's lock), and never lapse it.
                last = max((a.at for a in req.approvals), default=req.created_at)
                if now < req.lapses_at and now - last < self.settle_after:
                    continue
                try:
                    if (await self.service.decide_met(req.id)).request.status is not RequestStatus.PENDING:
                        report.decided.append(req.id)
                except HoopError as exc:
                    log.warning("deciding %s failed: %s", req.id, exc)
            elif req.lapses_at <= now:
                try:
                    await self.service.lapse(req.id)
                    report.lapsed.append(req.id)
                except HoopError as exc:  # decided meanwhile
                    log.debug("lapse of %s skipped: %s", req.id, exc)
        for grant in sorted(active, key=lambda g: g.depth):
            if grant.expires_at <= now:
                try:
                    if (await self.service.expire(grant.id)).status is GrantStatus.EXPIRED:
                        report.expired.append(grant.id)  # not when it was extended since the read above
                except HoopError as exc:  # ended meanwhile, e.g. with its parent
                    log.debug("expiry of %s skipped: %s", grant.id, exc)
            elif grant.reminded_at is None and grant.parent_id is None and now >= self._remind_at(grant.resources[0],
                                                                                                   grant.expires_at):
                await self.service.remind(grant.id)
                report.reminded.append(grant.id)
        await self._prune(now)
        if report.lapsed or report.decided or report.expired or report.reminded:
            log.info("scheduler: %s", report.summary())
        return report

    async def _prune(self, now: datetime) -> None:
        """Forget old Slack event ids (the table grew by one row per event, for ever)."""
        if self._pruned_at is not None and now - self._pruned_at < _PRUNE_EVERY:
            return
        self._pruned_at = now
        try:
            async with self.service.store.tx() as tx:
                gone = await tx.prune_processed(now - KEEP_EVENT_IDS)
        except Exception:
            log.exception("pruning processed Slack event ids failed; tried again in an hour")
            return
        if gone:
            log.info("scheduler: forgot %d Slack event ids older than %s", gone, KEEP_EVENT_IDS)

    def _remind_at(self, resource: str, expires_at: datetime) -> datetime:
        res = self.service.config.resource(resource)
        before = res.reminder_before if res is not None else timedelta(minutes=5)
        return expires_at - before

    # -- real time --------------------------------------------------------------------------
    async def start(self) -> DueReport:
        """Reconcile (act on what became due while down), then schedule every future deadline."""
        report = await self.run_due() if self.leader() else DueReport()
        self._aps = AsyncIOScheduler(timezone="UTC")
        self._aps.add_job(self._tick, "interval", seconds=self.sweep_every.total_seconds(), id="sweep",
                          max_instances=1, coalesce=True)
        self._aps.start()
        pending = await self._pending()
        active = await self._active()
        for req in pending:
            self.at(req.lapses_at)
        for grant in active:
            self.at(grant.expires_at)
            self.at(self._remind_at(grant.resources[0], grant.expires_at))
        return report

    def at(self, when: datetime) -> None:
        """Run :meth:`run_due` at ``when`` (deadlines in the past run at once)."""
        if self._aps is None:
            return
        run_at = max(when, self.clock.now())
        self._aps.add_job(self._tick, "date", run_date=run_at, id=f"due-{run_at.timestamp():.6f}",
                          replace_existing=True, misfire_grace_time=None)

    async def kick(self) -> None:
        """Act at once on whatever is due (a replica that just became the leader)."""
        await self._tick()

    async def _tick(self) -> None:
        if not self.leader():
            return
        try:
            await self.run_due()
        except Exception:
            log.exception("scheduler tick failed")

    def shutdown(self) -> None:
        if self._aps is not None and self._aps.running:
            self._aps.shutdown(wait=False)
        self._aps = None

    async def publish(self, event: Event) -> None:
        """Learn new deadlines from the broker's events."""
        if isinstance(event, RequestCreated):
            self.at(event.request.lapses_at)
        elif isinstance(event, GrantIssued | GrantExtended):
            self.at(event.grant.expires_at)
            self.at(self._remind_at(event.grant.resources[0], event.grant.expires_at))
