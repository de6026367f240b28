"""asciicast v2 recording and replay timing, without a terminal or a clock (and a store for paging)."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from broker.errors import InvalidInput, NotFound
from broker.model import Session, SessionEvent, SessionStatus
from broker.store import Store
from proxy.ssh.recording import Recorder, asciicast, cast_events
from proxy.ssh.replay import ScreenOnly, recorded, replay


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


ESC = "\x1b"
DRAWING = [  # what only draws passes as it is
    f"{ESC}[1;31mred{ESC}[0m", f"{ESC}[38:2:1:2:3mrgb", f"{ESC}[2J{ESC}[H", f"{ESC}[10;5H", f"{ESC}[K",
    f"{ESC}[3A{ESC}[2C", f"{ESC}[1;24r", f"{ESC}[?25l{ESC}[?25h", f"{ESC}[?1049h", f"{ESC}[?2004h",
    f"{ESC}7{ESC}8", f"{ESC}(0q{ESC}(B", f"{ESC}[2 q", "tab\there\r\nline\x08\x07", "ünïcode ✓",
]
ACTING = [  # what would act on the reader's terminal is dropped
    f"{ESC}]52;c;cm0gLXJmIH4K{ESC}\\",  # OSC 52: write the clipboard
    f"{ESC}]0;title\x07",  # OSC: window title (reported back by CSI 21 t on some terminals)
    f"{ESC}]8;;https://evil.example/{ESC}\\",  # hyperlink
    f"{ESC}[6n", f"{ESC}[c", f"{ESC}[>c", f"{ESC}[21t", f"{ESC}[14t", f"{ESC}[?1$p", f"{ESC}[x",  # requests
    f"{ESC}P$q\"p{ESC}\\", f"{ESC}_payload{ESC}\\", f"{ESC}^pm{ESC}\\", f"{ESC}Xsos{ESC}\\",  # strings
    f"{ESC}[?1000h", f"{ESC}[?1;1000h",  # mouse reports would reach the shell's input
    "\x0e", "\x00", f"{ESC}[5b",  # shift-out, NUL, repeat
]


@pytest.mark.parametrize("seq", DRAWING)
def test_replay_passes_what_only_draws(seq: str) -> None:
    assert ScreenOnly().feed(f"a{seq}b") == f"a{seq}b"


@pytest.mark.parametrize("seq", ACTING)
def test_replay_drops_what_acts_on_the_readers_terminal(seq: str) -> None:
    screen = ScreenOnly()
    assert screen.feed(f"before{seq}after") + screen.finish() == "beforeafter"


def test_replay_drops_c1_controls_leaving_their_parameters_as_text() -> None:
    assert ScreenOnly().feed("a\x9b6nb\x9d52;c;eA==\x07c\x90q") == "a6nb52;c;eA==\x07cq"


def test_replay_holds_a_sequence_split_between_events() -> None:
    screen = ScreenOnly()
    assert screen.feed(f"x{ESC}]52;c;") == "x"  # an OSC whose end is still to come
    assert screen.feed("cm0gLXJmIH4K") == ""
    assert screen.feed(f"\x07y{ESC}[3") == "y"  # then a colour cut after its parameter
    assert screen.feed("1mz") == f"{ESC}[31mz"
    assert screen.feed(f"{ESC}") == ""
    assert screen.feed("[6nw") == "w"
    assert screen.finish() == f"{ESC}[0m"


def test_replay_undoes_the_modes_the_host_left_on() -> None:
    screen = ScreenOnly()
    screen.feed(f"{ESC}[?1049h{ESC}[?25l{ESC}[?2004h{ESC}[?2004l")
    assert screen.finish() == f"{ESC}[?1049l{ESC}[?25h"
    assert screen.finish() == ""


def test_replay_drops_an_unfinished_string_past_its_cap() -> None:
    screen = ScreenOnly()
    shown = screen.feed(f"{ESC}]52;c;" + "A" * (70 * 1024))
    assert ESC not in shown and shown.startswith("]52;c;")  # the ESC is dropped: what follows is plain text


async def test_replay_writes_through_the_filter() -> None:
    out: list[str] = []

    async def sleep(s: float) -> None:
        pass

    events = [(0.0, "o", f"{ESC}[?1049hvim{ESC}]52;c;"), (0.1, "o", f"eA==\x07{ESC}[6n")]
    assert await replay(events, 1.0, out.append, sleep) == 2
    assert "".join(out) == f"{ESC}[?1049hvim{ESC}[?1049l"


def _session(sid: str, protocol: str = "ssh") -> Session:
    at = datetime(2030, 1, 1, tzinfo=UTC)
    return Session(id=sid, grant_id="g1", resource="web-1", protocol=protocol, login="a.b",
                   chain=("alice@example.com",), client_addr="10.0.0.9:2200", status=SessionStatus.OPEN, opened_at=at)


def _out(seq: int, channel: int, t: float, data: str, kind: str = "output") -> SessionEvent:
    return SessionEvent("s1", seq, datetime(2030, 1, 1, tzinfo=UTC), kind, {"channel": channel, "t": t, "data": data})


async def test_replay_reads_the_recording_a_page_at_a_time_as_it_plays(store: Store) -> None:
    """Pages of 3 events: the first two hold nothing of channel 3 (it is found on the third), pages cut
    between events of other kinds and channels, and events recorded while the replay runs (the session is
    still open) are played too: they were not there when the replay began, so only a reader that reads as
    it plays can show them."""
    at = datetime(2030, 1, 1, tzinfo=UTC)
    first = [SessionEvent("s1", 1, at, "asciicast", {"channel": 3, "header": {"version": 2}}),
             *(SessionEvent("s1", seq, at, "command", {"channel": 3, "command": "ls"}) for seq in range(2, 7)),
             _out(7, 3, 0.1, "a"), _out(8, 4, 0.2, "other channel"), _out(9, 3, 0.3, "ls\r\n", "input"),
             _out(10, 3, 0.4, "b"), _out(11, 3, 0.5, "c"), _out(12, 3, 0.6, "d")]
    async with store.tx() as tx:
        await tx.insert_session(_session("s1"))
        await tx.add_events(first)
    out: list[str] = []
    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)
        if len(slept) == 2:  # "a" was written: the host prints more
            async with store.tx() as tx:
                await tx.add_events([_out(13, 3, 0.7, "e"), _out(14, 4, 0.8, "x"), _out(15, 3, 0.9, "f")])

    assert await replay(await recorded(store, "s1", page=3), 1.0, out.append, sleep) == 6
    assert out == ["a", "b", "c", "d", "e", "f"]
    assert slept == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.1, 0.2])  # timed on channel 3's events only
    other: list[str] = []
    assert await replay(await recorded(store, "s1", 4, page=3), 1.0, other.append, sleep) == 2
    assert other == ["other channel", "x"]


async def test_replay_refuses_before_playing_what_has_nothing_to_play(store: Store) -> None:
    async with store.tx() as tx:
        await tx.insert_session(_session("s1"))
        await tx.insert_session(_session("s2", "postgres"))
        await tx.insert_session(_session("s3"))
        await tx.add_events([_out(seq, 0, 0.1 * seq, "out") for seq in range(1, 8)])
    for sid, channel, code in (("nope", None, "no_session"), ("s1", 5, "no_output"), ("s3", None, "no_output")):
        with pytest.raises(NotFound) as caught:
            await recorded(store, sid, channel, page=3)
        assert caught.value.code == code
    with pytest.raises(InvalidInput) as refused:
        await recorded(store, "s2", page=3)
    assert refused.value.code == "not_ssh"
