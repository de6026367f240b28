"""Every illegal lifecycle move raises."""

from __future__ import annotations

import pytest

from broker import lifecycle
from broker.errors import InvalidTransition
from broker.model import GrantStatus, RequestStatus, SessionStatus

REQUEST_EVENTS = ["approve", "deny", "lapse", "cancel"]
GRANT_EVENTS = ["extend", "expire", "revoke"]


@pytest.mark.parametrize("state", list(RequestStatus))
@pytest.mark.parametrize("event", REQUEST_EVENTS)
def test_request_moves(state: RequestStatus, event: str) -> None:
    if state is RequestStatus.PENDING:
        assert lifecycle.step(lifecycle.REQUEST, state, event) is not RequestStatus.PENDING
    else:
        with pytest.raises(InvalidTransition, match=f"cannot {event} .*{state.value}"):
            lifecycle.step(lifecycle.REQUEST, state, event, what="request")


@pytest.mark.parametrize("state", list(GrantStatus))
@pytest.mark.parametrize("event", GRANT_EVENTS)
def test_grant_moves(state: GrantStatus, event: str) -> None:
    if state is GrantStatus.ACTIVE:
        lifecycle.step(lifecycle.GRANT, state, event)
    else:
        with pytest.raises(InvalidTransition):
            lifecycle.step(lifecycle.GRANT, state, event)


def test_session_moves() -> None:
    assert lifecycle.step(lifecycle.SESSION, SessionStatus.OPEN, "close") is SessionStatus.CLOSED
    with pytest.raises(InvalidTransition):
        lifecycle.step(lifecycle.SESSION, SessionStatus.CLOSED, "close")
    with pytest.raises(InvalidTransition):
        lifecycle.step(lifecycle.REQUEST, RequestStatus.PENDING, "explode")


def test_a_repeated_move_says_already() -> None:
    """Once "cannot revoke grant while it is revoked"."""
    with pytest.raises(InvalidTransition, match=r"^cannot revoke grant: it is already revoked$"):
        lifecycle.step(lifecycle.GRANT, GrantStatus.REVOKED, "revoke", what="grant")
    with pytest.raises(InvalidTransition, match=r"^cannot revoke grant: it is expired$"):
        lifecycle.step(lifecycle.GRANT, GrantStatus.EXPIRED, "revoke", what="grant")
