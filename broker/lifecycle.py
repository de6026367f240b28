"""Lifecycle state machines as data: ``(state, event) -> next state``.

``step`` is the only way to move; an illegal move raises :class:`InvalidTransition`.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TypeVar

from broker.errors import InvalidTransition
from broker.model import GrantStatus, RequestStatus, SessionStatus

S = TypeVar("S", bound=StrEnum)

REQUEST: dict[tuple[RequestStatus, str], RequestStatus] = {
    (RequestStatus.PENDING, "approve"): RequestStatus.APPROVED,
    (RequestStatus.PENDING, "deny"): RequestStatus.DENIED,
    (RequestStatus.PENDING, "lapse"): RequestStatus.LAPSED,
    (RequestStatus.PENDING, "cancel"): RequestStatus.CANCELLED,
}

GRANT: dict[tuple[GrantStatus, str], GrantStatus] = {
    (GrantStatus.ACTIVE, "extend"): GrantStatus.ACTIVE,
    (GrantStatus.ACTIVE, "expire"): GrantStatus.EXPIRED,
    (GrantStatus.ACTIVE, "revoke"): GrantStatus.REVOKED,
}

SESSION: dict[tuple[SessionStatus, str], SessionStatus] = {
    (SessionStatus.OPEN, "close"): SessionStatus.CLOSED,
}


def step(table: dict[tuple[S, str], S], state: S, event: str, *, what: str = "") -> S:
    """Return the next state, or raise :class:`InvalidTransition` naming the illegal move."""
    try:
        return table[(state, event)]
    except KeyError:
        subject = f" {what}" if what else ""
        already = "already " if any(e == event and to == state for (_, e), to in table.items()) else ""
        raise InvalidTransition(f"cannot {event}{subject}: it is {already}{state.value}",
                                code=f"{state.value}") from None
