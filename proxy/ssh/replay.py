"""Play a recorded SSH session in the terminal: ``hoop replay <session> [--speed N]``.

:func:`replay` is pure timing over asciicast events with injected ``write`` and ``sleep``,
so it is tested without a terminal or a clock. Pauses longer than ``max_idle`` seconds
(after dividing by the speed) are shortened to it, like ``asciinema play -i``.
:func:`recorded` reads the events from the store a page at a time as they are played (a long
session's recording is never held whole), each page in its own short transaction so none is
open while the replay waits. :func:`replay_command` is the typer command; ``broker/cli.py``
registers it.

The recording is what a remote host printed, and the host may be hostile: its output must not
act on the reviewer's terminal beyond drawing. :class:`ScreenOnly` passes text and the escape
sequences that only draw (colours, cursor movement, erasing, scrolling, the alternate screen,
cursor visibility) and drops the rest: OSC (clipboard writes, hyperlinks, palette, file
transfers), DCS/APC/PM/SOS strings, C1 controls, and every request the terminal would answer
(device status, attributes, window reports): an answer lands in the reader's input, where the
shell reads it once the replay ends. A sequence split between two events is held until it is
whole. At the end it undoes the modes the host left on (alternate screen, hidden cursor,
bracketed paste, application keys).
"""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Annotated

import typer

from broker.errors import InvalidInput, NotFound
from broker.runtime import Runtime
from broker.store import Store
from proxy.ssh.recording import cast_channel, cast_events

__all__ = ["PAGE", "ScreenOnly", "recorded", "replay", "replay_command"]

#: events read from the store at a time while a session is replayed
PAGE = 2000

#: one token: a run of text, an allowed bare control, a whole escape sequence, or another control
_TOKEN = re.compile(
    r"(?P<text>[^\x00-\x08\x0b-\x1f\x7f-\x9f]+|[\r\x08\x07])"
    r"|(?P<csi>\x1b\[(?P<params>[0-?]*)(?P<inter>[ -/]*)(?P<final>[@-~]))"
    r"|(?P<string>\x1b[\]PX^_].*?(?:\x07|\x1b\\))"
    r"|(?P<esc>\x1b(?P<einter>[ -/]*)(?P<efinal>(?![\[\]PX^_])[0-~]))"
    r"|(?P<other>[\x00-\x1f\x7f-\x9f])",
    re.DOTALL)
#: the unfinished start of a sequence at the end of an event
_OPEN = re.compile(r"\x1b(?:\[[0-?]*[ -/]*|[\]PX^_].*|[ -/]*)\Z", re.DOTALL)
#: CSI finals that only draw: SGR, cursor movement, erase, insert/delete, scroll, scroll region
_DRAW = frozenset("mABCDEFGHJKLMPSTX@`adefr")
#: private modes (CSI ? n h / l) that only change what is drawn or how keys are sent
_MODES = frozenset({1, 7, 12, 25, 47, 1047, 1048, 1049, 2004})
#: what ScreenOnly.finish sends for a mode the host left on
_UNDO = {1049: "\x1b[?1049l", 1047: "\x1b[?1047l", 47: "\x1b[?47l", 25: "\x1b[?25h", 2004: "\x1b[?2004l",
         1: "\x1b[?1l"}
#: the longest unfinished sequence held across events; past it, its start is dropped as junk
_MAX_OPEN = 64 * 1024


class ScreenOnly:
    """Filter recorded output down to what draws on a screen (see the module docstring)."""

    def __init__(self) -> None:
        self._open = ""
        self._on: set[int] = set()  # the private modes from _UNDO the host turned on (cursor: turned off)
        self._styled = False  # an SGR passed: finish resets the colours

    def feed(self, data: str) -> str:
        data = self._open + data
        self._open = ""
        out: list[str] = []
        pos, end = 0, len(data)
        while pos < end:
            m = _TOKEN.match(data, pos)
            if m is not None and (m.lastgroup != "other" or data[pos] != "\x1b"):
                pos = m.end()
                kept = self._token(m)
                if kept:
                    out.append(kept)
                continue
            if _OPEN.match(data, pos) is not None and end - pos <= _MAX_OPEN:
                self._open = data[pos:]
                break
            pos += 1  # a lone or broken ESC (or an overlong open sequence): drop the ESC, read on
        return "".join(out)

    def _token(self, m: re.Match[str]) -> str:
        kind = m.lastgroup
        if kind == "text":
            return m.group()
        if kind == "csi":
            return m.group() if self._csi(m.group("params"), m.group("inter"), m.group("final")) else ""
        if kind == "esc":
            inter, final = m.group("einter"), m.group("efinal")
            if (not inter and final in "78DEMc=>") or (inter in ("(", ")") and final in "0B"):
                return m.group()
        return ""  # OSC, DCS, APC, PM, SOS, C1 and other controls, other escapes

    def _csi(self, params: str, inter: str, final: str) -> bool:
        if inter:
            return inter == " " and final == "q" and (not params or params.isdigit())  # cursor shape
        if params.startswith("?"):
            if final in "JK":
                return True
            if final not in "hl":
                return False
            try:
                modes = [int(p) for p in params[1:].split(";")]
            except ValueError:
                return False
            if not all(mode in _MODES for mode in modes):
                return False
            for mode in modes:
                turned_on = final == "h" if mode != 25 else final == "l"
                if turned_on:
                    self._on.add(mode)
                else:
                    self._on.discard(mode)
            return True
        if params and not params.replace(";", "").replace(":", "").isdigit():
            return False  # '<', '=', '>' parameter forms are requests or private settings
        if final == "m":
            self._styled = True
        return final in _DRAW or (final in "hl" and params == "4") or (final in "su" and not params)

    def finish(self) -> str:
        """What undoes the modes the host left on; an unfinished sequence is dropped."""
        self._open = ""
        undo = "".join(_UNDO[mode] for mode in sorted(self._on, reverse=True) if mode in _UNDO)
        reset = "\x1b[0m" if self._styled else ""
        self._on.clear()
        self._styled = False
        return reset + undo


Cast = tuple[float, str, str]


async def recorded(store: Store, session: str, channel: int | None = None, *,
                   page: int = PAGE) -> AsyncIterator[Cast]:
    """The ``(t, code, data)`` events of one channel of an SSH session (the first recorded if None), read
    ``page`` stored events at a time as they are iterated. Raises, before returning, :class:`NotFound` for
    an unknown session or one that recorded nothing on the channel, and :class:`InvalidInput` for a
    session that is not SSH: so nothing is played when there is nothing to play."""
    async with store.tx() as tx:
        row = await tx.get_session(session)
    if row is None:
        raise NotFound(f"no session {session!r}", code="no_session")
    if row.protocol != "ssh":
        raise InvalidInput(f"session {session} is a {row.protocol} session: only SSH sessions have a terminal "
                           f"recording to replay; hoop transcript {session} prints what it did", code="not_ssh")
    after = 0
    while True:  # the first page with something on the channel (pages before it hold other channels)
        async with store.tx() as tx:
            events = await tx.events_after(session, after=after, limit=page)
        if not events:  # (it once said nothing and exited 0, as if it had been played)
            on = f" on channel {channel}" if channel is not None else ""
            raise NotFound(f"session {session} recorded no terminal output{on}; hoop transcript {session} prints "
                           "what it did", code="no_output")
        if channel is None:
            channel = cast_channel(events)
        first = cast_events(events, channel)
        if first:
            return _pages(store, session, channel, first, events[-1].seq, page)
        after = events[-1].seq


async def _pages(store: Store, session: str, channel: int | None, first: list[Cast], after: int,
                 page: int) -> AsyncIterator[Cast]:
    for item in first:
        yield item
    del first  # (held by this frame until the replay ends otherwise)
    while True:
        async with store.tx() as tx:
            events = await tx.events_after(session, after=after, limit=page)
        if not events:
            return
        for item in cast_events(events, channel):
            yield item
        after = events[-1].seq


async def _each(events: Iterable[Cast] | AsyncIterable[Cast]) -> AsyncIterator[Cast]:
    if isinstance(events, AsyncIterable):
        async for item in events:
            yield item
    else:
        for item in events:
            yield item


async def replay(events: Iterable[Cast] | AsyncIterable[Cast], speed: float, write: Callable[[str], None],
                 sleep: Callable[[float], Awaitable[None]], *, max_idle: float = 2.0) -> int:
    """Write the ``"o"`` events at their pace divided by ``speed``, through :class:`ScreenOnly`.
    Returns the number of events written."""
    if speed <= 0:
        raise ValueError("speed must be positive")
    screen = ScreenOnly()
    last = 0.0
    count = 0
    try:
        async for t, code, data in _each(events):
            delay = min(max(t - last, 0.0) / speed, max_idle)
            last = max(last, t)
            if code != "o":
                continue
            if delay > 0:
                await sleep(delay)
            shown = screen.feed(data)
            if shown:
                write(shown)
            count += 1
    finally:
        undo = screen.finish()
        if undo:
            write(undo)
    return count


def replay_command(
    session: Annotated[str, typer.Argument(help="session id (see the transcript or `hoop sessions`)")],
    speed: Annotated[float, typer.Option("--speed", min=0.01, help="playback speed factor")] = 1.0,
    channel: Annotated[int | None, typer.Option(help="channel number (default: the first recorded)")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="hoop.yaml")] = None,
) -> None:
    """Play a recorded SSH session in this terminal (masked, as it was recorded)."""
    from broker.commands.base import _run, _with_runtime

    def write(data: str) -> None:
        sys.stdout.write(data)
        sys.stdout.flush()

    async def go(rt: Runtime) -> int:
        return await replay(await recorded(rt.store, session, channel), speed, write, asyncio.sleep)

    _run(lambda: _with_runtime(config, go))
