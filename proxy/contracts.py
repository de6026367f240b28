"""The shapes the proxies need from the shared session layer (``proxy.access``, ``proxy.sessions``).

Typed as small protocols so the proxy depends on behaviour, not on the classes: the real
:class:`proxy.access.Gate` and :class:`proxy.sessions.SessionHub` satisfy them, and so do the
hand-written fakes in the tests.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, Protocol

from broker.model import Grant

__all__ = ["AccessGate", "Hub", "Live"]


class AccessGate(Protocol):
    async def authenticate(self, login: str, secret: str, resource: str) -> Grant: ...

    async def identify(self, login: str, secret: str) -> Grant: ...

    def authorize(self, grant: Grant, resource: str) -> Grant: ...


class Live(Protocol):
    id: str
    grant: Grant
    resource: str
    deadline: datetime
    stats: dict[str, int]

    def record(self, kind: str, data: dict[str, Any]) -> None: ...

    async def review(self, text: str, rule: str, timeout: float) -> bool: ...

    async def close(self, reason: str) -> None: ...

    def deadline_passed(self) -> None:
        """The proxy's own timer saw the deadline pass: the session ends unless the grant was extended."""
        ...


class Hub(Protocol):
    async def open(self, grant: Grant, resource: str, protocol: str, client_addr: str,
                   on_end: Callable[[str], None], detail: Mapping[str, Any] | None = None) -> Live: ...
