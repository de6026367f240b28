"""Masking rules as the SQL guard asks about them: could this rule mask that column?

How this works: a ``table.column`` rule is an :mod:`fnmatch` glob that
:class:`~proxy.mask.Masker` matches against ``column``, ``schema.table.column`` and
``table.column`` once the table OID is resolved. The guard sees names as SQL writes them,
often without a schema, and sometimes without a table or a column (``*``, ``NEW.col``), so it
asks whether some name the server could resolve to matches the glob: two globs intersect
(:func:`_intersect`, a small product automaton), with ``+`` standing for an unknown identifier.
"""

from __future__ import annotations

import fnmatch
import re

from broker.config import Masking, Strategy

__all__ = ["CLEAN", "MaskedColumns", "Table", "Taint"]

#: where a value came from: ("users.ssn", the pattern of the column rule that masks it)
Taint = frozenset[tuple[str, str]]
CLEAN: Taint = frozenset()
#: (schema or None when unqualified, table), lower-case
Table = tuple[str | None, str]
_Tok = tuple[str, str]  # ("*", ""), ("?", ""), ("[", set body), ("c", one character), ("+", "")
_STAR: tuple[_Tok, ...] = (("*", ""),)
_NAME: tuple[_Tok, ...] = (("+", ""),)  # an unknown identifier: any run of characters but "."
_RUNS = frozenset({"*", "+"})


def _tokens(pattern: str) -> tuple[_Tok, ...]:
    out: list[_Tok] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c in "*?":
            if not (c == "*" and out and out[-1][0] == "*"):
                out.append((c, ""))
        elif c == "[" and (j := pattern.find("]", i + 2 if pattern[i + 1:i + 2] in ("!", "]") else i + 1)) > 0:
            out.append(("[", pattern[i + 1:j]))
            i = j
        else:
            out.append(("c", c.lower()))
        i += 1
    return tuple(out)


def _literal(text: str) -> tuple[_Tok, ...]:
    return tuple(("c", c) for c in text.lower())


def _one(a: _Tok, b: _Tok) -> bool:
    """Whether one character can match both single-character tokens (sets: assumed to overlap)."""
    if a[0] == "c" and b[0] == "c":
        return a[1] == b[1]
    if a[0] == "[" and b[0] == "c":
        a, b = b, a
    if a[0] == "c" and b[0] == "[":
        body = b[1]
        regex = "[" + ("^" + body[1:] if body.startswith("!") else body) + "]"
        try:
            return re.fullmatch(regex, a[1], re.IGNORECASE) is not None
        except re.error:
            return True
    return True


def _absorbs(run: _Tok, tok: _Tok) -> bool:
    """Whether a run token (``*`` any characters, ``+`` any but ".") can take in ``tok``'s characters."""
    return run[0] == "*" or tok != ("c", ".")


def _intersect(a: tuple[_Tok, ...], b: tuple[_Tok, ...]) -> bool:
    """Whether some string matches both globs (``*`` spans dots, as in :mod:`fnmatch`)."""
    seen: set[tuple[int, int]] = set()
    todo = [(0, 0)]
    while todo:
        i, j = todo.pop()
        if (i, j) in seen:
            continue
        seen.add((i, j))
        if i == len(a) and j == len(b):
            return True
        if i < len(a) and a[i][0] in _RUNS:
            todo.append((i + 1, j))
            if j < len(b) and _absorbs(a[i], b[j]):
                todo.append((i, j + 1))
        if j < len(b) and b[j][0] in _RUNS:
            todo.append((i, j + 1))
            if i < len(a) and _absorbs(b[j], a[i]):
                todo.append((i + 1, j))
        if i < len(a) and j < len(b) and a[i][0] not in _RUNS and b[j][0] not in _RUNS and _one(a[i], b[j]):
            todo.append((i + 1, j + 1))
    return False


class MaskedColumns:
    """The ``table.column`` rules of one resource's :class:`Masking`, asked about names as SQL
    writes them. Empty (false) when masking is off or no rule names a table."""

    def __init__(self, masking: Masking) -> None:
        rules = masking.columns if masking.enabled else []
        self._all = tuple((re.compile(fnmatch.translate(r.match), re.IGNORECASE), _tokens(r.match), r.strategy)
                          for r in rules)
        self._dotted = tuple((r.match, _tokens(r.match)) for r in rules if "." in r.match)
        #: rules with no table (``ssn``): they follow a result column's name, wherever it comes from
        self._bare = tuple((re.compile(fnmatch.translate(r.match), re.IGNORECASE), r.match)
                           for r in rules if "." not in r.match)
        self.strategy: dict[str, Strategy] = {r.match: r.strategy for r in reversed(rules)}
        self._reads: dict[tuple[Table | None, str | None], Taint] = {}

    def __bool__(self) -> bool:
        return bool(self._dotted)

    @property
    def any_rule(self) -> bool:
        """Whether any column rule exists, with a table or without."""
        return bool(self._dotted or self._bare)

    def by_name(self, column: str | None) -> Taint:
        """The rules without a table that mask a column named ``column`` (None: a name not known)."""
        shown = f"a column {column}" if column is not None else "columns hoop cannot name"
        return frozenset((shown, p) for regex, p in self._bare if column is None or regex.match(column))

    def reads(self, table: Table | None, column: str | None) -> Taint:
        """The rules that could mask ``column`` (None: any) of ``table`` (None: any table)."""
        key = (table, column)
        hit = self._reads.get(key)
        if hit is not None:
            return hit
        col = _literal(column) if column is not None else _NAME
        dot = (("c", "."),)
        if table is None:
            names = [_NAME + dot + col, _NAME + dot + _NAME + dot + col]
        else:
            schema, name = table
            names = [_literal(name) + dot + col,
                     (_literal(schema) if schema else _NAME) + dot + _literal(name) + dot + col]
        shown = f"{'.'.join(p for p in table if p)}.{column or '*'}" if table else f"a column {column}"
        found = frozenset((shown, p) for p, toks in self._dotted if any(_intersect(toks, n) for n in names))
        if len(self._reads) < 4096:
            self._reads[key] = found
        return found

    def in_schema(self, schema: str) -> Taint:
        """The rules that could mask a column of some table in ``schema`` by naming the schema."""
        name = (*_literal(schema), ("c", "."), *_NAME, ("c", "."), *_NAME)
        anywhere = (*_NAME, ("c", "."), *_NAME)  # what the rule also matches without the schema
        return frozenset((f"{schema.lower()}.*", p) for p, toks in self._dotted
                         if _intersect(toks, name) and not _intersect(toks, anywhere))

    def keeps(self, table: Table, column: str, taint: Taint) -> bool:
        """Whether values of ``taint`` written to ``table.column`` stay masked at least as strictly."""
        schema, name = table
        sure = [column, f"{name}.{column}"] + ([f"{schema}.{name}.{column}"] if schema else [])
        maybe = (*_NAME, ("c", "."), *_literal(f"{name}.{column}"))
        strategies: set[Strategy] = set()
        for regex, toks, strategy in self._all:
            if any(regex.match(s) for s in sure):
                strategies.add(strategy)
                break
            if schema is None and _intersect(toks, maybe):
                strategies.add(strategy)  # a rule for another schema's table may come first
        else:
            return False
        if strategies == {"redact"}:
            return True
        return len(strategies | {self.strategy[p] for _, p in taint}) == 1
