"""Service use cases over SQLite and a real PostgreSQL (the ``store`` fixture runs both)."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest

from broker import policy
from broker.clock import FakeClock
from broker.config import HoopConfig, parse_config
from broker.errors import Conflict, Denied, InvalidInput
from broker.events import (
    ApprovalAdded,
    GrantEnded,
    GrantIssued,
    RecordingNotifier,
    RequestCreated,
    RequestDenied,
    RequestLapsed,
)
from broker.model import AccessRequest, Grant, GrantStatus, Identity, RequestStatus
from broker.scheduler import Scheduler
from broker.service import Service
from broker.store import Store
from tests.conftest import base_config


def who(config: HoopConfig, email: str) -> Identity:
    return Identity(email=email, groups=policy.groups_of(config, email))


async def granted(service: Service, config: HoopConfig) -> tuple[str, str, str]:
    req = await service.request(who(config, "alice@example.com"), "prod-db", "1h", "fix invoice 4411")
    await service.approve(req.id, who(config, "dana@example.com"))
    result = await service.approve(req.id, who(config, "sam@example.com"))
    assert result.grant is not None and result.secret is not None
    return req.id, result.grant.id, result.secret


async def test_full_flow_issues_grant_once(service: Service, config: HoopConfig, notifier: RecordingNotifier,
                                           store: Store) -> None:
    req_id, grant_id, secret = await granted(service, config)
    assert secret.startswith("hoop_") and len(secret) >= 5 + 43
    assert len(notifier.of(RequestCreated)) == 1
    assert len(notifier.of(ApprovalAdded)) == 2
    issued = notifier.of(GrantIssued)
    assert len(issued) == 1 and issued[0].secret == secret
    assert "psql" in issued[0].hints["prod-db"] and secret in issued[0].hints["prod-db"]
    assert secret not in repr(issued[0]) and secret not in str(issued[0])  # hints embed it too
    async with store.tx() as tx:
        req = await tx.get_request(req_id)
        grant = await tx.get_grant(grant_id)
        found = await tx.grant_by_login(grant.login if grant else "")
    assert req is not None and req.status is RequestStatus.APPROVED and req.grant_id == grant_id
    assert grant is not None and grant.expires_at - grant.created_at == timedelta(hours=1)
    assert found is not None and secret not in found[1] and secret not in found[2]  # only hashes at rest
    with pytest.raises(Conflict):
        await service.approve(req_id, who(config, "erin@example.com"))


async def test_single_access_check(service: Service, config: HoopConfig, clock: FakeClock, store: Store) -> None:
    _, grant_id, secret = await granted(service, config)
    async with store.tx() as tx:
        grant = await tx.get_grant(grant_id)
    assert grant is not None
    ok = await service.authenticate(grant.login, secret, "prod-db")
    assert ok.id == grant_id
    cases = [(grant.login, secret + "x", "prod-db", "bad_credentials"),
             ("nobody.abcde", secret, "prod-db", "bad_credentials"),
             (grant.login, secret, "other-db", "wrong_resource")]
    for login, sec, res, code in cases:
        with pytest.raises(Denied) as exc:
            await service.authenticate(login, sec, res)
        assert exc.value.code == code
        assert secret not in exc.value.message
    clock.advance(timedelta(hours=1))
    with pytest.raises(Denied) as exc:
        await service.authenticate(grant.login, secret, "prod-db")
    assert exc.value.code == "expired"


async def test_deny_with_reason(service: Service, config: HoopConfig, notifier: RecordingNotifier) -> None:
    req = await service.request(who(config, "alice@example.com"), "prod-db", "30m", "why")
    with pytest.raises(Denied):
        await service.deny(req.id, who(config, "bob@example.com"), "no")
    denied = await service.deny(req.id, who(config, "dana@example.com"), "use the replica")
    assert denied.status is RequestStatus.DENIED and denied.decision_reason == "use the replica"
    assert notifier.of(RequestDenied)[0].reason == "use the replica"
    with pytest.raises(Conflict):
        await service.approve(req.id, who(config, "sam@example.com"))


async def test_request_refusals(service: Service, config: HoopConfig) -> None:
    alice = who(config, "alice@example.com")
    with pytest.raises(InvalidInput, match="maximum of 4h"):
        await service.request(alice, "prod-db", "5h", "x")
    with pytest.raises(InvalidInput, match="requires a reason"):
        await service.request(alice, "prod-db", "1h", "  ")
    with pytest.raises(InvalidInput, match="unknown resource 'nope'"):
        await service.request(alice, "nope", "1h", "x")
    with pytest.raises(Denied):
        await service.request(who(config, "dana@example.com"), "prod-db", "1h", "x")


async def test_cancel_and_lapse(service: Service, config: HoopConfig, clock: FakeClock,
                                notifier: RecordingNotifier) -> None:
    alice = who(config, "alice@example.com")
    r1 = await service.request(alice, "prod-db", "1h", "a")
    with pytest.raises(Denied):
        await service.cancel(r1.id, who(config, "bob@example.com"))
    assert (await service.cancel(r1.id, alice)).status is RequestStatus.CANCELLED
    r2 = await service.request(alice, "prod-db", "1h", "b")
    clock.advance(timedelta(hours=1, seconds=1))
    with pytest.raises(Conflict, match="lapsed"):
        await service.approve(r2.id, who(config, "dana@example.com"))
    report = await Scheduler(service, clock).run_due()
    assert report.lapsed == [r2.id]
    assert notifier.of(RequestLapsed)[0].request.id == r2.id


async def test_breakglass_admin_only(service: Service, config: HoopConfig, notifier: RecordingNotifier,
                                     store: Store) -> None:
    with pytest.raises(Denied, match="limited to members of admins"):
        await service.breakglass(who(config, "alice@example.com"), "prod-db", "alice@example.com", "30m", "fire")
    grant, secret = await service.breakglass(who(config, "root@example.com"), "prod-db", "root@example.com", "30m",
                                             "outage 7")
    assert grant.breakglass and notifier.of(GrantIssued)[0].breakglass_reason == "outage 7"
    async with store.tx() as tx:
        entries = await tx.audit_entries()
    assert [e.action for e in entries] == ["grant.breakglass"]
    assert (await service.authenticate(grant.login, secret, "prod-db")).id == grant.id


async def test_revoke_by_allowed_roles_only(service: Service, config: HoopConfig, notifier: RecordingNotifier) -> None:
    for revoker in ["alice@example.com", "dana@example.com", "root@example.com"]:
        _, grant_id, _ = await granted(service, config)
        with pytest.raises(Denied):
            await service.revoke(grant_id, who(config, "bob@example.com"), "nosy")
        g = await service.revoke(grant_id, who(config, revoker), "done")
        assert g.status is GrantStatus.REVOKED and g.ended_by == revoker
    assert len(notifier.of(GrantEnded)) == 3


async def test_extend_needs_reapproval(service: Service, config: HoopConfig, store: Store) -> None:
    _, grant_id, _ = await granted(service, config)
    alice = who(config, "alice@example.com")
    with pytest.raises(InvalidInput, match="maximum"):
        await service.extend(grant_id, alice, "3h30m")
    ext = await service.extend(grant_id, alice, "30m")
    assert not hasattr(ext, "login")  # a request, not a grant
    await service.approve(ext.id, who(config, "dana@example.com"))
    result = await service.approve(ext.id, who(config, "sam@example.com"))
    assert result.grant is not None and result.secret is None
    assert result.grant.expires_at - result.grant.created_at == timedelta(minutes=90)


async def test_extend_without_approval_when_policy_allows(tmp_path: object, clock: FakeClock, store: Store) -> None:
    data = base_config()
    data["resources"][0]["extension"] = {"requires_approval": False}
    config = parse_config(data)
    service = Service(config, store, clock, RecordingNotifier())
    _, grant_id, _ = await granted(service, config)
    g = await service.extend(grant_id, who(config, "alice@example.com"), "30m")
    assert getattr(g, "expires_at") - clock.now() == timedelta(minutes=90)


async def test_no_approval_resource_grants_at_once(clock: FakeClock, store: Store) -> None:
    data = base_config()
    data["resources"][0]["approval"] = []
    config = parse_config(data)
    notifier = RecordingNotifier()
    service = Service(config, store, clock, notifier)
    req = await service.request(who(config, "alice@example.com"), "prod-db", "10m", "x")
    assert req.status is RequestStatus.APPROVED and len(notifier.of(GrantIssued)) == 1


async def test_withdraw(service: Service, config: HoopConfig) -> None:
    req = await service.request(who(config, "alice@example.com"), "prod-db", "1h", "x")
    await service.approve(req.id, who(config, "dana@example.com"))
    after = await service.withdraw(req.id, who(config, "dana@example.com"))
    assert after.approvals == []
    await service.approve(req.id, who(config, "dana@example.com"))
    assert (await service.approve(req.id, who(config, "sam@example.com"))).grant is not None


async def test_revoking_a_parent_ends_every_descendant_past_a_page(service: Service, config: HoopConfig,
                                                                    clock: FakeClock, store: Store,
                                                                    notifier: RecordingNotifier) -> None:
    """More active children than one page of the store's listing (1,000): every one ends, and
    so does a grandchild under the oldest child, the one a single page used to miss."""
    root = who(config, "root@example.com")
    parent, _ = await service.breakglass(root, "prod-db", "root@example.com", "1h", "outage")
    async with store.tx() as tx:
        for i in range(1001):
            clock.advance(timedelta(milliseconds=1))
            child = Grant(id=f"gc{i:05d}", login=f"c.{i}", identity="sub", chain=("root@example.com", "sub"),
                          resources=("prod-db",), status=GrantStatus.ACTIVE, created_at=clock.now(),
                          expires_at=parent.expires_at, parent_id=parent.id, depth=1, label="sub")
            await tx.insert_grant(child, secret_digest=f"d{i}", scram_verifier="x")
        grandchild = Grant(id="gg00000", login="gg.0", identity="subsub", chain=("root@example.com", "sub", "subsub"),
                           resources=("prod-db",), status=GrantStatus.ACTIVE, created_at=clock.now(),
                           expires_at=parent.expires_at, parent_id="gc00000", depth=2, label="subsub")
        await tx.insert_grant(grandchild, secret_digest="dgg", scram_verifier="x")

    await service.revoke(parent.id, root, "contained")

    async with store.tx() as tx:
        assert await tx.list_grants(parent_id=parent.id, status=GrantStatus.ACTIVE, limit=5000) == []
        oldest, deepest = await tx.get_grant("gc00000"), await tx.get_grant("gg00000")
    assert oldest is not None and oldest.status is GrantStatus.REVOKED
    assert deepest is not None and deepest.status is GrantStatus.REVOKED and "gc00000" in (deepest.end_reason or "")
    assert len(notifier.of(GrantEnded)) == 1 + 1001 + 1


async def test_a_second_extension_waits_for_the_pending_one(service: Service, config: HoopConfig,
                                                           clock: FakeClock) -> None:
    _, grant_id, _ = await granted(service, config)
    alice = who(config, "alice@example.com")
    first = await service.extend(grant_id, alice, "30m")
    with pytest.raises(Conflict) as exc:
        await service.extend(grant_id, alice, "30m")  # a double click on the reminder's button
    assert exc.value.code == "extension_pending" and getattr(first, "id") in exc.value.message
    await service.cancel(getattr(first, "id"), alice)
    assert isinstance(await service.extend(grant_id, alice, "30m"), AccessRequest)  # nothing pending now


async def test_extension_bound_is_checked_again_at_approval(service: Service, config: HoopConfig,
                                                            clock: FakeClock, store: Store,
                                                            notifier: RecordingNotifier) -> None:
    """Two extension requests that each fitted when asked (one made before the pending check,
    or by an older replica): approving both must not leave more than max_duration (4h)."""
    alice = who(config, "alice@example.com")
    req = await service.request(alice, "prod-db", "4h", "backfill")
    await service.approve(req.id, who(config, "dana@example.com"))
    grant = (await service.approve(req.id, who(config, "sam@example.com"))).grant
    assert grant is not None
    clock.advance(timedelta(hours=1))
    first = await service.extend(grant.id, alice, "1h")
    assert isinstance(first, AccessRequest)
    async with store.tx() as tx:
        await tx.insert_request(replace(first, id="rsecond", approvals=[]))

    for ext in (first.id, "rsecond"):
        await service.approve(ext, who(config, "dana@example.com"))
        result = await service.approve(ext, who(config, "sam@example.com"))
    assert result.grant is None and result.request.status is RequestStatus.DENIED
    assert result.request.decided_by == "hoop" and "maximum of 4h" in (result.request.decision_reason or "")
    assert notifier.of(RequestDenied)[-1].request.id == "rsecond"
    async with store.tx() as tx:
        after = await tx.get_grant(grant.id)
    assert after is not None and after.expires_at - clock.now() == timedelta(hours=4)


async def test_an_extension_of_an_ended_grant_is_refused_at_approval(service: Service, config: HoopConfig,
                                                                     store: Store) -> None:
    _, grant_id, _ = await granted(service, config)
    alice = who(config, "alice@example.com")
    ext = await service.extend(grant_id, alice, "30m")
    await service.approve(getattr(ext, "id"), who(config, "dana@example.com"))
    await service.revoke(grant_id, who(config, "root@example.com"), "done")
    result = await service.approve(getattr(ext, "id"), who(config, "sam@example.com"))
    assert result.grant is None and result.request.status is RequestStatus.DENIED
    assert "revoked" in (result.request.decision_reason or "")
