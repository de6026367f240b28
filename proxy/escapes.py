"""A query as a server with ``standard_conforming_strings=off`` reads it.

How this works. pglast lexes SQL as a server with ``standard_conforming_strings=on``; hoop pins
that setting upstream, but a change the guard cannot see (a function calling ``set_config``)
would make the server read the statements pipelined behind it differently. With the setting
off, a plain ``'...'`` literal is lexed exactly like ``E'...'``: a backslash escapes the next
character, so ``'x\\''; DROP TABLE t; --'`` is one literal to pglast but a literal, a ``DROP``
and a comment to such a server. Only a backslash inside a plain literal can make the two
readings differ: up to it, both lexers take the same steps.

:func:`off_reading` writes ``E`` in front of every plain literal that pglast finds (a space
first, so that an identifier before it, as in ``date'...'``, stays itself) and lexes the result
again. If that second lexing finds no plain literal any more and starts a token at every ``E``
it wrote, it took the same steps as the server lexing the original with the setting off, so the
rewritten text read by pglast *is* the server's reading. Otherwise the reading is not known and
:class:`Unreadable` is raised (the guard then fails closed). The function is pure and only runs
on texts holding a backslash.
"""

from __future__ import annotations

from pglast import parser as pg

__all__ = ["Unreadable", "off_reading"]


class Unreadable(ValueError):
    """The server's reading with ``standard_conforming_strings=off`` cannot be worked out."""


def _plain_literals(tokens: list[pg.Token], sql: str) -> list[int]:
    return [t.start for t in tokens if sql[t.start] == "'"]


def off_reading(sql: str) -> str | None:
    """The text that pglast reads as a server with ``standard_conforming_strings=off`` reads
    ``sql``, or None when both settings read it alike (no plain literal holds a backslash).
    Raises :class:`Unreadable` when that text does not lex in step with the server."""
    if "\\" not in sql:
        return None
    try:
        tokens = pg.scan(sql)
    except pg.ParseError:
        raise Unreadable("does not lex") from None
    starts = _plain_literals(tokens, sql)
    ends = {t.start: t.end for t in tokens}
    if not any("\\" in sql[s : ends[s] + 1] for s in starts):
        return None
    parts: list[str] = []
    last = 0
    for s in starts:
        parts.append(sql[last:s])
        parts.append(" E")
        last = s
    parts.append(sql[last:])
    text = "".join(parts)
    try:
        again = pg.scan(text)
    except pg.ParseError:
        raise Unreadable("does not lex with standard_conforming_strings=off") from None
    written = {s + 2 * k + 1 for k, s in enumerate(starts)}
    if _plain_literals(again, text) or not written <= {t.start for t in again}:
        raise Unreadable("lexes differently with standard_conforming_strings=off")
    return text
