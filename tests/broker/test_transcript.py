"""Transcript rendering: summary counts, terminal text, and the stated cap."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from broker.model import Grant, GrantStatus, Session, SessionEvent, SessionStatus
from broker.transcript import render, terminal_text

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


def session(protocol: str = "postgres") -> Session:
    return Session(id="s1", grant_id="g1", resource="prod-db", protocol=protocol, login="alice.abcde",
                   chain=("alice@example.com", "ci-runner"), client_addr="127.0.0.1:1", status=SessionStatus.CLOSED,
                   opened_at=T0, closed_at=T0 + timedelta(minutes=3), close_reason="access expired")


def ev(seq: int, kind: str, **data: object) -> SessionEvent:
    return SessionEvent(session_id="s1", seq=seq, at=T0 + timedelta(seconds=seq), kind=kind, data=dict(data))


GRANT = Grant(id="g1", login="alice.abcde", identity="alice@example.com", chain=("alice@example.com", "ci-runner"),
              resources=("prod-db",), status=GrantStatus.EXPIRED, created_at=T0, expires_at=T0 + timedelta(minutes=3))


def test_summary_and_lines() -> None:
    events = [ev(1, "open"), ev(2, "statement", sql="SELECT email FROM users", rows=2, ms=1.5, decision="allow"),
              ev(3, "rows", columns=["email"], rows=[["[email]"], ["[email]"]]),
              ev(4, "statement", sql="DROP TABLE users", decision="block", rule="no-drop"),
              ev(5, "review", review="v1", text="DELETE FROM t WHERE id = ?", rule="review"),
              ev(6, "close", reason="access expired")]
    t = render(GRANT, [(session(), events)], max_bytes=10_000)
    assert t.summary.startswith("1 session(s) · 2 statement(s)/command(s) · 2 row(s) · 1 blocked · 1 reviewed")
    assert "alice@example.com → ci-runner" in t.text
    assert "BLOCKED DROP TABLE users [rule no-drop]" in t.text
    assert "| [email]" in t.text and not t.truncated


def test_sample_rows_inside_the_statement_event() -> None:
    sample = {"columns": ["id", "email"], "rows": [["1", "[email]"], ["2", None]]}
    events = [ev(1, "statement", sql="SELECT id, email FROM users", rows=2, ms=0.4, decision="allow",
                 rows_sample=sample)]
    t = render(GRANT, [(session(), events)], max_bytes=10_000)
    lines = t.text.splitlines()
    at = next(i for i, line in enumerate(lines) if "SELECT id, email FROM users" in line)
    assert lines[at + 1 : at + 3] == ["         | 1 | [email]", "         | 2 | NULL"]
    assert t.summary.startswith("1 session(s) · 1 statement(s)/command(s) · 2 row(s)")


def test_cap_is_stated() -> None:
    events = [ev(i, "statement", sql=f"SELECT {i} -- " + "x" * 100, rows=1) for i in range(1, 200)]
    t = render(GRANT, [(session(), events)], max_bytes=2048)
    assert t.truncated and len(t.text.encode()) < 2048 + 200
    assert "[transcript cut at 2048 bytes of" in t.text and "hoop transcript s1 --full" in t.text


def test_ssh_output_as_text() -> None:
    assert terminal_text("\x1b[1;32muser@host\x1b[0m:~$ ls\r\nfile\r\n") == "user@host:~$ ls\nfile\n"
    events = [ev(1, "command", command="cat /etc/app.env", exit_status=0), ev(2, "output", data="KEY=[secret]\r\n")]
    t = render(None, [(session("ssh"), events)], max_bytes=10_000)
    assert "$ cat /etc/app.env → exit 0" in t.text and "KEY=[secret]" in t.text


def test_every_action_line_names_an_agent_chain() -> None:
    events = [ev(1, "statement", sql="SELECT 1", rows=1), ev(2, "statement", sql="SELECT 2", rows=1)]
    t = render(GRANT, [(session(), events)], max_bytes=10_000)
    lines = [line for line in t.text.splitlines() if "SELECT" in line]
    assert len(lines) == 2 and all("[alice@example.com → ci-runner]" in line for line in lines)


def test_what_a_session_user_typed_cannot_steer_the_readers_terminal() -> None:
    """A statement or command with escape sequences, a carriage return or a bidi override would, printed
    raw by `hoop transcript`, hide or rewrite lines (a BLOCKED one) on the reviewer's terminal."""
    events = [ev(1, "statement", sql="DROP TABLE audit\r\x1b[2KSELECT 1", decision="block", rule="no-drop"),
              ev(2, "command", command="rm -rf /data \x1b]52;c;aGk=\x07\x9b1A", decision="allow"),
              ev(3, "http", method="GET", path="/x\u202egnp.exe", status=200, resp_body="ok\x1b[8m"),
              ev(4, "output", data="plain\r\nout\x1b[31mput\r\n")]
    t = render(GRANT, [(session(), events)], max_bytes=10_000)
    assert "\x1b" not in t.text and "\r" not in t.text and "\x9b" not in t.text and "\u202e" not in t.text
    assert "BLOCKED DROP TABLE audit\\x0d\\x1b[2KSELECT 1 [rule no-drop]" in t.text
    assert "$ rm -rf /data \\x1b]52;c;aGk=\\x07\\x9b1A" in t.text and "/x\\u202egnp.exe" in t.text
    assert "         plain\n         output" in t.text  # terminal output is still shown as plain text


def test_a_command_cut_short_says_how_it_ended() -> None:
    events = [ev(1, "command", command="sleep 600", decision="allow", exit_status=None, ended="access expired"),
              ev(2, "command", command="tail -f log", decision="allow", exit_status=None, ended="client disconnected"),
              ev(3, "command", command="true", decision="allow", exit_status=0)]
    text = render(GRANT, [(session("ssh"), events)], max_bytes=10_000).text
    assert "$ sleep 600 → ended: access expired" in text
    assert "$ tail -f log → ended: client disconnected" in text
    assert "$ true → exit 0\n" in text
