"""Requirements of the Slack bot issue that the other scenario tests left unexercised, each driven by
signed payloads against the fake Slack."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from broker.clock import FakeClock
from broker.config import HoopConfig, parse_config
from broker.events import GrantIssued
from broker.model import Grant, RequestStatus
from broker.scheduler import Scheduler
from tests.bot.harness import Hoop
from tests.conftest import base_config
from tests.support.fakeslack import FakeSlack


def _config(**prod_db: Any) -> HoopConfig:
    """The harness's config (security by Slack user group SSEC), with prod-db changed."""
    data = base_config()
    data["groups"]["security"] = {"members": [], "slack_usergroup": "SSEC"}
    data["resources"][0].update(prod_db)
    return parse_config(data)


@pytest.fixture
async def self_extending(fake: FakeSlack, tmp_path: Path, clock: FakeClock) -> AsyncIterator[Hoop]:
    """prod-db's grants are extended without re-approval."""
    running = await Hoop(fake=fake, db=tmp_path / "hoop.db", clock=clock,
                         config=_config(extension={"requires_approval": False})).start()
    try:
        yield running
    finally:
        await running.close()


async def _granted(hoop: Hoop) -> tuple[Grant, str, str]:
    await hoop.command("request prod-db 30m fix invoice 4411")
    channel, ts = hoop.card()
    await hoop.react("UDANA", channel, ts)
    await hoop.react("USAM", channel, ts)
    return hoop.recorder.of(GrantIssued)[-1].grant, channel, ts


def _extend_buttons(hoop: Hoop) -> list[tuple[str, str, str]]:
    """(channel, ts, value) of every Extend button posted: the reminder in the thread and in the DM."""
    out = []
    for call in hoop.fake.of("chat.postMessage"):
        for block in call.params.get("blocks") or []:
            for el in block.get("elements") or []:
                if el.get("action_id") == "hoop_extend":
                    out.append((str(call.response["channel"]), str(call.response["ts"]), str(el["value"])))
    return out


async def _ends(hoop: Hoop, grant_id: str):  # type: ignore[no-untyped-def]
    async with hoop.store.tx() as tx:
        stored = await tx.get_grant(grant_id)
    assert stored is not None
    return stored.expires_at


async def test_a_double_clicked_extend_button_extends_once(self_extending: Hoop, clock: FakeClock) -> None:
    """A grant extended without re-approval used to be extended by every click: a double click on the
    reminder's Extend button (or a click on its thread copy and its DM copy) gave twice the time."""
    hoop = self_extending
    grant, _, card_ts = await _granted(hoop)
    clock.advance(timedelta(minutes=26))
    assert (await Scheduler(hoop.service, clock).run_due()).reminded == [grant.id]
    (thread_ch, thread_ts, value), (dm_ch, dm_ts, dm_value) = _extend_buttons(hoop)
    assert dm_ch == "DUALICE" and dm_value == value
    await asyncio.gather(hoop.click("hoop_extend", value, "UALICE", thread_ch, thread_ts),
                         hoop.click("hoop_extend", value, "UALICE", thread_ch, thread_ts))
    await hoop.click("hoop_extend", dm_value, "UALICE", dm_ch, dm_ts)
    assert await _ends(hoop, grant.id) == grant.expires_at + timedelta(minutes=30)
    assert sum("Extended by" in t for t in hoop.thread(card_ts)) == 1
    assert sum("already pressed Extend" in n for n in hoop.ephemerals("UALICE")) == 2

    # the next reminder, for the new end, extends again
    clock.advance(timedelta(minutes=30))
    assert (await Scheduler(hoop.service, clock).run_due()).reminded == [grant.id]
    _, _, next_value = _extend_buttons(hoop)[-1]
    assert next_value != value
    await hoop.click("hoop_extend", next_value, "UALICE", thread_ch, thread_ts)
    assert await _ends(hoop, grant.id) == grant.expires_at + timedelta(minutes=60)


async def test_a_double_clicked_extend_button_asks_for_one_re_approval(hoop: Hoop, clock: FakeClock) -> None:
    grant, _, _ = await _granted(hoop)
    clock.advance(timedelta(minutes=26))
    await Scheduler(hoop.service, clock).run_due()
    channel, ts, value = _extend_buttons(hoop)[0]
    await asyncio.gather(hoop.click("hoop_extend", value, "UALICE", channel, ts),
                         hoop.click("hoop_extend", value, "UALICE", channel, ts))
    async with hoop.store.tx() as tx:
        pending = [r for r in await tx.list_requests(status=RequestStatus.PENDING) if r.extends_grant == grant.id]
    assert len(pending) == 1
    assert "already has a pending extension request" in hoop.ephemerals("UALICE")[-1]
    assert await _ends(hoop, grant.id) == grant.expires_at
