"""Render masked transcripts from session recordings, for the thread, `/hoop transcript` and the CLI.

Transcripts are rendered only from what the proxies recorded, and the proxies record only
masked data, so a transcript is masked by construction. Output is capped; where the cap
cuts, the transcript says so and how to get the rest. Times are times of day in UTC: the
session's line gives its date, and a marker line says when a later event is on another day.
Sample rows and response bodies are shortened (not with ``--full``), and each says how much more
was recorded.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from broker.duration import format_duration
from broker.model import Grant, Session, SessionEvent
from broker.terminal import visible

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


@dataclass(frozen=True)
class Transcript:
    summary: str
    text: str
    truncated: bool


#: sample rows and body characters a shortened transcript shows (``--full``: all that was recorded)
SAMPLE_ROWS = 5
BODY_CHARS = 500


def _hms(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%H:%M:%S")


def _day(at: datetime) -> date:
    return at.astimezone(UTC).date()


def terminal_text(data: str) -> str:
    """Terminal output as plain text: escape sequences and control characters removed."""
    text = _ANSI.sub("", data.replace("\r\n", "\n"))
    text = text.replace("\r", "\n")
    return _CONTROL.sub("", text)


@dataclass
class Counts:
    """The summary's numbers, gathered as sessions and their events are rendered."""

    sessions: int = 0
    statements: int = 0
    rows: int = 0
    blocked: int = 0
    reviewed: int = 0
    errors: int = 0
    connected: timedelta = timedelta(0)

    def summary(self) -> str:
        return (f"{self.sessions} session(s) · {self.statements} statement(s)/command(s) · {self.rows} row(s) · "
                f"{self.blocked} blocked · {self.reviewed} reviewed · {self.errors} error(s) · "
                f"{format_duration(self.connected)} connected")


def _sample_lines(rows: object, rest: str | None) -> list[str]:
    """The (masked) sample rows of a statement's result, one line each: all of them, or with ``rest`` (where
    to see the others) the first few and how many more were recorded."""
    if not isinstance(rows, list):
        return []
    rows = [row for row in rows if isinstance(row, list)]
    shown = rows if rest is None else rows[:SAMPLE_ROWS]
    lines = [f"         | {' | '.join('NULL' if c is None else str(c) for c in row)}" for row in shown]
    if len(rows) > len(shown):
        lines.append(f"         | … {len(rows) - len(shown)} more sample row(s) recorded ({rest})")
    return lines


def _body_line(body: str, rest: str | None) -> str:
    """A response body: whole, or with ``rest`` its start and how much more was recorded."""
    if rest is None or len(body) <= BODY_CHARS:
        return f"         {body}"
    return f"         {body[:BODY_CHARS]}… ({len(body) - BODY_CHARS} more character(s) recorded; {rest})"


def heading(grant: Grant | None, title: str = "") -> list[str]:
    """The lines above the sessions: the title, then the grant's."""
    lines = [title] if title else []
    if grant is not None:
        lines.append(f"grant {grant.id} · {grant.login} · {' → '.join(grant.chain)} · {', '.join(grant.resources)}"
                     f" · {grant.status.value}")
    return lines


def session_end(session: Session, last: SessionEvent | None) -> datetime:
    """When the session ended: when it closed, else (still open) its last event, else when it opened."""
    return session.closed_at or (last.at if last is not None else session.opened_at)


class SessionLines:
    """One session's transcript lines, made as its events arrive: all at once for a capped transcript,
    a page at a time for ``hoop transcript --full``, which must not hold a long recording in memory.
    Counts go to ``counts``. The lines are raw: :func:`visible_text` makes them safe to print."""

    def __init__(self, session: Session, counts: Counts, *, full: bool = False) -> None:
        self.session = session
        self.counts = counts
        #: where a shortened sample or body is whole (None: they are, here)
        self.rest = None if full else f"hoop transcript {session.id} --full shows them"
        #: the day of the lines so far: an event on another gets a marker line first
        self.day = _day(session.opened_at)
        self.chain = " → ".join(session.chain)
        # with a chain of agents, every action line names it too, so a line quoted alone still says who
        self.who = f" [{self.chain}]" if len(session.chain) > 1 else ""
        self.last: SessionEvent | None = None

    def header(self, end: datetime) -> str:
        s = self.session
        opened = f"{_day(s.opened_at)} {_hms(s.opened_at)}"
        span = f"{opened}–{_hms(end)}" if _day(end) == _day(s.opened_at) else f"{opened} – {_day(end)} {_hms(end)}"
        return (f"== session {s.id} · {s.protocol} · {s.resource} · {self.chain} · from {s.client_addr} · "
                f"{span} UTC ({format_duration(end - s.opened_at)})")

    def feed(self, events: Iterable[SessionEvent]) -> list[str]:
        lines: list[str] = []
        for e in events:
            before = len(lines)
            self._event(e, lines)
            self.last = e
            if len(lines) > before and _day(e.at) != self.day:
                self.day = _day(e.at)
                lines.insert(before, f"-- {self.day} (UTC) --")
        return lines

    def close(self) -> None:
        """The session is rendered: it counts toward the summary."""
        self.counts.sessions += 1
        self.counts.connected += session_end(self.session, self.last) - self.session.opened_at

    def _event(self, e: SessionEvent, lines: list[str]) -> None:
        counts, d = self.counts, e.data
        t = _hms(e.at) + (self.who if e.kind in ("statement", "command", "http", "blocked", "review", "sftp", "sftp_op")
                          else "")
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
                lines.extend(_sample_lines(sample.get("rows"), self.rest))
        elif e.kind == "rows":  # recordings made before the sample moved into "statement"
            lines.extend(_sample_lines(d.get("rows"), self.rest))
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
                lines.append(_body_line(str(d["resp_body"]), self.rest))
        elif e.kind == "review":
            if "decision" in d:
                by = f" by {d['by']}" if d.get("by") else ""
                said = "timed out: no approver decided in time" if d["decision"] == "timed_out" else d["decision"]
                lines.append(f"{t} review {d.get('review')}: {said}{by}")
            else:
                counts.reviewed += 1
                lines.append(f"{t} HELD for review [rule {d.get('rule')}]: {d.get('text', '')}")
        elif e.kind == "blocked":
            counts.blocked += 1
            lines.append(f"{t} BLOCKED {d.get('text', '')} [rule {d.get('rule')}]")
        elif e.kind == "sftp":  # the SFTP subsystem, or an allowed scp/sftp-server/rsync server exec
            what = f"file transfer by `{d['command']}`" if d.get("command") else "SFTP session"
            lines.append(f"{t} {what}: relayed as bytes, unmasked; the files' contents are not recorded")
        elif e.kind == "sftp_op":  # a file operation of an SFTP session (proxy/ssh/sftplog.py)
            if d.get("op") not in ("unreadable", "transferred"):  # (a transfer sums up an open's reads and writes)
                counts.statements += 1
            if d.get("op") == "unreadable":
                lines.append(f"{t} sftp: requests no longer read: {d.get('why', '')}")
            elif d.get("op") == "transferred":  # at the file's close: what moved through its handle
                moved = [f"{verb} {_size(d.get(key))}" for verb, key in (("read", "read"), ("wrote", "written"))
                         if d.get(key)]
                left = " (never closed: counted until the session ended)" if d.get("unclosed") else ""
                lines.append(f"{t} sftp {d.get('path', '')}: {', '.join(moved)}{left}")
            else:
                to = f" → {d['to']}" if d.get("to") else ""
                mode = f" ({d['mode']})" if d.get("mode") else ""
                lines.append(f"{t} sftp {d.get('op')} {d.get('path', '')}{to}{mode}")
        elif e.kind == "close":
            lines.append(f"{t} session closed: {d.get('reason', '')}")


def _size(n: object) -> str:
    """A byte count for a reader: ``512 B``, ``1.5 KiB``, ``3.2 MiB``."""
    value = float(n) if isinstance(n, int | float) else 0.0
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"  # (not reached)


def visible_text(lines: Sequence[str]) -> str:
    """Lines as text to print: one per line, what a session user typed (SQL, commands, paths, bodies) shown
    with its controls as escapes (:mod:`broker.terminal`), so it cannot steer the reader's terminal."""
    return visible("\n".join(lines) + "\n")


def render(grant: Grant | None, sessions: Sequence[tuple[Session, Sequence[SessionEvent]]], *,
           max_bytes: int, title: str = "", unread: Collection[str] = ()) -> Transcript:
    """One transcript for a session or for all sessions of a grant. ``unread``: the sessions whose events
    were read only in part (the first ones): the transcript says so after theirs."""
    counts = Counts()
    lines = heading(grant, title)
    for session, events in sessions:
        rendered = SessionLines(session, counts)
        lines.append(rendered.header(session_end(session, events[-1] if events else None)))
        lines.extend(rendered.feed(events))
        rendered.close()
        if session.id in unread:
            lines.append(f"[only the first {len(events)} events of session {session.id} are read here; "
                         f"all of them: hoop transcript {session.id} --full]")
    if not sessions:
        lines.append("no sessions were opened with this grant")
    text = visible_text(lines)
    raw = text.encode("utf-8")
    truncated = len(raw) > max_bytes
    if truncated:
        cut = raw[:max_bytes].decode("utf-8", "ignore")
        cut = cut[: cut.rfind("\n") + 1] or cut
        hint = f"hoop transcript {sessions[0][0].id if len(sessions) == 1 else '<session>'} --full"
        text = cut + f"\n[transcript cut at {max_bytes} bytes of {len(raw)}; the full recording: {hint}]\n"
    return Transcript(summary=counts.summary(), text=text, truncated=truncated)
