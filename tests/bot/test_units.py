"""Pure parts: command parsing, Block Kit builders, the manifest agreeing with the bot."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from bot import views
from bot.commands import Command, parse
from bot.reactions import emoji_of
from broker.clock import FakeClock
from broker.errors import InvalidInput
from broker.model import AccessRequest, Approval, Grant, GrantStatus, RequestStatus, Review, StepSpec
from tests.bot.harness import Hoop
from tests.support.fakeslack import MESSAGE_BLOCKS_MAX, VIEW_BLOCKS_MAX, FakeSlack, block_limit_errors

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(("text", "expected"), [
    ("", Command("help", ())),
    ("help me", Command("help", ())),
    ("request prod-db 30m fix  invoice 4411", Command("request", ("prod-db", "30m"), "fix  invoice 4411")),
    ("REQUEST prod-db 1h30m", Command("request", ("prod-db", "1h30m"), "")),
    ("deny r123 not now", Command("deny", ("r123",), "not now")),
    ("revoke g1", Command("revoke", ("g1",), "")),
    ("extend g1 15m", Command("extend", ("g1", "15m"))),
    ("sessions", Command("sessions", ())),
    ("sessions prod-db", Command("sessions", ("prod-db",))),
])
def test_parse(text: str, expected: Command) -> None:
    assert parse(text) == expected


@pytest.mark.parametrize("text", ["nope", "request", "request db", "request db soon", "approve", "approve a b",
                                  "extend g1", "extend g1 0m", "transcript", "list all", "sessions a b"])
def test_parse_refuses_with_usage(text: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse(text)
    assert "Usage" in info.value.message or "/hoop help" in info.value.message


def test_emoji_skin_tone() -> None:
    assert emoji_of("+1::skin-tone-4") == "+1"
    assert emoji_of("white_check_mark") == "white_check_mark"


def _req(**kw: object) -> AccessRequest:
    base: dict[str, object] = dict(id="r1", resource="prod-db", requester="alice@example.com",
                                   chain=("alice@example.com",), duration=timedelta(minutes=30), reason="why",
                                   status=RequestStatus.PENDING, created_at=NOW, lapses_at=NOW + timedelta(hours=1),
                                   steps=(StepSpec("dba", 1), StepSpec("security", 1)))
    base.update(kw)
    return AccessRequest(**base)  # type: ignore[arg-type]


def test_card_shows_steps_status_and_buttons_only_while_pending() -> None:
    req = _req(approvals=[Approval("dana@example.com", ("dba",), NOW)])
    text, blocks = views.card(req, NOW)
    flat = str(blocks)
    assert "alice@example.com" in text and "dana@example.com" in flat and "lapses at 13:00 UTC" in flat
    assert views.APPROVE_ACTION in flat and views.DENY_ACTION in flat
    grant = Grant(id="g1", login="l", identity="alice@example.com", chain=("alice@example.com",),
                  resources=("prod-db",), status=GrantStatus.REVOKED, created_at=NOW,
                  expires_at=NOW + timedelta(minutes=30), ended_by="dana@example.com", ended_at=NOW)
    _, done = views.card(_req(status=RequestStatus.APPROVED), NOW, grant)
    assert "Revoked* by dana@example.com" in str(done) and views.APPROVE_ACTION not in str(done)


def test_user_text_on_the_card_is_escaped_for_mrkdwn() -> None:
    reason = "<!channel> routine\n*Approvals* see <https://evil|runbook> & co"
    req = _req(reason=reason, requester="ci-runner", chain=("alice@example.com", "<!here>"),
               status=RequestStatus.DENIED, decided_by="dana@example.com", decision_reason="no <@U0BOSS> a>b")
    text, blocks = views.card(req, NOW)
    flat = json.dumps(blocks, ensure_ascii=False)
    assert "&lt;!channel&gt; routine" in flat and "&lt;https://evil|runbook&gt; &amp; co" in flat
    assert "(chain: alice@example.com → &lt;!here&gt;)" in flat
    assert "Denied* by dana@example.com: no &lt;@U0BOSS&gt; a&gt;b" in flat
    assert "<!" not in flat + text and "<http" not in flat and "<@U0BOSS" not in flat
    # ordinary text, mrkdwn the user meant, and hoop's own mention of a Slack requester are unchanged
    plain = _req(reason="fix invoice 4411 *now* (see `INC-12`)", requester_slack_id="UALICE")
    flat = json.dumps(views.card(plain, NOW)[1])
    assert "fix invoice 4411 *now* (see `INC-12`)" in flat and "<@UALICE> requests" in flat


@pytest.mark.parametrize("raw", ["", "plain", "<!channel>", "a & b", "&lt; already", "<https://x|y> && <<>>"])
def test_escape_round_trips_and_leaves_no_markup(raw: str) -> None:
    out = views.escape(raw)
    assert "<" not in out and ">" not in out and views.unescape(out) == raw


def test_escape_clipped_never_splits_an_entity() -> None:
    for n in range(1, 40):
        out = views.escape_clipped("<" * 50, n)
        assert len(out) <= n and out.endswith("…") and out[:-1] == "&lt;" * (len(out[:-1]) // 4)
    assert views.escape_clipped("plain text", 5) == "plai…"
    assert views.escape_clipped("plain", 5) == "plain" and views.escape_clipped("a<b", 9) == "a&lt;b"
    assert views.clip("see <@U123|dana> now", 12) == "see …"  # nor a mention or link hoop wrote


def _limits(blocks: list[dict[str, object]], most: int = MESSAGE_BLOCKS_MAX) -> list[str]:
    return block_limit_errors(blocks, most)


@pytest.mark.parametrize("reason", ["x" * 2000, "R&D <b> " * 400, "&" * 5000])
def test_card_fits_block_kit_whatever_the_reason(reason: str) -> None:
    _, blocks = views.card(_req(reason=reason, chain=("alice@example.com", "a<gent>" * 500)), NOW)
    assert _limits(blocks) == []
    field = blocks[1]["fields"][3]["text"]
    assert field.endswith("…") and field.startswith("*Reason*\n" + views.escape(reason[:10]))
    denied = _req(status=RequestStatus.DENIED, decided_by="dana@example.com", decision_reason=reason + "y" * 3000)
    _, blocks = views.card(denied, NOW)
    assert _limits(blocks) == [] and "*Denied* by dana@example.com: " in json.dumps(blocks)


def test_app_home_fits_block_kit_when_busy() -> None:
    waiting = [_req(id=f"r{i}", reason="fix invoice batch; " * 8) for i in range(20)]
    view = views.home_view([], [], waiting, NOW)
    assert _limits(view["blocks"], VIEW_BLOCKS_MAX) == []
    flat = json.dumps(view)
    assert all(f"`r{i}`" in flat for i in range(20))
    many = [_req(id=f"r{i}", reason="&" * 2000) for i in range(500)]
    view = views.home_view(many[:50], [], many, NOW)
    assert _limits(view["blocks"], VIEW_BLOCKS_MAX) == []
    assert "and 480 more" in json.dumps(view)


def test_review_statement_is_escaped_and_fits_a_section() -> None:
    review = Review(id="v1", grant_id="g1", session_id="s1", resource="prod-db", rule="delete",
                    text="SELECT '<!channel>' " + "<" * 3000, requested_by="<!here>", status="pending",
                    created_at=NOW, deadline=NOW + timedelta(minutes=5))
    text, blocks = views.review_message(review)
    section = blocks[0]["text"]["text"]
    assert len(section) <= 3000 and "&lt;!channel&gt;" in section and "*&lt;!here&gt;* wants" in section
    assert "<!" not in json.dumps(blocks) + text


def test_manifest_matches_the_bot() -> None:
    manifest = yaml.safe_load((Path(__file__).parents[2] / "manifests" / "slack-app.yaml").read_text())
    assert [c["command"] for c in manifest["features"]["slash_commands"]] == ["/hoop"]
    assert set(manifest["settings"]["event_subscriptions"]["bot_events"]) == {
        "app_home_opened", "reaction_added", "reaction_removed"}
    scopes = set(manifest["oauth_config"]["scopes"]["bot"])
    assert {"commands", "chat:write", "users:read.email", "usergroups:read", "files:write", "reactions:read"} <= scopes
    assert manifest["settings"]["interactivity"]["is_enabled"] is True


async def test_a_bot_token_in_the_environment_starts_the_bot_without_bolts_warning(
        fake: FakeSlack, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """bolt reads SLACK_BOT_TOKEN itself and warned, at every start of a correctly configured replica, that
    the token was unused because hoop gives it a client (made from that very token). Other warnings pass."""
    monkeypatch.setenv("SLACK_BOT_TOKEN", "xoxb-test")
    caplog.set_level(logging.WARNING)
    running = await Hoop(fake=fake, db=tmp_path / "hoop.db", clock=FakeClock()).start()
    try:
        logging.getLogger("bot.app").warning("something else")
    finally:
        await running.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == ["something else"], warnings
