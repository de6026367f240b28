"""Database URLs: as hoop prints them (never with a password), and as it hands them to SQLAlchemy."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlencode

__all__ = ["DIALECT_ONLY", "engine_args", "redact_url"]

#: query parameters of SQLAlchemy's asyncpg dialect that are not libpq/asyncpg DSN parameters
DIALECT_ONLY = frozenset({"prepared_statement_cache_size", "prepared_statement_name_func", "async_fallback"})


def redact_url(url: str) -> str:
    """Hide a password in a database URL before printing it: in the user part, and in the query
    (``?password=...``, which libpq-style URLs also take)."""
    base, qmark, query = url.partition("?")
    scheme, sep, rest = base.partition("://") if "://" in base else ("", "", base)
    if "@" in rest:
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        base = f"{scheme}{sep}{user}:***@{host}"
    if qmark:
        pairs = [(k, "***" if "pass" in k.lower() else v) for k, v in parse_qsl(query, keep_blank_values=True)]
        query = "&".join(f"{k}={v}" for k, v in pairs)
    return base + qmark + query


def engine_args(url: str) -> tuple[str, dict[str, Any]]:
    """The SQLAlchemy URL and ``connect_args`` for a store URL.

    A libpq-style ``postgresql://`` or ``postgres://`` URL (as a cloud console prints it) means hoop's
    asyncpg driver. Its libpq query parameters (``sslmode``, ``sslrootcert``, ``application_name``,
    ``connect_timeout``, ...) go to asyncpg as a DSN, which asyncpg reads as libpq would: SQLAlchemy would
    pass them on as keyword arguments, which asyncpg refuses (``?sslmode=require`` was a traceback). The
    dialect's own ``ssl=`` is libpq's ``sslmode``. Other URLs are returned as they are."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("postgres", "postgresql", "postgresql+asyncpg"):
        return url, {}
    base, _, query = rest.partition("?")
    pairs = parse_qsl(query, keep_blank_values=True)
    dialect = [(k, v) for k, v in pairs if k in DIALECT_ONLY]
    libpq = [("sslmode" if k == "ssl" else k, v) for k, v in pairs if k not in DIALECT_ONLY]
    target = "postgresql+asyncpg://" + base + (f"?{urlencode(dialect)}" if dialect else "")
    return target, ({"dsn": f"postgresql://?{urlencode(libpq)}"} if libpq else {})
