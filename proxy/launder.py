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
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

from broker.config import Strategy
from proxy.copyrows import CopyFormatError, CopyOut, copy_format
from proxy.maskcols import CLEAN, MaskedColumns, Table, Taint

__all__ = ["MASKED_COLUMNS_RULE", "Launder", "MaskedColumns"]

#: the built-in rule that refuses copying a masked column out of its rule
MASKED_COLUMNS_RULE = "hoop-masked-columns"

_CLEAN = CLEAN
_Table = Table
_CTAS = {"OBJECT_MATVIEW": "CREATE MATERIALIZED VIEW defines", "OBJECT_TABLE": "CREATE TABLE AS writes"}
_VALUE_SUBLINKS = frozenset({"EXPR_SUBLINK", "ARRAY_SUBLINK", "MULTIEXPR_SUBLINK"})


class _Out(NamedTuple):
    name: str | None  # None: a name hoop cannot be sure of (answers every reference)
    taint: Taint
    star: bool = False  # a ``*`` expansion: positions after it are unknown


class _Item:
    """A ``FROM`` item (or NEW/OLD, EXCLUDED): a base table or a derived relation."""

    __slots__ = ("names", "opaque", "outputs", "table")

    def __init__(self, names: Iterable[str], table: _Table | None = None,
                 outputs: tuple[_Out, ...] = (), opaque: Taint = _CLEAN) -> None:
        self.names = frozenset(names)
        self.table = table
        self.outputs = outputs
        self.opaque = opaque

    def column(self, masked: MaskedColumns, name: str) -> Taint:
        if self.table is not None:
            return masked.reads(self.table, name)
        found = self.opaque
        for out in self.outputs:
            if out.name is None or out.name == name:
                found |= out.taint
        return found

    def star(self, masked: MaskedColumns) -> Taint:
        if self.table is not None:
            return masked.reads(self.table, None)
        return _union([o.taint for o in self.outputs], self.opaque)


def _union(taints: Iterable[Taint], start: Taint = _CLEAN) -> Taint:
    out = start
    for t in taints:
        out |= t
    return out


def _positional(outputs: tuple[_Out, ...], n: int) -> list[Taint]:
    """Taint by position (n wanted); with a ``*`` expansion every position gets all of it."""
    if any(o.star for o in outputs) or len(outputs) < n:
        everything = _union(o.taint for o in outputs)
        return [everything] * n
    return [o.taint for o in outputs[:n]]


class _Env(NamedTuple):
    levels: tuple[list[_Item], ...]  # innermost last
    ctes: dict[str, _Item]


def _strs(items: Any) -> list[str]:
    return [i["String"]["sval"].lower() for i in items or () if "String" in i]


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


def _table(rv: dict[str, Any]) -> _Table:
    schema = rv.get("schemaname")
    return (schema.lower() if schema else None, str(rv.get("relname", "")).lower())


def _aliases(rv: dict[str, Any]) -> list[str]:
    alias = rv.get("alias", {}).get("aliasname")
    if alias:
        return [alias.lower()]
    schema, name = _table(rv)
    return [name] + ([f"{schema}.{name}"] if schema else [])


class Launder:
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

    # -- queries -----------------------------------------------------------------------

    def _query(self, wrapped: dict[str, Any], env: _Env) -> tuple[_Out, ...]:
        """The outputs of a query node (SELECT, VALUES, set operation, DML with RETURNING)."""
        ((typ, f),) = wrapped.items()
        if typ == "SelectStmt":
            return self._select(f, env)
        if typ in ("InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"):
            inner = _Env((*env.levels, [_target(f["relation"])]), dict(env.ctes))
            for key in ("fromClause", "usingClause"):
                inner.levels[-1].extend(self._from(f.get(key), inner))
            if typ == "MergeStmt":
                inner.levels[-1].extend(self._from([f["sourceRelation"]], inner))
            return self._targets(_returning(f), inner)
        return (_Out(None, self._expr(f, env), True),)  # anything else: all of what it mentions

    def _with(self, with_clause: Any, env: _Env) -> None:
        if not with_clause:
            return
        body = with_clause.get("WithClause", with_clause)
        for cte in body.get("ctes") or ():
            c = cte["CommonTableExpr"]
            name = str(c.get("ctename", "")).lower()
            item = _Item([name])  # what a recursive CTE's reference to itself first reads
            settled = False
            for _ in range(4 if body.get("recursive") else 1):  # a recursive CTE: to a fixed point
                env.ctes[name] = item
                new = _Item([name], outputs=_rename(self._query(c["ctequery"], env), _strs(c.get("aliascolnames"))))
                settled = new.star(self.masked) == item.star(self.masked)
                item = new
                if settled:
                    break
            if body.get("recursive") and not settled:
                item = _Item([name], opaque=item.star(self.masked))
            env.ctes[name] = item

    def _select(self, f: dict[str, Any], outer: _Env) -> tuple[_Out, ...]:
        env = _Env((*outer.levels, []), dict(outer.ctes))
        self._with(f.get("withClause"), env)
        if f.get("op", "SETOP_NONE") != "SETOP_NONE":
            left = self._select(f["larg"]["SelectStmt"] if "SelectStmt" in f["larg"] else f["larg"], env)
            right = self._select(f["rarg"]["SelectStmt"] if "SelectStmt" in f["rarg"] else f["rarg"], env)
            if any(o.star for o in left + right) or len(left) != len(right):
                return (_Out(None, _union(o.taint for o in left + right), True),)
            return tuple(_Out(a.name, a.taint | b.taint) for a, b in zip(left, right, strict=True))
        if f.get("valuesLists"):
            rows = [r["List"]["items"] for r in f["valuesLists"]]
            width = max(len(r) for r in rows)
            cols = [_union(self._expr(r[i], env) for r in rows if i < len(r)) for i in range(width)]
            return tuple(_Out(f"column{i + 1}", t) for i, t in enumerate(cols))
        env.levels[-1].extend(self._from(f.get("fromClause"), env))
        return self._targets(f.get("targetList"), env)

    def _targets(self, targets: Any, env: _Env) -> tuple[_Out, ...]:
        outs: list[_Out] = []
        for rt in targets or ():
            r = rt["ResTarget"]
            val = r.get("val")
            fields = val.get("ColumnRef", {}).get("fields") if isinstance(val, dict) else None
            if fields and "A_Star" in fields[-1]:
                outs.append(_Out(None, self._column(fields, env), True))
                continue
            name = r.get("name")
            if not name and fields:
                name = _strs(fields)[-1] if _strs(fields) else None  # a bare column keeps its name
            outs.append(_Out(name.lower() if name else None, self._expr(val, env)))
        return tuple(outs)

    def _from(self, items: Any, env: _Env) -> list[_Item]:
        out: list[_Item] = []
        for node in items or ():
            ((typ, f),) = node.items()
            # LATERAL items see the ones before them: give them this level as it grows
            here = _Env((*env.levels[:-1], env.levels[-1] + out), env.ctes)
            if typ == "RangeVar":
                cte = env.ctes.get(str(f.get("relname", "")).lower()) if not f.get("schemaname") else None
                if cte is not None:
                    out.append(_Item(_aliases(f), outputs=cte.outputs, opaque=cte.opaque))
                else:
                    out.append(_Item(_aliases(f), _table(f)))
            elif typ == "JoinExpr":
                sides = self._from([f["larg"], f["rarg"]], here)
                out.extend(sides)
                alias = f.get("alias", {}).get("aliasname")
                if alias:
                    out.append(_Item([alias.lower()], opaque=_union(s.star(self.masked) for s in sides)))
            elif typ == "RangeSubselect":
                outs = self._query(f["subquery"], here)
                alias = f.get("alias") or {}
                out.append(_Item([str(alias.get("aliasname", "")).lower()],
                                 outputs=_rename(outs, _strs(alias.get("colnames")))))
            elif typ == "RangeTableSample":
                out.extend(self._from([f["relation"]], here))
            else:  # functions, XMLTABLE, JSON_TABLE: their output is whatever their arguments hold
                alias = f.get("alias") or {}
                names = [str(alias["aliasname"]).lower()] if alias.get("aliasname") else []
                taint = self._expr({k: v for k, v in f.items() if k != "alias"}, here)
                out.append(_Item(names or _funcnames(f), opaque=taint))
        return out

    # -- expressions -------------------------------------------------------------------

    def _expr(self, node: Any, env: _Env) -> Taint:
        found = _CLEAN
        stack = [node]
        while stack:
            obj = stack.pop()
            if type(obj) is list:
                stack.extend(obj)
                continue
            if type(obj) is not dict:
                continue
            if "ColumnRef" in obj:
                found |= self._column(obj["ColumnRef"].get("fields") or [], env)
                continue
            if "SubLink" in obj:
                link = obj["SubLink"]
                stack.append(link.get("testexpr"))
                if link.get("subLinkType") in _VALUE_SUBLINKS:
                    found |= _union(o.taint for o in self._query(link["subselect"], env))
                continue
            stack.extend(v for v in obj.values() if type(v) is dict or type(v) is list)
        return found

    def _column(self, fields: list[Any], env: _Env) -> Taint:
        star = "A_Star" in fields[-1]
        names = _strs(fields)
        if not names:  # bare *: every item of the innermost level
            return _union(i.star(self.masked) for i in env.levels[-1])
        if len(names) == 1 and not star:  # a column of any item in scope, or a whole row
            name = names[0]
            return _union(i.column(self.masked, name) | (i.star(self.masked) if name in i.names else _CLEAN)
                          for level in env.levels for i in level)
        qualifier = ".".join(names if star else names[:-1])
        column = None if star else names[-1]
        for level in reversed(env.levels):
            for item in level:
                if qualifier in item.names:
                    return item.star(self.masked) if column is None else item.column(self.masked, column)
        # unknown qualifier: a record variable, NEW/OLD in a trigger function, a table named in full
        # that FROM names otherwise, or a composite column (``addr.city`` reads addr)
        parts = qualifier.split(".")
        table: _Table | None = (parts[-2], parts[-1]) if len(parts) > 1 else None
        found = self.masked.reads(table, column)
        if len(parts) == 1:
            found |= self._column([{"String": {"sval": parts[0]}}], env)
        return found


def _rename(outs: tuple[_Out, ...], colnames: list[str]) -> tuple[_Out, ...]:
    """Outputs under column aliases (``AS s(a, b)``), which rename by position."""
    if not colnames:
        return outs
    if any(o.star for o in outs):
        return (_Out(None, _union(o.taint for o in outs), True),)
    renamed = [_Out(n, o.taint) for n, o in zip(colnames, outs, strict=False)]
    return tuple(renamed) + outs[len(colnames):]


def _target(rv: dict[str, Any]) -> _Item:
    """A DML statement's target table, also as RETURNING's ``old`` and ``new`` (PostgreSQL 18)."""
    return _Item([*_aliases(rv), "old", "new"], _table(rv))


def _returning(f: dict[str, Any]) -> Any:
    """A DML statement's RETURNING list (PostgreSQL 18 wraps it in a ReturningClause)."""
    return f.get("returningList") or (f.get("returningClause") or {}).get("exprs")


def _funcnames(f: dict[str, Any]) -> list[str]:
    found: list[str] = []
    for fn in f.get("functions") or ():
        for part in fn.get("List", {}).get("items", ()):
            call = part.get("FuncCall") if isinstance(part, dict) else None
            if call:
                found.append(_strs(call.get("funcname"))[-1])
    return found
