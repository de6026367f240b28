"""Socket Mode: hello, then a slash-command envelope over a local fake WebSocket endpoint."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from bot.app import SlackBot
from broker.clock import FakeClock
from broker.config import Settings
from broker.events import Broadcast
from broker.model import RequestStatus
from broker.service import Service
from broker.store import Store
from tests.bot.harness import bot_config
from tests.support.fakeslack import FakeSlack


def _command(envelope_id: str, text: str) -> dict[str, object]:
    return {"envelope_id": envelope_id, "type": "slash_commands", "accepts_response_payload": True,
            "payload": {"token": "t", "team_id": "T1", "channel_id": "CCMD", "user_id": "UALICE",
                        "command": "/hoop", "text": text, "api_app_id": "A1", "trigger_id": "trig",
                        "response_url": ""}}


async def test_socket_mode_acks_commands_and_acts(fake: FakeSlack, tmp_path: Path, clock: FakeClock) -> None:
    fake.socket_envelopes = [_command("E-help", "help"), _command("E-bad", "approve"),
                             _command("E-req", "request prod-db 30m fix invoice 4411")]
    store = Store.from_url(f"sqlite+aiosqlite:///{tmp_path / 'hoop.db'}")
    await store.migrate()
    bus = Broadcast()
    service = Service(bot_config(), store, clock, bus)
    settings = Settings(slack_bot_token="xoxb-test", slack_app_token="xapp-test", slack_api_url=fake.api_url)
    bot = SlackBot(bot_config(), settings, service, clock)
    bus.add(bot)
    app = web.Application()
    await bot.start(app)
    try:
        acks = {a["envelope_id"]: a for a in await fake.socket_acked(3)}
        assert "/hoop request <resource> <duration>" in acks["E-help"]["payload"]["text"]
        assert "`approve` needs a request id" in acks["E-bad"]["payload"]["text"]
        assert not acks["E-req"].get("payload")  # a bare ack; the work runs after it
        await bot.drain()
        assert fake.of("apps.connections.open")
        assert not any(r.resource.method == "POST" for r in app.router.routes())  # nothing mounted in socket mode
        card = next(c for c in fake.of("chat.postMessage") if c.params["channel"] == "C1")
        async with store.tx() as tx:
            req = await tx.request_by_card("C1", str(card.response["ts"]))
        assert req is not None and req.status is RequestStatus.PENDING and req.reason == "fix invoice 4411"
        # no response_url: the reply came as an ephemeral message in the command's channel
        assert any(req.id in str(c.params.get("text")) for c in fake.of("chat.postEphemeral"))
    finally:
        await bot.stop()
        await store.close()
