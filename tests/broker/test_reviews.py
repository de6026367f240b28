"""Statement reviews: nobody behind a grant (its holder, the human an agent acts for, whoever
delegated it) may allow its held statement; another approver of the resource may."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from broker import policy
from broker.clock import FakeClock
from broker.config import HoopConfig, parse_config
from broker.delegation import delegate
from broker.errors import Conflict, Denied
from broker.model import Grant, Identity
from broker.reviews import Reviews
from broker.service import Service
from tests.conftest import base_config


@pytest.fixture
def config() -> HoopConfig:
    data = base_config()
    data["groups"]["dba"]["members"] = ["dana@example.com", "erin@example.com", "alice@example.com"]
    return parse_config(data)  # alice both requests (eng) and approves (dba) prod-db


def who(config: HoopConfig, email: str) -> Identity:
    return Identity(email=email, groups=policy.groups_of(config, email))


def agent(name: str, acts_for: str, *groups: str) -> Identity:
    return Identity(email=name, kind="agent", acts_for=acts_for, groups=frozenset(groups))


async def granted(service: Service, config: HoopConfig, requester: Identity) -> Grant:
    req = await service.request(requester, "prod-db", "1h", "nightly fix")
    await service.approve(req.id, who(config, "dana@example.com"))
    result = await service.approve(req.id, who(config, "sam@example.com"))
    assert result.grant is not None
    return result.grant


async def held(reviews: Reviews, grant: Grant) -> str:
    review = await reviews.open(session_id="s1", grant=grant, resource="prod-db", text="DELETE FROM orders",
                                rule="deletes", timeout=timedelta(minutes=5))
    return review.id


async def test_human_cannot_allow_their_agents_statement(service: Service, config: HoopConfig) -> None:
    grant = await granted(service, config, agent("ci-runner", "alice@example.com", "eng"))
    assert grant.chain == ("alice@example.com", "ci-runner")
    reviews = Reviews(service)
    review_id = await held(reviews, grant)
    for decider in (who(config, "alice@example.com"), agent("alice-bot", "Alice@Example.com", "dba")):
        with pytest.raises(Denied) as exc:
            await reviews.decide(review_id, decider, True)
        assert exc.value.code == "in_chain" and "alice@example.com" in exc.value.message.lower()
    decided = await reviews.decide(review_id, who(config, "erin@example.com"), True)
    assert decided.status == "allowed" and decided.decided_by == "erin@example.com"


async def test_the_team_an_agent_acts_for_cannot_allow_its_statement(service: Service, config: HoopConfig) -> None:
    grant = await granted(service, config, agent("eng-bot", "eng", "eng"))  # acts for the team eng
    reviews = Reviews(service)
    review_id = await held(reviews, grant)
    with pytest.raises(Denied) as exc:  # alice approves prod-db (dba) but is a member of eng
        await reviews.decide(review_id, who(config, "alice@example.com"), True)
    assert exc.value.code == "in_chain" and "eng" in exc.value.message
    decided = await reviews.decide(review_id, who(config, "erin@example.com"), True)
    assert decided.status == "allowed"


async def test_a_teams_agent_cannot_allow_a_members_statement(service: Service, config: HoopConfig) -> None:
    grant = await granted(service, config, who(config, "alice@example.com"))  # alice is in eng
    reviews = Reviews(service)
    review_id = await held(reviews, grant)
    with pytest.raises(Denied) as exc:
        await reviews.decide(review_id, agent("eng-bot", "eng", "dba"), True)
    assert exc.value.code == "in_chain" and "alice@example.com" in exc.value.message
    decided = await reviews.decide(review_id, agent("ops-bot", "security", "dba"), True)  # alice is not in security
    assert decided.status == "allowed"


async def test_an_agent_for_a_team_sharing_a_member_cannot_allow_the_other_teams_statement(
        service: Service, config: HoopConfig) -> None:
    grant = await granted(service, config, agent("eng-bot", "eng", "eng"))  # eng: alice, bob and carol
    reviews = Reviews(service)
    review_id = await held(reviews, grant)
    with pytest.raises(Denied) as exc:  # dba is dana, erin and alice here: alice is in both teams
        await reviews.decide(review_id, agent("dba-bot", "dba", "dba"), True)
    assert exc.value.code == "in_chain" and "alice@example.com" in exc.value.message


async def test_delegator_cannot_allow_the_sub_agents_statement(service: Service, config: HoopConfig) -> None:
    alice = who(config, "alice@example.com")
    parent = await granted(service, config, alice)
    child, _ = await delegate(service, parent, alice, ["prod-db"], None, "migration-script")
    assert child.chain == ("alice@example.com", "migration-script") and child.identity == "migration-script"
    reviews = Reviews(service)
    review_id = await held(reviews, child)
    with pytest.raises(Denied) as exc:
        await reviews.decide(review_id, alice, True)
    assert exc.value.code == "in_chain"
    own = await held(reviews, parent)
    with pytest.raises(Denied) as exc:
        await reviews.decide(own, alice, True)
    assert exc.value.code == "self_approval"
    # an agent acting for someone else entirely may decide, as any approver may
    decided = await reviews.decide(review_id, agent("dba-bot", "dana@example.com", "dba"), False)
    assert decided.status == "refused"
    assert (await reviews.decide(own, who(config, "dana@example.com"), True)).status == "allowed"


async def test_a_decision_just_before_the_deadline_reaches_the_waiting_proxy(service: Service, config: HoopConfig,
                                                                             clock: FakeClock) -> None:
    """Another replica allows the statement after the proxy's last poll; the deadline then
    passes. Marking the review timed out used to raise Conflict into the proxy."""
    grant = await granted(service, config, who(config, "bob@example.com"))
    waiting, elsewhere = Reviews(service), Reviews(service)  # the proxy's replica, and the deciding one
    review = await waiting.open(session_id="s1", grant=grant, resource="prod-db", text="DELETE FROM orders",
                                rule="deletes", timeout=timedelta(minutes=5))
    await elsewhere.decide(review.id, who(config, "dana@example.com"), True)
    clock.advance(timedelta(minutes=5))
    assert await waiting.wait(review) is True
    async with service.store.tx() as tx:
        stored = await tx.get_review(review.id)
    assert stored is not None and stored.status == "allowed"


async def test_a_review_whose_waiter_is_cancelled_is_closed(service: Service, config: HoopConfig) -> None:
    """The client left while its statement waited: the review must not keep offering Allow."""
    grant = await granted(service, config, who(config, "bob@example.com"))
    reviews = Reviews(service)
    review = await reviews.open(session_id="s1", grant=grant, resource="prod-db", text="DELETE FROM orders",
                                rule="deletes", timeout=timedelta(minutes=5))
    waiter = asyncio.create_task(reviews.wait(review))
    await asyncio.sleep(0.05)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    async with service.store.tx() as tx:
        stored = await tx.get_review(review.id)
        audit = [e.action for e in await tx.audit_entries()]
    assert stored is not None and stored.status == "timed_out" and stored.decided_by is None
    assert "review.timed_out" in audit
    with pytest.raises(Conflict):
        await reviews.decide(review.id, who(config, "dana@example.com"), True)
