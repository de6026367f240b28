"""Who may request, who may approve, quorum and durations. Pure functions over config.

Quorum is a matching problem: every step ``{from: G, count: N}`` is N slots; each approver
may fill at most one slot, in any step whose group they belonged to when they approved.
A request is met when a matching fills every slot. Bipartite matching (augmenting paths)
decides it, so a person in two groups is placed where they help most, and counts once.

A person is everyone in their chain (:func:`principals`): an agent acting for alice speaks for
alice too, so it may not approve a request alice is behind, and alice and her agents fill one
slot between them. An agent may act for a team (a config group) instead: every member of that
team is then behind its requests and statements (:func:`teams_behind`), and the team counts once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from broker.config import ApprovalStep, HoopConfig
from broker.duration import format_duration, parse_duration
from broker.errors import Denied, InvalidInput
from broker.model import AccessRequest, Approval, Grant, Identity, StepSpec


def groups_of(config: HoopConfig, email: str, slack_groups: Iterable[str] = ()) -> frozenset[str]:
    """Config groups an email belongs to, by member email or by Slack user group id."""
    email = email.lower()
    slack = set(slack_groups)
    return frozenset(
        name for name, g in config.groups.items()
        if email in g.members or (g.slack_usergroup is not None and g.slack_usergroup in slack)
    )


def is_admin(config: HoopConfig, who: Identity) -> bool:
    return config.admins in who.groups


def steps_of(approval: Sequence[ApprovalStep]) -> tuple[StepSpec, ...]:
    return tuple(StepSpec(group=s.from_, count=s.count) for s in approval)


def may_request(config: HoopConfig, who: Identity, resource_name: str) -> None:
    """Raise :class:`Denied` unless ``who`` may request ``resource_name``."""
    res = config.resource(resource_name)
    if res is None:
        raise InvalidInput(f"unknown resource {resource_name!r}", code="unknown_resource")
    allowed = set(res.request.groups)
    if not allowed:
        if not who.groups:
            raise Denied(f"{who.email} belongs to no hoop group, so may not request {res.name}")
        return
    if not allowed & who.groups:
        raise Denied(
            f"{who.email} may not request {res.name}: only members of {', '.join(sorted(allowed))} may",
            code="not_requester",
        )


def resolve_duration(config: HoopConfig, resource_name: str, text: str | None) -> timedelta:
    """Parse and bound a requested duration; an empty one takes the resource's default."""
    res = config.resource(resource_name)
    if res is None:
        raise InvalidInput(f"unknown resource {resource_name!r}", code="unknown_resource")
    try:
        duration = res.request.default_duration if not text else parse_duration(text)
    except InvalidInput as exc:  # zero, negative, unknown units: say what would do
        raise InvalidInput(f"{exc.message}; {res.name} allows up to {format_duration(res.request.max_duration)}",
                           code="duration") from None
    if duration > res.request.max_duration:
        raise InvalidInput(
            f"{format_duration(duration)} is longer than {res.name}'s maximum of "
            f"{format_duration(res.request.max_duration)}",
            code="too_long",
        )
    return duration


def extension_overrun(config: HoopConfig, grant: Grant, length: timedelta, now: datetime) -> str | None:
    """Why extending ``grant`` by ``length`` at ``now`` would leave more than its resource's
    ``max_duration``, or ``None`` when it fits. Checked when an extension is asked and again
    when it is approved, since the grant may have been extended in between."""
    res = config.resource(grant.resources[0])
    if res is None:
        return f"unknown resource {grant.resources[0]!r}"
    limit = res.request.max_duration
    if length > limit or grant.expires_at + length - now > limit:
        return f"extension would leave more than {res.name}'s maximum of {format_duration(limit)}"
    return None


def check_reason(config: HoopConfig, resource_name: str, reason: str) -> None:
    res = config.resource(resource_name)
    if res is not None and res.request.reason_required and not reason.strip():
        raise InvalidInput(f"{res.name} requires a reason: /hoop request {res.name} 30m <why>", code="reason")


def _slots(steps: Sequence[StepSpec]) -> list[str]:
    return [s.group for s in steps for _ in range(s.count)]


def match(steps: Sequence[StepSpec], approvals: Sequence[Approval]) -> dict[int, str]:
    """Maximum matching of slots to approvers: ``{slot index: approver email}``."""
    slots = _slots(steps)
    owner: dict[int, str] = {}

    def augment(person: Approval, seen: set[int]) -> bool:
        for i, group in enumerate(slots):
            if group in person.groups and i not in seen:
                seen.add(i)
                current = owner.get(i)
                holder = next((a for a in approvals if a.approver == current), None)
                if current is None or (holder is not None and augment(holder, seen)):
                    owner[i] = person.approver
                    return True
        return False

    for person in approvals:
        augment(person, set())
    return owner


def is_met(steps: Sequence[StepSpec], approvals: Sequence[Approval]) -> bool:
    return len(match(steps, approvals)) == len(_slots(steps))


@dataclass(frozen=True)
class StepFill:
    group: str
    count: int
    approvers: tuple[str, ...]


def fill(steps: Sequence[StepSpec], approvals: Sequence[Approval]) -> list[StepFill]:
    """Per step, who fills it under the current matching (for cards and status)."""
    owner = match(steps, approvals)
    out, i = [], 0
    for s in steps:
        who = tuple(owner[j] for j in range(i, i + s.count) if j in owner)
        out.append(StepFill(group=s.group, count=s.count, approvers=who))
        i += s.count
    return out


def principals(who: Identity) -> frozenset[str]:
    """Everyone ``who`` speaks for, lower-cased: their own name and their whole chain. For an
    agent that includes the human it acts for; for a sub-agent, every hop that delegated to it."""
    return frozenset(c.lower() for c in (*who.chain, who.email))


def teams_behind(who: Identity, behind: Iterable[str]) -> frozenset[str]:
    """The groups of ``who`` named in ``behind`` (lower-cased names and chains): an agent that acts for a
    team puts the team's name in its chain, and each member of the team stands behind what it asks."""
    names = {b.lower() for b in behind}
    return frozenset(g for g in who.groups if g.lower() in names)


def team_members(config: HoopConfig) -> Mapping[str, frozenset[str]]:
    """Each config group's members (lower-cased), by lower-cased name: whom an agent acting for it speaks for.
    (An agent may act only for a group whose members the config lists: the config refuses any other.)"""
    return {name.lower(): frozenset(m.lower() for m in g.members) for name, g in config.groups.items()}


def members_spoken_for(who: Identity, teams: Mapping[str, frozenset[str]]) -> frozenset[str]:
    """The members of every team ``who`` speaks for: an agent acting for a team speaks for each of them."""
    return frozenset(m for name in principals(who) for m in teams.get(name, ()))


def with_members(names: Iterable[str], teams: Mapping[str, frozenset[str]]) -> frozenset[str]:
    """``names`` (lower-cased) and the members of each team among them: everyone they stand for."""
    lowered = {n.lower() for n in names}
    return frozenset(lowered.union(*(teams.get(n, frozenset()) for n in lowered)))


def speaks_for(who: Identity, teams: Mapping[str, frozenset[str]]) -> frozenset[str]:
    """Everyone ``who`` speaks for: their chain, and the members of a team an agent in it acts for."""
    return principals(who) | members_spoken_for(who, teams)


_NO_TEAMS: Mapping[str, frozenset[str]] = {}


def _people(names: Iterable[str]) -> str:
    return ", ".join(sorted(names))


def assign(request: AccessRequest, who: Identity,
           teams: Mapping[str, frozenset[str]] = _NO_TEAMS) -> tuple[str, ...]:
    """Check that ``who`` may approve ``request`` now; return their eligible groups.

    Raises :class:`Denied` with the reason a person should be told: self-approval, acting
    for the requester or anyone in the request's chain, not in any step's group, already
    approved (by them, or for the same human through an agent), or not needed because the
    steps they could fill are full. People are compared by :func:`principals`, so a human and
    the agents acting for them count as one approver; ``teams`` (:func:`team_members`) says whom an
    agent acting for a team speaks for, so the team and its agents count as one too.
    """
    email = who.email.lower()
    if email == request.requester.lower():
        raise Denied("you cannot approve your own request", code="self_approval")
    behind = {request.requester.lower(), *(c.lower() for c in request.chain)}
    if email in behind:
        raise Denied("you are in this request's chain of identities, so you cannot approve it", code="in_chain")
    mine = principals(who)
    if shared := mine & behind:
        raise Denied(f"you act for {_people(shared)}, who is behind this request, so you cannot approve it",
                     code="in_chain")
    if found := teams_behind(who, behind):
        raise Denied(f"this request is made for {_people(found)}, which you are a member of, so you cannot "
                     "approve it", code="in_chain")
    spoken = members_spoken_for(who, teams)
    if shared := spoken & behind:
        raise Denied(f"you act for a team that {_people(shared)}, who is behind this request, belongs to, so you "
                     "cannot approve it", code="in_chain")
    everyone = mine | spoken
    if shared := everyone & with_members(behind, teams):  # (two teams with a member in common)
        raise Denied(f"you speak for {_people(shared)}, who is behind this request through a team, so you cannot "
                     "approve it", code="in_chain")
    eligible = tuple(s.group for s in request.steps if s.group in who.groups)
    if not eligible:
        groups = ", ".join(sorted({s.group for s in request.steps})) or "nobody"
        raise Denied(f"only members of {groups} can approve this request", code="not_approver")
    for a in request.approvals:
        if a.approver.lower() == email:
            raise Denied("you have already approved this request; each person counts once", code="duplicate")
        if shared := mine & a.principals:
            counted = (f"{a.approver} has already approved this request and you act for them"
                       if a.approver.lower() in shared else f"{_people(shared)} already counts through {a.approver}")
            raise Denied(f"{counted}; each person counts once, whether they approve themselves or through an agent",
                         code="duplicate")
        # a team counts once too: its agent and its members are one (members by the config, and by the groups
        # the approver is in now)
        if (found := teams_behind(who, a.principals)) or (found := frozenset(
                n for n in a.principals if email in teams.get(n, ()))):
            raise Denied(f"{_people(found)} already counts through {a.approver}; a team counts once, whether its "
                         "members approve or an agent acting for it does", code="duplicate")
        if a.approver.lower() in spoken or a.principals & spoken:
            raise Denied(f"{a.approver} has already approved this request and you act for a team they belong to; a "
                         "team counts once, whether its members approve or an agent acting for it does",
                         code="duplicate")
        if shared := everyone & with_members(a.principals, teams):  # (two teams with a member in common)
            raise Denied(f"{_people(shared)} already counts through {a.approver}; each person counts once, whether "
                         "they approve themselves or through an agent acting for them or their team", code="duplicate")
    before = len(match(request.steps, request.approvals))
    trial = [*request.approvals, Approval(approver=email, groups=eligible, at=request.created_at, chain=who.chain)]
    if len(match(request.steps, trial)) == before:
        raise Denied("the steps you can fill are already filled by others", code="not_needed")
    return eligible


def is_approver_of(config: HoopConfig, who: Identity, resource_name: str) -> bool:
    res = config.resource(resource_name)
    return res is not None and any(s.from_ in who.groups for s in res.approval)


def may_revoke(config: HoopConfig, who: Identity, grant: Grant) -> None:
    """Requester (the grant's holder or anyone in its chain, including a member of a team an agent in it
    acts for), an approver of one of its resources, or an admin may revoke. Everyone else gets
    :class:`Denied`."""
    email = who.email.lower()
    if email == grant.identity.lower() or email in (c.lower() for c in grant.chain):
        return
    if teams_behind(who, grant.chain):
        return
    if is_admin(config, who) or any(is_approver_of(config, who, r) for r in grant.resources):
        return
    raise Denied("only the requester, an approver of the resource or an admin can revoke this grant",
                 code="not_revoker")


def approvers_of(config: HoopConfig, resource_name: str) -> list[tuple[str, int, list[str]]]:
    """For display: ``[(group, count, members)]`` per approval step."""
    res = config.resource(resource_name)
    if res is None:
        return []
    return [(s.from_, s.count, list(config.groups[s.from_].members)) for s in res.approval]
