"""Waiting for a proxy session to be recorded closed, as every proxy's deadline tests do."""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

from broker.model import SessionStatus
from broker.service import Service


class HasService(Protocol):
    service: Service


async def close_reason(env: HasService, within: float = 10) -> str | None:
    """The close reason of the (first) session, once it is recorded closed; None if not within ``within``."""
    end = time.monotonic() + within
    while time.monotonic() < end:
        async with env.service.store.tx() as tx:
            sessions = await tx.list_sessions()
        if sessions and sessions[0].status is SessionStatus.CLOSED:
            return sessions[0].close_reason
        await asyncio.sleep(0.05)
    return None
