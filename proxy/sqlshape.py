"""The shape of a query string: its text with string and number literals replaced by ``?``.

How this works: :mod:`proxy.sqlguard` caches its results by shape as well as by exact text.
A shape is given only for a text free of comments, backslashes, ``&`` and dollar quotes; in
that restricted alphabet a regex tokenises literals exactly as the PostgreSQL lexer does, so
two texts with the same shape parse to the same tree up to literal values. :func:`shape` runs
in C (:mod:`proxy.pg._wire`) when that is built, :func:`py_shape` is its pure-Python twin.
"""

from __future__ import annotations

import re

try:
    from proxy.pg import _wire
except ImportError:  # not built: the pure-Python shape runs
    _wire = None  # type: ignore[assignment]

__all__ = ["py_shape", "shape"]


_UNSAFE_FOR_SHAPE = re.compile(r"--|/\*|[\\&]|\$(?!\d)")
_LITERAL = re.compile(r"\"[^\"]*\"|'[^']*'|(?<![\w$.])\d+(?:\.\d+)?(?:[eE][+-]?\d+)?(?![\w.$])")


def _literal_to_mark(m: re.Match[str]) -> str:
    text = m.group()
    return text if text[0] == '"' else "?"


#: ``_LITERAL`` without its quoted-identifier branch, which cannot match a text without ``"``:
#: every match becomes ``?``, so ``sub`` takes a plain replacement (no Python call per literal)
_LITERAL_NO_IDENT = re.compile(r"'[^']*'|(?<![\w$.])\d+(?:\.\d+)?(?:[eE][+-]?\d+)?(?![\w.$])")


def shape(sql: str) -> str | None:
    """The text with literals replaced by ``?``, or ``None`` when that is not provably safe.

    Runs in C (:mod:`proxy.pg._wire`) for an ASCII text when it is built; :func:`py_shape`
    is its twin, which the tests check on fuzzed input."""
    if _wire is not None and sql.isascii():
        return _wire.shape(sql)
    return py_shape(sql)


def py_shape(sql: str) -> str | None:
    """The pure-Python :func:`shape`: the regular expressions above."""
    if _UNSAFE_FOR_SHAPE.search(sql):
        return None
    if '"' not in sql:
        return _LITERAL_NO_IDENT.sub("?", sql)
    return _LITERAL.sub(_literal_to_mark, sql)
