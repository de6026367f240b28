"""The rules a resource carries: guardrails (block / review / allow) and masking.

The guards that apply them are in :mod:`proxy.guard`, :mod:`proxy.sqlguard`,
:mod:`proxy.shellguard` and :mod:`proxy.httpguard`; the maskers in :mod:`proxy.mask`.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Literal

from pydantic import Field, field_validator, model_validator

from broker.config.base import Duration, _Model

__all__ = ["ALL_DETECTORS", "Action", "Detector", "Guardrails", "MaskRule", "Masking", "Rule", "SqlKind",
           "Strategy"]


# Statement kinds the SQL guard classifies. ``write`` is any data change, ``ddl`` any schema change.
SqlKind = Literal[
    "select", "insert", "update", "delete", "merge", "write",
    "drop", "truncate", "alter", "create", "ddl",
    "grant", "revoke", "copy", "copy_to_program", "copy_from_program", "copy_to_file",
    "copy_from_file", "update_without_where", "delete_without_where",
    "do", "call", "set", "lock", "vacuum", "listen", "other",
]
Action = Literal["block", "review", "allow"]


class Rule(_Model):
    """A guard rule. Non-empty selectors are ANDed; the entries of one selector are ORed.

    SQL resources use ``statements``, ``tables`` and ``functions``; SSH resources use
    ``commands``; HTTP resources use ``methods`` and ``paths``. Rules are tried in order and
    the first that matches decides; no match means ``guardrails.default``.
    """

    name: str
    action: Action
    statements: list[SqlKind] = Field(default_factory=list)
    tables: list[str] = Field(default_factory=list, description="table names, optionally schema-qualified; globs")
    functions: list[str] = Field(default_factory=list, description="function names; globs")
    commands: list[str] = Field(default_factory=list, description="shell command patterns, e.g. 'rm -rf /'")
    methods: list[str] = Field(default_factory=list, description="HTTP methods")
    paths: list[str] = Field(default_factory=list, description="HTTP path globs, e.g. /api/v1/namespaces/*")

    @model_validator(mode="after")
    def _has_selector(self) -> Rule:
        if not (self.statements or self.tables or self.functions or self.commands or self.methods or self.paths):
            raise ValueError(f"rule {self.name!r} has no selector (statements, tables, functions, commands, ...)")
        return self

    @field_validator("methods")
    @classmethod
    def _upper(cls, value: list[str]) -> list[str]:
        return [m.upper() for m in value]


class Guardrails(_Model):
    rules: list[Rule] = Field(default_factory=list)
    default: Action = "allow"
    on_unparsed: Action = "block"
    review_timeout: Duration = timedelta(minutes=5)
    read_only: bool = False


Detector = Literal["email", "card", "ssn", "iban", "phone", "secret"]
Strategy = Literal["redact", "partial", "hash"]
ALL_DETECTORS: tuple[Detector, ...] = ("email", "card", "ssn", "iban", "phone", "secret")


class MaskRule(_Model):
    """Mask a column (SQL: ``email``, ``users.email``, globs) or a JSON key (HTTP)."""

    match: str
    strategy: Strategy = "redact"


class Masking(_Model):
    enabled: bool = True
    detectors: list[Detector] = Field(default_factory=lambda: list(ALL_DETECTORS))
    strategy: Strategy = "redact"
    columns: list[MaskRule] = Field(default_factory=list)
    json_keys: list[MaskRule] = Field(default_factory=list)
    #: how many masked rows of each result the recording keeps
    sample_rows: int = Field(default=20, ge=0, le=10_000)
