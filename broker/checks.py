"""``hoop check``: who can request and approve what, and the foot-guns in a config."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table
from rich.text import Text

from broker.config import HoopConfig
from broker.duration import format_duration
from broker.errors import ConfigError
from broker.render import cell
from broker.terminal import one_line

#: the rule selectors each kind of resource's guard reads; a rule naming another kind's never matches
_SELECTORS = {"postgres": ("statements", "tables", "functions"), "ssh": ("commands",), "http": ("methods", "paths")}
_ALL_SELECTORS = tuple(name for names in _SELECTORS.values() for name in names)


@dataclass(frozen=True)
class Finding:
    level: str  # "error" or "warning"
    resource: str
    message: str


def findings(config: HoopConfig, environ: Mapping[str, str]) -> list[Finding]:
    out: list[Finding] = []
    for res in config.resources:
        if not res.approval:
            out.append(Finding("warning", res.name, "reachable WITHOUT approval: any requester is granted at once"))
        requesters = set()
        for g in res.request.groups or list(config.groups):
            requesters |= set(config.groups[g].members)
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
        refs = [("credential", res.credential)]
        if res.kind == "postgres":
            refs.append(("admin_credential", res.admin_credential))
        if res.kind == "ssh":
            refs.append(("password", res.password))
        for key, ref in refs:
            if ref is None:
                continue
            try:
                ref.resolve(environ)
            except ConfigError as exc:
                out.append(Finding("error", res.name, f"{key}: {exc.message}"))
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
    if not config.groups[config.admins].members and not config.groups[config.admins].slack_usergroup:
        out.append(Finding("warning", "-", f"admins group {config.admins!r} has no members"))
    return out


def render_check(config: HoopConfig, environ: Mapping[str, str], console: Console) -> int:
    """Print the per-resource table and findings; return the number of errors."""
    table = Table("resource", "kind", "who can request", "who approves (quorum)", "max duration", title="hoop check")
    for res in config.resources:
        requesters = ", ".join(res.request.groups) or "any group"
        steps = " AND ".join(f"{s.count} of {s.from_}" for s in res.approval)
        # (cells are plain text: a '[' in a group's name is not rich markup)
        table.add_row(cell(res.name), cell(res.kind), cell(requesters),
                      cell(steps) if steps else Text("nobody: no approval", style="red"),
                      cell(format_duration(res.request.max_duration)))
    console.print(table)
    found = findings(config, environ)
    errors = 0
    for f in found:
        if f.level == "error":
            errors += 1
            console.print("[bold red]ERROR[/]   ", end="")
        else:
            console.print("[bold yellow]WARNING[/] ", end="")
        console.print(one_line(f"{f.resource}: {f.message}"), markup=False, soft_wrap=True)
    if not found:
        console.print("[green]no problems found[/]")
    console.print(f"{errors} error(s), {len(found) - errors} warning(s)")
    return errors
