"""Deadlines with a fake clock: expiry, reminders, and reconciliation after a restart."""

from __future__ import annotations

from datetime import timedelta

from broker import policy
from broker.clock import FakeClock
from broker.config import HoopConfig
from broker.events import GrantEnded, GrantReminder, RecordingNotifier
from broker.model import GrantStatus, Identity, RequestStatus
from broker.scheduler import Scheduler
from broker.service import Service
from broker.store import Store


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


async def test_restart_reconciles(config: HoopConfig, store: Store, clock: FakeClock) -> None:
    """A first 'process' issues grants and stops; time passes; a second one reconciles from the store."""
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
    report = await Scheduler(second, clock).run_due()
    assert sorted(report.expired) == sorted(ids) and report.lapsed == [pending.id]
    async with store.tx() as tx:
        for i in ids:
            grant = await tx.get_grant(i)
            assert grant is not None and grant.status is GrantStatus.EXPIRED
        assert (await tx.get_request(pending.id)).status is RequestStatus.LAPSED  # type: ignore[union-attr]
    assert (await Scheduler(second, clock).run_due()).expired == []
