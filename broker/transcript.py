"""Render masked transcripts from session recordings, for the thread, `/hoop transcript` and the CLI.

Transcripts are rendered only from what the proxies recorded, and the proxies record only
masked data, so a transcript is masked by construction. Output is capped; where the cap
cuts, the transcript says so and how to get the rest.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from broker.duration import format_duration
from broker.model import Grant, Session, SessionEvent

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
# What a session user typed (SQL, commands, paths, bodies) must not steer the reader's terminal:
# C0 and C1 controls (ESC, CR, the 8-bit CSI) and bidi overrides are shown as escapes, not sent.
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _escape(m: re.Match[str]) -> str:
    code = ord(m.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _visible(text: str) -> str:
    return _UNSAFE.sub(_escape, text.replace("\r\n", "\n"))


@dataclass(frozen=True)
class Transcript:
    summary: str
    text: str
    truncated: bool


def _hms(at: datetime) -> str:
    return at.strftime("%H:%M:%S")


def terminal_text(data: str) -> str:
    """Terminal output as plain text: escape sequences and control characters removed."""
    text = _ANSI.sub("", data.replace("\r\n", "\n"))
    text = text.replace("\r", "\n")
    return _CONTROL.sub("", text)


@dataclass
class Counts:
    statements: int = 0
    rows: int = 0
    blocked: int = 0
    reviewed: int = 0
    errors: int = 0


def _sample_lines(rows: object) -> list[str]:
    """The first few (masked) sample rows of a statement's result, one line each."""
    if not isinstance(rows, list):
        return []
    return [f"         | {' | '.join('NULL' if c is None else str(c) for c in row)}"
            for row in rows[:5] if isinstance(row, list)]


def _session_lines(session: Session, events: Sequence[SessionEvent], counts: Counts) -> list[str]:
    chain = " → ".join(session.chain)
    end = session.closed_at or (events[-1].at if events else session.opened_at)
    lines = [f"== session {session.id} · {session.protocol} · {session.resource} · {chain} · from "
             f"{session.client_addr} · {_hms(session.opened_at)}–{_hms(end)} UTC"
             f" ({format_duration(end - session.opened_at)})"]
    # with a chain of agents, every action line names it too, so a line quoted alone still says who
    who = f" [{chain}]" if len(session.chain) > 1 else ""
    for e in events:
        d = e.data
        t = _hms(e.at) + (who if e.kind in ("statement", "command", "http", "blocked", "review") else "")
        if e.kind == "statement":
            counts.statements += 1
            rows = d.get("rows")
            counts.rows += int(rows) if isinstance(rows, int) else 0
            decision = d.get("decision", "allow")
            if decision == "block":
                counts.blocked += 1
            if d.get("error"):
                counts.errors += 1
            extra = [f"{rows} rows" if rows is not None else "", f"{d['ms']:.1f} ms" if isinstance(d.get("ms"), float
                                                                                                    | int) else ""]
            tag = "BLOCKED " if decision == "block" else ""
            rule = f" [rule {d['rule']}]" if d.get("rule") else ""
            err = f" ERROR {d['error']}" if d.get("error") else ""
            lines.append(f"{t} {tag}{d.get('sql', '')}{rule} {' · '.join(x for x in extra if x)}{err}".rstrip())
            sample = d.get("rows_sample")
            if isinstance(sample, dict):
                lines.extend(_sample_lines(sample.get("rows")))
        elif e.kind == "rows":  # recordings made before the sample moved into "statement"
            lines.extend(_sample_lines(d.get("rows")))
        elif e.kind == "command":
            counts.statements += 1
            if d.get("decision") == "block":
                counts.blocked += 1
            status = f" → exit {d['exit_status']}" if d.get("exit_status") is not None else ""
            if d.get("ended"):  # cut short: the grant ended, the client left, the host went away
                status += f" → ended: {d['ended']}"
            tag = "BLOCKED " if d.get("decision") == "block" else ""
            lines.append(f"{t} {tag}$ {d.get('command', '')}{status}")
        elif e.kind == "output":
            text = terminal_text(str(d.get("data", "")))
            if text.strip():
                lines.extend(f"         {line}" for line in text.rstrip("\n").split("\n"))
        elif e.kind == "http":
            counts.statements += 1
            if d.get("decision") == "block":
                counts.blocked += 1
            lines.append(f"{t} {d.get('method')} {d.get('path')} → {d.get('status')} "
                         f"({d.get('req_bytes', 0)} B in, {d.get('resp_bytes', 0)} B out)")
            if d.get("resp_body"):
                lines.append(f"         {str(d['resp_body'])[:500]}")
        elif e.kind == "review":
            if "decision" in d:
                lines.append(f"{t} review {d.get('review')}: {d['decision']}")
            else:
                counts.reviewed += 1
                lines.append(f"{t} HELD for review [rule {d.get('rule')}]: {d.get('text', '')}")
        elif e.kind == "blocked":
            counts.blocked += 1
            lines.append(f"{t} BLOCKED {d.get('text', '')} [rule {d.get('rule')}]")
        elif e.kind == "close":
            lines.append(f"{t} session closed: {d.get('reason', '')}")
    return lines


def render(grant: Grant | None, sessions: Sequence[tuple[Session, Sequence[SessionEvent]]], *,
           max_bytes: int, title: str = "") -> Transcript:
    """One transcript for a session or for all sessions of a grant."""
    counts = Counts()
    lines: list[str] = []
    if title:
        lines.append(title)
    if grant is not None:
        lines.append(f"grant {grant.id} · {grant.login} · {' → '.join(grant.chain)} · {', '.join(grant.resources)}"
                     f" · {grant.status.value}")
    total = timedelta(0)
    for session, events in sessions:
        lines.extend(_session_lines(session, events, counts))
        end = session.closed_at or (events[-1].at if events else session.opened_at)
        total += end - session.opened_at
    if not sessions:
        lines.append("no sessions were opened with this grant")
    text = _visible("\n".join(lines) + "\n")
    raw = text.encode("utf-8")
    truncated = len(raw) > max_bytes
    if truncated:
        cut = raw[:max_bytes].decode("utf-8", "ignore")
        cut = cut[: cut.rfind("\n") + 1] or cut
        hint = f"hoop transcript {sessions[0][0].id if len(sessions) == 1 else '<session>'} --full"
        text = cut + f"\n[transcript cut at {max_bytes} bytes of {len(raw)}; the full recording: {hint}]\n"
    summary = (f"{len(sessions)} session(s) · {counts.statements} statement(s)/command(s) · {counts.rows} row(s) · "
               f"{counts.blocked} blocked · {counts.reviewed} reviewed · {counts.errors} error(s) · "
               f"{format_duration(total)} connected")
    return Transcript(summary=summary, text=text, truncated=truncated)
