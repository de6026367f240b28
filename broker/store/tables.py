"""SQLAlchemy Core tables. The Alembic migrations under ``migrations/`` create these."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
)


class UtcDateTime(TypeDecorator[datetime]):
    """Stores naive UTC, returns aware UTC: SQLite keeps no time zone, PostgreSQL does."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


metadata = MetaData()

requests = Table(
    "requests", metadata,
    Column("id", String(32), primary_key=True),
    Column("resource", String(64), nullable=False),
    Column("requester", String(320), nullable=False),
    Column("chain", JSON, nullable=False),
    Column("duration_s", Integer, nullable=False),
    Column("reason", Text, nullable=False),
    Column("status", String(16), nullable=False, index=True),
    Column("created_at", UtcDateTime, nullable=False),
    Column("lapses_at", UtcDateTime, nullable=False),
    Column("steps", JSON, nullable=False),
    Column("requester_slack_id", String(32)),
    Column("card_channel", String(64)),
    Column("card_ts", String(32)),
    Column("decided_by", String(320)),
    Column("decision_reason", Text),
    Column("decided_at", UtcDateTime),
    Column("grant_id", String(32)),
    Column("extends_grant", String(32), index=True),
    # a reaction or a button is looked up by the message it is on (migration 0006)
    Index("ix_requests_card", "card_channel", "card_ts"),
)

approvals = Table(
    "approvals", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("request_id", String(32), nullable=False, index=True),
    Column("approver", String(320), nullable=False),
    Column("groups", JSON, nullable=False),
    Column("at", UtcDateTime, nullable=False),
    Column("via", String(16), nullable=False),
    # the approver's chain of identities (migration 0005); NULL on rows written before it
    Column("chain", JSON),
    UniqueConstraint("request_id", "approver", name="uq_approvals_request_approver"),
)

grants = Table(
    "grants", metadata,
    Column("id", String(32), primary_key=True),
    Column("login", String(64), nullable=False, unique=True),
    Column("secret_digest", String(64), nullable=False, unique=True),
    Column("scram_verifier", Text, nullable=False),
    Column("identity", String(320), nullable=False),
    Column("chain", JSON, nullable=False),
    Column("resources", JSON, nullable=False),
    Column("status", String(16), nullable=False, index=True),
    Column("created_at", UtcDateTime, nullable=False),
    Column("expires_at", UtcDateTime, nullable=False),
    Column("request_id", String(32), unique=True),
    Column("parent_id", String(32), index=True),
    Column("depth", Integer, nullable=False, default=0),
    Column("label", String(128)),
    Column("breakglass", Boolean, nullable=False, default=False),
    Column("ended_at", UtcDateTime),
    Column("end_reason", Text),
    Column("ended_by", String(320)),
    Column("reminded_at", UtcDateTime),
    Column("db_role", String(64)),
)

sessions = Table(
    "sessions", metadata,
    Column("id", String(32), primary_key=True),
    Column("grant_id", String(32), nullable=False, index=True),
    Column("resource", String(64), nullable=False),
    Column("protocol", String(16), nullable=False),
    Column("login", String(64), nullable=False),
    Column("chain", JSON, nullable=False),
    Column("client_addr", String(128), nullable=False),
    Column("status", String(16), nullable=False, index=True),
    Column("opened_at", UtcDateTime, nullable=False),
    Column("closed_at", UtcDateTime),
    Column("close_reason", Text),
    Column("stats", JSON, nullable=False),
)

#: a session's recording: runs of its events, each a chunk of JSON lines (broker/eventlines.py),
#: in ``lines`` as text or, from migration 0004, in ``packed`` (``eventlines.pack``; ``lines`` is
#: then empty). Before migration 0003, a row per event in ``session_events``; see below.
session_event_chunks = Table(
    "session_event_chunks", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("session_id", String(32), nullable=False),
    Column("first_seq", Integer, nullable=False),
    Column("last_seq", Integer, nullable=False),
    Column("lines", Text, nullable=False),
    Column("packed", LargeBinary),
    Index("ix_session_event_chunks_session_first", "session_id", "first_seq", unique=True),
)

#: legacy, read only: a row per event, as replicas older than migration 0003 write them. 0003
#: moves the rows it finds into chunks but keeps the table, so during a rolling upgrade the old
#: replicas still running keep storing their events (hoop reads both); a later migration drops it.
session_events = Table(
    "session_events", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("session_id", String(32), nullable=False),
    Column("seq", Integer, nullable=False),
    Column("at", UtcDateTime, nullable=False),
    Column("kind", String(16), nullable=False),
    Column("data", JSON, nullable=False),
    Index("ix_session_events_session_seq", "session_id", "seq", unique=True),
)

reviews = Table(
    "reviews", metadata,
    Column("id", String(32), primary_key=True),
    Column("session_id", String(32), nullable=False),
    Column("grant_id", String(32), nullable=False),
    Column("resource", String(64), nullable=False),
    Column("text", Text, nullable=False),
    Column("rule", String(128), nullable=False),
    Column("requested_by", String(320), nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    Column("deadline", UtcDateTime, nullable=False),
    Column("status", String(16), nullable=False),
    Column("decided_by", String(320)),
    Column("channel", String(64)),
    Column("ts", String(32)),
    Index("ix_reviews_message", "channel", "ts"),
)

audit_log = Table(
    "audit_log", metadata,
    Column("seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=False),
    Column("at", UtcDateTime, nullable=False),
    Column("actor", String(320), nullable=False),
    Column("chain", JSON, nullable=False),
    Column("action", String(64), nullable=False),
    Column("request_id", String(32)),
    Column("grant_id", String(32)),
    Column("detail", JSON, nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
)

processed_events = Table(
    "processed_events", metadata,
    Column("key", String(128), primary_key=True),
    Column("at", UtcDateTime, nullable=False),
)

pickups = Table(
    "pickups", metadata,
    Column("request_id", String(32), primary_key=True),
    #: the requester's X25519 public key (base64url); the private half never reaches hoop
    Column("public_key", String(64), nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    #: the credential sealed to ``public_key`` (see broker/sealing.py); NULL until issued, and again once collected
    Column("sealed", Text, nullable=True),
    Column("grant_id", String(32), nullable=True),
    Column("expires_at", UtcDateTime, nullable=True),
    Column("collected_at", UtcDateTime, nullable=True),
)
