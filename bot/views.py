"""Block Kit builders: pure functions from domain objects to Slack payload dicts.

Nothing here does I/O. Each builder returns ``(text, blocks)`` (``text`` is the fallback
Slack shows in notifications) or a view dict. The secret appears only in :func:`grant_dm`.

Text people wrote (reasons, labels, names, statements) goes through :func:`escape` before it
is put into mrkdwn, so ``<!channel>`` or ``<https://evil|runbook>`` in an API request's reason
shows as typed instead of pinging the channel or posing as a link. Hoop stores such text as
typed: the Slack edge undoes Slack's own escaping of slash-command text with :func:`unescape`.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from broker import policy
from broker.config import HoopConfig
from broker.duration import format_duration
from broker.model import AccessRequest, Grant, GrantStatus, RequestStatus, Review, Session

Blocks = list[dict[str, Any]]

APPROVE_ACTION = "hoop_approve"
DENY_ACTION = "hoop_deny"
EXTEND_ACTION = "hoop_extend"
REVIEW_ALLOW_ACTION = "hoop_review_allow"
REVIEW_REFUSE_ACTION = "hoop_review_refuse"
DENY_MODAL = "hoop_deny_modal"
DENY_REASON_BLOCK = "reason"
DENY_REASON_INPUT = "reason_input"

USAGE = {
    "request": "/hoop request <resource> <duration> [reason…]   e.g. /hoop request prod-db 30m fix invoice 4411",
    "approve": "/hoop approve <request-id>",
    "deny": "/hoop deny <request-id> [reason…]",
    "revoke": "/hoop revoke <grant-id> [reason…]",
    "extend": "/hoop extend <grant-id> <duration>",
    "status": "/hoop status",
    "list": "/hoop list",
    "sessions": "/hoop sessions [resource]",
    "transcript": "/hoop transcript <session-id>",
    "help": "/hoop help",
}


def help_text() -> str:
    return "*hoop* — time-boxed, approved access to production.\n" + "\n".join(f"• `{u}`" for u in USAGE.values())


def escape(text: str) -> str:
    """Escape user-supplied text for Slack mrkdwn: ``&``, ``<`` and ``>`` become entities, which
    is all Slack asks for (``*bold*`` and the like are left alone)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def escape_clipped(text: str, limit: int) -> str:
    """:func:`escape`, cut to at most ``limit`` characters without splitting an entity (escaping
    can make a statement up to five times longer, and a section holds 3,000 characters)."""
    out = escape(text[:limit])
    if len(out) > limit:
        out = out[:limit]
        amp = out.rfind("&")
        if amp >= 0 and ";" not in out[amp:]:
            out = out[:amp]
    return out


def unescape(text: str) -> str:
    """Undo Slack's escaping of text it sends (slash-command text), so hoop keeps what was typed."""
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def hhmm(when: datetime) -> str:
    return when.strftime("%H:%M UTC")


def _section(text: str) -> dict[str, Any]:
    return {"type": "section", "text": {"type": "mrkdwn", "text": text}}


def _context(text: str) -> dict[str, Any]:
    return {"type": "context", "elements": [{"type": "mrkdwn", "text": text}]}


def _button(text: str, action_id: str, value: str, style: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "button", "text": {"type": "plain_text", "text": text}, "action_id": action_id,
                           "value": value}
    if style:
        out["style"] = style
    return out


def _who(req: AccessRequest) -> str:
    who = f"<@{req.requester_slack_id}>" if req.requester_slack_id else escape(req.requester)
    if len(req.chain) > 1:
        who += f" (chain: {escape(' → '.join(req.chain))})"
    return who


def status_line(req: AccessRequest, grant: Grant | None, now: datetime) -> str:
    if grant is not None and grant.status is GrantStatus.REVOKED:
        return f":no_entry_sign: *Revoked* by {escape(grant.ended_by or 'hoop')} at {hhmm(grant.ended_at or now)}"
    if grant is not None and grant.status is GrantStatus.EXPIRED:
        return f":hourglass: *Expired* at {hhmm(grant.ended_at or grant.expires_at)}"
    if req.status is RequestStatus.PENDING:
        return f":hourglass_flowing_sand: *Pending* — lapses at {hhmm(req.lapses_at)} if not approved"
    if req.status is RequestStatus.APPROVED:
        until = f" — granted until {hhmm(grant.expires_at)}" if grant is not None else ""
        return f":white_check_mark: *Approved*{until}"
    if req.status is RequestStatus.DENIED:
        why = f": {escape(req.decision_reason)}" if req.decision_reason else ""
        return f":x: *Denied* by {escape(str(req.decided_by))}{why}"
    if req.status is RequestStatus.LAPSED:
        return f":zzz: *Lapsed* — not approved by {hhmm(req.lapses_at)}"
    return f":heavy_minus_sign: *Cancelled* by {escape(str(req.decided_by))}"


def card(req: AccessRequest, now: datetime, grant: Grant | None = None) -> tuple[str, Blocks]:
    """The request card: who, what, how long, why, each approval step and its fillers, status."""
    kind = f"extend {req.extends_grant} by" if req.extends_grant else "access to"
    text = f"{escape(req.requester)} requests {kind} {req.resource} for {format_duration(req.duration)}"
    steps = []
    for f in policy.fill(req.steps, req.approvals):
        mark = ":white_check_mark:" if len(f.approvers) >= f.count else ":white_circle:"
        names = escape(", ".join(f.approvers)) or "—"
        steps.append(f"{mark} {f.count} from *{f.group}*: {names}")
    blocks: Blocks = [
        _section(f"*Access request* `{req.id}`\n{_who(req)} requests {kind} *{req.resource}* "
                 f"for *{format_duration(req.duration)}*"),
        {"type": "section", "fields": [
            {"type": "mrkdwn", "text": f"*Requester*\n{escape(req.requester)}"},
            {"type": "mrkdwn", "text": f"*Resource*\n{req.resource}"},
            {"type": "mrkdwn", "text": f"*Duration*\n{format_duration(req.duration)}"},
            {"type": "mrkdwn", "text": f"*Reason*\n{escape(req.reason) or '—'}"},
        ]},
        _section("*Approvals*\n" + ("\n".join(steps) or "none required")),
        _section(status_line(req, grant, now)),
    ]
    if req.status is RequestStatus.PENDING:
        blocks.append({"type": "actions", "block_id": "decide", "elements": [
            _button("Approve", APPROVE_ACTION, req.id, "primary"),
            _button("Deny", DENY_ACTION, req.id, "danger"),
        ]})
        blocks.append(_context("React :white_check_mark: :heavy_check_mark: :+1: to approve, :x: :no_entry: to deny."))
    return text, blocks


def grant_dm(grant: Grant, secret: str, hints: dict[str, str]) -> tuple[str, Blocks]:
    """The requester's DM: login, secret and per-resource connection hints. Never post elsewhere."""
    lines = [f"*Access granted* to {', '.join(grant.resources)} until {hhmm(grant.expires_at)} (grant `{grant.id}`).",
             f"Login: `{grant.login}`", f"Secret (shown once): `{secret}`"]
    for name in grant.resources:
        if name in hints:
            lines.append(f"{name}:\n```{hints[name]}```")
    text = f"Access granted to {', '.join(grant.resources)} until {hhmm(grant.expires_at)}"
    return text, [_section("\n".join(lines))]


def reminder(grant: Grant, now: datetime) -> tuple[str, Blocks]:
    text = f"Access {grant.id} expires at {hhmm(grant.expires_at)} ({format_duration(grant.remaining(now))} left)"
    return text, [_section(f":alarm_clock: {text}."),
                  {"type": "actions", "elements": [_button("Extend", EXTEND_ACTION, grant.id)]}]


def review_message(review: Review) -> tuple[str, Blocks]:
    by = escape(review.requested_by)
    text = f"{by} wants to run: {escape(review.text[:200])}"
    blocks: Blocks = [_section(f":raised_hand: *{by}* wants to run (rule `{review.rule}`):\n"
                               f"```{escape_clipped(review.text, 2800)}```")]
    if review.status == "pending":
        blocks.append({"type": "actions", "elements": [
            _button("Allow", REVIEW_ALLOW_ACTION, review.id, "primary"),
            _button("Refuse", REVIEW_REFUSE_ACTION, review.id, "danger")]})
        blocks.append(_context(f"React :white_check_mark: to allow or :x: to refuse before {hhmm(review.deadline)}."))
    else:
        by = f" by {escape(review.decided_by)}" if review.decided_by else ""
        blocks.append(_context(f"*{review.status}*{by}"))
    return text, blocks


def deny_modal(request_id: str) -> dict[str, Any]:
    return {
        "type": "modal", "callback_id": DENY_MODAL, "private_metadata": request_id,
        "title": {"type": "plain_text", "text": "Deny request"},
        "submit": {"type": "plain_text", "text": "Deny"},
        "close": {"type": "plain_text", "text": "Cancel"},
        "blocks": [{"type": "input", "block_id": DENY_REASON_BLOCK, "optional": True,
                    "label": {"type": "plain_text", "text": f"Why deny {request_id}?"},
                    "element": {"type": "plain_text_input", "action_id": DENY_REASON_INPUT, "multiline": True}}],
    }


def request_line(r: AccessRequest) -> str:
    return (f"`{r.id}` {r.resource} {format_duration(r.duration)} — {r.status.value}"
            f"{' (lapses ' + hhmm(r.lapses_at) + ')' if r.status is RequestStatus.PENDING else ''}: {escape(r.reason)}")


def grant_line(g: Grant, now: datetime) -> str:
    return (f"`{g.id}` {', '.join(g.resources)} as `{g.login}` — {format_duration(g.remaining(now))} left "
            f"(until {hhmm(g.expires_at)})")


def status_text(requests: Sequence[AccessRequest], grants: Sequence[Grant], now: datetime) -> str:
    out = ["*Your pending requests*"]
    out += [f"• {request_line(r)}" for r in requests] or ["• none"]
    out.append("*Your active grants*")
    out += [f"• {grant_line(g, now)}" for g in grants] or ["• none"]
    return "\n".join(out)


def resources_text(config: HoopConfig, requestable: Sequence[str]) -> str:
    if not requestable:
        return "You may not request any resource. Ask a hoop admin to add you to a group."
    lines = ["*Resources you may request*"]
    for name in requestable:
        res = config.resource(name)
        if res is None:
            continue
        quorum = " and ".join(f"{s.count} from {s.from_}" for s in res.approval) or "no approval"
        lines.append(f"• *{name}* ({res.kind}) — default {format_duration(res.request.default_duration)}, "
                     f"max {format_duration(res.request.max_duration)}, approval: {quorum}")
    return "\n".join(lines)


def sessions_text(sessions: Sequence[Session], now: datetime) -> str:
    if not sessions:
        return "No live sessions."
    return "*Live sessions*\n" + "\n".join(
        f"• `{s.id}` {s.resource} {s.protocol} by {escape(' → '.join(s.chain))} from {s.client_addr}, "
        f"open {format_duration(now - s.opened_at)}" for s in sessions)


def home_view(pending: Sequence[AccessRequest], grants: Sequence[Grant], waiting: Sequence[AccessRequest],
              now: datetime) -> dict[str, Any]:
    """App Home: my pending requests, my active grants with time left, requests waiting for me."""
    blocks: Blocks = [{"type": "header", "text": {"type": "plain_text", "text": "hoop"}}]
    blocks.append(_section("*My pending requests*\n" + ("\n".join(f"• {request_line(r)}" for r in pending)
                                                        or "none")))
    blocks.append(_section("*My active grants*\n" + ("\n".join(f"• {grant_line(g, now)}" for g in grants)
                                                     or "none")))
    blocks.append(_section("*Waiting for my approval*\n" + ("\n".join(
        f"• `{r.id}` {escape(r.requester)} → {r.resource} {format_duration(r.duration)}: {escape(r.reason)}"
        for r in waiting)
        or "none")))
    for r in waiting[:20]:
        blocks.append({"type": "actions", "elements": [
            _button(f"Approve {r.id}", APPROVE_ACTION, r.id, "primary"),
            _button(f"Deny {r.id}", DENY_ACTION, r.id, "danger")]})
    return {"type": "home", "blocks": blocks}
