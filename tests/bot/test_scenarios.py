"""The issue's scenarios: signed Slack payloads over HTTP to a running hoop, against the fake Slack."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest

from broker.clock import FakeClock
from broker.events import GrantIssued
from broker.model import Identity, RequestStatus
from broker.scheduler import Scheduler
from tests.bot.harness import Hoop
from tests.support.fakeslack import FakeSlack


async def _request(hoop: Hoop, text: str = "request prod-db 30m fix invoice 4411",
                   user: str = "UALICE") -> tuple[str, str, str]:
    status, _ = await hoop.command(text, user=user)
    assert status == 200
    channel, ts = hoop.card()
    async with hoop.store.tx() as tx:
        req = await tx.request_by_card(channel, ts)
    assert req is not None
    return req.id, channel, ts


async def _stored(hoop: Hoop, request_id: str):  # type: ignore[no-untyped-def]
    async with hoop.store.tx() as tx:
        return await tx.get_request(request_id)


def _updates(hoop: Hoop, ts: str) -> list[str]:
    return [json.dumps(c.params) for c in hoop.fake.of("chat.update") if c.params.get("ts") == ts]


async def test_full_flow_two_groups_dm_with_secret_card_updated(hoop: Hoop, tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    rid, channel, ts = await _request(hoop)
    assert channel == "C1"
    card_post = hoop.fake.of("chat.postMessage")[0]
    assert "fix invoice 4411" in json.dumps(card_post.params["blocks"])
    assert any(f"Request `{rid}`" in r for r in hoop.responses())

    await hoop.react("UDANA", channel, ts)  # dba
    assert any("Dana approved (dba)" in t for t in hoop.thread(ts))
    assert "dana@example.com" in _updates(hoop, ts)[-1]
    assert (await _stored(hoop, rid)).status is RequestStatus.PENDING

    status, _ = await hoop.click("hoop_approve", rid, "USAM", channel, ts)  # security, by Slack user group
    assert status == 200
    req = await _stored(hoop, rid)
    assert req.status is RequestStatus.APPROVED and req.grant_id

    issued = hoop.recorder.of(GrantIssued)
    assert len(issued) == 1
    secret = issued[0].secret
    assert secret.startswith("hoop_")
    opened = hoop.fake.of("conversations.open")
    assert opened and opened[-1].params["users"] == "UALICE"
    dms = [c for c in hoop.fake.of("chat.postMessage") if c.params["channel"] == "DUALICE"]
    assert len(dms) == 1 and secret in json.dumps(dms[0].params)
    assert "psql" in json.dumps(dms[0].params)
    assert secret not in hoop.fake.everything_but(dms[0])  # not in the thread, card, or anywhere else
    assert secret not in caplog.text and "fix invoice 4411" in caplog.text  # DEBUG logs on, secret absent
    for path in tmp_path.glob("hoop.db*"):
        assert secret.encode() not in path.read_bytes()

    assert any("Granted until" in t for t in hoop.thread(ts))
    final = _updates(hoop, ts)[-1]
    assert "Approved" in final and "granted until" in final and "hoop_approve" not in final


async def test_self_approval_refused(hoop: Hoop) -> None:
    rid, channel, ts = await _request(hoop)
    await hoop.react("UALICE", channel, ts)
    assert any("cannot approve your own request" in t for t in hoop.ephemerals("UALICE"))
    await hoop.click("hoop_approve", rid, "UALICE", channel, ts)
    assert len(hoop.ephemerals("UALICE")) == 2
    req = await _stored(hoop, rid)
    assert req.approvals == [] and req.status is RequestStatus.PENDING


async def test_non_approver_reaction_ignored_with_note(hoop: Hoop) -> None:
    rid, channel, ts = await _request(hoop)
    updates_before = len(hoop.fake.of("chat.update"))
    await hoop.react("UBOB", channel, ts)
    notes = hoop.ephemerals("UBOB")
    assert len(notes) == 1 and "only members of dba, security can approve" in notes[0]
    await hoop.react("UBOB", channel, ts, "x")  # nor can bob deny
    assert "only members of dba, security can deny" in hoop.ephemerals("UBOB")[1]
    await hoop.react("UBOB", channel, ts, "tada")  # an unrelated emoji: silence
    assert len(hoop.ephemerals("UBOB")) == 2
    assert (await _stored(hoop, rid)).approvals == []
    assert len(hoop.fake.of("chat.update")) == updates_before


async def test_one_person_in_both_groups_counts_once_and_double_click_counts_once(hoop: Hoop) -> None:
    rid, channel, ts = await _request(hoop)
    await hoop.react("UERIN", channel, ts)  # erin: dba by email, security by Slack user group
    await hoop.react("UERIN", channel, ts, "+1::skin-tone-2")
    await hoop.click("hoop_approve", rid, "UERIN", channel, ts)
    notes = hoop.ephemerals("UERIN")
    assert len(notes) == 2 and all("already approved" in n for n in notes)
    req = await _stored(hoop, rid)
    assert [a.approver for a in req.approvals] == ["erin@example.com"]
    assert req.status is RequestStatus.PENDING

    # dana double-clicks Approve: one approval, one grant
    await asyncio.gather(hoop.click("hoop_approve", rid, "UDANA", channel, ts),
                         hoop.click("hoop_approve", rid, "UDANA", channel, ts))
    req = await _stored(hoop, rid)
    assert sorted(a.approver for a in req.approvals) == ["dana@example.com", "erin@example.com"]
    assert req.status is RequestStatus.APPROVED
    assert len(hoop.recorder.of(GrantIssued)) == 1
    assert len(hoop.ephemerals("UDANA")) == 1


async def test_a_human_and_their_agent_count_once_and_never_review_their_own(hoop: Hoop) -> None:
    dana_bot = Identity(email="dana-bot", kind="agent", acts_for="dana@example.com", groups=frozenset({"eng", "dba"}))
    rid, channel, ts = await _request(hoop, user="UBOB")
    await hoop.service.approve(rid, dana_bot, via="api")  # dana's agent fills the dba slot over the API
    await hoop.react("UDANA", channel, ts)
    notes = hoop.ephemerals("UDANA")
    assert len(notes) == 1 and "dana@example.com already counts through dana-bot;" in notes[0]
    assert [a.approver for a in (await _stored(hoop, rid)).approvals] == ["dana-bot"]

    # the agent's own request: dana may neither approve it nor allow its held statement
    agent_req = await hoop.service.request(dana_bot, "prod-db", "30m", "nightly cleanup")
    await hoop.click("hoop_approve", agent_req.id, "UDANA", channel, ts)
    assert "you are in this request's chain" in hoop.ephemerals("UDANA")[-1]
    await hoop.service.approve(agent_req.id, Identity(email="erin@example.com", groups=frozenset({"dba"})))
    result = await hoop.service.approve(agent_req.id, Identity(email="sam@example.com", groups=frozenset({"security"})))
    assert result.grant is not None and result.grant.chain == ("dana@example.com", "dana-bot")
    review = await hoop.reviews.open(session_id="s1", grant=result.grant, resource="prod-db",
                                     text="DELETE FROM orders", rule="deletes", timeout=timedelta(minutes=5))
    await hoop.click("hoop_review_allow", review.id, "UDANA", channel, ts)
    assert "is behind this statement's grant (dana@example.com → dana-bot)" in hoop.ephemerals("UDANA")[-1]
    await hoop.click("hoop_review_allow", review.id, "UERIN", channel, ts)
    async with hoop.store.tx() as tx:
        stored = await tx.get_review(review.id)
    assert stored is not None and stored.status == "allowed" and stored.decided_by == "erin@example.com"


async def test_deny_with_reason_via_modal(hoop: Hoop) -> None:
    rid, channel, ts = await _request(hoop)
    await hoop.click("hoop_deny", rid, "UDANA", channel, ts)
    opened = hoop.fake.of("views.open")
    assert len(opened) == 1
    view = opened[0].params["view"]
    assert view["callback_id"] == "hoop_deny_modal" and view["private_metadata"] == rid
    status, _ = await hoop.interact({
        "type": "view_submission", "user": {"id": "UDANA"}, "trigger_id": "trig-x",
        "view": {"id": "V1", "type": "modal", "callback_id": "hoop_deny_modal", "private_metadata": rid,
                 "state": {"values": {"reason": {"reason_input": {"type": "plain_text_input",
                                                                  "value": "not during the freeze"}}}}}})
    assert status == 200
    req = await _stored(hoop, rid)
    assert req.status is RequestStatus.DENIED and req.decision_reason == "not during the freeze"
    assert req.decided_by == "dana@example.com"
    assert any("Denied by Dana: not during the freeze" in t for t in hoop.thread(ts))
    assert "Denied" in _updates(hoop, ts)[-1]


async def test_forged_signature_refused(hoop: Hoop) -> None:
    body = b"command=%2Fhoop&text=request+prod-db+30m+x&user_id=UALICE&team_id=T1"
    status, _ = await hoop.post(body, "application/x-www-form-urlencoded", secret="not-the-secret")
    assert status == 401
    tampered_headers = {"X-Slack-Signature": "v0=" + "0" * 64}
    status, _ = await hoop.post(body, "application/x-www-form-urlencoded", headers=tampered_headers)
    assert status == 401
    await hoop.bot.drain()
    assert hoop.fake.calls == []
    async with hoop.store.tx() as tx:
        assert await tx.list_requests() == []


async def test_stale_timestamp_refused(hoop: Hoop) -> None:
    body = b"command=%2Fhoop&text=request+prod-db+30m+x&user_id=UALICE&team_id=T1"
    status, _ = await hoop.post(body, "application/x-www-form-urlencoded", timestamp=int(time.time()) - 600)
    assert status == 401
    await hoop.bot.drain()
    assert hoop.fake.calls == []


async def test_retried_event_processed_once(hoop: Hoop) -> None:
    rid, channel, ts = await _request(hoop)
    event = {"type": "reaction_added", "user": "UDANA", "reaction": "white_check_mark",
             "item": {"type": "message", "channel": channel, "ts": ts}, "event_ts": "1.1"}
    first = await hoop.event(event, event_id="EvSAME")
    retry = await hoop.event(event, event_id="EvSAME",
                             headers={"X-Slack-Retry-Num": "1", "X-Slack-Retry-Reason": "http_timeout"})
    assert first[0] == retry[0] == 200
    assert len((await _stored(hoop, rid)).approvals) == 1
    assert sum("Dana approved" in t for t in hoop.thread(ts)) == 1
    assert hoop.ephemerals("UDANA") == []  # the retry was not even seen as a duplicate approval


async def test_restart_mid_request_updates_original_card(fake: FakeSlack, tmp_path: Path, clock: FakeClock) -> None:
    first = await Hoop(fake=fake, db=tmp_path / "hoop.db", clock=clock).start()
    try:
        rid, channel, ts = await _request(first)
        await first.react("UDANA", channel, ts)
    finally:
        await first.close()
    fake.clear()
    second = await Hoop(fake=fake, db=tmp_path / "hoop.db", clock=clock).start()
    try:
        await second.react("USAM", channel, ts)
        req = await _stored(second, rid)
        assert req.status is RequestStatus.APPROVED
        updates = fake.of("chat.update")
        assert updates and all(u.params["ts"] == ts and u.params["channel"] == channel for u in updates)
        assert "Approved" in json.dumps(updates[-1].params)
        assert any("Granted until" in t for t in second.thread(ts))
        assert [c for c in fake.of("chat.postMessage") if "thread_ts" not in c.params and c.params["channel"] == "C1"
                ] == []  # no second card
        assert any(c.params["channel"] == "DUALICE" for c in fake.of("chat.postMessage"))
    finally:
        await second.close()


async def test_lapse_updates_card(hoop: Hoop, clock: FakeClock) -> None:
    rid, _channel, ts = await _request(hoop)
    clock.advance(timedelta(minutes=30))
    assert (await Scheduler(hoop.service, clock).run_due()).lapsed == []
    clock.advance(timedelta(minutes=31))
    report = await Scheduler(hoop.service, clock).run_due()
    assert report.lapsed == [rid]
    assert (await _stored(hoop, rid)).status is RequestStatus.LAPSED
    final = _updates(hoop, ts)[-1]
    assert "Lapsed" in final and "hoop_approve" not in final
    assert any("Lapsed" in t for t in hoop.thread(ts))


async def test_malformed_commands_get_precise_ephemeral_usage(hoop: Hoop) -> None:
    cases = {
        "frobnicate prod-db": "unknown command 'frobnicate'",
        "request": "`request` needs a resource and a duration",
        "request prod-db": "`request` needs a resource and a duration (got 1 word)",
        "request prod-db fix the invoice": "'fix' is not a duration",
        "approve": "`approve` needs a request id",
        "approve r1 r2": "`approve` takes at most 1; unexpected 'r2'",
        "status now": "`status` takes no arguments; unexpected 'now'",
        "extend g123 soon": "'soon' is not understood",
        "transcript": "`transcript` needs a session id",
    }
    for text, expected in cases.items():
        status, body = await hoop.command(text)
        assert status == 200, text
        reply = json.loads(body)["text"]
        assert expected in reply, (text, reply)
        assert "Usage" in reply or "/hoop help" in reply, (text, reply)
    assert hoop.fake.of("respond") == []  # answered in the ack itself
    # well-formed but refused by the broker: a precise ephemeral reply, never silence
    for text, expected in {"request nope-db 30m x": "unknown resource 'nope-db'",
                           "request prod-db 9h x": "longer than prod-db's maximum of 4h",
                           # every refused duration states the maximum
                           "request prod-db 30x fix": "unknown unit 'x'; units are d, h, m, s; prod-db allows up to 4h",
                           "request prod-db 0m fix": "is zero; ask for a positive duration; prod-db allows up to 4h",
                           "request prod-db -5m fix": "is negative; use e.g. 30m, 2h, 1h30m, 45s, 1d; prod-db allows "
                                                      "up to 4h",
                           "request prod-db 30m": "requires a reason",
                           "approve r_missing": "no request 'r_missing'"}.items():
        await hoop.command(text)
        assert expected in hoop.responses()[-1], (text, hoop.responses()[-1])
    await hoop.command("request prod-db 30m x", user="UGHOST")
    assert "cannot map your Slack account" in hoop.responses()[-1]
    status, body = await hoop.command("")
    assert "/hoop request <resource> <duration>" in json.loads(body)["text"]
    async with hoop.store.tx() as tx:
        assert await tx.list_requests() == []


async def test_api_reason_cannot_ping_or_link_from_the_card(hoop: Hoop) -> None:
    # an API (or agent) requester's text reaches Slack unescaped by Slack: hoop escapes it
    from broker.model import Identity
    from broker.policy import groups_of

    bob = Identity(email="bob@example.com", groups=groups_of(hoop.config, "bob@example.com"))
    req = await hoop.service.request(bob, "prod-db", "30m", "<!channel> routine, see <https://evil|runbook>")
    await hoop.bot.drain()
    _, ts = hoop.card()
    card = json.dumps(hoop.fake.of("chat.postMessage")[0].params)
    assert "&lt;!channel&gt; routine, see &lt;https://evil|runbook&gt;" in card
    assert "<!channel>" not in card and "<https://evil" not in card
    dana = Identity(email="dana@example.com", name="Dana", groups=groups_of(hoop.config, "dana@example.com"))
    await hoop.service.deny(req.id, dana, "<!here> not now & not <https://x|ever>")
    await hoop.bot.drain()
    assert any("Denied by Dana: &lt;!here&gt; not now &amp; not &lt;https://x|ever&gt;" in t for t in hoop.thread(ts))
    assert "&lt;!here&gt; not now" in _updates(hoop, ts)[-1]
    assert "<!here>" not in "\n".join(json.dumps(c.params, default=str) for c in hoop.fake.calls)


async def test_slash_command_text_is_kept_as_typed_and_escaped_once(hoop: Hoop) -> None:
    # Slack sends "R&D <b>" typed in /hoop as "R&amp;D &lt;b&gt;"; hoop keeps the typed text
    rid, _, _ = await _request(hoop, "request prod-db 30m R&amp;D &lt;b&gt; <!channel>")
    assert (await _stored(hoop, rid)).reason == "R&D <b> <!channel>"
    card = json.dumps(hoop.fake.of("chat.postMessage")[0].params["blocks"])
    assert "R&amp;D &lt;b&gt; &lt;!channel&gt;" in card and "&amp;amp;" not in card


async def test_second_extension_refused_and_an_overrun_reported(hoop: Hoop, clock: FakeClock) -> None:
    rid, channel, ts = await _request(hoop, "request prod-db 4h backfill")
    await hoop.react("UDANA", channel, ts)
    await hoop.click("hoop_approve", rid, "USAM", channel, ts)
    gid = (await _stored(hoop, rid)).grant_id
    clock.advance(timedelta(hours=1))
    await hoop.command(f"extend {gid} 1h")
    await hoop.command(f"extend {gid} 1h")  # a second one while the first is pending
    assert any("already has a pending extension request" in r for r in hoop.responses())
    async with hoop.store.tx() as tx:
        first = await tx.pending_extension(gid, clock.now())
        assert first is not None
        await tx.insert_request(replace(first, id="rolder"))  # one made before the pending check
    for ext in (first.id, "rolder"):
        await hoop.command(f"approve {ext}", user="UDANA")
        await hoop.command(f"approve {ext}", user="USAM")
    assert (await _stored(hoop, "rolder")).status is RequestStatus.DENIED
    assert any("hoop refused it: extension would leave more than prod-db's maximum of 4h" in r
               for r in hoop.responses())


async def test_failed_credential_dm_still_marks_the_thread_and_card(hoop: Hoop) -> None:
    """Slack refuses the DM for good: the thread still says granted, names the failure without the
    secret and says how to recover, and the card no longer offers Approve/Deny."""
    hoop.fake.refuse("conversations.open", "cannot_dm_bot")
    rid, channel, ts = await _request(hoop)
    await hoop.react("UDANA", channel, ts)
    await hoop.click("hoop_approve", rid, "USAM", channel, ts)
    req = await _stored(hoop, rid)
    assert req.status is RequestStatus.APPROVED and req.grant_id
    secret = hoop.recorder.of(GrantIssued)[0].secret
    granted = [t for t in hoop.thread(ts) if ":key: Granted" in t]
    assert len(granted) == 1
    assert "could not be sent" in granted[0] and "cannot_dm_bot" in granted[0]
    assert f"/hoop revoke {req.grant_id}" in granted[0]
    final = _updates(hoop, ts)[-1]
    assert "Approved" in final and "hoop_approve" not in final
    assert secret not in json.dumps([c.params for c in hoop.fake.calls])


async def test_credential_dm_tried_again_after_a_passing_failure(hoop: Hoop) -> None:
    hoop.bot.notifier.dm_retry_delays = (0.0, 0.0)
    rid, channel, ts = await _request(hoop)
    await hoop.react("UDANA", channel, ts)
    hoop.fake.refuse("conversations.open", "service_unavailable", times=2)
    await hoop.click("hoop_approve", rid, "USAM", channel, ts)
    secret = hoop.recorder.of(GrantIssued)[0].secret
    dms = [c for c in hoop.fake.of("chat.postMessage") if c.params["channel"] == "DUALICE"]
    assert len(dms) == 1 and secret in json.dumps(dms[0].params)
    assert len(hoop.fake.of("conversations.open")) == 3
    assert any("details sent to alice@example.com by DM" in t for t in hoop.thread(ts))


async def test_long_reasons_fit_slack_and_the_card_still_follows_the_request(hoop: Hoop) -> None:
    """The fake Slack refuses blocks over Block Kit's limits as Slack does: a long, escaping-heavy
    reason still gets a card, a long denial still updates it, and a busy App Home still publishes."""
    rid, channel, ts = await _request(hoop, "request prod-db 30m " + "R&amp;D &lt;b&gt; " * 300)
    assert channel == "C1" and not [c for c in hoop.fake.calls if not c.response.get("ok", True)]
    await hoop.command(f"deny {rid} " + "not now & not like this; " * 200, user="UDANA")
    assert (await _stored(hoop, rid)).status is RequestStatus.DENIED
    final = _updates(hoop, ts)[-1]
    assert "Denied* by dana@example.com: not now &amp; not" in final and "hoop_approve" not in final
    for i in range(25):
        await hoop.service.request(Identity(email="bob@example.com", groups=frozenset({"eng"})), "prod-db", "30m",
                                   f"ticket {i} " + "fix invoice batch; " * 20)
    await hoop.event({"type": "app_home_opened", "user": "UDANA", "tab": "home"})
    published = hoop.fake.of("views.publish")[-1]
    assert published.response["ok"] and "and 5 more" in json.dumps(published.params)
    assert not [c for c in hoop.fake.calls if not c.response.get("ok", True)]


async def test_a_requester_told_to_cancel_can_cancel_from_slack(hoop: Hoop) -> None:
    rid, channel, ts = await _request(hoop)
    await hoop.react("UALICE", channel, ts, "x")
    note = hoop.ephemerals("UALICE")[-1]
    assert f"cancel it instead (`/hoop cancel {rid}`" in note
    await hoop.command(f"cancel {rid}", user="UBOB")
    assert "only the requester or an admin can cancel" in hoop.responses()[-1]
    await hoop.command(f"cancel {rid}")
    assert hoop.responses()[-1] == f"Cancelled `{rid}`."
    assert (await _stored(hoop, rid)).status is RequestStatus.CANCELLED
    assert any("Cancelled by Alice" in t for t in hoop.thread(ts))
    assert "Cancelled" in _updates(hoop, ts)[-1] and "hoop_approve" not in _updates(hoop, ts)[-1]


async def test_only_gestures_are_recorded_as_processed(hoop: Hoop) -> None:
    """Every reaction in hoop's channels reaches it; only approve/deny gestures cost a store write."""
    _, channel, ts = await _request(hoop)
    for emoji in ("tada", "eyes", "thumbsup::skin-tone-2"):
        await hoop.react("UDANA", channel, ts, reaction=emoji)
    await hoop.react("UDANA", channel, ts, reaction="x", removed=True)  # taking a deny emoji away: no gesture
    async with hoop.store.tx() as tx:
        assert await tx.prune_processed(hoop.clock.now() + timedelta(days=1)) == 1  # the 👍 only
