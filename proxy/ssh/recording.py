"""SSH sessions as asciicast v2, recorded masked through the session hub.

Each channel with a terminal (or an exec) is recorded as one asciicast stream: a header
event ``kind="asciicast"`` with ``{"channel", "header": {"version": 2, "width", "height",
"timestamp", "env": {"TERM", ...}, "command"?}}`` (``env``: the variables passed to the
host), then ``kind="output"`` events ``{"channel", "t", "data"}`` (asciicast ``"o"``) and
``kind="input"`` events (asciicast ``"i"``: the command lines the guard checked, never raw
keystrokes, so no-echo password prompts are not recorded key by key), and
``kind="resize"`` ``{"channel", "t", "size": "COLSxROWS"}``. Callers pass bytes that are
already masked; this module never sees clear output.

:func:`asciicast` turns stored events back into the text of an asciicast v2 file (one JSON
header line, then ``[t, code, data]`` lines), and :func:`cast_events` into
``(t, code, data)`` tuples for :mod:`proxy.ssh.replay` (which reads them a page at a time, the
channel fixed by :func:`cast_channel` on the first page that has one).
"""

from __future__ import annotations

import codecs
import json
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from broker.model import SessionEvent
from proxy.contracts import Live

__all__ = ["Recorder", "asciicast", "cast_channel", "cast_events"]

_CODES = {"output": "o", "input": "i", "resize": "r"}


class Recorder:
    """Records one channel of one session. ``now`` is a monotonic seconds source (injectable).

    Output is decoded with one incremental UTF-8 decoder per channel, so a character split
    across two chunks is recorded whole. With ``defer`` (``loop.call_soon`` in the proxy),
    the output of one event-loop iteration is merged into one ``output`` event timed at its
    first chunk: bulk output costs one event per iteration instead of one per SSH packet.
    Pending output is recorded before any input or resize event, and by :meth:`flush`.
    Without ``defer`` every chunk is recorded at once.
    """

    #: Merged output is recorded at once past this many bytes.
    MAX_MERGE = 1 << 20

    def __init__(self, session: Live, channel: int, *, now: Callable[[], float] = time.monotonic,
                 defer: Callable[[Callable[[], None]], object] | None = None) -> None:
        self._session = session
        self._channel = channel
        self._now = now
        self._start = now()
        self._defer = defer
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._parts: list[bytes] = []
        self._size = 0
        self._at = 0.0

    def header(self, width: int, height: int, term: str | None, timestamp: int,
               command: str | None = None, env: Mapping[str, str] | None = None) -> None:
        """The stream's header; ``env``: the (masked) environment variables passed to the host."""
        env = env or {}
        header: dict[str, Any] = {"version": 2, "width": width or 80, "height": height or 24,
                                  "timestamp": timestamp, "env": {**env, "TERM": term or env.get("TERM", "")}}
        if command is not None:
            header["command"] = command
        self._session.record("asciicast", {"channel": self._channel, "header": header})

    def _t(self) -> float:
        return round(self._now() - self._start, 6)

    def output(self, data: bytes) -> None:
        """Output as the client saw it (already masked)."""
        if not data:
            return
        if not self._parts:
            self._at = self._t()
            if self._defer is not None:
                self._defer(self.flush)
        self._parts.append(data)
        self._size += len(data)
        if self._defer is None or self._size >= self.MAX_MERGE:
            self.flush()

    def flush(self, *, final: bool = False) -> None:
        """Record the pending output now (``final``: the stream ended, decode what is left)."""
        parts, self._parts, self._size = self._parts, [], 0
        data = b"".join(parts) if len(parts) != 1 else parts[0]
        text = self._decoder.decode(data, final)
        if text:
            self._session.record("output", {"channel": self._channel, "t": self._at, "data": text})

    def input(self, text: str) -> None:
        if self._parts:
            self.flush()
        self._session.record("input", {"channel": self._channel, "t": self._t(), "data": text})

    def resize(self, width: int, height: int) -> None:
        if self._parts:
            self.flush()
        self._session.record("resize", {"channel": self._channel, "t": self._t(), "size": f"{width}x{height}"})


def cast_channel(events: Iterable[SessionEvent]) -> int | None:
    """The channel of the first asciicast event among ``events`` (None: there is none)."""
    return next((e.data.get("channel") for e in events if e.kind in _CODES), None)


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
