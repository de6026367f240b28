"""The SQL guard: classify PostgreSQL statements and decide block / review / allow.

How this works: the text goes through pglast's ``parse_sql_json`` (the real PostgreSQL
parser; the JSON path is several times faster than pglast's Python node objects) and the
tree is walked once. Every top-level statement becomes a :class:`Statement` (a *unit*) with
a command tag, its :data:`~broker.config.SqlKind` set, and the tables and functions it
mentions anywhere: subqueries, expressions, ``FROM`` functions, column defaults. Statements
that *run* inside another become units of their own so that an allow-rule for the outer
one cannot wave them through: data-modifying CTEs (``WITH x AS (DELETE ...) SELECT``), the
statement under ``EXPLAIN ANALYZE``, ``PREPARE``, ``COPY (query)``, ``CREATE TABLE AS``,
``DECLARE CURSOR``, and the SQL inside a ``DO`` block. Each unit is decided on its own
(:func:`proxy.guard.decide`) and the strictest decision wins.

Policies worth knowing:

- ``DO`` is always kind ``do``. A plpgsql body is parsed (``parse_plpgsql``) and its SQL
  becomes units. ``EXECUTE`` of a constant string is parsed too; ``EXECUTE`` of a computed
  string, or a ``DO`` in another language, cannot be known statically and makes the ``DO``
  unit *unparsed* (``on_unparsed``, block by default) unless a rule is stricter.
- SQL-level ``EXECUTE name`` is kind ``other``: the body was classified when it was
  ``PREPARE``\\ d (a ``PREPARE`` is decided by its inner statement), and a refused
  ``PREPARE`` never reaches the server. Extended-protocol Parse messages are checked too.
- ``EXPLAIN`` without ``ANALYZE`` does not run its statement: kind ``other``, but its tables
  and functions still count. Any ``analyze`` option, whatever its value, counts as ANALYZE.
- Bodies of ``CREATE FUNCTION`` / ``CREATE RULE`` / views / triggers are ``create``+``ddl``;
  their SQL is not run at creation and is not split into units (a *call* of a user-defined
  function is only seen as that function's name).
- ``UPDATE``/``DELETE`` whose ``WHERE`` names no column (``WHERE true``, ``WHERE 1=1``) count
  as without ``WHERE``. Tautologies that name a column (``WHERE id = id``) are not detected.
- Table and function names compare with :func:`proxy.guard.name_matches` (case-insensitive
  globs; unqualified names are matched pessimistically against qualified patterns).
- Built-in rules, decided from the tree (so comments, ``U&""`` spellings and quoting are seen
  through) and stricter than any configured rule: ``hoop-lexer`` blocks SET / ``SET NAMES`` /
  ``set_config`` of ``client_encoding``, ``standard_conforming_strings`` or ``backslash_quote``
  to anything but the value hoop pins (pglast lexes as UTF-8 with
  ``standard_conforming_strings=on``; a server lexing otherwise would run statements the guard
  never saw), RESET / ``TO DEFAULT`` of ``backslash_quote`` (the other two go back to the pin),
  any ``set_config`` whose setting name is not a constant (a column, a parameter, an
  expression: it could name any setting; pg_dump's ``set_config(name, …) FROM pg_settings
  WHERE name = 'x'`` counts as naming ``x``), and any INSERT / UPDATE / DELETE / MERGE of
  ``pg_settings`` (its rule calls ``set_config``). ``read_only`` (on a read-only resource)
  blocks ``READ WRITE`` transactions and session characteristics, and SET / RESET /
  ``set_config`` of a ``*transaction_read_only`` setting other than to a true constant.
- A text holding a backslash is also read as a server with ``standard_conforming_strings=off``
  reads it (:mod:`proxy.escapes`), in case a function changed that setting unseen just before:
  when that reading fails or yields other statements, the text is unparsed (``on_unparsed``)
  unless a rule applied to either reading is stricter. A regex such as ``'^\\d+$'`` only
  changes value, so it passes; ``'C:\\'`` cannot be read so and is unparsed.

Caching: results are cached by exact text (LRU) and, when the text is free of comments,
backslashes, ``&`` and dollar quotes, by its *shape* (the text with string and number
literals replaced by ``?``). In that restricted alphabet a regex tokenises literals exactly as
the PostgreSQL lexer does, so two texts with the same shape parse to the same tree up to
literal values; results that depend on literal values (``DO`` bodies) are never shared by
shape. Any exception while classifying is ``on_unparsed``: the guard fails closed.

Where the code is: this module holds :class:`SqlGuard` (the caches and the decision);
:mod:`proxy.sqlwalk` the walk that turns a parse tree into units, :mod:`proxy.sqlkinds` a
statement's tag and kinds, :mod:`proxy.sqlsettings` the ``hoop-lexer`` / ``read_only`` checks of
settings, :mod:`proxy.sqlshape` the shape. Their public names are also importable from here.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache

from pglast import parser as pg

from broker.config import Guardrails, Masking, Rule
from proxy.copyrows import CopyOut
from proxy.escapes import Unreadable, off_reading
from proxy.guard import Decision, decide, name_matches, strictest, unparsed
from proxy.launder import MASKED_COLUMNS_RULE, Launder, MaskedColumns
from proxy.sqlkinds import Statement, is_write
from proxy.sqlsettings import LEXER_RULE, LEXER_SETTINGS, READ_ONLY_RULE, is_utf8
from proxy.sqlshape import py_shape, shape
from proxy.sqlwalk import _Classifier

__all__ = ["LEXER_RULE", "LEXER_SETTINGS", "READ_ONLY_RULE", "Analysis", "SqlGuard", "Statement", "is_utf8",
           "is_write", "py_shape", "shape"]

_MAX_CACHED_LEN = 8192


@dataclass(frozen=True, slots=True)
class Analysis:
    """The classification of a whole query string and the decision about it."""

    statements: tuple[Statement, ...]
    decision: Decision


def _rule_matches(rule: Rule, st: Statement) -> bool:
    if rule.commands or rule.methods or rule.paths:
        return False
    if rule.statements and st.kinds.isdisjoint(rule.statements):
        return False
    if rule.tables and not any(name_matches(p, t) for p in rule.tables for t in st.tables):
        return False
    return not rule.functions or any(name_matches(p, fn) for p in rule.functions for fn in st.functions)


class SqlGuard:
    """Decides PostgreSQL query strings for one resource's :class:`Guardrails`.

    :meth:`check` is called for every simple-protocol Query and extended-protocol Parse;
    :meth:`analyse` also returns the per-statement classification for recording. Both are
    pure and cached; a guard is cheap to share between sessions of the same resource.
    """

    def __init__(self, guardrails: Guardrails, *, masking: Masking | None = None, cache_size: int = 4096) -> None:
        self.guardrails = guardrails
        masked = MaskedColumns(masking) if masking is not None else None
        #: refuses copying ``table.column``-masked values elsewhere (:mod:`proxy.launder`)
        self.launder = Launder(masked) if masked is not None and masked.any_rule else None
        self._cache_size = cache_size
        self._by_text = lru_cache(maxsize=cache_size)(self._analyse_text)
        self._by_shape: OrderedDict[str, Analysis] = OrderedDict()

    def check(self, sql: str) -> Decision:
        """The decision for ``sql`` (one or more statements; strictest statement wins)."""
        return self.analyse(sql).decision

    def copy_out(self, sql: str) -> CopyOut | None:
        """How to mask the rows of ``sql``, a ``COPY … TO STDOUT`` the guard allowed (None: nothing
        to mask). Such a COPY is allowed only as a query of its own, so its plan is the only one."""
        return next((st.copy_out for st in self.analyse(sql).statements if st.copy_out is not None), None)

    def analyse(self, sql: str) -> Analysis:
        """Classification and decision for ``sql``; classification is empty when unparsed."""
        if len(sql) > _MAX_CACHED_LEN:
            return self._analyse_text(sql)
        return self._by_text(sql)

    def _analyse_text(self, sql: str) -> Analysis:
        key = shape(sql)
        if key is None:
            return self._analyse_uncached(sql)[0]
        hit = self._by_shape.get(key)
        if hit is not None:
            self._by_shape.move_to_end(key)
            return hit
        analysis, literal_dependent = self._analyse_uncached(sql)
        if not literal_dependent:
            self._by_shape[key] = analysis
            if len(self._by_shape) > self._cache_size:
                self._by_shape.popitem(last=False)
        return analysis

    def _analyse_uncached(self, sql: str) -> tuple[Analysis, bool]:
        gr = self.guardrails
        run = _Classifier(launder=self.launder)
        try:
            run.sql(sql, None, 0)
        except pg.ParseError as exc:
            return Analysis((), unparsed(gr, f"syntax error: {exc.args[0] if exc.args else exc}")), False
        except Exception as exc:  # fail closed on anything the walker did not expect
            return Analysis((), unparsed(gr, f"{type(exc).__name__} while classifying")), False
        if len(run.units) > 1:
            for u in run.units:
                if u.copy_out is not None:  # the proxy matches a COPY's rows to their statement by query
                    u.launders = ("COPY TO STDOUT of masked columns must be sent as a query of its own, so that "
                                  "hoop can match its rows to it")
                    u.copy_out = None
        statements = tuple(u.freeze() for u in run.units)
        if not statements:
            return Analysis((), Decision("allow", None, "empty query", "empty query")), False
        decision = strictest(self._decide(st) for st in statements)
        if "\\" in sql:
            decision = self._read_off(sql, statements, decision)
        return Analysis(statements, decision), run.literal_dependent

    def _read_off(self, sql: str, statements: tuple[Statement, ...], decision: Decision) -> Decision:
        """The decision once ``sql`` is also read as a server with ``standard_conforming_strings=off``
        would read it: a setting hoop pins, but which a function could change unseen just before."""
        gr = self.guardrails
        run = _Classifier(off=True, launder=self.launder)
        try:
            if off_reading(sql) is None and all(st.tag != "DO" for st in statements):
                return decision  # read alike, and no body that the server reads again later
            run.sql(sql, None, 0)
        except Exception as exc:  # Unreadable, a syntax error, anything: fail closed
            why = exc.args[0] if isinstance(exc, (Unreadable, pg.ParseError)) and exc.args else type(exc).__name__
            return strictest([decision, unparsed(gr, f"with standard_conforming_strings=off: {why}")])
        off = tuple(u.freeze() for u in run.units)
        if off == statements:  # the same statements: only literal values differ (a regex's \d)
            return decision
        decisions = [decision, unparsed(gr, "standard_conforming_strings=off reads it as other statements")]
        decisions += [self._decide(st) for st in off]
        if gr.read_only and is_write(off):
            decisions.append(Decision("block", READ_ONLY_RULE, "the resource is read-only: "
                                      "standard_conforming_strings=off reads it as a write"))
        return strictest(decisions)

    def _decide(self, st: Statement) -> Decision:
        subject = st.tag
        if st.tables:
            subject += " " + ", ".join(sorted(st.tables)[:3])
        if st.functions:
            subject += " calling " + ", ".join(sorted(st.functions)[:3])
        d = decide(self.guardrails, lambda r: _rule_matches(r, st), subject, index=st.index,
                   kinds=st.kinds, tables=st.tables, functions=st.functions)
        if st.dynamic:
            d = strictest([d, unparsed(self.guardrails, st.dynamic, subject, st.index)])
        builtin: str | None = None
        reason = ""
        if st.lexer:
            builtin, reason = LEXER_RULE, f"{st.lexer}; hoop reads SQL as UTF8 with standard_conforming_strings=on"
        elif st.launders and st.launders.startswith("COPY TO STDOUT"):
            builtin, reason = MASKED_COLUMNS_RULE, st.launders
        elif st.launders:
            builtin, reason = MASKED_COLUMNS_RULE, (f"{st.launders}; hoop masks that column only in query "
                                                    "results, so a copy would leave the rule behind")
        elif st.writes_on and self.guardrails.read_only:
            builtin, reason = READ_ONLY_RULE, f"the resource is read-only: {st.writes_on}"
        if builtin is not None:  # built-in rules name the decision even when a rule also blocks
            d = Decision("block", builtin, f'rule "{builtin}" blocks {subject}: {reason}', subject, st.index,
                         st.kinds, st.tables, st.functions)
        return d
