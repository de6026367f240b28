"""Column lineage in the parse tree: which masked columns the values of a query's outputs carry.

How this works. :class:`Lineage` walks a query (pglast's JSON form) scope by scope. Each scope
is a level of ``FROM`` items (:class:`_Item`: a base table, a subquery, a CTE, a join alias, a
function, ``VALUES``), inner levels last, with the CTEs in view (:class:`_Env`). A query's
result is a tuple of outputs (:class:`_Out`), each with its name and its *taint*: the masked
columns (:class:`~proxy.maskcols.Taint`) whose values reach it. A column reference answers from
the item it names, or from every item in scope that could hold it. Value sublinks (scalar,
``ARRAY``, multi-assignment subqueries) carry their outputs into the expression around them;
filter sublinks (``EXISTS``, ``IN``) only choose rows. A recursive CTE is followed to a fixed
point (four rounds at most), or else counted as all it has read. :class:`~proxy.launder.Launder`
extends it with the checks of what a statement writes or defines; the fail-closed rules are
described there.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

from proxy.maskcols import CLEAN, MaskedColumns, Table, Taint

__all__ = ["Lineage"]

_CLEAN = CLEAN
_Table = Table
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


class _Env(NamedTuple):
    levels: tuple[list[_Item], ...]  # innermost last
    ctes: dict[str, _Item]


def _strs(items: Any) -> list[str]:
    return [i["String"]["sval"].lower() for i in items or () if "String" in i]


def _table(rv: dict[str, Any]) -> _Table:
    schema = rv.get("schemaname")
    return (schema.lower() if schema else None, str(rv.get("relname", "")).lower())


def _aliases(rv: dict[str, Any]) -> list[str]:
    alias = rv.get("alias", {}).get("aliasname")
    if alias:
        return [alias.lower()]
    schema, name = _table(rv)
    return [name] + ([f"{schema}.{name}"] if schema else [])


class Lineage:
    """Follows values through a query's scopes to the masked columns its outputs carry.

    The base of :class:`~proxy.launder.Launder`, which sets ``masked``."""

    masked: MaskedColumns

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
