"""Defects found in the review of the Slack side, each driven by signed payloads against the fake Slack."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from broker.clock import FakeClock
from broker.events import GrantIssued
from broker.model import Grant
from tests.bot.harness import Hoop


async def _request(hoop: Hoop, text: str = "request prod-db 30m fix invoice 4411",
                   user: str = "UALICE") -> tuple[str, str, str]:
    await hoop.command(text, user=user)
    channel, ts = hoop.card()
    async with hoop.store.tx() as tx:
        req = await tx.request_by_card(channel, ts)
    assert req is not None
    return req.id, channel, ts


async def _granted(hoop: Hoop) -> tuple[str, Grant, str, str]:
    rid, channel, ts = await _request(hoop)
    await hoop.react("UDANA", channel, ts)
    await hoop.react("USAM", channel, ts)
    return rid, hoop.recorder.of(GrantIssued)[-1].grant, channel, ts


async def test_a_review_click_after_its_deadline_does_not_allow_the_statement(hoop: Hoop, clock: FakeClock) -> None:
    """The proxy notices a timeout up to a poll later, and a proxy that died never records it: a
    click after the deadline used to mark the review allowed, and the waiter then let it run."""
    _rid, grant, channel, ts = await _granted(hoop)
    review = await hoop.reviews.open(session_id="s1", grant=grant, resource="prod-db", text="DELETE FROM orders",
                                     rule="deletes", timeout=timedelta(minutes=5))
    clock.advance(timedelta(minutes=5, seconds=1))
    await hoop.click("hoop_review_allow", review.id, "UDANA", channel, ts)
    async with hoop.store.tx() as tx:
        stored = await tx.get_review(review.id)
    assert stored is not None and stored.status == "timed_out" and stored.decided_by is None
    assert "timed out" in hoop.ephemerals("UDANA")[-1]
    assert await hoop.reviews.wait(review) is False
    updated = [c for c in hoop.fake.of("chat.update") if c.params["ts"] == review.ts]
    assert updated and "timed_out" in json.dumps(updated[-1].params) and "hoop_review_allow" not in json.dumps(
        updated[-1].params)


async def test_a_card_slack_refused_is_not_reported_as_posted(hoop: Hoop, caplog: pytest.LogCaptureFixture) -> None:
    """hoop not invited to the resource's channel: the request is stored but nobody sees a card.
    The requester used to be told it was "posted in #C1" and wait until it lapsed."""
    hoop.fake.refuse("chat.postMessage", "not_in_channel", times=1)
    await hoop.command("request prod-db 30m fix invoice 4411")
    async with hoop.store.tx() as tx:
        (req,) = await tx.list_requests()
    reply = hoop.responses()[-1]
    assert "posted in" not in reply
    assert f"could not post the card of `{req.id}` in <#C1> (Slack: not_in_channel)" in reply
    assert f"/hoop approve {req.id}" in reply
    assert any(r.levelname == "ERROR" and req.id in r.getMessage() and "not_in_channel" in r.getMessage()
               for r in caplog.records)
