"""A running hoop with the Slack bot mounted, driven by signed Slack payloads over real HTTP
against the fake Slack Web API."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
from aiohttp import web

from bot.app import SlackBot
from broker.clock import FakeClock
from broker.config import HoopConfig, Settings, parse_config
from broker.events import Broadcast, RecordingNotifier
from broker.reviews import Reviews
from broker.service import Service
from broker.store import Store
from tests.conftest import base_config
from tests.support.fakeslack import FakeSlack

SIGNING_SECRET = "test-signing-secret"
USERS = {
    "UALICE": {"email": "alice@example.com", "name": "Alice"},
    "UBOB": {"email": "bob@example.com", "name": "Bob"},
    "UDANA": {"email": "dana@example.com", "name": "Dana"},
    "USAM": {"email": "sam@example.com", "name": "Sam"},
    "UERIN": {"email": "erin@example.com", "name": "Erin"},
    "UGHOST": {"name": "Ghost"},  # no email on the profile: unmappable
}
USERGROUPS = {"SSEC": ["USAM", "UERIN"]}


def bot_config() -> HoopConfig:
    """dba by email (dana, erin); security by Slack user group SSEC (sam, erin): erin is in both."""
    data = base_config()
    data["groups"]["security"] = {"members": [], "slack_usergroup": "SSEC"}
    return parse_config(data)


def fake_slack() -> FakeSlack:
    return FakeSlack(users=dict(USERS), usergroups={k: list(v) for k, v in USERGROUPS.items()})


def sign(body: bytes, *, timestamp: int | None = None, secret: str = SIGNING_SECRET) -> dict[str, str]:
    ts = str(int(time.time()) if timestamp is None else timestamp)
    base = b"v0:" + ts.encode() + b":" + body
    sig = "v0=" + hmac.new(secret.encode(), base, hashlib.sha256).hexdigest()
    return {"X-Slack-Request-Timestamp": ts, "X-Slack-Signature": sig}


@dataclass
class Hoop:
    fake: FakeSlack
    db: Path
    clock: FakeClock
    config: HoopConfig = field(default_factory=bot_config)
    recorder: RecordingNotifier = field(default_factory=RecordingNotifier)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    async def start(self) -> Hoop:
        self.store = Store.from_url(f"sqlite+aiosqlite:///{self.db}")
        await self.store.migrate()
        self.bus = Broadcast()
        self.service = Service(self.config, self.store, self.clock, self.bus)
        self.reviews = Reviews(self.service)
        settings = Settings(slack_bot_token="xoxb-test", slack_signing_secret=SIGNING_SECRET,
                            slack_api_url=self.fake.api_url)
        self.bot = SlackBot(self.config, settings, self.service, self.clock, self.reviews)
        self.bus.add(self.bot)
        self.bus.add(self.recorder)
        app = web.Application()
        await self.bot.start(app)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}/slack/events"
        self.http = aiohttp.ClientSession()
        return self

    async def close(self) -> None:
        await self.http.close()
        await self.bot.stop()
        await self.runner.cleanup()
        await self.store.close()

    # -- posting signed payloads ----------------------------------------------------------
    async def post(self, body: bytes, content_type: str, *, headers: dict[str, str] | None = None,
                   timestamp: int | None = None, secret: str = SIGNING_SECRET) -> tuple[int, str]:
        h = {"Content-Type": content_type, **sign(body, timestamp=timestamp, secret=secret), **(headers or {})}
        async with self.http.post(self.url, data=body, headers=h) as resp:
            return resp.status, await resp.text()

    async def command(self, text: str, user: str = "UALICE", *, settle: bool = True) -> tuple[int, str]:
        n = next(self._ids)
        form = {"token": "t", "team_id": "T1", "team_domain": "x", "channel_id": "CCMD", "channel_name": "ops",
                "user_id": user, "user_name": user.lower(), "command": "/hoop", "text": text,
                "response_url": f"{self.fake.url}/respond/{n}", "trigger_id": f"trig{n}", "api_app_id": "A1"}
        out = await self.post(urlencode(form).encode(), "application/x-www-form-urlencoded")
        if settle:
            await self.bot.drain()
        return out

    def event_body(self, event: dict[str, Any], event_id: str | None = None) -> bytes:
        return json.dumps({"token": "t", "team_id": "T1", "api_app_id": "A1", "type": "event_callback",
                           "event_id": event_id or f"Ev{next(self._ids)}", "event_time": int(time.time()),
                           "event": event}).encode()

    async def event(self, event: dict[str, Any], event_id: str | None = None,
                    headers: dict[str, str] | None = None) -> tuple[int, str]:
        out = await self.post(self.event_body(event, event_id), "application/json", headers=headers)
        await self.bot.drain()
        return out

    async def react(self, user: str, channel: str, ts: str, reaction: str = "white_check_mark",
                    removed: bool = False) -> tuple[int, str]:
        self.fake.set_reaction(channel, ts, reaction, user, present=not removed)  # Slack has it before the event
        return await self.event({"type": "reaction_removed" if removed else "reaction_added", "user": user,
                                 "reaction": reaction, "item_user": "UBOT",
                                 "item": {"type": "message", "channel": channel, "ts": ts},
                                 "event_ts": f"{time.time():.6f}"})

    async def interact(self, payload: dict[str, Any]) -> tuple[int, str]:
        payload = {"team": {"id": "T1"}, "api_app_id": "A1", "token": "t", **payload}
        out = await self.post(urlencode({"payload": json.dumps(payload)}).encode(),
                              "application/x-www-form-urlencoded")
        await self.bot.drain()
        return out

    async def click(self, action_id: str, value: str, user: str, channel: str = "C1",
                    ts: str = "1.0") -> tuple[int, str]:
        return await self.interact({
            "type": "block_actions", "user": {"id": user}, "trigger_id": f"trig{next(self._ids)}",
            "channel": {"id": channel}, "container": {"type": "message", "channel_id": channel, "message_ts": ts},
            "message": {"ts": ts}, "response_url": f"{self.fake.url}/respond/a",
            "actions": [{"type": "button", "action_id": action_id, "block_id": "decide", "value": value,
                         "action_ts": "1"}]})

    # -- reading the fake -----------------------------------------------------------------
    def card(self) -> tuple[str, str]:
        """Channel and ts of the first card posted."""
        post = next(c for c in self.fake.of("chat.postMessage") if "thread_ts" not in c.params)
        return str(post.params["channel"]), str(post.response["ts"])

    def thread(self, ts: str) -> list[str]:
        return [str(c.params.get("text")) for c in self.fake.of("chat.postMessage") if c.params.get("thread_ts") == ts]

    def responses(self) -> list[str]:
        return [str(c.params.get("text")) for c in self.fake.of("respond")]

    def ephemerals(self, user: str) -> list[str]:
        return [str(c.params.get("text")) for c in self.fake.of("chat.postEphemeral") if c.params.get("user") == user]
