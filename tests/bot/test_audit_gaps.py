"""Requirements of the Slack bot issue that the other scenario tests left unexercised, each driven by
signed payloads against the fake Slack."""

from __future__ import annotations

import asyncio
import json
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
    notes = [n for n in hoop.ephemerals("UALICE") if "extends it again" in n]
    assert len(notes) == 2 and any("now ends at 13:00 UTC" in n for n in notes)  # the DM's copy, after

    # the next reminder, for the new end, extends again
    clock.advance(timedelta(minutes=30))
    assert (await Scheduler(hoop.service, clock).run_due()).reminded == [grant.id]
    _, _, next_value = _extend_buttons(hoop)[-1]
    assert next_value != value
    await hoop.click("hoop_extend", next_value, "UALICE", thread_ch, thread_ts)
    assert await _ends(hoop, grant.id) == grant.expires_at + timedelta(minutes=60)
    # the first reminder's button does not extend again, even once its clicks are forgotten (the store
    # keeps the keys of handled Slack events for a day)
    async with hoop.store.tx() as tx:
        assert await tx.prune_processed(clock.now() + timedelta(days=1)) > 0
    await hoop.click("hoop_extend", value, "UALICE", thread_ch, thread_ts)
    assert await _ends(hoop, grant.id) == grant.expires_at + timedelta(minutes=60)
    assert "was extended after this reminder" in hoop.ephemerals("UALICE")[-1]


async def test_the_holder_and_an_admin_clicking_one_reminder_at_once_extend_it_once(self_extending: Hoop,
                                                                                   clock: FakeClock) -> None:
    """Each person's clicks counted once, so two people (the holder and an admin, both may extend) clicking
    together extended twice; and a click whose extension failed for a passing reason blocked that person's
    next click. The service now extends only the end the reminder announced, checked under the grant's lock."""
    hoop = self_extending
    hoop.fake.users["UROOT"] = {"email": "root@example.com", "name": "Root"}
    grant, _, card_ts = await _granted(hoop)
    clock.advance(timedelta(minutes=26))
    assert (await Scheduler(hoop.service, clock).run_due()).reminded == [grant.id]
    (thread_ch, thread_ts, value), _ = _extend_buttons(hoop)
    await asyncio.gather(hoop.click("hoop_extend", value, "UALICE", thread_ch, thread_ts),
                         hoop.click("hoop_extend", value, "UROOT", thread_ch, thread_ts))
    assert await _ends(hoop, grant.id) == grant.expires_at + timedelta(minutes=30)
    assert sum("Extended by" in t for t in hoop.thread(card_ts)) == 1
    told = [n for u in ("UALICE", "UROOT") for n in hoop.ephemerals(u) if "was extended after this reminder" in n]
    assert len(told) == 1 and "now ends at 13:00" in told[0]


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


async def _pending(hoop: Hoop) -> tuple[str, str, str]:
    await hoop.command("request prod-db 30m fix invoice 4411")
    channel, ts = hoop.card()
    async with hoop.store.tx() as tx:
        req = await tx.request_by_card(channel, ts)
    assert req is not None
    return req.id, channel, ts


async def test_no_entry_reaction_denies(hoop: Hoop) -> None:
    rid, channel, ts = await _pending(hoop)
    await hoop.react("UDANA", channel, ts, "no_entry")
    async with hoop.store.tx() as tx:
        req = await tx.get_request(rid)
    assert req is not None and req.status is RequestStatus.DENIED and req.decided_by == "dana@example.com"
    assert any("Denied by Dana" in t for t in hoop.thread(ts))


async def test_slack_lookups_are_cached_for_their_ttl(hoop: Hoop, clock: FakeClock) -> None:
    """users.info and usergroups.users.list are asked once per person and group within the TTL (5 minutes);
    after it, Slack is asked again, so someone taken out of an approver user group stops counting."""
    def asked(method: str, **params: str) -> int:
        return sum(all(c.params.get(k) == v for k, v in params.items()) for c in hoop.fake.of(method))

    rid, channel, ts = await _pending(hoop)
    await hoop.command("status")
    await hoop.react("USAM", channel, ts)  # security, by Slack user group SSEC
    await hoop.react("USAM", channel, ts, removed=True)
    await hoop.react("UERIN", channel, ts)
    await hoop.react("UERIN", channel, ts, removed=True)
    assert asked("users.info", user="UALICE") == 1 and asked("users.info", user="USAM") == 1
    assert asked("usergroups.users.list", usergroup="SSEC") == 1

    hoop.fake.usergroups["SSEC"] = ["UERIN"]  # sam leaves the security user group
    clock.advance(timedelta(minutes=5, seconds=1))
    await hoop.react("USAM", channel, ts)
    assert asked("users.info", user="USAM") == 2 and asked("usergroups.users.list", usergroup="SSEC") == 2
    assert "only members of dba, security can approve" in hoop.ephemerals("USAM")[-1]
    async with hoop.store.tx() as tx:
        req = await tx.get_request(rid)
    assert req is not None and req.approvals == []


async def test_app_home_shows_my_active_grants_with_time_left(hoop: Hoop, clock: FakeClock) -> None:
    grant, _, _ = await _granted(hoop)
    clock.advance(timedelta(minutes=12))
    await hoop.event({"type": "app_home_opened", "user": "UALICE", "tab": "home"})
    view = json.dumps(hoop.fake.of("views.publish")[-1].params["view"])
    mine = view.split("My active grants")[1].split("Waiting for my approval")[0]
    assert grant.id in mine and "18m left" in mine and "until 12:30 UTC" in mine


def _kinds_config() -> HoopConfig:
    """prod-db, plus an ssh and an http resource alice may request, each approved by one dba."""
    data = base_config()
    data["groups"]["security"] = {"members": [], "slack_usergroup": "SSEC"}
    common = {"channel": "C2", "request": {"groups": ["eng"]}, "approval": [{"from": "dba", "count": 1}]}
    data["resources"] += [
        {"name": "web", "kind": "ssh", "address": "10.0.0.5", "user": "deploy", "credential": {"env": "SSHPW"},
         "host_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIC7lmSI4NyIHf4bTaoNNhQnJpNyElvWNrV/DNPIjjMDg", **common},
        {"name": "k8s", "kind": "http", "address": "https://10.0.0.6:6443", "credential": {"env": "K8STOKEN"},
         **common},
    ]
    data["listen"] = {"advertise": "hoop.internal", "ssh": 2022, "http_proxy": 18443}
    return parse_config(data)


async def test_the_credential_dm_tells_how_to_connect_to_each_kind(fake: FakeSlack, tmp_path: Path,
                                                                  clock: FakeClock) -> None:
    """A psql connection string for PostgreSQL (see test_scenarios), an ssh command for SSH and a curl
    example for HTTP, each naming hoop's advertised proxy, with the secret in the DM only."""
    hoop = await Hoop(fake=fake, db=tmp_path / "hoop.db", clock=clock, config=_kinds_config()).start()
    try:
        for resource in ("web", "k8s"):
            fake.clear()
            await hoop.command(f"request {resource} 30m deploy 4411")
            channel, ts = hoop.card()
            assert channel == "C2"
            await hoop.react("UDANA", channel, ts)
            issued = hoop.recorder.of(GrantIssued)[-1]
            assert issued.grant.resources == (resource,)
            (dm,) = [c for c in fake.of("chat.postMessage") if c.params["channel"] == "DUALICE"]
            text = json.dumps(dm.params["blocks"])
            if resource == "web":
                assert f"ssh -p 2022 {issued.grant.login}@hoop.internal" in text
            else:
                assert f"curl -H 'Authorization: Bearer {issued.secret}' http://hoop.internal:18443/k8s/" in text
            assert issued.secret in text and issued.secret not in fake.everything_but(dm)
    finally:
        await hoop.close()


async def test_list_names_only_what_i_may_request(fake: FakeSlack, tmp_path: Path, clock: FakeClock) -> None:
    config = _config(request={"groups": ["dba"], "max_duration": "2h", "default_duration": "15m"})
    hoop = await Hoop(fake=fake, db=tmp_path / "hoop.db", clock=clock, config=config).start()
    try:
        await hoop.command("list", user="UDANA")
        assert "*prod-db* (postgres) — default 15m, max 2h, approval: 1 from dba and 1 from security" \
            in hoop.responses()[-1]
        await hoop.command("list", user="UALICE")  # eng, not dba
        assert "prod-db" not in hoop.responses()[-1] and "You may not request any resource" in hoop.responses()[-1]
    finally:
        await hoop.close()
