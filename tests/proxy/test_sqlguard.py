"""SQL guard: classification tables, rule semantics, a bypass-attempt table, caching."""

from __future__ import annotations

import pytest

from broker.config import Guardrails, Rule
from proxy.sqlguard import SqlGuard, is_write, shape

RULES = Guardrails(
    rules=[
        Rule(name="no-drop", action="block", statements=["drop", "truncate"]),
        Rule(name="no-files", action="block",
             functions=["pg_read_file", "lo_export", "dblink*", "pg_terminate_backend"]),
        Rule(name="no-program", action="block", statements=["copy_to_program", "copy_from_program"]),
        Rule(name="wide-writes", action="review", statements=["delete_without_where", "update_without_where"]),
        Rule(name="orders", action="review", tables=["public.orders"], statements=["write"]),
        Rule(name="do", action="review", statements=["do"]),
    ],
)


@pytest.fixture
def guard() -> SqlGuard:
    return SqlGuard(RULES)


def kinds(guard: SqlGuard, sql: str) -> set[str]:
    return set().union(*(s.kinds for s in guard.analyse(sql).statements))


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT 1", {"select"}),
        ("SELECT * FROM t FOR UPDATE", {"select", "lock"}),
        ("INSERT INTO t VALUES (1)", {"insert", "write"}),
        ("UPDATE t SET a = 1 WHERE id = 2", {"update", "write"}),
        ("UPDATE t SET a = 1", {"update", "write", "update_without_where"}),
        ("DELETE FROM t", {"delete", "write", "delete_without_where"}),
        ("DELETE FROM t WHERE true", {"delete", "write", "delete_without_where"}),
        ("DELETE FROM t WHERE 1 = 1", {"delete", "write", "delete_without_where"}),
        ("DELETE FROM t WHERE id = 3", {"delete", "write"}),
        ("MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE", {"merge", "write", "delete"}),
        ("DROP TABLE t", {"drop", "ddl"}),
        ("TRUNCATE t", {"truncate", "write"}),
        ("ALTER TABLE t ADD COLUMN c int", {"alter", "ddl"}),
        ("CREATE TABLE t (a int)", {"create", "ddl"}),
        ("CREATE INDEX i ON t (a)", {"create", "ddl"}),
        ("COMMENT ON TABLE t IS 'x'", {"ddl"}),
        ("GRANT SELECT ON t TO bob", {"grant"}),
        ("REVOKE SELECT ON t FROM bob", {"revoke"}),
        ("COPY t TO STDOUT", {"copy"}),
        ("COPY t FROM STDIN", {"copy", "write"}),
        ("COPY t TO '/tmp/x'", {"copy", "copy_to_file"}),
        ("COPY t FROM '/tmp/x'", {"copy", "write", "copy_from_file"}),
        ("COPY t TO PROGRAM 'gzip'", {"copy", "copy_to_program"}),
        ("COPY t FROM PROGRAM 'curl x'", {"copy", "write", "copy_from_program"}),
        ("DO $$ BEGIN NULL; END $$", {"do"}),
        ("CALL p()", {"call"}),
        ("SET search_path = x", {"set"}),
        ("LOCK TABLE t", {"lock"}),
        ("VACUUM t", {"vacuum"}),
        ("LISTEN ch", {"listen"}),
        ("BEGIN", {"other"}),
        ("SHOW work_mem", {"other"}),
        ("SELECT 1 INTO new_t", {"create", "ddl", "write"}),
        ("CREATE TABLE n AS SELECT 1", {"create", "ddl", "write", "select"}),
        ("CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'DELETE FROM t RETURNING 1'", {"create", "ddl"}),
        ("CREATE RULE r AS ON INSERT TO t DO INSTEAD DELETE FROM u", {"create", "ddl"}),
        ("EXPLAIN DELETE FROM t", {"other"}),
        ("EXPLAIN ANALYZE DELETE FROM t", {"other", "delete", "write", "delete_without_where"}),
        ("PREPARE p AS UPDATE t SET a = 1", {"other", "update", "write", "update_without_where"}),
        ("EXECUTE p", {"other"}),
    ],
)
def test_kinds(guard: SqlGuard, sql: str, expected: set[str]) -> None:
    assert kinds(guard, sql) == expected


def test_tables_and_functions_are_extracted(guard: SqlGuard) -> None:
    (st,) = guard.analyse(
        'SELECT lower(x.a) FROM public.orders x JOIN "Items" i ON true WHERE x.id IN (SELECT s.f(1) FROM s.t)'
    ).statements
    assert st.tables == {"public.orders", "Items", "s.t"}
    assert st.functions == {"lower", "s.f"}
    (drop,) = guard.analyse("DROP TABLE a.b, c").statements
    assert drop.tables == {"a.b", "c"}


@pytest.mark.parametrize(
    ("sql", "action", "rule"),
    [
        ("SELECT abalance FROM pgbench_accounts WHERE aid = 1", "allow", None),
        ("DROP TABLE x", "block", "no-drop"),
        ("DELETE FROM x", "review", "wide-writes"),
        ("UPDATE orders SET a = 1 WHERE id = 1", "review", "orders"),  # unqualified matches public.orders
        ("UPDATE public.orders SET a = 1 WHERE id = 1", "review", "orders"),
        ("UPDATE other.orders SET a = 1 WHERE id = 1", "allow", None),
        ('UPDATE U&"\\0070ublic"."ORDERS" SET a = 1 WHERE id = 1', "review", "orders"),
        ("SELECT * FROM public.orders", "allow", None),  # selectors are ANDed: a read is not a write
        ("SELECT 1; DROP TABLE x; DELETE FROM y", "block", "no-drop"),  # strictest statement wins
        ("selec 1", "block", "on_unparsed"),
    ],
)
def test_decisions(guard: SqlGuard, sql: str, action: str, rule: str | None) -> None:
    d = guard.check(sql)
    assert (d.action, d.rule) == (action, rule)


def test_decision_names_the_statement() -> None:
    d = SqlGuard(RULES).check("SELECT 1; SELECT 2; DROP TABLE public.orders")
    assert d.index == 2
    assert d.reason == 'rule "no-drop" blocks DROP TABLE public.orders'
    assert d.kinds == {"drop", "ddl"}


def test_first_rule_wins_and_default_applies() -> None:
    gr = Guardrails(
        rules=[Rule(name="r1", action="review", statements=["delete"]),
               Rule(name="r2", action="block", statements=["delete"])],
        default="block",
    )
    g = SqlGuard(gr)
    assert (g.check("DELETE FROM t WHERE id = 1").rule) == "r1"
    assert g.check("SELECT 1").action == "block"
    assert g.check("SELECT 1").rule is None


def test_allowlist_cannot_be_bypassed_by_a_data_modifying_cte() -> None:
    g = SqlGuard(Guardrails(rules=[Rule(name="reads", action="allow", statements=["select"])], default="block"))
    assert g.check("SELECT 1").action == "allow"
    assert g.check("WITH x AS (DELETE FROM t RETURNING *) SELECT * FROM x").action == "block"


def test_non_sql_rules_never_match() -> None:
    g = SqlGuard(Guardrails(rules=[Rule(name="shell", action="block", commands=["rm"], statements=["select"])]))
    assert g.check("SELECT 1").action == "allow"


def test_on_unparsed_policy_is_configurable() -> None:
    g = SqlGuard(Guardrails(on_unparsed="review"))
    d = g.check("SELEC")
    assert (d.action, d.rule) == ("review", "on_unparsed")


# (sql, outcome): "caught" is blocked or held for review; "harmless" is rightly allowed (no hidden
# statement runs); "limit" is a documented limit (allowed although risky).
BYPASSES = [
    ("WITH x AS (DELETE FROM t RETURNING *) SELECT * FROM x", "caught"),
    ("WITH x AS (SELECT 1) DELETE FROM t", "caught"),
    ("SELECT 1; DROP TABLE t", "caught"),
    ("SELECT 1;DROP TABLE t;", "caught"),
    ("/* harmless */ DROP TABLE t", "caught"),
    ("SELECT 1 -- ; DROP TABLE t\n; DROP TABLE u", "caught"),
    ("SELECT 1 /* ; DROP TABLE t */", "harmless"),  # really only a comment: nothing to catch
    ("DrOp TaBlE t", "caught"),
    ('DROP TABLE "Orders"', "caught"),
    ('SELECT * FROM "DROP TABLE t"', "harmless"),  # an identifier that merely reads like a drop
    ("DO $$ BEGIN DROP TABLE t; END $$", "caught"),
    ("DO $body$ BEGIN EXECUTE 'DROP TABLE t'; END $body$", "caught"),
    ("DO $$ BEGIN EXECUTE 'DR' || 'OP TABLE t'; END $$", "caught"),  # computed: on_unparsed
    ("DO LANGUAGE plpython3u $$ import os $$", "caught"),
    ("EXPLAIN ANALYZE DELETE FROM t", "caught"),
    ("EXPLAIN (ANALYZE, FORMAT JSON) DROP TABLE t", "caught"),  # DDL cannot be EXPLAINed: parse error -> block
    ("EXPLAIN (ANALYZE false) DELETE FROM t", "caught"),  # any analyze option counts, whatever its value
    ("SELECT * FROM (SELECT pg_read_file('/etc/passwd')) s", "caught"),
    ("SELECT pg_catalog.pg_read_file('/etc/passwd')", "caught"),
    ('SELECT "pg_catalog"."PG_READ_FILE"(\'x\')', "caught"),  # quoted mixed case: globs are case-insensitive
    ("SELECT 1 WHERE EXISTS (SELECT lo_export(1, '/tmp/x'))", "caught"),
    ("SELECT * FROM dblink('host=x', 'DROP TABLE t') AS r(a text)", "caught"),
    ("CREATE TABLE z (a text DEFAULT pg_read_file('/etc/passwd'))", "caught"),
    ("COPY (SELECT 1) TO PROGRAM 'x'", "caught"),
    ("copy t from program $$curl evil$$", "caught"),
    ('SELECT * FROM U&"\\0070ublic".orders; DROP TABLE t', "caught"),
    ("SELECT U&'\\0044ROP TABLE t'", "harmless"),  # a string literal, not a statement
    ("SELECT $$; DROP TABLE t; $$", "harmless"),  # dollar-quoted literal: nothing runs
    ("SELECT $a$ x $a$; DROP TABLE t", "caught"),
    ("PREPARE p AS DROP TABLE t", "caught"),  # syntax error (PREPARE takes DML only) -> on_unparsed
    ("PREPARE p AS DELETE FROM t", "caught"),
    ("CREATE FUNCTION f() RETURNS void LANGUAGE sql AS 'DROP TABLE t'; SELECT f()", "limit"),  # UDF bodies
]


@pytest.mark.parametrize(("sql", "outcome"), BYPASSES)
def test_bypass_attempts(sql: str, outcome: str) -> None:
    d = SqlGuard(RULES).check(sql)
    assert (d.action != "allow") is (outcome == "caught"), d.reason


def test_do_execute_of_computed_string_is_unparsed() -> None:
    d = SqlGuard(Guardrails()).check("DO $$ BEGIN EXECUTE format('DROP TABLE %I', 't'); END $$")
    assert (d.action, d.rule) == ("block", "on_unparsed")


def test_is_write() -> None:
    g = SqlGuard(Guardrails())
    assert not is_write(g.analyse("SELECT 1; SHOW x").statements)
    assert is_write(g.analyse("SELECT 1; INSERT INTO t VALUES (1)").statements)
    assert is_write(g.analyse("WITH x AS (UPDATE t SET a = 1 RETURNING 1) SELECT 1").statements)


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT a FROM t WHERE id = 123 AND b = 'x'", "SELECT a FROM t WHERE id = ? AND b = ?"),
        ('SELECT "t1".a FROM "t 2" WHERE x = 1.5e3', 'SELECT "t1".a FROM "t 2" WHERE x = ?'),
        ("SELECT t1 FROM x WHERE a = $1", "SELECT t1 FROM x WHERE a = $1"),
        ("SELECT 1 -- c", None),
        ("SELECT /* c */ 1", None),
        ("SELECT E'\\''", None),
        ("SELECT $$x$$", None),
        ('SELECT U&"x"', None),
    ],
)
def test_shape(sql: str, expected: str | None) -> None:
    assert shape(sql) == expected


def test_cache_by_shape_shares_results_but_not_for_do_bodies() -> None:
    g = SqlGuard(RULES)
    a = g.analyse("SELECT abalance FROM pgbench_accounts WHERE aid = 1")
    assert g.analyse("SELECT abalance FROM pgbench_accounts WHERE aid = 2") is a
    assert g.check("DO 'BEGIN NULL; END'").action == "review"
    assert g.check("DO 'BEGIN DROP TABLE t; END'").action == "block"


# (sql, the built-in rule that blocks it on a read-only resource, or None): how the server reads
# SQL (client_encoding, standard_conforming_strings, backslash_quote) is pinned on every resource;
# turning writes back on is refused on a read-only one. Decided from the parse tree, so comments,
# U&"" identifiers and computed set_config names are seen through.
SETTINGS = [
    ("SET client_encoding = 'SJIS'", "hoop-lexer"),
    ("SET NAMES 'BIG5'", "hoop-lexer"),
    ("SET SESSION client_encoding TO gbk", "hoop-lexer"),
    ("RESET client_encoding", None),  # back to the value hoop pinned at login, like RESET ALL
    ("SET client_encoding TO DEFAULT", None),
    ("RESET standard_conforming_strings", None),
    ("SET SESSION standard_conforming_strings TO DEFAULT", None),
    ("RESET backslash_quote", "hoop-lexer"),  # not pinned: its start-up value is the server's
    ("SET backslash_quote = safe_encoding", "hoop-lexer"),
    ('SET "Client_Encoding" = \'SJIS\'', "hoop-lexer"),
    ('SET U&"client_encodin\\0067" = \'SJIS\'', "hoop-lexer"),
    ("SET standard_conforming_strings = off", "hoop-lexer"),
    ("SET LOCAL standard_conforming_strings TO 0", "hoop-lexer"),
    ("SET backslash_quote = on", "hoop-lexer"),
    ("SELECT set_config('standard_conforming_strings', 'off', false)", "hoop-lexer"),
    ("SELECT pg_catalog.set_config('CLIENT_ENCODING', 'sjis', false)", "hoop-lexer"),
    ("SELECT x FROM t WHERE set_config('client_' || 'encoding', 'SJIS', false) IS NOT NULL", "hoop-lexer"),
    ("SELECT set_config(name, 'off', false) FROM pg_settings", "hoop-lexer"),
    # one pg_settings row named by a constant (pg_dump sends this): decided by that name
    ("SELECT set_config(name, 'view, foreign-table', false) FROM pg_settings "
     "WHERE name = 'restrict_nonsystem_relation_kind'", None),
    ("SELECT set_config(name, setting, false) FROM pg_settings WHERE name = 'search_path'", None),
    ("SELECT pg_catalog.set_config(s.name, 'on', false) FROM pg_catalog.pg_settings s "
     "WHERE 'standard_conforming_strings' = s.name", None),
    ("SELECT set_config(name, 'off', false) FROM pg_settings WHERE name = 'standard_conforming_strings'",
     "hoop-lexer"),
    ("SELECT set_config(name, 'off', false) FROM pg_settings WHERE name = 'default_transaction_read_only'",
     "read_only"),
    ("SELECT set_config(name, 'x', false) FROM pg_settings WHERE name = 'a' OR name = 'client_encoding'",
     "hoop-lexer"),
    ("SELECT set_config(name, 'x', false) FROM pg_settings WHERE name <> 'a'", "hoop-lexer"),
    ("SELECT set_config(name, 'x', false) FROM pg_settings, users WHERE name = 'a'", "hoop-lexer"),
    ("SELECT set_config(name, 'x', false) FROM users WHERE name = 'a'", "hoop-lexer"),
    ("SELECT set_config(upper(name), 'x', false) FROM pg_settings WHERE name = 'a'", "hoop-lexer"),
    ("SELECT set_config(t.name, 'x', false) FROM pg_settings s, (SELECT 'client_encoding' AS name) t "
     "WHERE s.name = 'a'", "hoop-lexer"),
    ("SELECT (SELECT set_config(name, 'x', false) FROM users) FROM pg_settings WHERE name = 'a'", "hoop-lexer"),
    ("SELECT set_config(name, 'x', false) FROM pg_settings WHERE name = 'a' "
     "UNION SELECT set_config(name, 'x', false) FROM pg_settings", "hoop-lexer"),
    ("UPDATE pg_settings SET setting = 'off' WHERE name = 'standard_conforming_strings'", "hoop-lexer"),
    ("UPDATE pg_catalog.pg_settings SET setting = 'SJIS' WHERE name = 'client_encoding'", "hoop-lexer"),
    ("update PG_SETTINGS set setting = 'x' where name = 'search_path'", "hoop-lexer"),
    ("WITH a AS (UPDATE pg_settings SET setting = 'off' RETURNING 1) SELECT * FROM a", "hoop-lexer"),
    ("INSERT INTO pg_settings (name, setting) VALUES ('standard_conforming_strings', 'off')", "hoop-lexer"),
    ("DELETE FROM pg_catalog.pg_settings WHERE name = 'x'", "hoop-lexer"),
    ("SELECT name, setting FROM pg_settings WHERE name = 'standard_conforming_strings'", None),
    ("SELECT set_config($1, $2, false)", "hoop-lexer"),
    ("DO $$ BEGIN PERFORM set_config('client_encoding', 'SJIS', false); END $$", "hoop-lexer"),
    ("SET client_encoding = 'UTF8'", None),
    ("SET NAMES 'utf-8'", None),
    ("SET standard_conforming_strings = on", None),
    ("RESET ALL", None),
    ("SELECT set_config('search_path', 'public', false)", None),
    ("SELECT set_config('client_encoding', 'Unicode', false)", None),
    ("BEGIN READ --x\n WRITE", "read_only"),
    ("BEGIN READ WRITE", "read_only"),
    ("START TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ WRITE", "read_only"),
    ("SET TRANSACTION READ WRITE", "read_only"),
    ("SET SESSION CHARACTERISTICS AS TRANSACTION READ/**/WRITE", "read_only"),
    ('SET U&"default_transaction_read_onl\\0079" = off', "read_only"),
    ("SET default_transaction_read_only = off", "read_only"),
    ("SET transaction_read_only TO false", "read_only"),
    ("RESET default_transaction_read_only", "read_only"),
    ("SELECT set_config('default_transaction_read_only', 'off', false)", "read_only"),
    ("SELECT set_config('default_transaction_' || 'read_only', 'off', false)", "hoop-lexer"),
    ("SELECT 1; COMMIT; BEGIN READ WRITE", "read_only"),
    ("BEGIN", None),
    ("BEGIN READ ONLY", None),
    ("BEGIN ISOLATION LEVEL REPEATABLE READ", None),
    ("SET TRANSACTION READ ONLY", None),
    ("SET default_transaction_read_only = on", None),
    ("SELECT set_config('default_transaction_read_only', 'on', false)", None),
    ("SELECT 'BEGIN READ WRITE', 'transaction_read_only'", None),  # only mentioned, in literals
]


@pytest.mark.parametrize(("sql", "rule"), SETTINGS)
def test_settings_that_change_how_sql_is_read_or_written(sql: str, rule: str | None) -> None:
    d = SqlGuard(Guardrails(read_only=True)).check(sql)
    assert (d.action, d.rule) == (("block", rule) if rule else ("allow", None)), d.reason
    d = SqlGuard(Guardrails()).check(sql)  # not read-only: only the lexer rule applies
    assert (d.action, d.rule) == (("block", rule) if rule == "hoop-lexer" else ("allow", None)), d.reason


def test_lexer_rule_wins_over_other_rules_and_is_not_shared_by_shape() -> None:
    g = SqlGuard(Guardrails(rules=[Rule(name="careful-set", action="review", statements=["set"])]))
    assert (g.check("SET client_encoding = 'SJIS'").rule, g.check("SET client_encoding = 'UTF8'").rule) == \
        ("hoop-lexer", "careful-set")
    assert g.check("SET client_encoding = 'UTF8'").rule == "careful-set"  # same shape, other value
    assert g.check("SELECT set_config('client_encoding', 'SJIS', false)").rule == "hoop-lexer"
    assert g.check("SELECT set_config('application_name', 'x', false)").action == "allow"


# (sql, action, rule): a text with a backslash in a plain literal is also read as a server with
# standard_conforming_strings=off would (a function may have turned it off just before); when
# the two readings differ in their statements the text is unparsed, or blocked by a stricter
# rule of either reading. Values alone may differ: a regex's \d is still allowed.
SCS_OFF = [
    (r"SELECT 'x\''; DROP TABLE big; --'", "block", "on_unparsed"),
    (r"SELECT 'x\''; SELECT 1; --'", "block", "on_unparsed"),
    (r"SELECT 1 WHERE 'a1' ~ '^a\d$'", "allow", None),
    (r"SELECT regexp_replace(x, '\s+', ' ', 'g'), x LIKE 'a\%' FROM t", "allow", None),
    (r"SELECT date'2020-01-01', N'a\b', E'c\'d', $$e\$$", "allow", None),
    (r"SELECT 'C:\'", "block", "on_unparsed"),  # unterminated when read so: fails closed
    (r"SELECT 'a\', 'b'", "block", "on_unparsed"),
    (r"DO $$BEGIN PERFORM 'x\d'; END$$", "review", "do"),
    (r"DO $$BEGIN PERFORM 'x\''; DROP TABLE big; --'; END$$", "block", "on_unparsed"),
    (r"DO $$BEGIN EXECUTE 'SELECT ''x\''''; DROP TABLE big; --'''; END$$", "block", "on_unparsed"),
]


@pytest.mark.parametrize(("sql", "action", "rule"), SCS_OFF)
def test_a_backslash_in_a_plain_literal_is_also_read_with_standard_conforming_strings_off(
        sql: str, action: str, rule: str | None) -> None:
    d = SqlGuard(RULES).check(sql)
    assert (d.action, d.rule) == (action, rule), d.reason


def test_a_rule_of_the_other_reading_decides_when_unparsed_input_is_allowed() -> None:
    g = SqlGuard(Guardrails(on_unparsed="allow", rules=[Rule(name="no-drop", action="block", statements=["drop"])]))
    assert g.check(r"SELECT 'x\''; DROP TABLE big; --'").rule == "no-drop"
    ro = SqlGuard(Guardrails(on_unparsed="allow", read_only=True))
    d = ro.check(r"SELECT 'x\''; DELETE FROM t; --'")
    assert (d.action, d.rule) == ("block", "read_only"), d.reason
