"""The read-only commands: ``hoop requests``, ``grants`` and ``sessions`` (newest first, at most
``--limit``), and ``hoop transcript``. :func:`register` adds them to the ``hoop`` app."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer

from broker.commands.base import ConfigOpt, JsonOpt, _run, _with_runtime, err, out
from broker.model import GrantStatus, RequestStatus
from broker.runtime import Runtime

__all__ = ["register"]

LimitOpt = Annotated[int, typer.Option("--limit", min=1, max=100_000, help="show at most this many, newest first")]


def _newest(rows: list[Any], limit: int, what: str) -> list[Any]:
    """The first ``limit`` of ``rows`` (read with one more), saying on stderr when more were left out."""
    if len(rows) > limit:
        err.print(f"hoop: showing the newest {limit} {what}; there are more (--limit N shows more)", markup=False)
    return rows[:limit]


def requests(status: Annotated[RequestStatus | None, typer.Option(help="only requests in this state")] = None,
             limit: LimitOpt = 200, as_json: JsonOpt = False, config: ConfigOpt = None) -> None:
    """List access requests."""
    from broker.render import request_row, requests_table

    async def go(rt: Runtime) -> list[dict[str, Any]]:
        async with rt.store.tx() as tx:
            rows = await tx.list_requests(status=status, limit=limit + 1)
        return [request_row(r) for r in _newest(rows, limit, "requests")]

    rows = _run(lambda: _with_runtime(config, go))
    if as_json:
        sys.stdout.write(json.dumps(rows) + "\n")
    else:
        out.print(requests_table(rows))


def grants(status: Annotated[GrantStatus | None, typer.Option(help="only grants in this state")] = None,
           limit: LimitOpt = 200, as_json: JsonOpt = False, config: ConfigOpt = None) -> None:
    """List grants (never their secrets)."""
    from broker.render import grant_row, grants_table

    async def go(rt: Runtime) -> list[dict[str, Any]]:
        async with rt.store.tx() as tx:
            rows = await tx.list_grants(status=status, limit=limit + 1)
        now = rt.clock.now()
        return [grant_row(g, now) for g in _newest(rows, limit, "grants")]

    rows = _run(lambda: _with_runtime(config, go))
    if as_json:
        sys.stdout.write(json.dumps(rows) + "\n")
    else:
        out.print(grants_table(rows))


def sessions(resource: Annotated[str | None, typer.Option(help="only this resource")] = None,
             live: Annotated[bool, typer.Option("--live", help="only open sessions")] = False,
             limit: LimitOpt = 200, as_json: JsonOpt = False, config: ConfigOpt = None) -> None:
    """List proxy sessions (newest first) with who, from where, and why they closed."""
    from broker.model import SessionStatus
    from broker.render import session_row, sessions_table

    async def go(rt: Runtime) -> list[dict[str, Any]]:
        async with rt.store.tx() as tx:
            rows = await tx.list_sessions(status=SessionStatus.OPEN if live else None, resource=resource,
                                          limit=limit + 1)
        return [session_row(s) for s in _newest(rows, limit, "sessions")]

    rows = _run(lambda: _with_runtime(config, go))
    if as_json:
        sys.stdout.write(json.dumps(rows) + "\n")
    else:
        out.print(sessions_table(rows))


def transcript(session: Annotated[str, typer.Argument(help="session id")],
               full: Annotated[bool, typer.Option("--full", help="every event, not capped at transcripts.max_bytes")]
               = False,
               config: ConfigOpt = None) -> None:
    """Print a session's masked transcript (capped at transcripts.max_bytes, the cut stated; --full: all of it,
    printed as it is read)."""
    from broker.recap import full_session_transcript, session_transcript
    from broker.transcript import Counts

    async def go(rt: Runtime) -> str:
        if not full:
            _, t = await session_transcript(rt.service, session)
            sys.stdout.write(t.text)
            return t.summary
        counts = Counts()
        async for text in full_session_transcript(rt.service, session, counts):
            sys.stdout.write(text)
            sys.stdout.flush()  # a page at a time, to a pager or a file, not at the end
        return counts.summary()

    err.print(_run(lambda: _with_runtime(config, go)), markup=False)


def register(app: typer.Typer) -> None:
    """Add the commands to ``app``, in the order ``hoop --help`` lists them."""
    for command in (requests, grants, sessions, transcript):
        app.command()(command)
