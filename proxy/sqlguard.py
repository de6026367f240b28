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
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from pglast import parser as pg

from broker.config import Guardrails, Masking, Rule, SqlKind
from proxy.copyrows import CopyOut
from proxy.escapes import Unreadable, off_reading
from proxy.guard import Decision, decide, name_matches, strictest, unparsed
from proxy.launder import MASKED_COLUMNS_RULE, Launder, MaskedColumns

try:
    from proxy.pg import _wire
except ImportError:  # not built: the pure-Python shape runs
    _wire = None  # type: ignore[assignment]

__all__ = ["LEXER_RULE", "LEXER_SETTINGS", "READ_ONLY_RULE", "Analysis", "SqlGuard", "Statement", "is_utf8",
           "is_write", "py_shape", "shape"]

_MAX_DEPTH = 4
_MAX_CACHED_LEN = 8192

_WRITE_KINDS: frozenset[SqlKind] = frozenset(
    {"write", "insert", "update", "delete", "merge", "truncate", "ddl", "create", "alter", "drop",
     "grant", "revoke", "copy_from_program", "copy_to_program", "copy_to_file", "copy_from_file",
     "do", "call", "lock", "vacuum"}
)


#: the built-in rule that refuses changes to how the server reads SQL text
LEXER_RULE = "hoop-lexer"
#: the built-in rule that refuses turning writes back on for a read-only resource
READ_ONLY_RULE = "read_only"
#: settings that change how the server lexes a query string; pglast always lexes as UTF-8 with
#: ``standard_conforming_strings=on``, and hoop pins the server to the same
LEXER_SETTINGS = frozenset({"client_encoding", "standard_conforming_strings", "backslash_quote"})
#: lexer settings hoop pins at login: RESET (or SET ... TO DEFAULT) goes back to the pinned value
_PINNED_SETTINGS = frozenset({"client_encoding", "standard_conforming_strings"})
_TRUE = frozenset({"on", "true", "yes", "1", "t", "y"})


def is_utf8(encoding: str) -> bool:
    """Whether an encoding name means UTF-8 (PostgreSQL ignores case and punctuation in it)."""
    return re.sub(r"[^0-9a-z]", "", encoding.lower()) in ("utf8", "unicode")


def _safe_lexer_value(name: str, value: str | None) -> bool:
    """Whether setting ``name`` to the constant ``value`` keeps the value hoop pins."""
    if value is None:
        return False
    if name == "client_encoding":
        return is_utf8(value)
    return name == "standard_conforming_strings" and value.lower() in _TRUE


@dataclass(frozen=True, slots=True)
class Statement:
    """One classified unit. ``index`` is the top-level statement it belongs to (0-based).

    ``dynamic`` is set when part of the unit cannot be known statically (computed
    ``EXECUTE`` in a ``DO`` block); such a unit is decided as unparsed. ``lexer`` says how the
    unit would change the way the server reads SQL (refused everywhere), ``writes_on`` how it
    would turn writing back on (refused on a read-only resource), ``launders`` how it would
    copy a column a ``table.column`` masking rule covers out of that rule (refused).
    ``copy_out`` is how the proxy masks the rows of a ``COPY … TO STDOUT`` field by field.
    """

    tag: str
    kinds: frozenset[SqlKind]
    tables: frozenset[str]
    functions: frozenset[str]
    index: int
    dynamic: str | None = None
    lexer: str | None = None
    writes_on: str | None = None
    launders: str | None = None
    copy_out: CopyOut | None = None


@dataclass(frozen=True, slots=True)
class Analysis:
    """The classification of a whole query string and the decision about it."""

    statements: tuple[Statement, ...]
    decision: Decision


def is_write(statements: tuple[Statement, ...]) -> bool:
    """Whether any unit may change data, schema, privileges or the server (``do``/``call`` count)."""
    return any(not s.kinds.isdisjoint(_WRITE_KINDS) or s.dynamic for s in statements)


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


class _Unparsable(Exception):
    pass


class _Unit:
    __slots__ = ("copy_out", "dynamic", "functions", "index", "kinds", "launders", "lexer", "tables", "tag",
                 "writes_on")

    def __init__(self, tag: str, kinds: set[SqlKind], index: int) -> None:
        self.tag = tag
        self.kinds = kinds
        self.index = index
        self.tables: set[str] = set()
        self.functions: set[str] = set()
        self.dynamic: str | None = None
        self.lexer: str | None = None
        self.writes_on: str | None = None
        self.launders: str | None = None
        self.copy_out: CopyOut | None = None

    def freeze(self) -> Statement:
        return Statement(self.tag, frozenset(self.kinds), frozenset(self.tables), frozenset(self.functions),
                         self.index, self.dynamic, self.lexer, self.writes_on, self.launders, self.copy_out)


_FIXED: dict[str, tuple[str, frozenset[SqlKind]]] = {
    "InsertStmt": ("INSERT", frozenset({"insert", "write"})),
    "TruncateStmt": ("TRUNCATE", frozenset({"truncate", "write"})),
    "DoStmt": ("DO", frozenset({"do"})),
    "CallStmt": ("CALL", frozenset({"call"})),
    "VariableSetStmt": ("SET", frozenset({"set"})),
    "ConstraintsSetStmt": ("SET CONSTRAINTS", frozenset({"set"})),
    "AlterSystemStmt": ("ALTER SYSTEM", frozenset({"alter", "ddl", "set"})),
    "LockStmt": ("LOCK", frozenset({"lock"})),
    "VacuumStmt": ("VACUUM", frozenset({"vacuum"})),
    "ListenStmt": ("LISTEN", frozenset({"listen"})),
    "UnlistenStmt": ("UNLISTEN", frozenset({"listen"})),
    "NotifyStmt": ("NOTIFY", frozenset({"listen"})),
    "CommentStmt": ("COMMENT", frozenset({"ddl"})),
    "SecLabelStmt": ("SECURITY LABEL", frozenset({"ddl"})),
    "IndexStmt": ("CREATE INDEX", frozenset({"create", "ddl"})),
    "ViewStmt": ("CREATE VIEW", frozenset({"create", "ddl"})),
    "RuleStmt": ("CREATE RULE", frozenset({"create", "ddl"})),
    "DefineStmt": ("CREATE", frozenset({"create", "ddl"})),
    "CompositeTypeStmt": ("CREATE TYPE", frozenset({"create", "ddl"})),
    "ImportForeignSchemaStmt": ("IMPORT FOREIGN SCHEMA", frozenset({"create", "ddl"})),
    "RenameStmt": ("RENAME", frozenset({"alter", "ddl"})),
    "ReassignOwnedStmt": ("REASSIGN OWNED", frozenset({"alter", "ddl"})),
    "CreateTableAsStmt": ("CREATE TABLE AS", frozenset({"create", "ddl", "write"})),
    "RefreshMatViewStmt": ("REFRESH MATERIALIZED VIEW", frozenset({"write"})),
    "VariableShowStmt": ("SHOW", frozenset({"other"})),
    "ExecuteStmt": ("EXECUTE", frozenset({"other"})),
    "PrepareStmt": ("PREPARE", frozenset({"other"})),
    "ExplainStmt": ("EXPLAIN", frozenset({"other"})),
    "TransactionStmt": ("TRANSACTION", frozenset({"other"})),
}
# statements that run where they appear nested (data-modifying CTEs)
_NESTED_DML = frozenset({"InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"})
# statements whose nested SQL is stored, not run
_INERT_BODIES = frozenset({"RuleStmt", "CreateFunctionStmt", "ViewStmt", "CreateTrigStmt"})
# statements whose ``query`` field runs as a statement of its own
_RUNS_QUERY = frozenset({"PrepareStmt", "CopyStmt", "CreateTableAsStmt", "DeclareCursorStmt"})
_TABLE_OBJECTS = frozenset({"OBJECT_TABLE", "OBJECT_VIEW", "OBJECT_MATVIEW", "OBJECT_FOREIGN_TABLE",
                            "OBJECT_SEQUENCE", "OBJECT_INDEX"})
_CAMEL = re.compile(r"(?<!^)(?=[A-Z])")
_MERGE_KIND: dict[str, SqlKind] = {"CMD_UPDATE": "update", "CMD_DELETE": "delete", "CMD_INSERT": "insert"}
_ASSIGN_TARGET = re.compile(r'\s*(?:"[^"]*"|[^:="])*?:?=')


def _names(items: list[Any]) -> str:
    return ".".join(i["String"]["sval"] for i in items if "String" in i)


def _const(node: Any) -> str | None:
    """The text of a constant argument (string, number, boolean, or one of these cast), else None."""
    if not isinstance(node, dict):
        return None
    if "TypeCast" in node:
        node = node["TypeCast"].get("arg")
        if not isinstance(node, dict):
            return None
    c = node.get("A_Const")
    if c is None:
        return None
    if "sval" in c:
        return str(c["sval"].get("sval", ""))
    if "ival" in c:
        return str(c["ival"].get("ival", 0))  # the JSON leaves out a zero
    if "boolval" in c:
        return "true" if c["boolval"].get("boolval") else "false"
    return None


def _read_write_option(options: Any) -> bool:
    """Whether transaction options (``BEGIN``/``SET TRANSACTION``/``SESSION CHARACTERISTICS``) say READ WRITE."""
    for opt in options or ():
        d = opt.get("DefElem", {})
        if d.get("defname") == "transaction_read_only" and (_const(d.get("arg")) or "").lower() not in _TRUE:
            return True
    return False


def _setting_change(unit: _Unit, name: str, value: str | None, how: str) -> None:
    """Note on ``unit`` what setting ``name`` to ``value`` (None: not a known constant) would do."""
    if name in LEXER_SETTINGS and not _safe_lexer_value(name, value):
        unit.lexer = f"{how} of {name} would change how the server reads SQL"
    elif name.endswith("transaction_read_only") and (value is None or value.lower() not in _TRUE):
        unit.writes_on = f"{how} of {name} could turn writing back on"


def _is_pg_settings(relation: Any) -> bool:
    """Whether a statement's target relation is (or, unqualified, may be) ``pg_catalog.pg_settings``."""
    return (isinstance(relation, dict) and relation.get("relname") == "pg_settings"
            and relation.get("schemaname") in (None, "pg_catalog"))


def _settings_row_calls(select: dict[str, Any]) -> dict[int, tuple[dict[str, Any], str]]:
    """``SELECT set_config(name, …) FROM pg_settings WHERE name = 'setting'`` (pg_dump sends it):
    each such call in the target list (by ``id``) and the setting it names.

    Only that exact shape: one unaliased or aliased ``pg_settings``, a ``WHERE`` that is a
    single ``name = 'constant'``, and the call's first argument the bare ``name`` column; anything
    else is left to the computed-name refusal. (A user-defined ``=`` earlier in ``search_path``
    could match other rows: the settings that matter are then caught by the server's
    ParameterStatus reports, see :func:`proxy.pg.replies.unsafe_parameter`.)
    """
    frm: list[dict[str, Any]] = select.get("fromClause") or []
    if len(frm) != 1 or not _is_pg_settings(frm[0].get("RangeVar")):
        return {}
    alias = str(frm[0]["RangeVar"].get("alias", {}).get("aliasname", "pg_settings"))
    where = select.get("whereClause", {}).get("A_Expr", {})
    if where.get("kind") != "AEXPR_OP" or _names(where.get("name", ())) != "=":
        return {}
    sides = (where.get("lexpr"), where.get("rexpr"))
    setting = next((c for c in map(_string_const, sides) if c is not None), None)
    if setting is None or not any(_is_name_column(side, alias) for side in sides):
        return {}
    calls = {}
    for target in select.get("targetList") or ():
        call = target.get("ResTarget", {}).get("val", {}).get("FuncCall")
        if (call is not None and _names(call.get("funcname", ())).lower() in ("set_config", "pg_catalog.set_config")
                and call.get("args") and _is_name_column(call["args"][0], alias)):
            calls[id(call)] = (call, setting)
    return calls


def _string_const(node: Any) -> str | None:
    c = node.get("A_Const") if isinstance(node, dict) else None
    return str(c["sval"].get("sval", "")) if isinstance(c, dict) and "sval" in c else None


def _is_name_column(node: Any, alias: str) -> bool:
    fields = node.get("ColumnRef", {}).get("fields") if isinstance(node, dict) else None
    return fields is not None and _names(fields) in ("name", f"{alias}.name") and len(fields) == len(
        _names(fields).split("."))


def _mentions_column(obj: Any) -> bool:
    if isinstance(obj, dict):
        if "ColumnRef" in obj or "CurrentOfExpr" in obj:
            return True
        return any(_mentions_column(v) for v in obj.values())
    if isinstance(obj, list):
        return any(_mentions_column(v) for v in obj)
    return False


def _kinds_and_tag(typ: str, f: dict[str, Any]) -> tuple[str, set[SqlKind]]:
    fixed = _FIXED.get(typ)
    if fixed is not None:
        return fixed[0], set(fixed[1])
    if typ == "SelectStmt":
        if f.get("intoClause"):
            return "SELECT INTO", {"create", "ddl", "write"}
        return "SELECT", {"select", "lock"} if f.get("lockingClause") else {"select"}
    if typ in ("UpdateStmt", "DeleteStmt"):
        verb: SqlKind = "update" if typ == "UpdateStmt" else "delete"
        kinds: set[SqlKind] = {verb, "write"}
        if not _mentions_column(f.get("whereClause")):
            kinds.add("update_without_where" if verb == "update" else "delete_without_where")
        return verb.upper(), kinds
    if typ == "MergeStmt":
        kinds = {"merge", "write"}
        for clause in f.get("mergeWhenClauses", ()):
            kind = _MERGE_KIND.get(clause.get("MergeWhenClause", {}).get("commandType", ""))
            if kind is not None:
                kinds.add(kind)
        return "MERGE", kinds
    if typ == "CopyStmt":
        kinds = {"copy"}
        frm = bool(f.get("is_from"))
        if frm:
            kinds.add("write")
        if f.get("is_program"):
            kinds.add("copy_from_program" if frm else "copy_to_program")
        elif f.get("filename") is not None:
            kinds.add("copy_from_file" if frm else "copy_to_file")
        return "COPY", kinds
    if typ in ("GrantStmt", "GrantRoleStmt"):
        return ("GRANT", {"grant"}) if f.get("is_grant") else ("REVOKE", {"revoke"})
    if typ == "DropStmt":
        obj = str(f.get("removeType", "OBJECT_")).removeprefix("OBJECT_").replace("_", " ")
        return f"DROP {obj}", {"drop", "ddl"}
    words = _CAMEL.sub(" ", typ.removesuffix("Stmt")).upper()
    if typ.startswith("Create"):
        return words, {"create", "ddl"}
    if typ.startswith("Alter"):
        return words, {"alter", "ddl"}
    if typ.startswith("Drop"):
        return words, {"drop", "ddl"}
    return words, {"other"}


class _Classifier:
    """One classification run: builds units from a parse tree. With ``off``, every text (the
    query, a ``DO`` body, a constant ``EXECUTE`` string) is read as a server with
    ``standard_conforming_strings=off`` reads it (:mod:`proxy.escapes`). With ``launder``,
    each unit is also checked for copying masked columns (:mod:`proxy.launder`); ``body``
    counts the ``DO`` / function bodies the walk is inside, where plain queries count too."""

    def __init__(self, off: bool = False, launder: Launder | None = None) -> None:
        self.units: list[_Unit] = []
        self.literal_dependent = False
        self.off = off
        self.launder = launder
        self.body = 0
        self.source = ""  # the text of the top-level statement being walked (function bodies need it)
        # id(set_config call) -> (the call, kept so its id stays its own; the one pg_settings row it reads)
        self.row_settings: dict[int, tuple[dict[str, Any], str]] = {}

    def sql(self, text: str, index: int | None, depth: int) -> None:
        if depth > _MAX_DEPTH:
            raise _Unparsable("SQL nested too deeply")
        if self.off:
            text = off_reading(text) or text
        tree = json.loads(pg.parse_sql_json(text))
        data = text.encode() if self.launder is not None else b""
        for i, raw in enumerate(tree.get("stmts", ())):
            ((typ, fields),) = raw["stmt"].items()
            if typ == "CreateFunctionStmt" and data:  # locations count bytes; 0 length: to the end
                start = raw.get("stmt_location", 0)
                end = start + raw["stmt_len"] if raw.get("stmt_len") else len(data)
                self.source = data[start:end].decode()
            self.statement(typ, fields, i if index is None else index, depth)

    def statement(self, typ: str, f: dict[str, Any], index: int, depth: int) -> None:
        tag, kinds = _kinds_and_tag(typ, f)
        unit = _Unit(tag, kinds, index)
        self.units.append(unit)
        if self.launder is not None:
            if typ == "CreateFunctionStmt":
                unit.launders = self.function_body(f, depth) if self.launder.masked else None
            elif typ == "CopyStmt" and not f.get("is_from") and not f.get("is_program") and f.get("filename") is None:
                self.literal_dependent = True  # its options (delimiter, null string) shape the rows
                unit.launders, unit.copy_out = self.launder.copy_out(f)
            else:
                unit.launders = self.launder.check(typ, f, strict=self.body > 0)
        skip: str | None = None
        if typ == "ExplainStmt":
            skip = "query"
            if any(o.get("DefElem", {}).get("defname") == "analyze" for o in f.get("options", ())):
                self.node(f["query"], index, depth)
            else:
                self.walk(f["query"], unit, index, depth, runs=False)
        elif typ in _RUNS_QUERY and f.get("query"):
            skip = "query"
            self.node(f["query"], index, depth)
        elif typ == "DoStmt":
            self.do_block(f, unit, index, depth)
            return
        elif typ == "VariableSetStmt":
            self.variable_set(f, unit)
        elif typ == "SelectStmt":
            self.row_settings.update(_settings_row_calls(f))
        elif typ == "TransactionStmt" and _read_write_option(f.get("options")):
            unit.writes_on = "a READ WRITE transaction"
        elif typ in _NESTED_DML and _is_pg_settings(f.get("relation")):
            # its rules call set_config: any setting, from values the guard cannot follow
            unit.lexer = f"{tag} of pg_settings can change any setting"
        elif typ == "DropStmt" and f.get("removeType") in _TABLE_OBJECTS:
            for obj in f.get("objects", ()):
                unit.tables.add(_names(obj.get("List", {}).get("items", ())))
        roots = [v for k, v in f.items() if k != skip and type(v) in (dict, list)]
        self.walk(roots, unit, index, depth, typ not in _INERT_BODIES)

    def variable_set(self, f: dict[str, Any], unit: _Unit) -> None:
        """SET / RESET / SET NAMES / SET TRANSACTION / SET SESSION CHARACTERISTICS."""
        self.literal_dependent = True  # the decision depends on the value set
        name = str(f.get("name", "")).lower()
        kind = f.get("kind", "")
        if kind == "VAR_SET_MULTI":
            if _read_write_option(f.get("args")):
                unit.writes_on = f"SET {name.upper()} ... READ WRITE"
            return
        if kind == "VAR_RESET_ALL" or (kind in ("VAR_RESET", "VAR_SET_DEFAULT") and name in _PINNED_SETTINGS):
            return  # back to the values of the session start, which hoop pinned
        args = f.get("args", ())
        value = _const(args[0]) if kind == "VAR_SET_VALUE" and len(args) == 1 else None
        _setting_change(unit, name, value, "SET" if kind == "VAR_SET_VALUE" else "RESET")

    def set_config(self, call: dict[str, Any], unit: _Unit) -> None:
        """``set_config(name, value, is_local)``: decided like SET when the name is a constant."""
        self.literal_dependent = True
        args = call.get("args") or []
        name = _const(args[0]) if args else None
        if name is None:
            known = self.row_settings.get(id(call))
            name = known[1] if known is not None and known[0] is call else None
        if name is None:
            # could name any setting: fail closed, everywhere (a pipelined statement would be
            # read by the server under the new setting before hoop could see it change)
            unit.lexer = "set_config of a computed setting name"
            return
        _setting_change(unit, name.lower(), _const(args[1]) if len(args) > 1 else None, "set_config")

    def node(self, wrapped: dict[str, Any], index: int, depth: int) -> None:
        ((typ, fields),) = wrapped.items()
        self.statement(typ, fields, index, depth)

    def walk(self, root: Any, unit: _Unit, index: int, depth: int, runs: bool) -> None:
        # iterative: this loop is most of the cold-path cost, and calls are what make it slow
        stack = [root]
        pop, push = stack.pop, stack.append
        while stack:
            obj = pop()
            if type(obj) is list:
                stack.extend(obj)
                continue
            if type(obj) is not dict:
                continue
            if "relname" in obj:
                parts = (obj.get("catalogname"), obj.get("schemaname"), obj["relname"])
                unit.tables.add(".".join(p for p in parts if p))
            if "funcname" in obj:
                fn = _names(obj["funcname"])
                unit.functions.add(fn)
                if fn[-10:].lower() == "set_config" and fn.rpartition(".")[2].lower() == "set_config":
                    self.set_config(obj, unit)  # any schema (or db.schema) prefix: fail closed
            for key, val in obj.items():
                if runs and key in _NESTED_DML:
                    self.statement(key, val, index, depth)
                elif type(val) is dict or type(val) is list:
                    push(val)

    def do_block(self, f: dict[str, Any], unit: _Unit, index: int, depth: int) -> None:
        self.literal_dependent = True
        opts = {o["DefElem"]["defname"]: o["DefElem"].get("arg", {}) for o in f.get("args", ())}
        body = opts.get("as", {}).get("String", {}).get("sval", "")
        language = opts.get("language", {}).get("String", {}).get("sval", "plpgsql").lower()
        if language != "plpgsql":
            unit.dynamic = f"DO block in language {language}"
            return
        if self.off:
            body = off_reading(body) or body  # plpgsql lexes the body with the session's setting
        quote = "$hoop$"
        while quote in body:
            quote = quote[:-1] + "x$"
        source = f"CREATE FUNCTION hoop_do() RETURNS void LANGUAGE plpgsql AS {quote}{body}{quote}"
        self.body += 1
        try:
            self.plpgsql(json.loads(pg.parse_plpgsql_json(source)), unit, index, depth + 1)
        finally:
            self.body -= 1

    def function_body(self, f: dict[str, Any], depth: int) -> str | None:
        """How a ``CREATE FUNCTION`` / ``PROCEDURE`` body would copy masked columns, or None.

        The body is walked like a ``DO`` block (plain queries count: a function's result carries
        no table OID) by a classifier of its own, whose units are dropped: the body runs later."""
        assert self.launder is not None
        self.literal_dependent = True  # the body is a string literal
        opts = {o["DefElem"]["defname"]: o["DefElem"].get("arg") for o in f.get("options", ())}
        language = str((opts.get("language") or {}).get("String", {}).get("sval", "sql")).lower()
        sub = _Classifier(self.off, self.launder)
        sub.body = 1
        body = f.get("sql_body")
        if body is not None:  # BEGIN ATOMIC ... END, or RETURN expr
            if "ReturnStmt" in body:
                val = body["ReturnStmt"].get("returnval")
                sub.statement("SelectStmt", {"targetList": [{"ResTarget": {"val": val}}]}, 0, depth + 1)
            else:
                for stmts in body.get("List", {}).get("items", ()):
                    for stmt in stmts.get("List", {}).get("items", ()):
                        sub.node(stmt, 0, depth + 1)
        elif language == "sql":
            items = (opts.get("as") or {}).get("List", {}).get("items", ())
            sub.sql(items[0]["String"]["sval"] if items else "", 0, depth + 1)
        elif language == "plpgsql":
            sub.units.append(_Unit("BODY", set(), 0))  # a computed EXECUTE marks it dynamic
            sub.plpgsql(json.loads(pg.parse_plpgsql_json(self.source)), sub.units[-1], 0, depth + 1)
        elif language not in ("c", "internal"):
            return f"a function in language {language} could read any masked column; hoop cannot see into it"
        for u in sub.units:
            if u.launders or u.dynamic:
                return u.launders or "the body runs a computed EXECUTE string, which could read any masked column"
        return None

    def plpgsql(self, obj: Any, unit: _Unit, index: int, depth: int, dynamic: bool = False) -> None:
        if isinstance(obj, list):
            for item in obj:
                self.plpgsql(item, unit, index, depth, dynamic)
            return
        if not isinstance(obj, dict):
            return
        expr = obj.get("PLpgSQL_expr")
        if expr is not None:
            self.plpgsql_expr(expr["query"], int(expr.get("parseMode", 0)), unit, index, depth, dynamic)
            return
        for key, val in obj.items():
            dyn = key == "dynquery" or (key == "query" and dynamic)
            self.plpgsql(val, unit, index, depth, key in ("PLpgSQL_stmt_dynexecute", "PLpgSQL_stmt_dynfors")
                         or dyn)

    def plpgsql_expr(self, query: str, mode: int, unit: _Unit, index: int, depth: int, dynamic: bool) -> None:
        if mode >= 3:  # assignment: "target := expression"
            m = _ASSIGN_TARGET.match(query)
            query = query[m.end():] if m else query
        if mode == 0 and not dynamic:
            self.sql(query, index, depth)
            return
        if not dynamic:
            self.sql("SELECT " + query, index, depth)
            return
        tree = json.loads(pg.parse_sql_json("SELECT " + query))
        target = tree["stmts"][0]["stmt"]["SelectStmt"]["targetList"]
        const = target[0]["ResTarget"]["val"].get("A_Const", {}).get("sval") if len(target) == 1 else None
        if const is None:
            self.sql("SELECT " + query, index, depth)  # its functions still count
            unit.dynamic = "EXECUTE of a computed string in a DO block"
        else:
            self.sql(const["sval"], index, depth + 1)


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
