"""The REST API's request and response bodies as pydantic models.

These models are the API's contract: handlers validate input with them, serialise output
with them, and ``/api/v1/openapi.json`` is generated from their JSON schemas.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from broker import policy, sealing
from broker.duration import format_duration, parse_duration
from broker.errors import InvalidInput
from broker.model import AccessRequest, Grant, GrantStatus, RequestStatus


def _check_pickup_key(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        sealing.public_key(value)
    except InvalidInput as exc:
        raise ValueError(exc.message) from None
    return value


def _check_duration(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        parse_duration(value)
    except InvalidInput as exc:
        raise ValueError(exc.message) from None
    return value


DurationText = Annotated[str, Field(max_length=32, examples=["30m", "1h30m"]), AfterValidator(_check_duration)]
#: a request's duration is checked by the service, whose refusal states the resource's maximum
RequestedDuration = Annotated[str, Field(min_length=1, max_length=32, examples=["30m", "1h30m"])]
Name = Annotated[str, Field(min_length=1, max_length=63, pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}$")]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @field_validator("*")
    @classmethod
    def _no_nul(cls, value: Any) -> Any:
        # PostgreSQL cannot store a NUL in text: refuse it here, naming the field, not later with a 500
        if isinstance(value, str) and "\x00" in value:
            raise ValueError("must not contain a NUL character")
        return value


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True)


# -- inputs ----------------------------------------------------------------------------------
class RequestCreate(_In):
    """Ask for access. Agents' requests carry the chain of the human they act for."""

    resource: Name
    duration: RequestedDuration | None = Field(default=None, description="e.g. 30m, at most the resource's "
                                               "max_duration; default: the resource's default")
    reason: str = Field(default="", max_length=2000)
    pickup_key: Annotated[str | None, AfterValidator(_check_pickup_key)] = Field(
        default=None, max_length=64,
        description="base64url X25519 public key: the credential is sealed to it in the store, so any broker "
                    "replica can hand it out, and only the holder of the private key can read it")


class Decision(_In):
    """Deny a request or revoke a grant, with an optional reason."""

    reason: str = Field(default="", max_length=2000)


class DelegateBody(_In):
    """Hand a sub-agent a narrower credential. Prove possession of the parent grant with the
    ``X-Hoop-Grant: <secret>`` header (preferred) or ``parent_secret``."""

    resources: list[Name] = Field(min_length=1, max_length=50, description="a subset of the parent's resources")
    duration: DurationText | None = Field(default=None, description="at most the parent's remaining time "
                                                                    "(default: all of it)")
    label: Name = Field(description="the sub-agent's name; appended to the chain")
    parent_secret: str | None = Field(default=None, max_length=512, description="the parent grant's secret, if "
                                                                                 "not sent as X-Hoop-Grant")


class RequestsQuery(_In):
    status: RequestStatus | None = None
    resource: str | None = Field(default=None, max_length=63)
    mine: bool = Field(default=False, description="only requests I made (or whose chain names me)")
    limit: int = Field(default=100, ge=1, le=500)


class GrantsQuery(_In):
    status: GrantStatus | None = None
    mine: bool = Field(default=False, description="only grants I hold or whose chain names me")
    limit: int = Field(default=100, ge=1, le=500)


# -- outputs ---------------------------------------------------------------------------------
class ApprovalOut(_Out):
    approver: str
    groups: list[str]
    at: datetime
    via: str


class StepOut(_Out):
    group: str
    count: int
    approvers: list[str]


class RequestOut(_Out):
    id: str
    resource: str
    requester: str
    chain: list[str]
    chain_text: str
    status: RequestStatus
    duration: str
    duration_seconds: int
    reason: str
    created_at: datetime
    lapses_at: datetime
    steps: list[StepOut]
    approvals: list[ApprovalOut]
    grant_id: str | None
    decided_by: str | None
    decision_reason: str | None
    extends_grant: str | None

    @classmethod
    def of(cls, r: AccessRequest) -> RequestOut:
        return cls(id=r.id, resource=r.resource, requester=r.requester, chain=list(r.chain),
                   chain_text=" → ".join(r.chain), status=r.status, duration=format_duration(r.duration),
                   duration_seconds=int(r.duration.total_seconds()), reason=r.reason, created_at=r.created_at,
                   lapses_at=r.lapses_at,
                   steps=[StepOut(group=f.group, count=f.count, approvers=list(f.approvers))
                          for f in policy.fill(r.steps, r.approvals)],
                   approvals=[ApprovalOut(approver=a.approver, groups=list(a.groups), at=a.at, via=a.via)
                              for a in r.approvals],
                   grant_id=r.grant_id, decided_by=r.decided_by, decision_reason=r.decision_reason,
                   extends_grant=r.extends_grant)


class GrantOut(_Out):
    """A grant, never its secret."""

    id: str
    login: str
    identity: str
    chain: list[str]
    chain_text: str
    resources: list[str]
    status: GrantStatus
    created_at: datetime
    expires_at: datetime
    remaining_seconds: int
    request_id: str | None
    parent_id: str | None
    depth: int
    label: str | None
    breakglass: bool
    ended_at: datetime | None
    end_reason: str | None
    ended_by: str | None

    @classmethod
    def of(cls, g: Grant, now: datetime) -> GrantOut:
        left = int(g.remaining(now).total_seconds()) if g.status is GrantStatus.ACTIVE else 0
        return cls(id=g.id, login=g.login, identity=g.identity, chain=list(g.chain), chain_text=g.chain_text(),
                   resources=list(g.resources), status=g.status, created_at=g.created_at, expires_at=g.expires_at,
                   remaining_seconds=left, request_id=g.request_id, parent_id=g.parent_id, depth=g.depth,
                   label=g.label, breakglass=g.breakglass, ended_at=g.ended_at, end_reason=g.end_reason,
                   ended_by=g.ended_by)


class RequestList(_Out):
    requests: list[RequestOut]


class GrantList(_Out):
    grants: list[GrantOut]


class ApproveOut(_Out):
    """The request after this approval. ``granted`` when it met the quorum; the secret goes to
    the requester, never to the approver."""

    request: RequestOut
    granted: bool
    grant: GrantOut | None = None


class CredentialOut(_Out):
    """A credential, shown once: ``secret`` works on every hoop proxy for ``grant.resources``.
    For a request made with a ``pickup_key``, ``secret`` is null and ``sealed`` holds the secret and
    the hints, encrypted to that key (X25519, HKDF-SHA256, AES-256-GCM bound to the request id)."""

    grant: GrantOut
    login: str
    secret: str | None
    hints: dict[str, str]
    sealed: str | None = None


class FieldError(_Out):
    loc: list[str | int]
    message: str
    type: str


class ErrorOut(_Out):
    """Every error: a stable ``error`` code, a human ``message``, and the field(s) at fault."""

    error: str
    message: str
    field: str | None = None
    fields: list[FieldError] = Field(default_factory=list)


class WhoAmI(_Out):
    """The caller as hoop sees it: agents name the human they act for in ``chain``."""

    email: str
    name: str
    kind: str
    acts_for: str | None
    groups: list[str]
    chain: list[str]
