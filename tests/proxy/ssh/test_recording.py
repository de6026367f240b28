"""asciicast v2 recording and replay timing, without a terminal or a clock."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from broker.model import SessionEvent
from proxy.ssh.recording import Recorder, asciicast, cast_events
from proxy.ssh.replay import replay


class FakeLive:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def record(self, kind: str, data: dict[str, Any]) -> None:
        self.events.append((kind, data))


def stored(live: FakeLive) -> list[SessionEvent]:
    at = datetime(2030, 1, 1, tzinfo=UTC)
    return [SessionEvent("s1", i, at, k, d) for i, (k, d) in enumerate(live.events, 1)]


def test_recorder_writes_asciicast_v2() -> None:
    live, ticks = FakeLive(), iter([10.0, 10.5, 11.25, 12.0, 13.0])
    rec = Recorder(live, 1, now=lambda: next(ticks))  # type: ignore[arg-type]
    rec.header(100, 30, "xterm", 1_900_000_000)
    rec.output(b"$ ")
    rec.input("ls\r\n")
    rec.resize(120, 40)
    rec.output("caf\u00e9\r\n".encode())
    lines = asciicast(stored(live)).splitlines()
    header = json.loads(lines[0])
    assert header == {"version": 2, "width": 100, "height": 30, "timestamp": 1_900_000_000, "env": {"TERM": "xterm"}}
    assert [json.loads(x) for x in lines[1:]] == [[0.5, "o", "$ "], [1.25, "i", "ls\r\n"], [2.0, "r", "120x40"],
                                                  [3.0, "o", "caf\u00e9\r\n"]]


def test_cast_events_picks_one_channel() -> None:
    live = FakeLive()
    Recorder(live, 1, now=lambda: 0.0).output(b"one")  # type: ignore[arg-type]
    Recorder(live, 2, now=lambda: 0.0).output(b"two")  # type: ignore[arg-type]
    assert cast_events(stored(live)) == [(0.0, "o", "one")]
    assert cast_events(stored(live), 2) == [(0.0, "o", "two")]


def test_recorder_merges_one_iteration_of_output_and_keeps_order() -> None:
    live, ticks = FakeLive(), iter([0.0, 1.0, 2.0, 3.0])
    deferred: list[Callable[[], None]] = []
    rec = Recorder(live, 1, now=lambda: next(ticks), defer=deferred.append)  # type: ignore[arg-type]
    rec.output(b"one ")
    rec.output(b"two ")
    assert live.events == [] and len(deferred) == 1  # one event per loop iteration, not per chunk
    deferred.pop()()
    rec.output(b"three")
    rec.input("ls\r\n")  # pending output is recorded first, at the time of its first chunk
    deferred.pop()()  # the scheduled flush finds nothing left
    assert cast_events(stored(live)) == [(1.0, "o", "one two "), (2.0, "o", "three"), (3.0, "i", "ls\r\n")]


def test_recorder_keeps_a_character_split_across_chunks() -> None:
    live = FakeLive()
    rec = Recorder(live, 1, now=lambda: 0.0)  # type: ignore[arg-type]
    snowman = "\u2603".encode()
    rec.output(b"a" + snowman[:1])
    rec.output(snowman[1:] + b"b")
    rec.output(snowman[:2])
    rec.flush(final=True)  # a stream that ends inside a character
    assert "".join(d for _, _, d in cast_events(stored(live))) == "a\u2603b\ufffd"


def test_recorder_records_a_large_merge_at_once() -> None:
    live = FakeLive()
    rec = Recorder(live, 1, now=lambda: 0.0, defer=lambda f: None)  # type: ignore[arg-type]
    rec.output(b"x" * Recorder.MAX_MERGE)
    assert [len(d) for _, _, d in cast_events(stored(live))] == [Recorder.MAX_MERGE]


async def test_replay_paces_output_by_speed_and_caps_idle() -> None:
    out: list[str] = []
    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)

    events = [(0.0, "o", "a"), (1.0, "i", "x"), (2.0, "o", "b"), (60.0, "o", "c")]
    assert await replay(events, 2.0, out.append, sleep) == 3
    assert out == ["a", "b", "c"]
    assert slept == [0.5, 2.0]  # 1s/2 then 1s/2 were split by the "i" event; 58s/2 capped at 2
    with pytest.raises(ValueError):
        await replay(events, 0, out.append, sleep)
