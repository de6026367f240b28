"""A grant's real end brought near, and an extension announced late: what the deadline tests of every
proxy use to race an extension against a grant's end."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from broker.clock import FakeClock
from broker.model import Grant
from broker.service import NoHooks


class ShiftedClock(FakeClock):
    """The system's clock, ``offset`` ahead: it moves as time does, and moving it brings a grant's real end
    (not only a live session's) seconds away. ``set`` and ``advance`` move the offset."""

    def __init__(self) -> None:
        super().__init__()
        self.offset = timedelta(0)

    def now(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def advance(self, delta: timedelta) -> datetime:
        self.offset += delta
        return self.now()

    def set(self, when: datetime) -> None:
        self.offset = when - datetime.now(UTC)


class SlowExtendHooks(NoHooks):
    """The extension's side effects take ``delay`` seconds: it is stored before it is announced."""

    def __init__(self) -> None:
        self.delay = 0.0

    async def extended(self, grant: Grant) -> None:
        await asyncio.sleep(self.delay)
