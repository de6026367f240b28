"""Policy: AND of groups, distinct people, self-approval, one slot per person, duration caps."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from broker import policy
from broker.config import HoopConfig
from broker.errors import Denied, InvalidInput
from broker.model import AccessRequest, Approval, Grant, GrantStatus, Identity, RequestStatus, StepSpec

T0 = datetime(2030, 1, 1, tzinfo=UTC)


def who(config: HoopConfig, email: str) -> Identity:
    return Identity(email=email, groups=policy.groups_of(config, email))


def req(steps: tuple[StepSpec, ...], requester: str = "alice@example.com") -> AccessRequest:
    return AccessRequest(id="r1", resource="prod-db", requester=requester, chain=(requester,),
                         duration=timedelta(minutes=30), reason="x", status=RequestStatus.PENDING, created_at=T0,
                         lapses_at=T0 + timedelta(hours=1), steps=steps)


def approve(r: AccessRequest, identity: Identity) -> None:
    groups = policy.assign(r, identity)
    r.approvals.append(Approval(approver=identity.email, groups=groups, at=T0, chain=identity.chain))


def agent(name: str, acts_for: str, *groups: str) -> Identity:
    return Identity(email=name, kind="agent", acts_for=acts_for, groups=frozenset(groups))


def test_and_of_groups_needs_each(config: HoopConfig) -> None:
    r = req((StepSpec("dba", 1), StepSpec("security", 1)))
    approve(r, who(config, "dana@example.com"))
    assert not policy.is_met(r.steps, r.approvals)
    approve(r, who(config, "sam@example.com"))
    assert policy.is_met(r.steps, r.approvals)
    assert [f.approvers for f in policy.fill(r.steps, r.approvals)] == [("dana@example.com",), ("sam@example.com",)]


def test_distinct_people_count_once(config: HoopConfig) -> None:
    r = req((StepSpec("dba", 2),))
    approve(r, who(config, "dana@example.com"))
    with pytest.raises(Denied) as exc:
        approve(r, who(config, "dana@example.com"))
    assert exc.value.code == "duplicate"
    assert not policy.is_met(r.steps, r.approvals)


def test_self_approval_refused(config: HoopConfig) -> None:
    r = req((StepSpec("dba", 1),), requester="dana@example.com")
    with pytest.raises(Denied) as exc:
        approve(r, who(config, "dana@example.com"))
    assert exc.value.code == "self_approval"


def test_person_in_two_groups_fills_one_slot(config: HoopConfig) -> None:
    # erin is in dba AND security: alone she must not satisfy both steps
    r = req((StepSpec("dba", 1), StepSpec("security", 1)))
    approve(r, who(config, "erin@example.com"))
    assert not policy.is_met(r.steps, r.approvals)
    approve(r, who(config, "dana@example.com"))  # dba only: matching moves erin to security
    assert policy.is_met(r.steps, r.approvals)


def test_approval_not_needed_when_steps_full(config: HoopConfig) -> None:
    r = req((StepSpec("dba", 1), StepSpec("security", 1)))
    approve(r, who(config, "dana@example.com"))
    with pytest.raises(Denied) as exc:
        approve(r, who(config, "dana2@example.com"))
    assert exc.value.code == "not_approver"
    r2 = req((StepSpec("security", 1),))
    approve(r2, who(config, "sam@example.com"))
    with pytest.raises(Denied) as exc:
        approve(r2, who(config, "erin@example.com"))
    assert exc.value.code == "not_needed"


def test_outsider_and_chain_refused(config: HoopConfig) -> None:
    r = req((StepSpec("dba", 1),))
    with pytest.raises(Denied) as exc:
        approve(r, who(config, "bob@example.com"))
    assert exc.value.code == "not_approver"
    agent_req = req((StepSpec("dba", 1),), requester="ci-runner")
    agent_req.chain = ("dana@example.com", "ci-runner")
    with pytest.raises(Denied) as exc:
        approve(agent_req, who(config, "dana@example.com"))
    assert exc.value.code == "in_chain"


def test_agent_cannot_approve_for_its_human(config: HoopConfig) -> None:
    r = req((StepSpec("eng", 1),), requester="alice@example.com")
    with pytest.raises(Denied) as exc:
        approve(r, agent("ci-runner", "alice@example.com", "eng"))
    assert exc.value.code == "in_chain" and "alice@example.com" in exc.value.message
    # nor for anyone in an agent request's chain, through another agent of theirs
    agent_req = req((StepSpec("eng", 1),), requester="ci-runner")
    agent_req.chain = ("alice@example.com", "ci-runner")
    with pytest.raises(Denied) as exc:
        approve(agent_req, agent("alice-bot", "Alice@Example.com", "eng"))
    assert exc.value.code == "in_chain"
    assert agent_req.approvals == [] and r.approvals == []


@pytest.mark.parametrize("first, second", [
    ("human", "agent"),   # alice, then her agent
    ("agent", "human"),   # her agent, then alice
    ("agent", "agent2"),  # two agents acting for alice
])
def test_one_human_counts_once_through_agents(config: HoopConfig, first: str, second: str) -> None:
    people = {"human": Identity(email="alice@example.com", groups=frozenset({"eng"})),
              "agent": agent("ci-runner", "alice@example.com", "eng"),
              "agent2": agent("nightly-bot", "ALICE@example.com", "eng")}
    r = req((StepSpec("eng", 2),), requester="bob@example.com")
    approve(r, people[first])
    with pytest.raises(Denied) as exc:
        approve(r, people[second])
    assert exc.value.code == "duplicate" and "alice@example.com" in exc.value.message.lower()
    assert [a.approver for a in r.approvals] == [people[first].email]
    assert not policy.is_met(r.steps, r.approvals)


def test_an_agent_acting_for_a_team_is_approved_by_none_of_its_members(config: HoopConfig) -> None:
    team_req = req((StepSpec("security", 1),), requester="schema-bot")
    team_req.chain = ("dba", "schema-bot")  # an agent acting for the team dba
    with pytest.raises(Denied) as exc:
        approve(team_req, who(config, "erin@example.com"))  # in security, and a member of dba
    assert exc.value.code == "in_chain" and "dba" in exc.value.message
    approve(team_req, who(config, "sam@example.com"))  # in security, outside the team: counts
    assert policy.is_met(team_req.steps, team_req.approvals)


@pytest.mark.parametrize("step", ["dba", "security"])  # the team is a step's group, or not (erin is in both)
@pytest.mark.parametrize("member_first", [True, False])
def test_a_team_counts_once_through_its_agent(config: HoopConfig, member_first: bool, step: str) -> None:
    teams = policy.team_members(config)
    member, team_agent = who(config, "erin@example.com"), agent("dba-bot", "dba", "dba", "security")
    first, second = (member, team_agent) if member_first else (team_agent, member)
    r = req((StepSpec(step, 2),), requester="bob@example.com")
    r.approvals.append(Approval(approver=first.email, groups=policy.assign(r, first, teams), at=T0, chain=first.chain))
    with pytest.raises(Denied) as exc:
        policy.assign(r, second, teams)
    assert exc.value.code == "duplicate" and "a team counts once" in exc.value.message
    assert not policy.is_met(r.steps, r.approvals)


def test_an_agent_acting_for_a_team_cannot_approve_a_members_request(config: HoopConfig) -> None:
    """The agent speaks for every member of its team, as an agent acting for alice speaks for alice."""
    r = req((StepSpec("security", 1),), requester="dana@example.com")  # dana is in dba
    with pytest.raises(Denied) as exc:
        policy.assign(r, agent("dba-bot", "dba", "security"), policy.team_members(config))
    assert exc.value.code == "in_chain" and "dana@example.com" in exc.value.message
    assert policy.assign(r, agent("eng-bot", "eng", "security"), policy.team_members(config)) == ("security",)


def test_different_humans_and_their_agents_still_count(config: HoopConfig) -> None:
    r = req((StepSpec("eng", 3),), requester="bob@example.com")
    approve(r, Identity(email="carol@example.com", groups=frozenset({"eng"})))
    approve(r, agent("ci-runner", "alice@example.com", "eng"))  # acts for someone else: counts
    assert not policy.is_met(r.steps, r.approvals)
    approve(r, agent("stranger-bot", "dave@example.com", "eng"))
    assert policy.is_met(r.steps, r.approvals)


def test_approvals_stored_before_chains_count_as_their_approver(config: HoopConfig) -> None:
    r = req((StepSpec("eng", 2),), requester="bob@example.com")
    r.approvals.append(Approval(approver="alice@example.com", groups=("eng",), at=T0))  # no chain recorded
    with pytest.raises(Denied) as exc:
        approve(r, agent("ci-runner", "alice@example.com", "eng"))
    assert exc.value.code == "duplicate"


def test_duration_caps(config: HoopConfig) -> None:
    assert policy.resolve_duration(config, "prod-db", None) == timedelta(minutes=30)
    assert policy.resolve_duration(config, "prod-db", "4h") == timedelta(hours=4)
    with pytest.raises(InvalidInput, match="maximum of 4h"):
        policy.resolve_duration(config, "prod-db", "4h1s")


def test_who_may_request(config: HoopConfig) -> None:
    policy.may_request(config, who(config, "alice@example.com"), "prod-db")
    with pytest.raises(Denied, match="only members of eng"):
        policy.may_request(config, who(config, "dana@example.com"), "prod-db")
    with pytest.raises(InvalidInput, match="unknown resource"):
        policy.may_request(config, who(config, "alice@example.com"), "nope")


def test_a_member_of_the_team_an_agent_acts_for_may_revoke_its_grant(config: HoopConfig) -> None:
    grant = Grant(id="g1", login="eng-bot.abcde", identity="eng-bot", chain=("eng", "eng-bot"),
                  resources=("prod-db",), status=GrantStatus.ACTIVE, created_at=T0, expires_at=T0 + timedelta(hours=1))
    policy.may_revoke(config, who(config, "carol@example.com"), grant)  # in eng, not an approver of prod-db
    with pytest.raises(Denied) as exc:
        policy.may_revoke(config, who(config, "zed@example.com"), grant)  # neither in the team nor an approver
    assert exc.value.code == "not_revoker"


def test_two_teams_with_a_member_in_common_are_the_same_person_there(config: HoopConfig) -> None:
    """erin is in dba and in security: an agent acting for security speaks for her, and so does one acting
    for dba. The one does not approve the other's request, and they do not fill two slots."""
    teams = policy.team_members(config)
    dba_request = req((StepSpec("eng", 1),), requester="dba-bot")
    dba_request.chain = ("dba", "dba-bot")
    with pytest.raises(Denied) as exc:
        policy.assign(dba_request, agent("sec-bot", "security", "eng"), teams)
    assert exc.value.code == "in_chain" and "erin@example.com" in exc.value.message
    r = req((StepSpec("eng", 2),), requester="bob@example.com")
    first = agent("dba-bot", "dba", "eng")
    r.approvals.append(Approval(approver=first.email, groups=policy.assign(r, first, teams), at=T0, chain=first.chain))
    with pytest.raises(Denied) as exc:
        policy.assign(r, agent("sec-bot", "security", "eng"), teams)
    assert exc.value.code == "duplicate" and "erin@example.com" in exc.value.message
    assert policy.assign(r, agent("root-bot", "admins", "eng"), teams) == ("eng",)  # admins share nobody with dba
