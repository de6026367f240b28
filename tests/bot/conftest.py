from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from broker.clock import FakeClock
from tests.bot.harness import Hoop, fake_slack
from tests.support.fakeslack import FakeSlack


@pytest.fixture
async def fake() -> AsyncIterator[FakeSlack]:
    server = await fake_slack().start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def hoop(fake: FakeSlack, tmp_path: Path, clock: FakeClock) -> AsyncIterator[Hoop]:
    running = await Hoop(fake=fake, db=tmp_path / "hoop.db", clock=clock).start()
    try:
        yield running
    finally:
        await running.close()
