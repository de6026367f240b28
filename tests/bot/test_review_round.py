"""Defects found in the review of the Slack side, each driven by signed payloads against the fake Slack."""

from __future__ import annotations

import json
from datetime import timedelta
from urllib.parse import urlencode

import pytest

from broker.clock import FakeClock
from broker.events import ApprovalAdded, GrantIssued, TranscriptReady
from broker.model import Grant, Identity, Session, SessionEvent, SessionStatus
from tests.bot.harness import Hoop


async def _request(hoop: Hoop, text: str = "request prod-db 30m fix invoice 4411",
                   user: str = "UALICE") -> tuple[str, str, str]:
    await hoop.command(text, user=user)
    post = [c for c in hoop.fake.of("chat.postMessage") if "thread_ts" not in c.params and c.response.get("ok")][-1]
    channel, ts = str(post.params["channel"]), str(post.response["ts"])
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


def _home_click(action_id: str, value: str, user: str) -> dict[str, object]:
    """A button clicked in the App Home tab: the payload names a view, and no channel."""
    return {"type": "block_actions", "user": {"id": user}, "trigger_id": "trig-home",
            "container": {"type": "view", "view_id": "VHOME"},
            "view": {"id": "VHOME", "type": "home", "blocks": [], "private_metadata": ""},
            "actions": [{"type": "button", "action_id": action_id, "block_id": "b", "value": value,
                         "action_ts": "1"}]}


async def test_app_home_buttons_answer_the_clicker_and_refresh_the_home(hoop: Hoop) -> None:
    """A click in App Home has no channel: a refusal used to go nowhere, and the Home kept
    offering Approve for a request the clicker had already approved."""
    rid, _channel, ts = await _request(hoop)
    await hoop.event({"type": "app_home_opened", "user": "UDANA", "tab": "home"})
    assert rid in json.dumps(hoop.fake.of("views.publish")[-1].params["view"])

    await hoop.interact(_home_click("hoop_approve", rid, "UDANA"))
    async with hoop.store.tx() as tx:
        req = await tx.get_request(rid)
    assert req is not None and [a.approver for a in req.approvals] == ["dana@example.com"]
    home = hoop.fake.of("views.publish")[-1]
    assert home.params["user_id"] == "UDANA" and f"Approve {rid}" not in json.dumps(home.params["view"])

    await hoop.interact(_home_click("hoop_approve", rid, "UDANA"))  # a stale Home clicked again
    dms = [c for c in hoop.fake.of("chat.postMessage") if c.params["channel"] == "DUDANA"]
    assert len(dms) == 1 and "already approved" in dms[0].params["text"]
    assert not any("already approved" in t for t in hoop.thread(ts))

    await hoop.interact(_home_click("hoop_approve", rid, "UBOB"))  # not an approver
    dms = [c for c in hoop.fake.of("chat.postMessage") if c.params["channel"] == "DUBOB"]
    assert len(dms) == 1 and "only members of dba, security can approve" in dms[0].params["text"]


def _deny_submission(meta: str, user: str, reason: str = "") -> dict[str, object]:
    return {"type": "view_submission", "user": {"id": user}, "trigger_id": "trig-x",
            "view": {"id": "V1", "type": "modal", "callback_id": "hoop_deny_modal", "private_metadata": meta,
                     "state": {"values": {"reason": {"reason_input": {"type": "plain_text_input",
                                                                      "value": reason}}}}}}


async def test_a_refused_deny_shows_in_the_modal_as_slack_errors(hoop: Hoop) -> None:
    """A refused deny used to close the modal and post an ephemeral note in the card's channel,
    which the denier may not even be in; Slack shows ``response_action: errors`` in the modal."""
    rid, _channel, _ts = await _request(hoop)
    status, body = await hoop.interact(_deny_submission(rid, "UBOB", "no"))
    assert status == 200
    answer = json.loads(body)
    assert answer["response_action"] == "errors"
    assert "only members of dba, security can deny" in answer["errors"]["reason"]
    assert hoop.ephemerals("UBOB") == []

    await hoop.command(f"cancel {rid}")
    status, body = await hoop.interact(_deny_submission(rid, "UDANA", "too late"))
    assert "cannot deny request: it is cancelled" in json.loads(body)["errors"]["reason"]

    rid2, _, _ = await _request(hoop, "request prod-db 1h second")
    status, body = await hoop.interact(_deny_submission(f"{rid2}|home", "UDANA", "not today"))
    assert status == 200 and body == ""  # closes the modal
    async with hoop.store.tx() as tx:
        req = await tx.get_request(rid2)
    assert req is not None and req.status.value == "denied" and req.decision_reason == "not today"
    assert hoop.fake.of("views.publish")[-1].params["user_id"] == "UDANA"  # opened from App Home: refreshed


async def test_a_deny_slower_than_the_modal_waits_is_answered_beside_the_card(hoop: Hoop) -> None:
    rid, channel, _ts = await _request(hoop)
    hoop.bot.modal_wait = 0.0
    status, body = await hoop.interact(_deny_submission(rid, "UBOB"))
    assert status == 200 and body == ""
    assert "only members of dba, security can deny" in hoop.ephemerals("UBOB")[-1]
    assert [c.params["channel"] for c in hoop.fake.of("chat.postEphemeral")] == [channel]


async def test_the_deny_button_in_app_home_marks_its_modal(hoop: Hoop) -> None:
    rid, _channel, _ts = await _request(hoop)
    await hoop.interact(_home_click("hoop_deny", rid, "UDANA"))
    assert hoop.fake.of("views.open")[-1].params["view"]["private_metadata"] == f"{rid}|home"


async def test_a_lost_thread_reply_does_not_keep_the_card_or_transcript_from_slack(
        hoop: Hoop, caplog: pytest.LogCaptureFixture) -> None:
    """Slack refusing the revocation notice used to end the notifier's work: the card kept saying
    "granted", and the only trace was a generic traceback. A passing failure is tried again."""
    hoop.bot.notifier.post_retry_delays = (0.0, 0.0)
    _rid, grant, _channel, ts = await _granted(hoop)
    hoop.fake.refuse("chat.postMessage", "service_unavailable", times=1)  # passes: tried again
    await hoop.command(f"revoke {grant.id} done", user="UDANA")
    posted = [c for c in hoop.fake.of("chat.postMessage") if c.params.get("thread_ts") == ts and c.response["ok"]]
    assert sum("Revoked by dana@example.com" in c.params["text"] for c in posted) == 1

    rid2, channel2, ts2 = await _request(hoop, "request prod-db 1h again")
    await hoop.react("UDANA", channel2, ts2)
    await hoop.react("USAM", channel2, ts2)
    grant2 = hoop.recorder.of(GrantIssued)[-1].grant
    hoop.fake.refuse("chat.postMessage", "not_in_channel")  # for good
    await hoop.command(f"revoke {grant2.id} done", user="UDANA")
    final = [c for c in hoop.fake.of("chat.update") if c.params["ts"] == ts2][-1]
    assert "Revoked" in json.dumps(final.params)
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any(f"request {rid2}" in e and "Revoked by dana@example.com" in e and "not_in_channel" in e
               for e in errors), errors

    # the transcript file still goes up when its summary line cannot, and a lost file is named
    async with hoop.store.tx() as tx:
        req2 = await tx.get_request(rid2)
    await hoop.bus.publish(TranscriptReady(request=req2, grant=grant2, title="Revoked", summary="1 statement",
                                           text="SELECT 1\n", filename="hoop-s7.txt", extra={"session": "s7"}))
    assert hoop.fake.of("upload")[-1].body == b"SELECT 1\n"
    hoop.fake.refuse("files.completeUploadExternal", "channel_not_found")
    await hoop.bus.publish(TranscriptReady(request=req2, grant=grant2, title="Revoked", summary="1 statement",
                                           text="SELECT 2\n", filename="hoop-s8.txt", extra={"session": "s8"}))
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any(f"grant {grant2.id}: the transcript file hoop-s8.txt" in e and "/hoop transcript s8" in e
               and "channel_not_found" in e for e in errors), errors


async def test_an_unreachable_response_url_falls_back_to_an_ephemeral(hoop: Hoop) -> None:
    """A response_url that cannot be reached raised out of the command's work: the asker got nothing."""
    form = {"token": "t", "team_id": "T1", "channel_id": "CCMD", "user_id": "UBOB", "command": "/hoop",
            "text": "request prod-db 30m x", "response_url": "http://127.0.0.1:9/respond/closed",
            "trigger_id": "trig-z", "api_app_id": "A1"}
    status, _ = await hoop.post(urlencode(form).encode(), "application/x-www-form-urlencoded")
    await hoop.bot.drain()
    assert status == 200
    notes = hoop.ephemerals("UBOB")
    assert len(notes) == 1 and "Request `r" in notes[0]
    assert hoop.fake.of("chat.postEphemeral")[-1].params["channel"] == "CCMD"


async def test_a_transient_user_group_failure_is_not_taken_as_not_a_member(hoop: Hoop, clock: FakeClock) -> None:
    """usergroups.users.list failing once used to count as an empty group, cached for five
    minutes: sam (security by Slack user group) was told he is no approver, again and again."""
    rid, channel, ts = await _request(hoop)
    clock.advance(timedelta(minutes=6))  # past the directory's cache of the group read for alice
    hoop.fake.refuse("usergroups.users.list", "service_unavailable", times=1)
    await hoop.react("USAM", channel, ts)
    note = hoop.ephemerals("USAM")[-1]
    assert "only members of" not in note and "service_unavailable" in note and "try again" in note
    await hoop.react("USAM", channel, ts, "+1")  # Slack is back: no five-minute memory of the failure
    async with hoop.store.tx() as tx:
        req = await tx.get_request(rid)
    assert req is not None and [a.approver for a in req.approvals] == ["sam@example.com"]


class _DenyOnFirstApproval:
    """A bus subscriber that denies a request between an approval's commit and its decision:
    the window in which another approver's ❌ or Deny lands."""

    def __init__(self, hoop: Hoop) -> None:
        self.hoop = hoop
        self.done = False

    async def publish(self, event: object) -> None:
        if isinstance(event, ApprovalAdded) and not self.done:
            self.done = True
            erin = Identity(email="erin@example.com", name="Erin", groups=frozenset({"dba", "security"}))
            await self.hoop.service.deny(event.request.id, erin, "")


async def test_an_approval_that_loses_to_a_denial_says_who_denied(hoop: Hoop) -> None:
    """A human denial racing the last approval was reported as "hoop refused it: None"."""
    rid, channel, ts = await _request(hoop)
    await hoop.react("USAM", channel, ts)  # security; dana's dba approval will meet the quorum
    hoop.bus.add(_DenyOnFirstApproval(hoop))
    await hoop.command(f"approve {rid}", user="UDANA")
    async with hoop.store.tx() as tx:
        req = await tx.get_request(rid)
    assert req is not None and req.status.value == "denied" and req.grant_id is None
    reply = hoop.responses()[-1]
    assert "None" not in reply and "hoop refused" not in reply
    assert f"`{rid}` was denied by erin@example.com before it was decided" in reply
    assert hoop.recorder.of(GrantIssued) == []


async def test_a_transcript_upload_slack_refuses_is_explained_to_the_asker(hoop: Hoop) -> None:
    _rid, grant, _channel, _ts = await _granted(hoop)
    now = hoop.clock.now()
    async with hoop.store.tx() as tx:
        await tx.insert_session(Session(id="s1", grant_id=grant.id, resource="prod-db", protocol="postgres",
                                        login=grant.login, chain=grant.chain, client_addr="10.1.2.3",
                                        status=SessionStatus.OPEN, opened_at=now))
        await tx.add_events([SessionEvent("s1", 1, now, "statement", {"sql": "SELECT 1", "decision": "allow"})])
    hoop.fake.refuse("files.completeUploadExternal", "not_in_channel")
    await hoop.command("transcript s1", user="UDANA")
    reply = hoop.responses()[-1]
    assert "failed inside hoop" not in reply
    assert "Slack refused it (not_in_channel)" in reply


async def test_a_review_whose_session_or_grant_ended_cannot_be_allowed(hoop: Hoop) -> None:
    """The client quit while its statement was held: nothing waits on the review any more, yet an
    Allow click recorded "allowed by dana" in the thread and the audit."""
    _rid, grant, channel, ts = await _granted(hoop)
    now = hoop.clock.now()
    session = Session(id="s1", grant_id=grant.id, resource="prod-db", protocol="postgres", login=grant.login,
                      chain=grant.chain, client_addr="10.1.2.3", status=SessionStatus.OPEN, opened_at=now)
    async with hoop.store.tx() as tx:
        await tx.insert_session(session)
    review = await hoop.reviews.open(session_id="s1", grant=grant, resource="prod-db", text="DELETE FROM orders",
                                     rule="deletes", timeout=timedelta(minutes=5))
    session.status, session.closed_at, session.close_reason = SessionStatus.CLOSED, now, "client quit"
    async with hoop.store.tx() as tx:
        await tx.update_session(session)
    await hoop.click("hoop_review_allow", review.id, "UDANA", channel, ts)
    async with hoop.store.tx() as tx:
        stored = await tx.get_review(review.id)
    assert stored is not None and stored.status == "timed_out" and stored.decided_by is None
    assert "session `s1` closed" in hoop.ephemerals("UDANA")[-1]
    assert not any("allowed by" in t for t in hoop.thread(ts))
    await hoop.click("hoop_review_allow", review.id, "USAM", channel, ts)  # a second click: told it is over
    assert "already timed_out" in hoop.ephemerals("USAM")[-1]


async def test_an_extension_card_slack_refused_is_not_reported_as_posted(hoop: Hoop, clock: FakeClock) -> None:
    await hoop.command("request prod-db 4h backfill")
    channel, ts = hoop.card()
    async with hoop.store.tx() as tx:
        (req,) = await tx.list_requests()
    await hoop.react("UDANA", channel, ts)
    await hoop.click("hoop_approve", req.id, "USAM", channel, ts)
    async with hoop.store.tx() as tx:
        granted = await tx.get_request(req.id)
    assert granted is not None and granted.grant_id is not None
    clock.advance(timedelta(hours=1))
    hoop.fake.refuse("chat.postMessage", "not_in_channel", times=1)
    await hoop.command(f"extend {granted.grant_id} 1h")
    reply = hoop.responses()[-1]
    assert "was posted in the thread" not in reply and "not_in_channel" in reply and "/hoop approve" in reply
