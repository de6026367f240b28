"""``hoop check``: who can request and approve what, the foot-guns in a config, and everything
``hoop serve`` would load at start from what the config names (:mod:`broker.preflight`)."""

from __future__ import annotations

import datetime as dt

from rich.console import Console
from rich.table import Table
from rich.text import Text

from broker import policy
from broker.config import ApprovalStep, HoopConfig, Settings
from broker.duration import format_duration
from broker.model import Approval
from broker.preflight import Finding, Probe, preflight
from broker.render import cell
from broker.terminal import one_line

#: the rule selectors each kind of resource's guard reads; a rule naming another kind's never matches
_SELECTORS = {"postgres": ("statements", "tables", "functions"), "ssh": ("commands",), "http": ("methods", "paths")}
_ALL_SELECTORS = tuple(name for names in _SELECTORS.values() for name in names)
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_LABELS = {"error": "[bold red]ERROR[/]   ", "warning": "[bold yellow]WARNING[/] ", "info": "[cyan]INFO[/]    "}


def findings(config: HoopConfig, settings: Settings, *, probes: tuple[Probe, ...] = (),
             now: dt.datetime | None = None) -> list[Finding]:
    """The foot-guns of the config's policy, then :func:`~broker.preflight.preflight`: what ``hoop serve``
    would load at start (``probes`` check the proxies' files; ``now`` dates certificates)."""
    out = _policy(config)
    out.extend(preflight(config, settings, now or dt.datetime.now(dt.UTC), probes))
    return out


def _policy(config: HoopConfig) -> list[Finding]:
    out: list[Finding] = []
    for res in config.resources:
        if not res.approval:
            out.append(Finding("warning", res.name, "reachable WITHOUT approval: any requester is granted at once"))
        requesters = set()
        for g in res.request.groups or list(config.groups):
            requesters |= set(config.groups[g].members)
        step_errors = len(out)
        for step in res.approval:
            group = config.groups[step.from_]
            members = set(group.members)
            if group.slack_usergroup:
                continue  # membership is resolved from Slack at run time
            candidates: list[str | None] = [*sorted(requesters & members)] or [None]
            for requester in candidates:
                pool = members - {requester} if requester else members
                if len(pool) < step.count:
                    who = f" when {requester} requests" if requester else ""
                    out.append(Finding("error", res.name,
                                       f"approval step from {step.from_} needs {step.count} but only "
                                       f"{len(pool)} member(s) can approve{who}"))
                    break
        if len(out) == step_errors:  # (a step too small on its own is said once, above)
            out.extend(_quorum(config, res.name, res.approval, requesters))
        out.extend(_team_agents(config, res.name, res.approval, res.request.groups))
        if not res.channel:
            out.append(Finding("warning", res.name, "no Slack channel: request cards have nowhere to go"))
        for rule in res.guardrails.rules:
            # (the guard skips such a rule by design: a commands rule says nothing about SQL; but a block
            # rule written with the wrong selector then blocks nothing, and nothing said so)
            foreign = [name for name in _ALL_SELECTORS if getattr(rule, name) and name not in _SELECTORS[res.kind]]
            if foreign:
                out.append(Finding("warning", res.name,
                                   f"guardrails rule {rule.name!r} never matches: {' and '.join(foreign)} "
                                   f"{'is' if len(foreign) == 1 else 'are'} not read on a {res.kind} resource "
                                   f"(its rules use {', '.join(_SELECTORS[res.kind])})"))
        if res.kind == "postgres" and res.guardrails.on_unparsed == "allow":
            out.append(Finding("warning", res.name, "guardrails.on_unparsed is allow: unparseable SQL passes"))
    host = config.listen.host
    if config.listen.advertise is None and host in ("0.0.0.0", "::"):  # (every address: no name to give users)
        out.append(Finding("warning", "listen", f"host is {host} and advertise is not set: connection hints would "
                                                f"tell users to connect to {host}; set listen.advertise to the "
                                                "name users reach hoop by"))
    if not config.groups[config.admins].members and not config.groups[config.admins].slack_usergroup:
        out.append(Finding("warning", "-", f"admins group {config.admins!r} has no members"))
    return out


def _team_agents(config: HoopConfig, name: str, approval: list[ApprovalStep], request_groups: list[str]
                 ) -> list[Finding]:
    """Agents acting for a team may request ``name`` but no member of the team approves their requests: the
    steps must be fillable by people outside it."""
    groups = {step.from_: config.groups[step.from_] for step in approval}
    if not approval or any(g.slack_usergroup for g in groups.values()):
        return []
    out: list[Finding] = []
    for agent in config.oidc.agents if config.oidc is not None else ():
        team = config.groups.get(agent.acts_for or "")
        may = set(agent.groups) & set(request_groups) if request_groups else set(agent.groups)
        if team is None or not may or team.slack_usergroup:
            continue
        outside = [Approval(approver=m, groups=tuple(n for n, g in groups.items() if m in g.members), at=_EPOCH)
                   for m in sorted({m for g in groups.values() for m in g.members} - set(team.members))]
        filled = len(policy.match(policy.steps_of(approval), outside))
        if filled < sum(step.count for step in approval):
            quorum = " AND ".join(f"{s.count} of {s.from_}" for s in approval)
            out.append(Finding("warning", name, f"agent {agent.name} acts for {agent.acts_for}, whose members "
                                                f"cannot approve its requests; without them only {filled} "
                                                f"can fill {quorum}, so its requests can never be approved"))
    return out


def _quorum(config: HoopConfig, name: str, approval: list[ApprovalStep], requesters: set[str]) -> list[Finding]:
    """The steps together: one person fills at most one slot across all of them, so steps whose groups
    share members can need more people than they have between them, though each step alone has enough."""
    groups = {step.from_: config.groups[step.from_] for step in approval}
    if not groups or any(g.slack_usergroup for g in groups.values()):
        return []  # (membership resolved from Slack at run time)
    people = {m for g in groups.values() for m in g.members}
    steps = policy.steps_of(approval)
    needed = sum(step.count for step in approval)
    candidates: list[str | None] = [*sorted(requesters & people)] or [None]
    for requester in candidates:
        pool = [Approval(approver=m, groups=tuple(n for n, g in groups.items() if m in g.members), at=_EPOCH)
                for m in sorted(people - {requester})]
        filled = len(policy.match(steps, pool))
        if filled < needed:
            who = f" when {requester} requests" if requester else ""
            quorum = " AND ".join(f"{s.count} of {s.from_}" for s in approval)
            return [Finding("error", name, f"approval steps {quorum} need {needed} different people, but only "
                                           f"{filled} can fill them{who} (one person fills at most one slot "
                                           "across all steps)")]
    return []


def render_check(config: HoopConfig, settings: Settings, console: Console, *, probes: tuple[Probe, ...] = (),
                 now: dt.datetime | None = None) -> int:
    """Print the per-resource table and findings, one a line; return the number of errors."""
    table = Table("resource", "kind", "who can request", "who approves (quorum)", "max duration", title="hoop check")
    for res in config.resources:
        requesters = ", ".join(res.request.groups) or "any group"
        steps = " AND ".join(f"{s.count} of {s.from_}" for s in res.approval)
        # (cells are plain text: a '[' in a group's name is not rich markup)
        table.add_row(cell(res.name), cell(res.kind), cell(requesters),
                      cell(steps) if steps else Text("nobody: no approval", style="red"),
                      cell(format_duration(res.request.max_duration)))
    console.print(table)
    found = findings(config, settings, probes=probes, now=now)
    for f in found:
        console.print(_LABELS[f.level], end="")
        where = "" if f.resource == "-" else f"{f.resource}: "  # (a finding about the whole config)
        console.print(one_line(where + f.message), markup=False, soft_wrap=True)
    errors = sum(f.level == "error" for f in found)
    warnings = sum(f.level == "warning" for f in found)
    if not errors and not warnings:
        console.print("[green]no problems found[/]")
    console.print(f"{errors} error(s), {warnings} warning(s)")
    return errors
