"""Deadlines with a fake clock: expiry, reminders, and reconciliation after a restart."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from broker import policy
from broker.clock import FakeClock
from broker.config import HoopConfig, parse_config
from broker.errors import Denied
from broker.events import ApprovalAdded, Event, GrantEnded, GrantIssued, GrantReminder, RecordingNotifier
from broker.model import GrantStatus, Identity, RequestStatus
from broker.scheduler import Scheduler
from broker.service import Service
from broker.store import Store
from tests.conftest import base_config


def who(config: HoopConfig, email: str) -> Identity:
    return Identity(email=email, groups=policy.groups_of(config, email))


async def test_reminder_then_expiry(service: Service, config: HoopConfig, clock: FakeClock,
                                    notifier: RecordingNotifier) -> None:
    req = await service.request(who(config, "alice@example.com"), "prod-db", "30m", "x")
    await service.approve(req.id, who(config, "dana@example.com"))
    grant = (await service.approve(req.id, who(config, "sam@example.com"))).grant
    assert grant is not None
    sched = Scheduler(service, clock)
    assert (await sched.run_due()).reminded == []
    clock.advance(timedelta(minutes=25))
    assert (await sched.run_due()).reminded == [grant.id]
    assert (await sched.run_due()).reminded == []  # once
    clock.advance(timedelta(minutes=5))
    assert (await sched.run_due()).expired == [grant.id]
    assert len(notifier.of(GrantReminder)) == 1 and notifier.of(GrantEnded)[0].grant.status is GrantStatus.EXPIRED


async def test_the_reminder_comes_as_long_before_the_end_as_its_resource_says(store: Store, clock: FakeClock) -> None:
    """``reminder_before`` per resource (the default, 5 minutes, was the only one tested): a reminder 20
    minutes ahead on one resource, the default on another, each once, and again after an extension."""
    data = base_config()
    data["resources"][0]["reminder_before"] = "20m"
    data["resources"].append({**data["resources"][0], "name": "replica-db", "reminder_before": "5m",
                              "approval": []})
    data["resources"][0]["extension"] = {"requires_approval": False}
    config = parse_config(data)
    notifier = RecordingNotifier()
    service = Service(config, store, clock, notifier)
    alice = who(config, "alice@example.com")
    req = await service.request(alice, "prod-db", "1h", "x")
    await service.approve(req.id, who(config, "dana@example.com"))
    early = (await service.approve(req.id, who(config, "sam@example.com"))).grant
    late = (await service.request(alice, "replica-db", "1h", "x")).grant_id
    assert early is not None and late is not None
    sched = Scheduler(service, clock)
    clock.advance(timedelta(minutes=39))
    assert (await sched.run_due()).reminded == []
    clock.advance(timedelta(minutes=1))  # 20 minutes before the end
    assert (await sched.run_due()).reminded == [early.id]
    clock.advance(timedelta(minutes=14, seconds=59))
    assert (await sched.run_due()).reminded == []
    clock.advance(timedelta(seconds=1))  # 5 minutes before the end
    assert (await sched.run_due()).reminded == [late]
    await service.extend(early.id, alice, "30m")  # ends 35 minutes from now: reminded again at 20
    clock.advance(timedelta(minutes=14))
    assert (await sched.run_due()).reminded == []
    clock.advance(timedelta(minutes=1))
    assert (await sched.run_due()).reminded == [early.id]
    assert [e.grant.id for e in notifier.of(GrantReminder)] == [early.id, late, early.id]


async def test_restart_reconciles(config: HoopConfig, store: Store, clock: FakeClock,
                                  caplog: pytest.LogCaptureFixture) -> None:
    """A first 'process' issues grants and stops; time passes; a second one reconciles from the store,
    and says in its log what it did (it once acted in silence: an operator could not tell)."""
    first = Service(config, store, clock, RecordingNotifier())
    ids = []
    for minutes in ("10m", "1h"):
        req = await first.request(who(config, "alice@example.com"), "prod-db", minutes, "x")
        await first.approve(req.id, who(config, "dana@example.com"))
        result = await first.approve(req.id, who(config, "sam@example.com"))
        assert result.grant is not None
        ids.append(result.grant.id)
    pending = await first.request(who(config, "bob@example.com"), "prod-db", "1h", "never approved")

    clock.advance(timedelta(minutes=61))  # hoop was down
    notifier = RecordingNotifier()
    second = Service(config, store, clock, notifier)
    with caplog.at_level("INFO", logger="broker.scheduler"):
        report = await Scheduler(second, clock).run_due()
    assert sorted(report.expired) == sorted(ids) and report.lapsed == [pending.id]
    (said,) = [r.getMessage() for r in caplog.records if r.name == "broker.scheduler"]
    assert said == (f"scheduler: expired grant(s) {', '.join(report.expired)}; lapsed request(s) {pending.id}")
    async with store.tx() as tx:
        for i in ids:
            grant = await tx.get_grant(i)
            assert grant is not None and grant.status is GrantStatus.EXPIRED
        assert (await tx.get_request(pending.id)).status is RequestStatus.LAPSED  # type: ignore[union-attr]
    caplog.clear()
    with caplog.at_level("INFO", logger="broker.scheduler"):
        assert (await Scheduler(second, clock).run_due()).expired == []
    assert not caplog.records  # nothing done, nothing said


async def test_expiry_after_an_extension_is_a_no_op(service: Service, config: HoopConfig, clock: FakeClock,
                                                    store: Store, notifier: RecordingNotifier) -> None:
    """The leader read the grant as due, then an extension committed before ``expire`` took the
    row lock: the expiry must leave the extended grant alone."""
    req = await service.request(who(config, "alice@example.com"), "prod-db", "30m", "x")
    await service.approve(req.id, who(config, "dana@example.com"))
    grant = (await service.approve(req.id, who(config, "sam@example.com"))).grant
    assert grant is not None
    clock.advance(timedelta(minutes=29))
    ext = await service.extend(grant.id, who(config, "alice@example.com"), "30m")
    await service.approve(ext.id, who(config, "dana@example.com"))
    await service.approve(ext.id, who(config, "sam@example.com"))
    clock.advance(timedelta(minutes=1))  # the original deadline, as a stale snapshot saw it

    after = await service.expire(grant.id)

    assert after.status is GrantStatus.ACTIVE and after.expires_at == clock.now() + timedelta(minutes=30)
    async with store.tx() as tx:
        stored = await tx.get_grant(grant.id)
        actions = [e.action for e in await tx.audit_entries()]
    assert stored is not None and stored.status is GrantStatus.ACTIVE and stored.ended_at is None
    assert "grant.expired" not in actions and notifier.of(GrantEnded) == []
    assert (await Scheduler(service, clock).run_due()).expired == []
    clock.advance(timedelta(minutes=30))
    assert (await Scheduler(service, clock).run_due()).expired == [grant.id]


class DiesAfterApproval(RecordingNotifier):
    """The process is killed (its task cancelled) while the approval is being announced, after
    the approval committed and before the decision."""

    async def publish(self, event: Event) -> None:
        await super().publish(event)
        if isinstance(event, ApprovalAdded):
            raise asyncio.CancelledError


async def test_scheduler_decides_a_request_left_undecided(config: HoopConfig, store: Store,
                                                           clock: FakeClock) -> None:
    dying = Service(config, store, clock, DiesAfterApproval())
    req = await dying.request(who(config, "alice@example.com"), "prod-db", "1h", "x")
    with pytest.raises(asyncio.CancelledError):
        await dying.approve(req.id, who(config, "dana@example.com"))
    with pytest.raises(asyncio.CancelledError):
        await dying.approve(req.id, who(config, "sam@example.com"))  # the quorum is met, then the crash
    notifier = RecordingNotifier()
    service = Service(config, store, clock, notifier)  # the restarted process
    with pytest.raises(Denied) as exc:
        await service.approve(req.id, who(config, "erin@example.com"))
    assert exc.value.code == "not_needed"

    assert (await Scheduler(service, clock).run_due()).decided == []  # its approver may still decide it
    clock.advance(timedelta(seconds=30))
    report = await Scheduler(service, clock).run_due()

    assert report.decided == [req.id] and report.lapsed == []
    issued = notifier.of(GrantIssued)
    assert len(issued) == 1 and issued[0].request.id == req.id
    async with store.tx() as tx:
        decided = await tx.get_request(req.id)
    assert decided is not None and decided.status is RequestStatus.APPROVED
    assert decided.grant_id == issued[0].grant.id and decided.decided_by == "hoop"
    clock.advance(timedelta(hours=2))  # past its lapse: decided once, never lapsed
    report = await Scheduler(service, clock).run_due()
    assert report.decided == [] and report.lapsed == [] and len(notifier.of(GrantIssued)) == 1


async def test_scheduler_decides_a_met_request_instead_of_lapsing_it(config: HoopConfig, store: Store,
                                                                     clock: FakeClock) -> None:
    dying = Service(config, store, clock, DiesAfterApproval())
    req = await dying.request(who(config, "alice@example.com"), "prod-db", "1h", "x")
    for approver in ("dana@example.com", "sam@example.com"):
        with pytest.raises(asyncio.CancelledError):
            await dying.approve(req.id, who(config, approver))
    clock.advance(timedelta(hours=1, minutes=1))  # hoop was down until after the request's lapse
    notifier = RecordingNotifier()
    report = await Scheduler(Service(config, store, clock, notifier), clock).run_due()
    assert report.decided == [req.id] and report.lapsed == []
    grant = notifier.of(GrantIssued)[0].grant
    assert grant.expires_at == clock.now() + timedelta(hours=1)  # the full hour, from the decision


async def test_every_due_grant_and_request_is_read_page_by_page(config: HoopConfig, store: Store,
                                                                 clock: FakeClock) -> None:
    """The scheduler read at most 100,000 rows, so past that grants were never expired by it; it now walks
    the rows in pages (two rows here) and reads only grants due to end or to be reminded."""
    service = Service(config, store, clock, RecordingNotifier())
    ids = []
    for i in range(5):
        req = await service.request(who(config, "alice@example.com"), "prod-db", "10m", f"n{i}")
        await service.approve(req.id, who(config, "dana@example.com"))
        result = await service.approve(req.id, who(config, "sam@example.com"))
        assert result.grant is not None
        ids.append(result.grant.id)
    later = await service.request(who(config, "bob@example.com"), "prod-db", "1h", "not yet due")
    await service.approve(later.id, who(config, "dana@example.com"))
    lasting = (await service.approve(later.id, who(config, "sam@example.com"))).grant
    assert lasting is not None
    lapsing = [await service.request(who(config, "bob@example.com"), "prod-db", "1h", f"p{i}") for i in range(3)]
    clock.advance(timedelta(minutes=11))
    async with store.tx() as tx:  # what the sweep reads: the due grants, not the one ending in 49 minutes
        due = await tx.list_grants(status=GrantStatus.ACTIVE, expires_by=clock.now() + timedelta(minutes=5))
    assert sorted(g.id for g in due) == sorted(ids)
    clock.advance(config.resource("prod-db").pending_ttl)  # type: ignore[union-attr]
    report = await Scheduler(service, clock, page=2).run_due()
    assert sorted(report.expired) == sorted([*ids, lasting.id])
    assert sorted(report.lapsed) == sorted(r.id for r in lapsing)


async def test_old_slack_event_ids_are_forgotten_hourly(config: HoopConfig, store: Store, clock: FakeClock) -> None:
    service = Service(config, store, clock, RecordingNotifier())
    async with store.tx() as tx:
        assert await tx.mark_processed("Ev-old", clock.now())
    clock.advance(timedelta(hours=23))
    async with store.tx() as tx:
        assert await tx.mark_processed("Ev-new", clock.now())
    sched = Scheduler(service, clock)
    clock.advance(timedelta(hours=2))  # Ev-old is 25 h old, Ev-new 2 h
    await sched.run_due()
    async with store.tx() as tx:
        assert await tx.mark_processed("Ev-old", clock.now())  # forgotten: new again
        assert not await tx.mark_processed("Ev-new", clock.now())  # kept: still a duplicate
        assert await tx.mark_processed("Ev-late", clock.now() - timedelta(days=2))
    clock.advance(timedelta(minutes=30))
    await sched.run_due()  # within the hour: no second prune
    async with store.tx() as tx:
        assert not await tx.mark_processed("Ev-late", clock.now())
    clock.advance(timedelta(minutes=31))
    await sched.run_due()
    async with store.tx() as tx:
        assert await tx.mark_processed("Ev-late", clock.now())
