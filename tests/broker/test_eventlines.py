"""broker.eventlines: the JSON-lines form of session events that spools and stored chunks share."""

from __future__ import annotations

import zlib
from datetime import UTC, datetime, timedelta, timezone

import pytest

from broker import eventlines
from broker.model import SessionEvent


def test_events_survive_a_round_trip_through_lines() -> None:
    at = datetime(2026, 12, 1, 3, 0, 0, 5, tzinfo=UTC)
    events = [SessionEvent("s_1", 1, at, "open", {"login": "alice"}),
              SessionEvent("s_1", 2, at + timedelta(seconds=1), "statement",
                           {"sql": "SELECT '\u2028\"x\"'", "rows": 3, "nested": {"a": [1, None]}}),
              SessionEvent("s_1", 3, at, "odd kind!", {"bad": "\udc80 lone surrogate"})]
    text = eventlines.join(events)
    assert text.count("\n") == 3
    back = eventlines.decode("s_1", text)
    assert [(e.seq, e.at, e.kind) for e in back] == [(e.seq, e.at, e.kind) for e in events]
    assert back[1].data == events[1].data
    assert back[2].data == {"bad": "\udc80 lone surrogate"}  # the standard encoder's fallback keeps it


def test_times_come_back_in_utc_whatever_offset_they_were_written_with() -> None:
    at = datetime(2026, 12, 1, 5, 0, tzinfo=timezone(timedelta(hours=2)))
    got = eventlines.parse(eventlines.line(7, at.isoformat(), "close", "{}"))
    assert got == (7, datetime(2026, 12, 1, 3, 0, tzinfo=UTC), "close", {})
    assert got is not None and got[1].tzinfo is UTC


def test_torn_and_foreign_lines_are_skipped() -> None:
    good = eventlines.line(1, "2026-12-01T03:00:00.000000+00:00", "statement", '{"sql":"SELECT 1"}')
    for bad in (good[:-10], "", "null", "[1,2]", '{"seq":"1","at":"2026-12-01T03:00:00","kind":"k","data":{}}',
                '{"seq":1,"at":"yesterday","kind":"k","data":{}}', '{"seq":1,"at":"2026-12-01","kind":"k","data":[]}',
                '{"seq":1,"kind":"k","data":{}}'):
        assert eventlines.parse(bad) is None, bad
    assert [e.seq for e in eventlines.decode("s", good + "garbage\n" + good[:-5])] == [1]


def test_packed_chunks_unpack_to_the_same_text_and_damage_is_reported() -> None:
    at = datetime(2026, 12, 1, 5, 0, tzinfo=UTC)
    text = "".join(eventlines.line(seq, at.isoformat(timespec="microseconds"), "http",
                                   eventlines.encode_data({"body": "é \u2028 \U0001f600 " * 50, "raw": "\udcff"}))
                   for seq in range(1, 30))
    packed = eventlines.pack(text)
    assert eventlines.unpack(packed) == text
    assert len(packed) * 5 < len(text.encode())
    assert [e.seq for e in eventlines.decode("s", eventlines.unpack(packed))] == list(range(1, 30))
    with pytest.raises(zlib.error):
        eventlines.unpack(packed[:-10])
    with pytest.raises(UnicodeDecodeError):
        eventlines.unpack(zlib.compress(b"\xff\xfe not utf-8"))
