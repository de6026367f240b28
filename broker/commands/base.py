"""What every ``hoop`` command shares: its consoles, its common options, and running a command on the
broker's object graph (:func:`_with_runtime`, inside :func:`_run`'s event loop).

The names keep their leading underscore: they are the command line's own plumbing, not an API
(:mod:`broker.cli` and its command modules use them, and so does ``hoop replay`` in
:mod:`proxy.ssh.replay`).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.console import Console

from broker.config import HoopConfig, Settings, load_config, load_settings
from broker.runtime import Runtime, build_runtime

__all__ = ["ConfigOpt", "JsonOpt", "_load", "_run", "_say", "_with_runtime", "err", "out"]

T = TypeVar("T")

# emoji off: a fingerprint's ":cd:" (or a name's) printed as an emoji; soft_wrap: a message folded at 80
# columns is two to grep
out = Console(highlight=False, emoji=False)
err = Console(stderr=True, highlight=False, emoji=False, soft_wrap=True)

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="hoop.yaml (default: $HOOP_CONFIG, hoop.yaml)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON")]


def _config_path(path: Path | None) -> Path:
    return path or Path(os.environ.get("HOOP_CONFIG") or "hoop.yaml")


def _load(path: Path | None) -> tuple[HoopConfig, Settings]:
    settings = load_settings()
    return load_config(_config_path(path), environ=settings.environ), settings


def _run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    async def runner() -> T:
        return await coro_fn()

    try:
        import uvloop
    except ImportError:  # pragma: no cover - platforms without uvloop
        return asyncio.run(runner())
    return uvloop.run(runner())


async def _with_runtime(path: Path | None, fn: Callable[[Runtime], Awaitable[T]], *, migrate: bool = True,
                        slack: bool = False) -> T:
    """Run ``fn`` on the broker's object graph. ``slack``: the command changes a grant that Slack must hear
    of (a break-glass, a revocation): with ``SLACK_BOT_TOKEN`` it posts as ``hoop serve`` would, and
    without it the user is told that nothing was posted."""
    config, settings = _load(path)
    rt = build_runtime(config, settings)
    try:
        if slack:
            from bot.app import command_notifier

            notifier = command_notifier(config, settings, rt.service, rt.clock)
            if notifier is not None:
                rt.bus.add(notifier)
            else:
                err.print("[yellow]hoop: SLACK_BOT_TOKEN is not set for this command: nothing is posted to Slack "
                          "(the channel does not hear of this)[/]")
        if migrate:
            await rt.store.migrate()
        return await fn(rt)
    finally:
        await rt.close()


def _say(line: str) -> None:
    """One line of what a command did, whole: a log collector (``hoop serve`` in a container, where stdout
    is no terminal and rich folds at 80 columns) keeps each line as one record, and a fingerprint or a
    command folded in two cannot be compared or pasted. No markup: URLs, hosts and paths are not rich's."""
    out.print(line, markup=False, soft_wrap=True)
