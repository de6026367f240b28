"""The walk that turns a query string's parse tree into units, one per statement that runs.

How this works: :class:`_Classifier` parses a text with pglast's ``parse_sql_json`` and walks
each statement's tree once (iteratively: this loop is most of the cold-path cost), collecting
the tables and functions the unit mentions. A statement that runs inside another (a
data-modifying CTE, the statement under ``EXPLAIN ANALYZE``, the ``query`` of ``PREPARE`` /
``COPY`` / ``CREATE TABLE AS`` / ``DECLARE CURSOR``, the SQL of a ``DO`` block and its constant
``EXECUTE`` strings) becomes a unit of its own; bodies that are stored, not run, do not. The
unit kinds come from :mod:`proxy.sqlkinds`, the setting rules from :mod:`proxy.sqlsettings`,
the masked-column copy check from :mod:`proxy.launder`. The policies are described in
:mod:`proxy.sqlguard`, which is the only user of this module.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pglast import parser as pg

from proxy.escapes import off_reading
from proxy.launder import Launder
from proxy.sqlkinds import _kinds_and_tag, _names, _Unit
from proxy.sqlsettings import (
    _PINNED_SETTINGS,
    _const,
    _is_pg_settings,
    _read_write_option,
    _setting_change,
    _settings_row_calls,
)

_MAX_DEPTH = 4


class _Unparsable(Exception):
    pass


# statements that run where they appear nested (data-modifying CTEs)
_NESTED_DML = frozenset({"InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"})
# statements whose nested SQL is stored, not run
_INERT_BODIES = frozenset({"RuleStmt", "CreateFunctionStmt", "ViewStmt", "CreateTrigStmt"})
# statements whose ``query`` field runs as a statement of its own
_RUNS_QUERY = frozenset({"PrepareStmt", "CopyStmt", "CreateTableAsStmt", "DeclareCursorStmt"})
_TABLE_OBJECTS = frozenset({"OBJECT_TABLE", "OBJECT_VIEW", "OBJECT_MATVIEW", "OBJECT_FOREIGN_TABLE",
                            "OBJECT_SEQUENCE", "OBJECT_INDEX"})
_ASSIGN_TARGET = re.compile(r'\s*(?:"[^"]*"|[^:="])*?:?=')


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
