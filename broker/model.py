"""The domain model: plain dataclasses, no I/O, no Slack, no sockets."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Literal


class RequestStatus(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"
    LAPSED = "lapsed"
    CANCELLED = "cancelled"


class GrantStatus(StrEnum):
    ACTIVE = "active"
    EXPIRED = "expired"
    REVOKED = "revoked"


class SessionStatus(StrEnum):
    OPEN = "open"
    CLOSED = "closed"


@dataclass(frozen=True)
class Identity:
    """Who is acting. ``chain`` is the whole line of identities behind this one.

    A human acting directly has ``chain == (email,)``. An agent acting for alice has
    ``chain == ("alice@x", "ci-runner")``; a sub-agent holding a delegated credential adds
    its label.
    """

    email: str
    name: str = ""
    groups: frozenset[str] = frozenset()
    kind: Literal["human", "agent"] = "human"
    acts_for: str | None = None
    slack_id: str | None = None
    chain: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.chain:
            base = (self.acts_for, self.email) if self.acts_for else (self.email,)
            object.__setattr__(self, "chain", base)

    @property
    def label(self) -> str:
        return self.name or self.email

    def chain_text(self) -> str:
        return " → ".join(self.chain)


@dataclass(frozen=True)
class StepSpec:
    group: str
    count: int


@dataclass
class Approval:
    """One person's approval. ``groups`` are the approver groups they belonged to when they
    approved; which step slot they fill is decided by matching (see ``policy.assign``).
    ``chain`` is the approver's chain of identities: for an agent it starts with the human it
    acts for, so that human counts once however many of their agents approve. Approvals stored
    before hoop recorded it have an empty chain and stand for their approver alone."""

    approver: str
    groups: tuple[str, ...]
    at: datetime
    via: str = "slack"
    chain: tuple[str, ...] = ()

    @property
    def principals(self) -> frozenset[str]:
        """Everyone this approval speaks for, lower-cased: the approver and their chain."""
        return frozenset(c.lower() for c in (*self.chain, self.approver))


@dataclass
class AccessRequest:
    id: str
    resource: str
    requester: str
    chain: tuple[str, ...]
    duration: timedelta
    reason: str
    status: RequestStatus
    created_at: datetime
    lapses_at: datetime
    steps: tuple[StepSpec, ...]
    approvals: list[Approval] = field(default_factory=list)
    requester_slack_id: str | None = None
    card_channel: str | None = None
    card_ts: str | None = None
    decided_by: str | None = None
    decision_reason: str | None = None
    decided_at: datetime | None = None
    grant_id: str | None = None
    #: set when this request asks to extend an existing grant rather than for new access
    extends_grant: str | None = None


@dataclass
class Grant:
    id: str
    login: str
    identity: str
    chain: tuple[str, ...]
    resources: tuple[str, ...]
    status: GrantStatus
    created_at: datetime
    expires_at: datetime
    request_id: str | None = None
    parent_id: str | None = None
    depth: int = 0
    label: str | None = None
    breakglass: bool = False
    ended_at: datetime | None = None
    end_reason: str | None = None
    ended_by: str | None = None
    reminded_at: datetime | None = None
    #: upstream role name when the resource uses ephemeral credentials
    db_role: str | None = None

    def remaining(self, now: datetime) -> timedelta:
        return max(self.expires_at - now, timedelta(0))

    def chain_text(self) -> str:
        return " → ".join(self.chain)


@dataclass
class Session:
    id: str
    grant_id: str
    resource: str
    protocol: str
    login: str
    chain: tuple[str, ...]
    client_addr: str
    status: SessionStatus
    opened_at: datetime
    closed_at: datetime | None = None
    close_reason: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class SessionEvent:
    session_id: str
    seq: int
    at: datetime
    kind: str
    data: dict[str, Any]


@dataclass
class Review:
    """A statement or command held by a proxy until an approver allows it."""

    id: str
    session_id: str
    grant_id: str
    resource: str
    text: str
    rule: str
    requested_by: str
    created_at: datetime
    deadline: datetime
    status: Literal["pending", "allowed", "refused", "timed_out"] = "pending"
    decided_by: str | None = None
    channel: str | None = None
    ts: str | None = None


@dataclass(frozen=True)
class AuditEntry:
    seq: int
    at: datetime
    actor: str
    chain: tuple[str, ...]
    action: str
    request_id: str | None
    grant_id: str | None
    detail: dict[str, Any]
    prev_hash: str
    hash: str
