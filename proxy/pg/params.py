"""Which of a client's start-up settings hoop passes to the database.

How this works. Every start-up parameter other than ``user``, ``database``, ``replication`` and
``options`` becomes a setting of the upstream session, with a higher priority than the role's
and the database's own. hoop passes on only settings that change neither how the server reads
SQL (``client_encoding``, ``standard_conforming_strings``, ``backslash_quote``: the guard reads
SQL as UTF-8 with ``standard_conforming_strings=on``) nor who the session is or what it may do
(``role``, ``session_authorization``, ``*read_only``, ``session_replication_role``, custom
``app.*`` settings that row-level security may read): the planner, timeouts, memory, output
formats, ``search_path`` and ``application_name`` (:data:`PASSED_SETTINGS`). Names compare
case-insensitively, as in PostgreSQL.

``options`` (libpq's PGOPTIONS, pgjdbc's and npgsql's ``options``) is split as the server
splits it (:func:`parse_options`: spaces separate, a backslash keeps the next character), and
each ``-c name=value`` or ``--name=value`` in it is judged by the same list and passed as a
start-up parameter of its own; any other switch is refused. A parameter given both ways keeps
its explicit value, as in PostgreSQL. A ``client_encoding`` meaning UTF-8 (or SQL_ASCII, which
asks for no conversion at all) is accepted and served by hoop's pin. Anything else is refused
with 42501 naming it, before hoop connects upstream.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from broker.errors import HoopError
from proxy.sqlguard import is_utf8

__all__ = ["PASSED_SETTINGS", "Refusal", "parse_options", "startup_params"]

#: settings passed on to the database, by lower-case name; also every ``enable_*`` planner switch
#: and every ``geqo*`` setting (:func:`passed`)
PASSED_SETTINGS = frozenset({
    "application_name", "search_path",
    "datestyle", "intervalstyle", "timezone", "extra_float_digits", "bytea_output", "xmlbinary", "xmloption",
    "lc_monetary", "lc_numeric", "lc_time", "client_min_messages",
    "statement_timeout", "lock_timeout", "idle_in_transaction_session_timeout", "idle_session_timeout",
    "transaction_timeout", "default_transaction_isolation",
    "work_mem", "maintenance_work_mem", "hash_mem_multiplier", "temp_buffers",
    "jit", "jit_above_cost", "jit_inline_above_cost", "jit_optimize_above_cost",
    "random_page_cost", "seq_page_cost", "cpu_tuple_cost", "cpu_index_tuple_cost", "cpu_operator_cost",
    "parallel_setup_cost", "parallel_tuple_cost", "effective_cache_size", "effective_io_concurrency",
    "default_statistics_target", "from_collapse_limit", "join_collapse_limit", "cursor_tuple_fraction",
    "plan_cache_mode", "max_parallel_workers_per_gather", "constraint_exclusion",
})
_PASSED_FAMILIES = re.compile(r"(?:enable_|geqo)[a-z_]*")
_LOGIN_PARAMS = frozenset({"user", "database", "replication"})  # read by hoop itself
_PASSED_TEXT = ("planner, timeout, memory and output-format settings, search_path, application_name, "
                "client_encoding=UTF8")
_SPACE = " \t\n\r\f\v"  # C isspace(), which the server splits options on


class Refusal(HoopError):
    """A refusal during set-up with its own SQLSTATE."""

    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(message, code=sqlstate)
        self.sqlstate = sqlstate


def passed(name: str) -> bool:
    """Whether setting ``name`` (any case) is passed on as a start-up setting."""
    key = name.lower()
    return key in PASSED_SETTINGS or _PASSED_FAMILIES.fullmatch(key) is not None


def _split(options: str) -> list[str]:
    """PostgreSQL's ``pg_split_opts``: words separated by spaces; a backslash keeps the next character."""
    words: list[str] = []
    word: list[str] = []
    escaped = started = False
    for ch in options:
        if escaped:
            word.append(ch)
            escaped = False
        elif ch in _SPACE:
            if started:
                words.append("".join(word))
                word, started = [], False
            continue
        elif ch == "\\":
            escaped = True
        else:
            word.append(ch)
        started = True
    if started:
        words.append("".join(word))
    return words


def parse_options(options: str) -> list[tuple[str, str]]:
    """The ``(name, value)`` settings of an ``options`` start-up parameter, in order; raises a
    42501 :class:`Refusal` for any other switch (the server would take those too)."""
    words = _split(options)
    out: list[tuple[str, str]] = []
    i = 0
    while i < len(words):
        word = words[i]
        if word == "-c" and i + 1 < len(words):
            setting = words[i + 1]
            i += 2
        elif word[:2] in ("-c", "--") and len(word) > 2:
            setting = word[2:]
            i += 1
        else:
            raise Refusal("42501", f'hoop: "{word}" in start-up parameter "options" is not allowed: hoop passes '
                                   "only -c name=value and --name=value settings")
        name, eq, value = setting.partition("=")
        if not eq:
            raise Refusal("42501", f'hoop: "{setting}" in start-up parameter "options" has no value')
        out.append((name.replace("-", "_"), value))  # the server reads dashes in a name as underscores
    return out


def startup_params(params: Mapping[str, str]) -> dict[str, str]:
    """The client's start-up parameters that go upstream; raises a 42501 :class:`Refusal`
    naming any setting hoop does not pass on (see the module docstring)."""
    taken: dict[str, tuple[str, str]] = {}  # lower-case name -> (name, value)
    explicit: list[tuple[str, str, str]] = []
    for name, value in params.items():
        key = name.lower()
        if key in _LOGIN_PARAMS or key.startswith("_pq_."):  # _pq_: answered by NegotiateProtocolVersion
            continue
        if key == "options":
            explicit[:0] = [(n, v, f'setting "{n}" in start-up parameter "options"') for n, v in parse_options(value)]
        else:
            explicit.append((name, value, f'start-up parameter "{name}"'))
    for name, value, what in explicit:  # options first: an explicit parameter overrides them
        key = name.lower()
        if key == "client_encoding":
            encoding = value.strip("'\" ")
            if not is_utf8(encoding) and encoding.lower() != "sql_ascii":
                raise Refusal("42501", f"hoop: client_encoding {encoding!r} is not allowed: hoop relays "
                                       "UTF8 sessions only (set PGCLIENTENCODING=UTF8)")
        elif passed(key):
            taken.pop(key, None)
            taken[key] = (name, value)
        else:
            raise Refusal("42501", f"hoop: {what} is not allowed: hoop does not pass it to the database "
                                   f"(it passes {_PASSED_TEXT})")
    return dict(taken.values())
