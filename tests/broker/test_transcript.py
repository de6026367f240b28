"""Transcript rendering: summary counts, terminal text, the stated cap, and the uncapped transcript
read a page at a time."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from sqlalchemy import insert

from broker import eventlines
from broker.model import Grant, GrantStatus, Session, SessionEvent, SessionStatus
from broker.recap import full_session_transcript, session_transcript
from broker.service import Service
from broker.store import Store
from broker.store import tables as t
from broker.transcript import Counts, render, terminal_text

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
    assert t.summary == ("1 session(s) · 2 statement(s)/command(s) · 2 row(s) · 1 blocked · 1 reviewed · 0 error(s) · "
                         "3m connected")  # (the session's duration, from open to close, is in the summary too)
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


def _statements(first: int, last: int, sid: str = "s1") -> list[SessionEvent]:
    return [SessionEvent(sid, i, T0 + timedelta(seconds=i), "statement", {"sql": f"SELECT {i}", "rows": 1})
            for i in range(first, last + 1)]


async def test_a_recording_is_read_a_page_at_a_time(store: Store) -> None:
    """Chunks (one packed, and more than one read fetches), a page boundary inside a chunk, and rows a pre-0003
    replica stored (one also in a chunk): pages read in turn give exactly what the whole read gives, never
    more than asked for."""
    long_run = [replace(e, data={**e.data, "pad": "x" * 200}) for e in _statements(1, 40)]
    async with store.tx() as tx:
        await tx.add_event_chunks([("s1", 1, 40, eventlines.join(long_run))])  # packed
        await tx.add_events(_statements(41, 55))
        await tx.add_events(_statements(56, 56))
    legacy = [{"session_id": "s1", "seq": seq, "at": T0, "kind": "statement", "data": {"sql": f"old {seq}"}}
              for seq in (5, 57, 58)]
    async with store.engine.begin() as conn:
        await conn.execute(insert(t.session_events), legacy)
    for seq in range(59, 79):  # a chunk each
        async with store.tx() as tx:
            await tx.add_events(_statements(seq, seq))
    async with store.tx() as tx:
        whole = await tx.events("s1")
        assert await tx.events_after("s1", after=58, limit=15) == whole[58:73]
    assert [e.seq for e in whole] == list(range(1, 79)) and whole[4].data["sql"] == "SELECT 5"
    pages, after = [], 0
    while True:
        async with store.tx() as tx:
            page = await tx.events_after("s1", after=after, limit=7)
        if not page:
            break
        assert len(page) <= 7 and page[0].seq == after + 1
        pages.append(page)
        after = page[-1].seq
    assert [e for page in pages for e in page] == whole and len(pages) == 12
    async with store.tx() as tx:
        assert await tx.events_after("s1", after=78) == []
        assert await tx.events_after("other") == []


async def test_the_full_transcript_is_printed_as_it_is_read(service: Service) -> None:
    """`hoop transcript --full` renders page by page: what a live session records while the first
    pages are printed is in the pages read later (read all at once, it would be missing)."""
    opened = Session(id="s1", grant_id="g1", resource="prod-db", protocol="postgres", login="alice.abcde",
                     chain=("alice@example.com",), client_addr="127.0.0.1:1", status=SessionStatus.OPEN,
                     opened_at=T0)
    async with service.store.tx() as tx:
        await tx.insert_session(opened)
        await tx.add_events(_statements(1, 25))
    counts = Counts()
    texts = full_session_transcript(service, "s1", counts, page=10)
    head = await anext(texts)
    assert head.startswith("transcript of session s1\n== session s1 ·") and "12:00:00–12:00:25 UTC" in head
    first = await anext(texts)
    assert [line.split()[2] for line in first.splitlines()] == [str(i) for i in range(1, 11)]
    async with service.store.tx() as tx:
        await tx.add_events(_statements(26, 30))
    rest = [text async for text in texts]
    assert len(rest) == 2 and "SELECT 30" in rest[-1] and "SELECT 31" not in rest[-1]
    assert counts.summary().startswith("1 session(s) · 30 statement(s)/command(s) · 30 row(s)")


def test_a_day_marker_when_events_pass_midnight_utc() -> None:
    """Lines show only the time of day: across midnight, a line would seem to come before the ones above it."""
    at = T0.replace(hour=23, minute=59, second=58)
    late = replace(session(), opened_at=at, closed_at=at + timedelta(days=1, seconds=12))
    events = [SessionEvent("s1", 1, at, "statement", {"sql": "SELECT 1", "rows": 1}),
              SessionEvent("s1", 2, at + timedelta(seconds=1), "statement", {"sql": "SELECT 2", "rows": 1}),
              SessionEvent("s1", 3, at + timedelta(seconds=3), "output", {"data": "   "}),  # no line, no marker
              SessionEvent("s1", 4, at + timedelta(seconds=4), "statement", {"sql": "SELECT 3", "rows": 1}),
              SessionEvent("s1", 5, at + timedelta(seconds=5), "statement", {"sql": "SELECT 4", "rows": 1}),
              SessionEvent("s1", 6, at + timedelta(days=1, seconds=10), "close", {"reason": "client quit"})]
    lines = render(GRANT, [(late, events)], max_bytes=10_000).text.splitlines()
    (header,) = [line for line in lines if line.startswith("== session")]
    assert "· 2030-01-01 23:59:58 – 2030-01-03 00:00:10 UTC (" in header
    body = lines[lines.index(header) + 1:]
    assert [line.replace(" [alice@example.com → ci-runner]", "") for line in body] == [
        "23:59:58 SELECT 1 1 rows", "23:59:59 SELECT 2 1 rows", "-- 2030-01-02 (UTC) --",
        "00:00:02 SELECT 3 1 rows", "00:00:03 SELECT 4 1 rows", "-- 2030-01-03 (UTC) --",
        "00:00:08 session closed: client quit"]
    same_day = render(GRANT, [(session(), events[:2])], max_bytes=10_000).text
    assert "· 2030-01-01 12:00:00–12:03:00 UTC (3m)" in same_day and "\n-- " not in same_day


def test_shortened_samples_and_bodies_say_how_much_more_was_recorded() -> None:
    sample = {"columns": ["n"], "rows": [[str(i)] for i in range(20)]}
    events = [ev(1, "statement", sql="SELECT n FROM t", rows=900, rows_sample=sample),
              ev(2, "http", method="GET", path="/big", status=200, resp_body="a" * 500 + "b" * 700),
              ev(3, "http", method="GET", path="/small", status=200, resp_body="c" * 500)]
    text = render(GRANT, [(session(), events)], max_bytes=100_000).text
    assert "         | 4\n         | … 15 more sample row(s) recorded (hoop transcript s1 --full shows them)\n" in text
    assert "| 5\n" not in text
    assert ("         " + "a" * 500 + "… (700 more character(s) recorded; hoop transcript s1 --full shows them)\n"
            in text)
    assert "         " + "c" * 500 + "\n" in text  # not shortened: nothing said


async def test_the_full_transcript_shows_whole_samples_and_bodies(service: Service) -> None:
    async with service.store.tx() as tx:
        await tx.insert_session(session())
        await tx.add_events([ev(1, "statement", sql="SELECT n FROM t", rows=20,
                                rows_sample={"columns": ["n"], "rows": [[str(i)] for i in range(20)]}),
                             ev(2, "http", method="GET", path="/big", status=200, resp_body="a" * 1200)])
    text = "".join([t async for t in full_session_transcript(service, "s1", Counts())])
    assert "         | 19\n" in text and "more sample" not in text
    assert "         " + "a" * 1200 + "\n" in text and "more character" not in text


async def test_a_capped_transcript_says_when_it_read_only_the_first_events(service: Service) -> None:
    """A capped transcript reads a bounded number of events; with a byte cap raised above what they make,
    the transcript ended there without a word."""
    async with service.store.tx() as tx:
        await tx.insert_session(session())
        await tx.add_events(_statements(1, 12))
    _, t = await session_transcript(service, "s1", read_max=10)
    assert "SELECT 10" in t.text and "SELECT 11" not in t.text and not t.truncated
    assert t.text.endswith("[only the first 10 events of session s1 are read here; all of them: "
                           "hoop transcript s1 --full]\n")
    _, whole = await session_transcript(service, "s1", read_max=12)
    assert "SELECT 12" in whole.text and "only the first" not in whole.text


def test_a_command_cut_short_says_how_it_ended() -> None:
    events = [ev(1, "command", command="sleep 600", decision="allow", exit_status=None, ended="access expired"),
              ev(2, "command", command="tail -f log", decision="allow", exit_status=None, ended="client disconnected"),
              ev(3, "command", command="true", decision="allow", exit_status=0)]
    text = render(GRANT, [(session("ssh"), events)], max_bytes=10_000).text
    assert "$ sleep 600 → ended: access expired" in text
    assert "$ tail -f log → ended: client disconnected" in text
    assert "$ true → exit 0\n" in text


def test_a_file_transfer_is_shown_for_what_it_is() -> None:
    """An SFTP session, or an allowed scp server exec, is relayed as bytes: the transcript says a transfer
    happened and that its files are not in the recording (it showed nothing for an SFTP session)."""
    events = [ev(1, "sftp", channel=0), ev(2, "sftp", channel=1, command="scp -t /tmp/x"),
              ev(3, "command", command="scp -t /tmp/x", decision="allow", exit_status=0)]
    lines = render(GRANT, [(session("ssh"), events)], max_bytes=10_000).text.splitlines()
    assert any(line.endswith("[alice@example.com → ci-runner] SFTP session: relayed as bytes, unmasked; the "
                             "files' contents are not recorded") for line in lines)
    assert any("file transfer by `scp -t /tmp/x`: relayed as bytes" in line for line in lines)
    assert any(line.endswith("$ scp -t /tmp/x → exit 0") for line in lines)


def test_sftp_file_operations_are_lines_of_the_transcript() -> None:
    events = [ev(1, "sftp", channel=0), ev(2, "sftp_op", channel=0, op="open", path="/srv/[email].csv", mode="read"),
              ev(3, "sftp_op", channel=0, op="rename", path="/tmp/a", to="/tmp/b"),
              ev(4, "sftp_op", channel=0, op="transferred", path="/srv/[email].csv", mode="read", read=3_500_000,
                 written=0),
              ev(5, "sftp_op", channel=0, op="unreadable", path="", why="a packet of 9 bytes is not SFTP")]
    t = render(GRANT, [(session("ssh"), events)], max_bytes=10_000)
    lines = t.text.splitlines()
    assert any(line.endswith("] sftp open /srv/[email].csv (read)") for line in lines)
    assert any(line.endswith("] sftp rename /tmp/a → /tmp/b") for line in lines)
    assert any(line.endswith("] sftp /srv/[email].csv: read 3.3 MiB") for line in lines)
    assert any(line.endswith("] sftp: requests no longer read: a packet of 9 bytes is not SFTP") for line in lines)
    assert "2 statement(s)/command(s)" in t.summary  # the open and the rename
