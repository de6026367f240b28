"""SSH sessions as asciicast v2, recorded masked through the session hub.

Each channel with a terminal (or an exec) is recorded as one asciicast stream: a header
event ``kind="asciicast"`` with ``{"channel", "header": {"version": 2, "width", "height",
"timestamp", "env": {"TERM"}, "command"?}}``, then ``kind="output"`` events ``{"channel",
"t", "data"}`` (asciicast ``"o"``) and ``kind="input"`` events (asciicast ``"i"``: the
command lines the guard checked, never raw keystrokes, so no-echo password prompts are not
recorded key by key), and ``kind="resize"`` ``{"channel", "t", "size": "COLSxROWS"}``.
Callers pass bytes that are already masked; this module never sees clear output.

:func:`asciicast` turns stored events back into the text of an asciicast v2 file (one JSON
header line, then ``[t, code, data]`` lines), and :func:`cast_events` into
``(t, code, data)`` tuples for :mod:`proxy.ssh.replay`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from typing import Any

from broker.model import SessionEvent
from proxy.ssh.contracts import Live

__all__ = ["Recorder", "asciicast", "cast_events"]

_CODES = {"output": "o", "input": "i", "resize": "r"}


class Recorder:
    """Records one channel of one session. ``now`` is a monotonic seconds source (injectable)."""

    def __init__(self, session: Live, channel: int, *, now: Callable[[], float] = time.monotonic) -> None:
        self._session = session
        self._channel = channel
        self._now = now
        self._start = now()

    def header(self, width: int, height: int, term: str | None, timestamp: int,
               command: str | None = None) -> None:
        header: dict[str, Any] = {"version": 2, "width": width or 80, "height": height or 24,
                                  "timestamp": timestamp, "env": {"TERM": term or ""}}
        if command is not None:
            header["command"] = command
        self._session.record("asciicast", {"channel": self._channel, "header": header})

    def _t(self) -> float:
        return round(self._now() - self._start, 6)

    def output(self, data: bytes) -> None:
        if data:
            self._session.record("output", {"channel": self._channel, "t": self._t(),
                                            "data": data.decode("utf-8", "replace")})

    def input(self, text: str) -> None:
        self._session.record("input", {"channel": self._channel, "t": self._t(), "data": text})

    def resize(self, width: int, height: int) -> None:
        self._session.record("resize", {"channel": self._channel, "t": self._t(), "size": f"{width}x{height}"})


def cast_events(events: Iterable[SessionEvent], channel: int | None = None) -> list[tuple[float, str, str]]:
    """``(t, code, data)`` of the stored events of one channel (the first recorded if None)."""
    out: list[tuple[float, str, str]] = []
    for e in events:
        if e.kind not in _CODES:
            continue
        ch = e.data.get("channel")
        if channel is None:
            channel = ch
        if ch != channel:
            continue
        data = e.data.get("size") if e.kind == "resize" else e.data.get("data")
        out.append((float(e.data.get("t", 0.0)), _CODES[e.kind], str(data)))
    return out


def asciicast(events: Iterable[SessionEvent], channel: int | None = None) -> str:
    """The asciicast v2 text of one channel of a recorded session."""
    items = list(events)
    header: dict[str, Any] = {"version": 2, "width": 80, "height": 24}
    for e in items:
        if e.kind == "asciicast" and (channel is None or e.data.get("channel") == channel):
            header = dict(e.data.get("header", header))
            channel = e.data.get("channel")
            break
    lines = [json.dumps(header)]
    lines += [json.dumps([t, code, data]) for t, code, data in cast_events(items, channel)]
    return "\n".join(lines) + "\n"
