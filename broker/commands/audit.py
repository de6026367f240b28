"""``hoop audit verify`` and ``hoop audit export``: the hash-chained audit log, checked and written out,
with a progress bar on a terminal for a long log."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from enum import StrEnum
from typing import Annotated

import typer

from broker.audit import Verdict
from broker.commands.base import ConfigOpt, _run, _with_runtime, err, out
from broker.errors import InvalidInput
from broker.runtime import Runtime
from broker.terminal import one_line

__all__ = ["audit_app"]

audit_app = typer.Typer(help="The hash-chained audit log.", no_args_is_help=True)


@audit_app.command("verify")
def audit_verify(config: ConfigOpt = None,
                 anchor: Annotated[str | None, typer.Option(
                     "--anchor", help="ENTRY:HASH from an earlier run, kept outside hoop: that entry must still be "
                                      "there, unchanged (catches removed newest entries)")] = None) -> None:
    """Check the hash chain; report the first broken link. Prints the head (the last entry's number and
    hash): keep it outside hoop and pass it to --anchor later."""
    from broker.audit import parse_anchor, verify

    try:
        kept = parse_anchor(anchor) if anchor is not None else None
    except InvalidInput as exc:
        err.print(one_line(exc.message), markup=False)
        raise typer.Exit(2) from None

    async def go(rt: Runtime) -> Verdict:
        with _progress(await _audit_length(rt), "verifying") as step:
            return await verify(rt.store, anchor=kept, progress=step)

    verdict = _run(lambda: _with_runtime(config, go))
    if verdict.ok:
        seq, digest = verdict.head
        out.print(f"audit log intact: {verdict.checked} entries verified", markup=False)
        out.print(f"head: {seq}:{digest}", markup=False, soft_wrap=True)
        return
    _say_broken(verdict)
    raise typer.Exit(1)


async def _audit_length(rt: Runtime) -> int:
    """The newest audit entry's number, for a progress bar (0: no bar, stderr is not a terminal)."""
    if not err.is_terminal:
        return 0
    async with rt.store.tx() as tx:
        return await tx.audit_last_seq()


@contextlib.contextmanager
def _progress(total: int, what: str) -> Iterator[Callable[[int], None]]:
    """A progress bar on stderr for a walk of a long audit log (``total`` entries; none under 10,000, or
    when stderr is not a terminal): yields the function to call with the entry reached."""
    if total < 10_000:
        yield lambda _: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn(f"{what} the audit log"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=err, transient=True) as bar:
        task = bar.add_task(what, total=total)
        yield lambda seq: bar.update(task, completed=seq)


def _say_broken(verdict: Verdict) -> None:
    err.print("[bold red]audit log broken[/] ", end="")  # the reason may quote edited text: no markup
    err.print(one_line(f"at entry {verdict.broken_at}: {verdict.reason} ({verdict.checked} entries before it "
                       "verified)"), markup=False)


class ExportFormat(StrEnum):
    JSONL = "jsonl"


@audit_app.command("export")
def audit_export(fmt: Annotated[ExportFormat, typer.Option("--format", help="one JSON object per line")]
                 = ExportFormat.JSONL,
                 config: ConfigOpt = None) -> None:
    """Write every audit entry, one JSON object per line, to stdout. The hash chain is checked on
    the way: a broken chain is reported and the exit status is 1 (the entries are still written)."""
    from broker.audit import Chain, export_jsonl

    chain = Chain()

    async def go(rt: Runtime) -> int:
        n = 0
        with _progress(await _audit_length(rt), "exporting") as step:
            async for line in export_jsonl(rt.store, chain):
                sys.stdout.write(line + "\n")
                n += 1
                if n % 1000 == 0:
                    step(n)
        return n

    n = _run(lambda: _with_runtime(config, go))
    err.print(f"{n} entries exported")
    verdict = chain.verdict()
    if not verdict.ok:
        _say_broken(verdict)
        raise typer.Exit(1)
