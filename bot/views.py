"""Block Kit builders: pure functions from domain objects to Slack payload dicts.

Nothing here does I/O. Each builder returns ``(text, blocks)`` (``text`` is the fallback
Slack shows in notifications) or a view dict. The secret appears only in :func:`grant_dm`.

Text people wrote (reasons, labels, names, statements) goes through :func:`escape` before it
is put into mrkdwn, so ``<!channel>`` or ``<https://evil|runbook>`` in an API request's reason
shows as typed instead of pinging the channel or posing as a link. Hoop stores such text as
typed: the Slack edge undoes Slack's own escaping of slash-command text with :func:`unescape`.

Slack refuses a whole message (``invalid_blocks``) when one block is too long, so user text is
also clipped (:func:`escape_clipped`), with "…", to fit Block Kit's limits: 3,000 characters of
section text, 2,000 per section field, 50 blocks per message and 100 per App Home view. A
section also clips its whole text (:func:`clip`) in case hoop's own words push it over.
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

#: Block Kit limits (Slack answers ``invalid_blocks`` beyond them)
SECTION_TEXT_MAX = 3000
SECTION_FIELD_MAX = 2000
MESSAGE_BLOCKS_MAX = 50
VIEW_BLOCKS_MAX = 100
#: how much of a reason a one-line summary (status, App Home) shows
LINE_REASON_MAX = 200
#: how many entries each App Home list shows
HOME_LIST_MAX = 20

USAGE = {
    "request": "/hoop request <resource> <duration> [reason…]   e.g. /hoop request prod-db 30m fix invoice 4411",
    "approve": "/hoop approve <request-id>",
    "deny": "/hoop deny <request-id> [reason…]",
    "cancel": "/hoop cancel <request-id>",
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


def clip(mrkdwn: str, limit: int) -> str:
    """``mrkdwn`` cut to at most ``limit`` characters, ending in "…" when cut, without splitting
    an entity (``&amp;``) or a mention or link (``<@U1>``)."""
    if len(mrkdwn) <= limit:
        return mrkdwn
    out = mrkdwn[:max(limit - 1, 0)]
    for opener, closer in (("&", ";"), ("<", ">")):
        at = out.rfind(opener)
        if at >= 0 and closer not in out[at:]:
            out = out[:at]
    return out + "…" if limit > 0 else ""


def escape_clipped(text: str, limit: int) -> str:
    """:func:`escape`, cut to at most ``limit`` characters, ending in "…" when cut, without
    splitting an entity (escaping can make text up to five times longer)."""
    return clip(escape(text[:limit + 1]), limit)


def unescape(text: str) -> str:
    """Undo Slack's escaping of text it sends (slash-command text), so hoop keeps what was typed."""
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def hhmm(when: datetime) -> str:
    return when.strftime("%H:%M UTC")


def _section(text: str) -> dict[str, Any]:
    return {"type": "section", "text": {"type": "mrkdwn", "text": clip(text, SECTION_TEXT_MAX)}}


def _field(title: str, value: str) -> dict[str, Any]:
    return {"type": "mrkdwn", "text": clip(f"*{title}*\n{value}", SECTION_FIELD_MAX)}


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
        who += f" (chain: {escape_clipped(' → '.join(req.chain), 1000)})"
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
        why = f": {escape_clipped(req.decision_reason, 2500)}" if req.decision_reason else ""
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
            _field("Requester", escape_clipped(req.requester, 500)),
            _field("Resource", req.resource),
            _field("Duration", format_duration(req.duration)),
            _field("Reason", escape_clipped(req.reason, SECTION_FIELD_MAX - 20) or "—"),
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
                  {"type": "actions", "elements": [_button("Extend", EXTEND_ACTION, extend_value(grant))]}]


def extend_value(grant: Grant) -> str:
    """The Extend button's value: the grant and the expiry the reminder announced, so that a
    double click, or a click on both the thread's and the DM's copy, extends that expiry once."""
    return f"{grant.id}|{int(grant.expires_at.timestamp())}"


def extend_target(value: str) -> tuple[str, str | None]:
    """The grant id in an Extend button's value, and the expiry it was shown for (None on buttons
    posted before the value carried it)."""
    grant_id, _, expiry = value.partition("|")
    return grant_id, expiry or None


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


def deny_modal(request_id: str, *, from_home: bool = False) -> dict[str, Any]:
    """The deny modal; its ``private_metadata`` is the request id, then ``|home`` when opened from App Home."""
    return {
        "type": "modal", "callback_id": DENY_MODAL, "private_metadata": request_id + ("|home" if from_home else ""),
        "title": {"type": "plain_text", "text": "Deny request"},
        "submit": {"type": "plain_text", "text": "Deny"},
        "close": {"type": "plain_text", "text": "Cancel"},
        "blocks": [{"type": "input", "block_id": DENY_REASON_BLOCK, "optional": True,
                    "label": {"type": "plain_text", "text": f"Why deny {request_id}?"},
                    "element": {"type": "plain_text_input", "action_id": DENY_REASON_INPUT, "multiline": True}}],
    }


def deny_modal_origin(private_metadata: str) -> tuple[str, bool]:
    """The request id in a deny modal's ``private_metadata``, and whether it was opened from App Home."""
    request_id, _, origin = private_metadata.partition("|")
    return request_id, origin == "home"


def request_line(r: AccessRequest) -> str:
    return (f"`{r.id}` {r.resource} {format_duration(r.duration)} — {r.status.value}"
            f"{' (lapses ' + hhmm(r.lapses_at) + ')' if r.status is RequestStatus.PENDING else ''}: "
            f"{escape_clipped(r.reason, LINE_REASON_MAX)}")


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
        f"• `{s.id}` {s.resource} {s.protocol} by {escape_clipped(' → '.join(s.chain), 300)} from {s.client_addr}, "
        f"open {format_duration(now - s.opened_at)}" for s in sessions)


def home_view(pending: Sequence[AccessRequest], grants: Sequence[Grant], waiting: Sequence[AccessRequest],
              now: datetime) -> dict[str, Any]:
    """App Home: my pending requests, my active grants with time left, requests waiting for me.

    Each list shows its newest :data:`HOME_LIST_MAX` entries, then "and K more"; its lines are
    packed into as many sections as their length needs."""
    blocks: Blocks = [{"type": "header", "text": {"type": "plain_text", "text": "hoop"}}]
    blocks += _listing("My pending requests", [f"• {request_line(r)}" for r in pending], "see `/hoop status`")
    blocks += _listing("My active grants", [f"• {grant_line(g, now)}" for g in grants], "see `/hoop status`")
    blocks += _listing("Waiting for my approval", [
        f"• `{r.id}` {escape_clipped(r.requester, 200)} → {r.resource} {format_duration(r.duration)}: "
        f"{escape_clipped(r.reason, LINE_REASON_MAX)}" for r in waiting],
        "the older ones wait in their resources' channels")
    for r in waiting[:HOME_LIST_MAX]:
        blocks.append({"type": "actions", "elements": [
            _button(f"Approve {r.id}", APPROVE_ACTION, r.id, "primary"),
            _button(f"Deny {r.id}", DENY_ACTION, r.id, "danger")]})
    return {"type": "home", "blocks": blocks[:VIEW_BLOCKS_MAX]}


def _listing(title: str, lines: Sequence[str], rest: str) -> Blocks:
    """A titled list as sections of at most :data:`SECTION_TEXT_MAX` characters each."""
    shown = list(lines[:HOME_LIST_MAX]) or ["none"]
    if len(lines) > HOME_LIST_MAX:
        shown.append(f"… and {len(lines) - HOME_LIST_MAX} more; {rest}")
    out: Blocks = []
    text = f"*{title}*"
    for line in shown:
        if len(text) + 1 + len(line) > SECTION_TEXT_MAX:
            out.append(_section(text))
            text = ""
        text = f"{text}\n{line}" if text else line
    out.append(_section(text))
    return out
