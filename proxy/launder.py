"""Masked columns laundered into relations hoop cannot attribute: found in the parse tree.

How this works. A ``table.column`` masking rule applies to a result column whose table OID
resolves to that table, so a value copied into another relation (``CREATE TEMP TABLE t AS
SELECT ssn FROM users``, ``INSERT INTO other SELECT ...``, a view, a generated column, a
function's result) escapes the rule. :class:`Launder` follows *values* through a statement's
parse tree (pglast's JSON form): each scope's ``FROM`` items (tables, subqueries, CTEs,
joins, functions, ``VALUES``) and each output expression's column references, and names the
masked columns (:class:`MaskedColumns`) whose values reach what the statement writes or
defines. Filter positions (``WHERE``, ``JOIN ... ON``, ``GROUP BY``, ``ORDER BY``, ``EXISTS``
and ``IN`` subqueries) choose rows but copy no value; a plain ``SELECT`` can already use them.

It fails closed wherever the tree cannot tell: an unqualified column counts as every table in
scope that could mask it; ``*``, ``t.*`` and a whole-row reference (``row_to_json(u)``) of a
rule table count as reading all its masked columns; a function over a masked value is masked;
an output whose name hoop cannot be sure of answers every reference; a reference whose
qualifier is unknown (``NEW.ssn``, a record variable) counts if any rule could mask a column
of that name. Table names compare as :class:`~proxy.mask.Masker` compares them (globs,
case-insensitively), and an unqualified name as if in any schema (the search path, and
``pg_temp`` first on it, decide where it resolves). A value written back into a column that
is surely masked as strictly (``UPDATE users SET ssn = upper(ssn)``) is not laundered.

Where the code is: this module holds the checks of what a statement writes or defines;
:class:`~proxy.lineage.Lineage`, which :class:`Launder` extends, follows values through a
query's scopes (``FROM`` items, CTEs, outputs, expressions).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from broker.config import Strategy
from proxy.copyrows import CopyFormatError, CopyOut, copy_format
from proxy.lineage import Lineage, _Env, _Item, _Out, _returning, _strs, _table, _target, _union
from proxy.maskcols import CLEAN, MaskedColumns, Table, Taint

__all__ = ["MASKED_COLUMNS_RULE", "Launder", "MaskedColumns"]

#: the built-in rule that refuses copying a masked column out of its rule
MASKED_COLUMNS_RULE = "hoop-masked-columns"

_CLEAN = CLEAN
_Table = Table
_CTAS = {"OBJECT_MATVIEW": "CREATE MATERIALIZED VIEW defines", "OBJECT_TABLE": "CREATE TABLE AS writes"}


def _positional(outputs: tuple[_Out, ...], n: int) -> list[Taint]:
    """Taint by position (n wanted); with a ``*`` expansion every position gets all of it."""
    if any(o.star for o in outputs) or len(outputs) < n:
        everything = _union(o.taint for o in outputs)
        return [everything] * n
    return [o.taint for o in outputs[:n]]


def _column_names(tree: Any) -> set[str | None]:
    """The column names a query mentions anywhere (None for ``*`` or ``t.*``): a rule without a
    table could apply to any of them."""
    found: set[str | None] = set()
    stack = [tree]
    while stack:
        obj = stack.pop()
        if isinstance(obj, list):
            stack.extend(obj)
        elif isinstance(obj, dict):
            ref = obj.get("ColumnRef")
            if isinstance(ref, dict):
                last = (ref.get("fields") or [{}])[-1]
                found.add(str(last["String"]["sval"]).lower() if "String" in last else None)
            stack.extend(v for v in obj.values() if isinstance(v, (dict, list)))
    return found


class Launder(Lineage):
    """Finds masked column values that a statement copies into something hoop cannot mask."""

    def __init__(self, masked: MaskedColumns) -> None:
        self.masked = masked

    # -- entry point -------------------------------------------------------------------

    def check(self, typ: str, f: dict[str, Any], *, strict: bool = False) -> str | None:
        """Why statement ``typ`` launders a masked column, or None. ``strict`` (a DO block, a
        function or rule body) counts what plain queries return too: it lands in variables,
        notices or function results, which no column rule follows."""
        if not self.masked:
            return None
        return next(self._findings(typ, f, strict, ()), None)

    def copy_out(self, f: dict[str, Any]) -> tuple[str | None, CopyOut | None]:
        """``COPY … TO STDOUT`` (``f``): why it is refused, or how to mask its rows (None: nothing to mask).

        Its rows carry no column names or table OIDs, so hoop applies the column rules (with a
        table or without) itself, field by field, when the statement names the table's columns
        (``COPY users (id, ssn) TO STDOUT``, as pg_dump writes it). Without a column list, or from
        a query, hoop cannot tell which field is which: refused when a rule could apply."""
        what = "COPY TO STDOUT sends rows without column names"
        cols = _strs(f.get("attlist")) if f.get("relation") else []
        if cols:
            table = _table(f["relation"])
            per_column = [self.masked.reads(table, c) | self.masked.by_name(c) for c in cols]
            strategies = tuple(self._strictest(t) for t in per_column)
            if not any(strategies):
                return None, None
            try:
                return None, copy_format(f.get("options"), strategies)
            except CopyFormatError as exc:
                found = next(self._taints(what, [_union(per_column)]), "")
                return f"{found} ({exc})", None
        if f.get("query"):
            taint = self._copy_source(f, _Env(([],), {})) if self.masked else _CLEAN
            taint |= _union(self.masked.by_name(n) for n in _column_names(f["query"]))
            fix = "; SELECT it instead, or COPY the table's unmasked columns by name"
        else:
            taint = self.masked.reads(_table(f["relation"]), None) | self.masked.by_name(None)
            fix = "; name the columns (COPY table (a, b) TO STDOUT) so hoop can mask them"
        refused = next(self._taints(what, [taint]), None)
        return (refused + fix if refused else None), None

    def _strictest(self, taint: Taint) -> Strategy | None:
        """The strategy of the rules in ``taint``: theirs when they agree, else ``redact``."""
        found = {self.masked.strategy[p] for _, p in taint}
        return found.pop() if len(found) == 1 else ("redact" if found else None)

    def _findings(self, typ: str, f: dict[str, Any], strict: bool, extra: tuple[_Item, ...]) -> Iterator[str]:
        env = _Env((list(extra),), {})
        if typ == "SelectStmt":
            if f.get("intoClause") or strict:
                what = "SELECT INTO writes a new table" if f.get("intoClause") else "the body would read"
                yield from self._taints(what, [_union(o.taint for o in self._select(f, env))])
        elif typ in ("CreateTableAsStmt", "ViewStmt"):
            q = f.get("query", {})
            label = "CREATE VIEW defines" if typ == "ViewStmt" else _CTAS.get(f.get("objtype", ""), "CREATE AS writes")
            if "ExecuteStmt" in q:
                yield f"{label} a relation from a prepared statement hoop cannot see into"
            else:
                yield from self._taints(f"{label} a relation", [_union(o.taint for o in self._query(q, env))])
        elif typ == "InsertStmt":
            yield from self._insert(f, env, strict)
        elif typ == "UpdateStmt":
            target = _table(f["relation"])
            self._with(f.get("withClause"), env)
            env.levels[0].append(_target(f["relation"]))
            env.levels[0].extend(self._from(f.get("fromClause"), env))
            yield from self._assignments(target, f.get("targetList"), env, "UPDATE")
            if strict:
                yield from self._returning(f, env)
        elif typ == "DeleteStmt" and strict:
            self._with(f.get("withClause"), env)
            env.levels[0].append(_target(f["relation"]))
            env.levels[0].extend(self._from(f.get("usingClause"), env))
            yield from self._returning(f, env)
        elif typ == "MergeStmt":
            yield from self._merge(f, env, strict)
        elif typ == "CopyStmt" and not f.get("is_from") and (f.get("is_program") or f.get("filename") is not None):
            yield from self._taints("COPY writes a file or program", [self._copy_source(f, env)])
        elif typ == "RuleStmt":
            target = _table(f["relation"])
            rows = (_Item(["new"], target), _Item(["old"], target))
            for action in f.get("actions") or ():
                ((atyp, afields),) = action.items()
                yield from self._findings(atyp, afields, True, rows)
        elif typ in ("CreateStmt", "AlterTableStmt"):
            yield from self._generated(typ, f, env)
        elif typ in ("RenameStmt", "AlterObjectSchemaStmt"):
            yield from self._rename(typ, f)

    def _taints(self, what: str, taints: Iterable[Taint]) -> Iterator[str]:
        for taint in taints:
            if taint:
                source, pattern = min(taint)
                yield f'{what} from {source}, masked by the column rule "{pattern}"'

    # -- writes ------------------------------------------------------------------------

    def _insert(self, f: dict[str, Any], env: _Env, strict: bool) -> Iterator[str]:
        target = _table(f["relation"])
        self._with(f.get("withClause"), env)
        cols = [c["ResTarget"].get("name", "").lower() for c in f.get("cols") or ()]
        source = self._query(f["selectStmt"], env) if f.get("selectStmt") else ()
        taints = _positional(source, len(cols) or max(len(source), 1))
        shown = ".".join(p for p in target if p)
        if cols:
            for col, taint in zip(cols, taints, strict=True):
                if taint and not self.masked.keeps(target, col, taint):
                    yield from self._taints(f"INSERT writes {shown}.{col}", [taint])
        else:
            yield from self._taints(f"INSERT writes {shown} (columns by position)", taints)
        conflict = f.get("onConflictClause") or {}
        if conflict.get("targetList"):
            if cols:
                excluded = tuple(_Out(c, t) for c, t in zip(cols, taints, strict=True))
                row = _Item(["excluded"], outputs=excluded)
            else:
                row = _Item(["excluded"], opaque=_union(taints))
            env.levels[0].extend([_target(f["relation"]), row])
            yield from self._assignments(target, conflict["targetList"], env, "INSERT ... ON CONFLICT")
        if strict:
            env.levels[0].append(_target(f["relation"]))
            yield from self._returning(f, env)

    def _assignments(self, target: _Table, targets: Any, env: _Env, verb: str) -> Iterator[str]:
        shown = ".".join(p for p in target if p)
        for rt in targets or ():
            r = rt["ResTarget"]
            col = str(r.get("name", "")).lower()
            val = r.get("val")
            taint = self._expr(val.get("MultiAssignRef", {}).get("source", val) if isinstance(val, dict) else val, env)
            if taint and not self.masked.keeps(target, col, taint):
                yield from self._taints(f"{verb} writes {shown}.{col}", [taint])

    def _returning(self, f: dict[str, Any], env: _Env) -> Iterator[str]:
        outs = self._targets(_returning(f), env)
        yield from self._taints("the body would read", [_union(o.taint for o in outs)])

    def _merge(self, f: dict[str, Any], env: _Env, strict: bool) -> Iterator[str]:
        target = _table(f["relation"])
        self._with(f.get("withClause"), env)
        env.levels[0].append(_target(f["relation"]))
        env.levels[0].extend(self._from([f["sourceRelation"]], env))
        shown = ".".join(p for p in target if p)
        for clause in f.get("mergeWhenClauses") or ():
            c = clause["MergeWhenClause"]
            if c.get("commandType") == "CMD_UPDATE":
                yield from self._assignments(target, c.get("targetList"), env, "MERGE")
            elif c.get("commandType") == "CMD_INSERT":
                cols = [t["ResTarget"].get("name", "").lower() for t in c.get("targetList") or ()]
                taints = [self._expr(v, env) for v in c.get("values") or ()]
                if cols and len(cols) == len(taints):
                    for col, taint in zip(cols, taints, strict=True):
                        if taint and not self.masked.keeps(target, col, taint):
                            yield from self._taints(f"MERGE writes {shown}.{col}", [taint])
                else:
                    yield from self._taints(f"MERGE writes {shown} (columns by position)", taints)
        if strict:
            yield from self._returning(f, env)

    def _copy_source(self, f: dict[str, Any], env: _Env) -> Taint:
        if f.get("query"):
            return _union(o.taint for o in self._query(f["query"], env))
        table = _table(f["relation"])
        cols = _strs(f.get("attlist"))
        return _union(self.masked.reads(table, c) for c in cols) if cols else self.masked.reads(table, None)

    def _generated(self, typ: str, f: dict[str, Any], env: _Env) -> Iterator[str]:
        """Generated columns (``GENERATED ALWAYS AS (expr) STORED``) computed from a masked column."""
        target = _table(f["relation"])
        shown = ".".join(p for p in target if p)
        env.levels[0].append(_target(f["relation"]))
        found: list[tuple[str, Any]] = []
        defs = f.get("tableElts") or () if typ == "CreateStmt" else ()
        for cmd in f.get("cmds") or () if typ == "AlterTableStmt" else ():
            c = cmd.get("AlterTableCmd", {})
            if c.get("subtype") == "AT_SetExpression":
                found.append((str(c.get("name", "")).lower(), c.get("def")))
            elif isinstance(c.get("def"), dict) and "ColumnDef" in c["def"]:
                defs = [*defs, c["def"]]
        for d in defs:
            cd = d.get("ColumnDef")
            for con in (cd or {}).get("constraints") or ():
                if con.get("Constraint", {}).get("contype") == "CONSTR_GENERATED":
                    found.append((str(cd.get("colname", "")).lower(), con["Constraint"].get("raw_expr")))
        for col, expr in found:
            taint = self._expr(expr, env)
            if taint and not self.masked.keeps(target, col, taint):
                yield from self._taints(f"the generated column {shown}.{col} copies a value", [taint])

    def _rename(self, typ: str, f: dict[str, Any]) -> Iterator[str]:
        """Renaming a masked column, or renaming or moving a table or schema out of a rule."""
        kind = f.get("renameType") if typ == "RenameStmt" else f.get("objectType")
        rel = f.get("relation")
        new = str(f.get("newname") or f.get("newschema") or "").lower()
        if typ == "RenameStmt" and kind == "OBJECT_SCHEMA":
            lost = self.masked.in_schema(str(f.get("subname", ""))) - self.masked.in_schema(new)
            yield from self._taints("renaming the schema moves values", [lost])
        if not isinstance(rel, dict):
            return
        table = _table(rel)
        if kind == "OBJECT_COLUMN":
            taint = self.masked.reads(table, str(f.get("subname", "")).lower())
            if taint and not self.masked.keeps(table, new, taint):
                yield from self._taints("renaming the column moves values", [taint])
        elif kind in ("OBJECT_TABLE", "OBJECT_VIEW", "OBJECT_MATVIEW", "OBJECT_FOREIGN_TABLE"):
            moved = (new, table[1]) if typ == "AlterObjectSchemaStmt" else (table[0], new)
            kept = {p for _, p in self.masked.reads(moved, None)}  # rules that may still cover it
            lost = frozenset(t for t in self.masked.reads(table, None) if t[1] not in kept)
            yield from self._taints("renaming or moving the table moves values", [lost])
