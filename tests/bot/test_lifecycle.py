"""The rest of a request's thread and the other commands: rate limits, App Home, withdraw,
revoke, extend, reminders, break-glass, sessions, reviews and transcripts."""

from __future__ import annotations

import json
from datetime import timedelta

from broker.events import GrantIssued, SessionClosed, SessionOpened, TranscriptReady
from broker.model import GrantStatus, Identity, RequestStatus, Session, SessionEvent, SessionStatus
from broker.scheduler import Scheduler
from tests.bot.harness import Hoop


async def _granted(hoop: Hoop) -> tuple[str, str, str, str]:
    await hoop.command("request prod-db 30m fix invoice 4411")
    channel, ts = hoop.card()
    async with hoop.store.tx() as tx:
        req = await tx.request_by_card(channel, ts)
    assert req is not None
    await hoop.react("UDANA", channel, ts)
    await hoop.react("USAM", channel, ts)
    grant = hoop.recorder.of(GrantIssued)[-1].grant
    return req.id, grant.id, channel, ts


async def test_rate_limited_web_api_call_is_retried(hoop: Hoop) -> None:
    hoop.fake.rate_limit_once("chat.postMessage", retry_after=0)
    await hoop.command("request prod-db 30m fix invoice 4411")
    assert len(hoop.fake.of("chat.postMessage#429")) == 1
    channel, ts = hoop.card()
    assert channel == "C1"
    async with hoop.store.tx() as tx:
        assert await tx.request_by_card(channel, ts) is not None


async def test_app_home_lists_pending_grants_and_waiting(hoop: Hoop) -> None:
    await hoop.command("request prod-db 30m fix invoice 4411")
    await hoop.event({"type": "app_home_opened", "user": "UDANA", "tab": "home"})
    await hoop.event({"type": "app_home_opened", "user": "UALICE", "tab": "home"})
    published = {c.params["user_id"]: json.dumps(c.params["view"]) for c in hoop.fake.of("views.publish")}
    async with hoop.store.tx() as tx:
        rid = (await tx.list_requests())[0].id
    dana = published["UDANA"]
    assert "Waiting for my approval" in dana and rid in dana and "alice@example.com" in dana
    alice = published["UALICE"]
    assert "My pending requests" in alice and rid in alice
    assert alice.split("Waiting for my approval")[1].count(rid) == 0  # nobody approves their own


async def test_reaction_removed_withdraws_approval(hoop: Hoop) -> None:
    await hoop.command("request prod-db 30m fix invoice 4411")
    channel, ts = hoop.card()
    await hoop.react("UDANA", channel, ts)
    await hoop.react("UDANA", channel, ts, removed=True)
    async with hoop.store.tx() as tx:
        req = await tx.request_by_card(channel, ts)
    assert req is not None and req.approvals == []
    assert any("withdrew" in t for t in hoop.thread(ts))
    await hoop.react("UBOB", channel, ts, removed=True)  # never counted: nothing happens, no note
    assert hoop.ephemerals("UBOB") == []


async def test_removing_one_emoji_keeps_an_approval_given_otherwise(hoop: Hoop) -> None:
    """Un-reacting used to withdraw whatever approval its author had: one still shown by a
    second approve emoji, or one given by button."""
    await hoop.command("request prod-db 30m fix invoice 4411")
    channel, ts = hoop.card()

    async def approvers() -> list[str]:
        async with hoop.store.tx() as tx:
            req = await tx.request_by_card(channel, ts)
        assert req is not None and req.status is RequestStatus.PENDING
        return [a.approver for a in req.approvals]

    await hoop.react("USAM", channel, ts, "thumbsup")
    await hoop.react("USAM", channel, ts, "heavy_check_mark")  # counts once
    await hoop.react("USAM", channel, ts, "thumbsup", removed=True)
    assert await approvers() == ["sam@example.com"]
    assert not any("withdrew" in t for t in hoop.thread(ts))
    await hoop.react("USAM", channel, ts, "heavy_check_mark", removed=True)  # the last one goes: withdrawn
    assert await approvers() == []
    assert any("withdrew" in t for t in hoop.thread(ts))

    async with hoop.store.tx() as tx:
        req = await tx.request_by_card(channel, ts)
    assert req is not None
    await hoop.click("hoop_approve", req.id, "UDANA", channel, ts)
    await hoop.react("UDANA", channel, ts, "+1")
    await hoop.react("UDANA", channel, ts, "+1", removed=True)
    assert await approvers() == ["dana@example.com"]


async def test_revoke_status_list_and_card(hoop: Hoop) -> None:
    _rid, gid, _channel, ts = await _granted(hoop)
    await hoop.command("status")
    assert gid in hoop.responses()[-1] and "30m left" in hoop.responses()[-1]
    await hoop.command("list")
    assert "prod-db" in hoop.responses()[-1] and "1 from dba and 1 from security" in hoop.responses()[-1]
    await hoop.command(f"revoke {gid} done early", user="UBOB")  # bob is not an approver
    assert "only the requester" in hoop.responses()[-1]
    await hoop.command(f"revoke {gid} done early", user="UDANA")
    async with hoop.store.tx() as tx:
        grant = await tx.get_grant(gid)
    assert grant is not None and grant.status is GrantStatus.REVOKED
    assert any("Revoked by dana@example.com" in t for t in hoop.thread(ts))
    assert "Revoked" in json.dumps(hoop.fake.of("chat.update")[-1].params)


async def test_reminder_extend_button_and_expiry(hoop: Hoop) -> None:
    _rid, gid, channel, ts = await _granted(hoop)
    hoop.clock.advance(timedelta(minutes=26))
    assert (await Scheduler(hoop.service, hoop.clock).run_due()).reminded == [gid]
    reminder = [c for c in hoop.fake.of("chat.postMessage") if c.params.get("thread_ts") == ts][-1]
    assert "hoop_extend" in json.dumps(reminder.params["blocks"])
    dm = [c for c in hoop.fake.of("chat.postMessage") if c.params["channel"] == "DUALICE"][-1]
    assert "expires at" in dm.params["text"] and "hoop_extend" in json.dumps(dm.params["blocks"])
    await hoop.click("hoop_extend", gid, "UALICE", channel, ts)
    # extension needs re-approval: a new card in the same thread
    ext_card = [c for c in hoop.fake.of("chat.postMessage") if c.params.get("thread_ts") == ts][-1]
    assert len([c for c in hoop.fake.of("chat.postMessage") if "thread_ts" not in c.params
                and c.params["channel"] == "C1"]) == 1  # no second top-level card
    assert "Access request" in json.dumps(ext_card.params["blocks"]) and f"extend {gid}" in ext_card.params["text"]
    ext_ts = str(ext_card.response["ts"])
    await hoop.react("UDANA", channel, ext_ts)
    await hoop.react("USAM", channel, ext_ts)
    async with hoop.store.tx() as tx:
        grant = await tx.get_grant(gid)
    assert grant is not None and grant.expires_at == hoop.clock.now() + timedelta(minutes=34)
    assert any("Extended" in t for t in hoop.thread(ts))
    assert hoop.thread(ext_ts) == []  # approvals of the extension reply in the parent thread
    assert "Approved" in json.dumps([c.params for c in hoop.fake.of("chat.update") if c.params["ts"] == ext_ts][-1])
    hoop.clock.advance(timedelta(minutes=35))
    assert (await Scheduler(hoop.service, hoop.clock).run_due()).expired == [gid]
    assert any("Expired" in t for t in hoop.thread(ts))
    assert "Expired" in json.dumps([c.params for c in hoop.fake.of("chat.update") if c.params["ts"] == ts][-1])


async def test_breakglass_announced_in_channel_secret_only_in_dm(hoop: Hoop) -> None:
    admin = Identity(email="root@example.com", name="Root", groups=frozenset({"admins"}))
    _grant, secret = await hoop.service.breakglass(admin, "prod-db", "alice@example.com", "15m", "outage INC-7")
    announce = [c for c in hoop.fake.of("chat.postMessage") if c.params["channel"] == "C1"]
    assert len(announce) == 1 and "Break-glass" in announce[0].params["text"] and "INC-7" in announce[0].params["text"]
    # the secret was printed once, to the admin who ran break-glass; Slack never carries it
    assert not [c for c in hoop.fake.of("chat.postMessage") if c.params["channel"] == "DUALICE"]
    assert secret not in json.dumps([c.params for c in hoop.fake.calls])


async def test_sessions_reviews_and_transcript_in_thread(hoop: Hoop) -> None:
    rid, gid, channel, ts = await _granted(hoop)
    async with hoop.store.tx() as tx:
        grant = await tx.get_grant(gid)
        req = await tx.get_request(rid)
    assert grant is not None and req is not None
    now = hoop.clock.now()
    session = Session(id="s1", grant_id=gid, resource="prod-db", protocol="postgres", login=grant.login,
                      chain=grant.chain, client_addr="10.1.2.3", status=SessionStatus.OPEN, opened_at=now)
    async with hoop.store.tx() as tx:
        await tx.insert_session(session)
        await tx.add_events([SessionEvent("s1", 1, now, "statement", {"sql": "SELECT email FROM users",
                                                                       "decision": "allow"})])
    await hoop.bus.publish(SessionOpened(session=session, request=req))
    assert any("alice@example.com connected with postgres from 10.1.2.3" in t for t in hoop.thread(ts))

    await hoop.command("sessions prod-db", user="UDANA")  # an approver of prod-db
    assert "s1" in hoop.responses()[-1]
    await hoop.command("sessions", user="UALICE")  # her own
    assert "s1" in hoop.responses()[-1]
    await hoop.command("sessions", user="UBOB")  # neither: not even that it exists
    assert hoop.responses()[-1] == "No live sessions."
    await hoop.command("transcript s1", user="UBOB")
    assert "only the session's owner" in hoop.responses()[-1]
    await hoop.command("transcript s1", user="UDANA")  # typed in CCMD: the file goes to the request's thread
    assert f"Posted the transcript of `s1` in its request's thread in <#{channel}>" in hoop.responses()[-1]
    upload = hoop.fake.of("upload")[-1]
    assert b"SELECT email FROM users" in upload.body
    done = hoop.fake.of("files.completeUploadExternal")[-1]
    assert done.params["channel_id"] == channel and done.params["thread_ts"] == ts
    assert "1 statement(s)" in done.params["initial_comment"]
    assert not [c for c in hoop.fake.calls if "CCMD" in (c.params.get("channel"), c.params.get("channel_id"))]

    review = await hoop.reviews.open(session_id="s1", grant=grant, resource="prod-db",
                                     text="DELETE FROM orders WHERE id = 1", rule="deletes",
                                     timeout=timedelta(minutes=5))
    posted = [c for c in hoop.fake.of("chat.postMessage") if c.params.get("thread_ts") == ts][-1]
    assert "DELETE FROM orders" in posted.params["text"] and "hoop_review_allow" in json.dumps(posted.params["blocks"])
    review_ts = str(posted.response["ts"])
    await hoop.react("UALICE", channel, review_ts)  # the one asking cannot allow it
    assert any("cannot review your own statement" in t for t in hoop.ephemerals("UALICE"))
    await hoop.react("UDANA", channel, review_ts)
    async with hoop.store.tx() as tx:
        stored = await tx.get_review(review.id)
    assert stored is not None and stored.status == "allowed" and stored.decided_by == "dana@example.com"
    assert any(c.params["ts"] == review_ts and "allowed" in json.dumps(c.params) for c in hoop.fake.of("chat.update"))
    second = await hoop.reviews.open(session_id="s1", grant=grant, resource="prod-db", text="DROP TABLE x",
                                     rule="ddl", timeout=timedelta(minutes=5))
    await hoop.click("hoop_review_refuse", second.id, "USAM", channel, ts)
    async with hoop.store.tx() as tx:
        refused = await tx.get_review(second.id)
    assert refused is not None and refused.status == "refused"

    session.status, session.closed_at, session.close_reason = SessionStatus.CLOSED, now, "client quit"
    await hoop.bus.publish(SessionClosed(session=session, request=req))
    assert any("session `s1` closed" in t for t in hoop.thread(ts))
    await hoop.bus.publish(TranscriptReady(request=req, grant=grant, title="Transcript of s1",
                                           summary="1 statement", text="SELECT email FROM users\n",
                                           filename="s1.txt"))
    assert any("Transcript of s1" in t for t in hoop.thread(ts))
    upload = hoop.fake.of("upload")
    assert len(upload) == 2 and upload[-1].body == b"SELECT email FROM users\n"  # the first: /hoop transcript
    done = hoop.fake.of("files.completeUploadExternal")[-1]
    assert done.params["channel_id"] == channel and done.params["thread_ts"] == ts
    assert req.status is RequestStatus.APPROVED


async def test_transcript_of_a_session_without_a_thread_is_answered_to_the_asker_only(hoop: Hoop) -> None:
    """A break-glass grant has no request card: the transcript is the asker's ephemeral answer,
    not a file in the channel the command was typed in."""
    admin = Identity(email="root@example.com", name="Root", groups=frozenset({"admins"}))
    grant, _secret = await hoop.service.breakglass(admin, "prod-db", "alice@example.com", "15m", "INC-9")
    now = hoop.clock.now()
    async with hoop.store.tx() as tx:
        await tx.insert_session(Session(id="s9", grant_id=grant.id, resource="prod-db", protocol="postgres",
                                        login=grant.login, chain=grant.chain, client_addr="10.1.2.3",
                                        status=SessionStatus.OPEN, opened_at=now))
        await tx.add_events([SessionEvent("s9", 1, now, "statement", {"sql": "SELECT 1", "decision": "allow"})])
    hoop.fake.clear()
    await hoop.command("transcript s9", user="UDANA")
    assert "SELECT 1" in hoop.responses()[-1]
    assert hoop.fake.of("files.completeUploadExternal") == [] and hoop.fake.of("chat.postMessage") == []
