"""What kind of statement a parse-tree node is: its command tag and :data:`~broker.config.SqlKind` set.

How this works: :func:`_kinds_and_tag` names a top-level or nested statement from its node type
and, where the type alone does not tell, from its fields (``SELECT INTO``, ``UPDATE`` / ``DELETE``
without a ``WHERE`` that names a column, the ``MERGE`` actions, the ``COPY`` direction and
target, ``GRANT`` or ``REVOKE``). :class:`_Unit` is a unit being built by the walk
(:mod:`proxy.sqlwalk`); :class:`Statement` is its frozen form, which :mod:`proxy.sqlguard`
decides and records. Everything here is pure.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from broker.config import SqlKind
from proxy.copyrows import CopyOut

__all__ = ["Statement", "is_write"]

_WRITE_KINDS: frozenset[SqlKind] = frozenset(
    {"write", "insert", "update", "delete", "merge", "truncate", "ddl", "create", "alter", "drop",
     "grant", "revoke", "copy_from_program", "copy_to_program", "copy_to_file", "copy_from_file",
     "do", "call", "lock", "vacuum"}
)


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


def is_write(statements: tuple[Statement, ...]) -> bool:
    """Whether any unit may change data, schema, privileges or the server (``do``/``call`` count)."""
    return any(not s.kinds.isdisjoint(_WRITE_KINDS) or s.dynamic for s in statements)


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
_CAMEL = re.compile(r"(?<!^)(?=[A-Z])")
_MERGE_KIND: dict[str, SqlKind] = {"CMD_UPDATE": "update", "CMD_DELETE": "delete", "CMD_INSERT": "insert"}


def _names(items: list[Any]) -> str:
    return ".".join(i["String"]["sval"] for i in items if "String" in i)


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
