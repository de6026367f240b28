"""What the broker tells the world, and the ``Notifier`` interface it tells it through.

The broker publishes events after each committed change. The Slack bot renders them in
the request's thread; the proxies' session hub acts on grant endings and extensions. In one
process a :class:`Broadcast` delivers them in memory; a multi-instance deployment would add
a PostgreSQL LISTEN/NOTIFY carrier behind the same interface. Proxies enforce expiry on their
own clocks too, so a lost event never extends access.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from broker.model import AccessRequest, Grant, Identity, Review, Session

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Event:
    pass


@dataclass(frozen=True)
class RequestCreated(Event):
    request: AccessRequest
    requester: Identity


@dataclass(frozen=True)
class ApprovalAdded(Event):
    request: AccessRequest
    approver: Identity
    via: str


@dataclass(frozen=True)
class ApprovalWithdrawn(Event):
    request: AccessRequest
    approver: Identity


@dataclass(frozen=True)
class RequestDenied(Event):
    request: AccessRequest
    by: Identity
    reason: str


@dataclass(frozen=True)
class RequestLapsed(Event):
    request: AccessRequest


@dataclass(frozen=True)
class RequestCancelled(Event):
    request: AccessRequest
    by: Identity


@dataclass(frozen=True)
class GrantIssued(Event):
    """The only event that carries the secret: the notifier shows it to the requester only."""

    grant: Grant
    request: AccessRequest | None
    secret: str = field(repr=False)
    #: connection hints embed the secret (``PGPASSWORD=…``, ``Authorization: Bearer …``)
    hints: dict[str, str] = field(default_factory=dict, repr=False)
    breakglass_by: Identity | None = None
    breakglass_reason: str | None = None


@dataclass(frozen=True)
class GrantExtended(Event):
    grant: Grant
    request: AccessRequest | None
    by: Identity


@dataclass(frozen=True)
class GrantReminder(Event):
    grant: Grant
    request: AccessRequest | None


@dataclass(frozen=True)
class GrantEnded(Event):
    """Expired or revoked. ``grant.status`` says which; ``grant.ended_by`` who, if revoked."""

    grant: Grant
    request: AccessRequest | None


@dataclass(frozen=True)
class SessionOpened(Event):
    session: Session
    request: AccessRequest | None


@dataclass(frozen=True)
class SessionClosed(Event):
    session: Session
    request: AccessRequest | None


@dataclass(frozen=True)
class ReviewRequested(Event):
    review: Review
    request: AccessRequest | None


@dataclass(frozen=True)
class ReviewDecided(Event):
    review: Review
    request: AccessRequest | None


@dataclass(frozen=True)
class TranscriptReady(Event):
    """A masked transcript for the thread: ``summary`` in the message, ``text`` as a file."""

    request: AccessRequest | None
    grant: Grant
    title: str
    summary: str
    text: str
    filename: str
    extra: dict[str, Any] = field(default_factory=dict)


class Notifier(Protocol):
    async def publish(self, event: Event) -> None: ...


class NullNotifier:
    async def publish(self, event: Event) -> None:
        return None


class Broadcast:
    """Delivers each event to every subscriber, in order; one failing subscriber is logged
    and does not stop the others or the broker."""

    def __init__(self, subscribers: Sequence[Notifier] = ()) -> None:
        self.subscribers: list[Notifier] = list(subscribers)

    def add(self, subscriber: Notifier) -> None:
        self.subscribers.append(subscriber)

    async def publish(self, event: Event) -> None:
        for sub in list(self.subscribers):
            try:
                await sub.publish(event)
            except Exception:
                log.exception("notifier %s failed on %s", type(sub).__name__, type(event).__name__)


class RecordingNotifier:
    """A fake for tests: keeps every event."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    async def publish(self, event: Event) -> None:
        self.events.append(event)

    def of(self, kind: type[Event]) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]
