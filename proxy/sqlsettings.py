"""The built-in rules on session settings: ``hoop-lexer`` and ``read_only``, read from the parse tree.

How this works: a ``SET`` / ``RESET`` or a ``set_config`` call found by the walk
(:mod:`proxy.sqlwalk`) is passed to :func:`_setting_change` with the constant value it sets
(``None`` when the value is not a constant), which notes on the unit whether it would change how
the server reads SQL (:data:`LEXER_SETTINGS`, other than to the value hoop pins) or turn writing
back on (``*transaction_read_only``). :func:`_settings_row_calls` recognises the one computed
setting name that is allowed, pg_dump's ``set_config(name, ...) FROM pg_settings WHERE name =
'x'``. The policies are described in :mod:`proxy.sqlguard`. Everything here is pure.
"""

from __future__ import annotations

import re
from typing import Any

from proxy.sqlkinds import _names, _Unit

__all__ = ["LEXER_RULE", "LEXER_SETTINGS", "READ_ONLY_RULE", "is_utf8"]

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
