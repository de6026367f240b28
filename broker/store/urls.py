"""Database URLs as hoop prints them: never with a password."""

from __future__ import annotations

from urllib.parse import parse_qsl

__all__ = ["redact_url"]


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
