"""Which prepared statements and portals a SQL text replaces or destroys.

How this works. PostgreSQL has one namespace of prepared statements, shared by the extended
protocol's Parse/Close and SQL ``PREPARE``/``DEALLOCATE``/``DISCARD ALL``, and one of
portals, shared by Bind/Close and SQL ``DECLARE``/``CLOSE`` (``FETCH`` and ``MOVE`` read it).
The inspector tracks the protocol side message by message; :func:`effect` tells it which of
its entries a SQL text makes stale, so that it never masks a result with the description of
a statement or portal the client has since replaced. It only reads names from the parse
tree: the inspector calls it for texts whose guard classification has one of :data:`TAGS`
(or for every text when there is no guard), and caches the answer per text.

It also names the prepared statements a text creates with ``PREPARE`` and those it runs with
``EXECUTE`` (also under ``EXPLAIN ANALYZE`` or ``CREATE TABLE AS``): a statement held for
review is reviewed at each execution (:mod:`proxy.pg.inspect`), so hoop must know which
``EXECUTE`` runs one.

A statement nested in another (the SQL of a ``DO`` block) cannot be named here: when the
guard saw more namespace statements than the top level has, every entry is forgotten, and
when it saw more ``PREPARE`` or ``EXECUTE`` units than the parse tree names, those names are
unknown (None), which the inspector reads as "any".
Statements run inside a user-defined function are not seen at all. A portal is still
described again in every round trip that does not bind or describe it (:mod:`proxy.pg.state`),
but a statement a function deallocates and prepares again under the same name keeps the
description hoop has of it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pglast import parser as pg

__all__ = ["NO_EFFECT", "TAGS", "Effect", "effect", "label"]


@dataclass(frozen=True, slots=True)
class Effect:
    """What running a SQL text does to the two namespaces (None: every entry)."""

    statements: frozenset[str] | None  # prepared statements it creates, replaces or drops
    portals: frozenset[str] | None  # portals (cursors) it creates or closes
    dynamic: bool  # its (first) statement's result shape is decided when it runs: EXECUTE, FETCH...
    prepares: frozenset[str] | None = frozenset()  # names it PREPAREs (None: a nested PREPARE, name unknown)
    executes: frozenset[str] | None = frozenset()  # names it EXECUTEs (None: a nested EXECUTE, name unknown)
    only_prepare: bool = False  # it is nothing but PREPAREs: running it runs none of their statements


NO_EFFECT = Effect(frozenset(), frozenset(), False)
_EVERYTHING = Effect(None, None, False, None, None)

#: the guard's tags (:attr:`proxy.sqlguard.Statement.tag`) of the statements that touch a namespace
_NAMESPACE_TAGS = frozenset({"PREPARE", "DEALLOCATE", "DISCARD", "DECLARE CURSOR", "CLOSE PORTAL"})
#: ... and of those whose result shape is decided at run time (so a Describe of the statement
#: says nothing lasting about the portals bound to it)
_DYNAMIC = {"ExecuteStmt": "EXECUTE", "FetchStmt": "FETCH", "ExplainStmt": "EXPLAIN", "VariableShowStmt": "SHOW"}
#: every tag for which :func:`effect` must look at the text
TAGS = _NAMESPACE_TAGS | frozenset(_DYNAMIC.values())


def effect(sql: str, tags: Sequence[str] | None) -> Effect:
    """What ``sql`` does to the namespaces; ``tags`` are the guard's unit tags for it (one per
    unit, nested ones included), None when there is no guard."""
    if tags is not None and not any(t in TAGS for t in tags):
        return NO_EFFECT
    try:
        tree = json.loads(pg.parse_sql_json(sql))
    except Exception:  # the server rejects it too; a guard that classified it cannot get here
        return NO_EFFECT if tags is None else _EVERYTHING
    statements: set[str] | None = set()
    portals: set[str] | None = set()
    seen = 0
    dynamic = False
    for i, raw in enumerate(tree.get("stmts", ())):
        ((typ, f),) = raw["stmt"].items()
        f = f if isinstance(f, dict) else {}
        if i == 0 and typ in _DYNAMIC:
            dynamic = True
        if typ == "PrepareStmt":
            seen += 1
            statements = _add(statements, f.get("name"))
        elif typ == "DeallocateStmt":
            seen += 1
            statements = None if f.get("isall") else _add(statements, f.get("name"))
        elif typ == "DiscardStmt":
            seen += 1
            if f.get("target") == "DISCARD_ALL":  # DEALLOCATE ALL and CLOSE ALL, among others
                statements = portals = None
        elif typ == "DeclareCursorStmt":
            seen += 1
            portals = _add(portals, f.get("portalname"))
        elif typ == "ClosePortalStmt":
            seen += 1
            portals = _add(portals, f.get("portalname"))  # no name: CLOSE ALL
    if tags is not None and sum(t in _NAMESPACE_TAGS for t in tags) > seen:
        statements = portals = None  # nested (a DO block): names unknown
    prepares = _names_of(tree, "PrepareStmt", top=True)
    executes = _names_of(tree, "ExecuteStmt", top=False)
    if prepares is not None and tags is not None and tags.count("PREPARE") > len(prepares[1]):
        prepares = None
    if executes is not None and tags is not None and tags.count("EXECUTE") > len(executes[1]):
        executes = None
    only_prepare = bool(tree.get("stmts")) and all("PrepareStmt" in raw["stmt"] for raw in tree["stmts"])
    if (statements is not None and not statements and portals is not None and not portals and not dynamic
            and prepares is not None and not prepares[0] and executes is not None and not executes[0]):
        return NO_EFFECT
    return Effect(None if statements is None else frozenset(statements),
                  None if portals is None else frozenset(portals), dynamic,
                  None if prepares is None else prepares[0], None if executes is None else executes[0], only_prepare)


def _names_of(tree: dict[str, Any], node: str, *, top: bool) -> tuple[frozenset[str], list[str]] | None:
    """The names of the ``node`` statements (``PrepareStmt``, ``ExecuteStmt``) of a parse tree: at
    the top level only, or anywhere (an EXECUTE under EXPLAIN or CREATE TABLE AS); with each
    occurrence listed, to be counted against the guard's units. None: one has no name."""
    found: list[str] = []
    todo: list[Any] = [raw["stmt"] for raw in tree.get("stmts", ())]
    while todo:
        item = todo.pop()
        if isinstance(item, list):
            todo.extend(item)
        elif isinstance(item, dict):
            for key, value in item.items():
                if key == node:
                    name = value.get("name") if isinstance(value, dict) else None
                    if not isinstance(name, str):
                        return None
                    found.append(name)
                elif not top:
                    todo.append(value)
    return frozenset(found), found


def _add(names: set[str] | None, name: Any) -> set[str] | None:
    if names is None or not isinstance(name, str):
        return None
    names.add(name)
    return names


_PLAIN = re.compile(r"[a-z_][a-z0-9_$]*")


def label(name: str) -> str:
    """A statement or portal name as SQL would write it (``<unnamed>`` for the unnamed one)."""
    if not name:
        return "<unnamed>"
    if _PLAIN.fullmatch(name):
        return name
    return '"' + name.replace('"', '""') + '"'
