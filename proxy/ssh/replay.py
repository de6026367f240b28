"""Play a recorded SSH session in the terminal: ``hoop replay <session> [--speed N]``.

:func:`replay` is pure timing over asciicast events with injected ``write`` and ``sleep``,
so it is tested without a terminal or a clock. Pauses longer than ``max_idle`` seconds
(after dividing by the speed) are shortened to it, like ``asciinema play -i``.
:func:`replay_command` is the typer command; ``broker/cli.py`` registers it.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Annotated

import typer

from broker.runtime import Runtime
from proxy.ssh.recording import cast_events

__all__ = ["replay", "replay_command"]


async def replay(events: Iterable[tuple[float, str, str]], speed: float, write: Callable[[str], None],
                 sleep: Callable[[float], Awaitable[None]], *, max_idle: float = 2.0) -> int:
    """Write the ``"o"`` events at their pace divided by ``speed``. Returns the number written."""
    if speed <= 0:
        raise ValueError("speed must be positive")
    last = 0.0
    count = 0
    for t, code, data in events:
        delay = min(max(t - last, 0.0) / speed, max_idle)
        last = max(last, t)
        if code != "o":
            continue
        if delay > 0:
            await sleep(delay)
        write(data)
        count += 1
    return count


def replay_command(
    session: Annotated[str, typer.Argument(help="session id (see the transcript or `hoop sessions`)")],
    speed: Annotated[float, typer.Option("--speed", min=0.01, help="playback speed factor")] = 1.0,
    channel: Annotated[int | None, typer.Option(help="channel number (default: the first recorded)")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="hoop.yaml")] = None,
) -> None:
    """Play a recorded SSH session in this terminal (masked, as it was recorded)."""
    from broker.cli import _run, _with_runtime
    from broker.errors import NotFound

    async def go(rt: Runtime) -> list[tuple[float, str, str]]:
        async with rt.store.tx() as tx:
            if await tx.get_session(session) is None:
                raise NotFound(f"no session {session!r}", code="no_session")
            return cast_events(await tx.events(session), channel)

    events = _run(lambda: _with_runtime(config, go))

    def write(data: str) -> None:
        sys.stdout.write(data)
        sys.stdout.flush()

    _run(lambda: replay(events, speed, write, asyncio.sleep))
