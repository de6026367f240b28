"""A fake Slack Web API on a loopback aiohttp server, for the bot's scenario tests and the bench.

It records every call (method + merged query/form/JSON parameters) in :attr:`FakeSlack.calls`
and answers with plausible Slack payloads. Point ``AsyncWebClient(base_url=fake.api_url)`` at it.

- ``users`` maps Slack user ids to ``{"email", "name"}`` (no email: an unmappable user);
- ``usergroups`` maps Slack user group ids to member user ids;
- :meth:`rate_limit_once` makes the next call of a method answer 429 with ``Retry-After``;
- ``socket_url`` is returned by ``apps.connections.open`` (Socket Mode tests);
- ``/respond/<id>`` is a response_url endpoint; its posts are recorded as method ``respond``;
- :meth:`set_reaction` keeps the reactions on a message, which ``reactions.get`` answers with;
- :meth:`refuse` makes a method answer ``{"ok": false, "error": ...}``, every time or ``times`` times;
- messages and views over Block Kit's limits are refused with ``invalid_blocks``, as Slack does
  (:func:`block_limit_errors` says which limit was crossed).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

#: Block Kit limits Slack enforces (https://api.slack.com/reference/block-kit/blocks)
SECTION_TEXT_MAX = 3000
SECTION_FIELD_MAX = 2000
SECTION_FIELDS_MAX = 10
MESSAGE_BLOCKS_MAX = 50
VIEW_BLOCKS_MAX = 100
_BLOCK_METHODS = {"chat.postMessage": MESSAGE_BLOCKS_MAX, "chat.update": MESSAGE_BLOCKS_MAX,
                  "chat.postEphemeral": MESSAGE_BLOCKS_MAX, "views.publish": VIEW_BLOCKS_MAX,
                  "views.open": VIEW_BLOCKS_MAX, "views.update": VIEW_BLOCKS_MAX}


def block_limit_errors(blocks: Any, max_blocks: int = MESSAGE_BLOCKS_MAX) -> list[str]:
    """What in ``blocks`` crosses a Block Kit limit; empty when Slack would take them."""
    if not isinstance(blocks, list):
        return []
    errors = [f"{len(blocks)} blocks > {max_blocks}"] if len(blocks) > max_blocks else []
    for i, block in enumerate(blocks):
        if not isinstance(block, dict) or block.get("type") != "section":
            continue
        text = (block.get("text") or {}).get("text", "")
        if len(text) > SECTION_TEXT_MAX:
            errors.append(f"block {i}: section text {len(text)} > {SECTION_TEXT_MAX}")
        fields = block.get("fields") or []
        if len(fields) > SECTION_FIELDS_MAX:
            errors.append(f"block {i}: {len(fields)} fields > {SECTION_FIELDS_MAX}")
        for j, f in enumerate(fields):
            if len(f.get("text", "")) > SECTION_FIELD_MAX:
                errors.append(f"block {i} field {j}: {len(f['text'])} > {SECTION_FIELD_MAX}")
    return errors


@dataclass
class Call:
    method: str
    params: dict[str, Any]
    body: bytes = b""
    #: what the fake answered
    response: dict[str, Any] = field(default_factory=dict)
    #: ``time.perf_counter()`` when it arrived (the bench measures with it)
    at: float = field(default_factory=time.perf_counter)


@dataclass
class FakeSlack:
    users: dict[str, dict[str, str]] = field(default_factory=dict)
    usergroups: dict[str, list[str]] = field(default_factory=dict)
    socket_url: str = ""
    bot_user_id: str = "UBOT"
    calls: list[Call] = field(default_factory=list)
    _ts: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _limits: dict[str, int] = field(default_factory=dict)
    #: method -> (error, how many more times; None: always)
    _refusals: dict[str, tuple[str, int | None]] = field(default_factory=dict)
    _runner: web.AppRunner | None = None
    url: str = ""
    #: set on every recorded call (the bench waits on it)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    #: Socket Mode: envelopes sent after ``hello`` to each connection, and the acks received
    socket_envelopes: list[dict[str, Any]] = field(default_factory=list)
    socket_acks: list[dict[str, Any]] = field(default_factory=list)
    #: (channel, ts) -> emoji name -> users who reacted with it
    reactions: dict[tuple[str, str], dict[str, list[str]]] = field(default_factory=dict)

    @property
    def api_url(self) -> str:
        return self.url + "/api/"

    async def start(self) -> FakeSlack:
        app = web.Application()
        app.router.add_route("*", "/api/{method}", self._api)
        app.router.add_post("/upload/{file_id}", self._upload)
        app.router.add_post("/respond/{id}", self._respond)
        app.router.add_get("/socket", self._socket)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        self.socket_url = self.socket_url or f"ws://127.0.0.1:{port}/socket"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def socket_acked(self, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Wait until ``count`` Socket Mode acks have arrived."""
        async with asyncio.timeout(timeout):
            while len(self.socket_acks) < count:
                self.changed.clear()
                await self.changed.wait()
        return self.socket_acks

    def set_reaction(self, channel: str, ts: str, name: str, user: str, *, present: bool = True) -> None:
        users = self.reactions.setdefault((channel, ts), {}).setdefault(name, [])
        if present and user not in users:
            users.append(user)
        elif not present and user in users:
            users.remove(user)

    def rate_limit_once(self, method: str, retry_after: int = 0) -> None:
        self._limits[method] = retry_after

    def refuse(self, method: str, error: str, times: int | None = None) -> None:
        """Answer ``method`` with ``{"ok": false, "error": error}``, ``times`` times or always."""
        self._refusals[method] = (error, times)

    def _refusal(self, method: str, p: dict[str, Any]) -> dict[str, Any] | None:
        if method in self._refusals:
            error, times = self._refusals[method]
            if times is not None:
                if times <= 1:
                    del self._refusals[method]
                else:
                    self._refusals[method] = (error, times - 1)
            return {"ok": False, "error": error}
        if method in _BLOCK_METHODS:
            view = p.get("view")
            blocks = (view.get("blocks") if isinstance(view, dict) else None) if method.startswith("views.") \
                else p.get("blocks")
            errors = block_limit_errors(blocks, _BLOCK_METHODS[method])
            if errors:
                return {"ok": False, "error": "invalid_blocks", "errors": errors}
        return None

    # -- queries for tests ------------------------------------------------------------------
    def of(self, method: str) -> list[Call]:
        return [c for c in self.calls if c.method == method]

    def everything_but(self, call: Call) -> str:
        """Every recorded call's parameters except ``call``'s, as one string (leak checks)."""
        return "\n".join(json.dumps(c.params, default=str) + c.body.decode("utf-8", "replace")
                         for c in self.calls if c is not call)

    def clear(self) -> None:
        self.calls.clear()

    # -- handlers ---------------------------------------------------------------------------
    def _record(self, method: str, params: dict[str, Any], body: bytes = b"") -> None:
        self.calls.append(Call(method, params, body))
        self.changed.set()

    async def _params(self, request: web.Request) -> dict[str, Any]:
        params: dict[str, Any] = dict(request.query)
        if request.content_type == "application/json":
            params.update(await request.json())
        elif request.can_read_body:
            params.update(dict(await request.post()))
        for key in ("blocks", "view", "files", "attachments"):
            if isinstance(params.get(key), str):
                with contextlib.suppress(ValueError):
                    params[key] = json.loads(params[key])
        return params

    async def _api(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        params = await self._params(request)
        if method in self._limits:
            retry_after = self._limits.pop(method)
            self._record(method + "#429", params)
            return web.json_response({"ok": False, "error": "ratelimited"}, status=429,
                                     headers={"Retry-After": str(retry_after)})
        answer = self._refusal(method, params) or self._answer(method, params, request)
        self._record(method, params)
        self.calls[-1].response = answer
        return web.json_response(answer)

    def _next_ts(self) -> str:
        return f"1700000000.{next(self._ts):06d}"

    def _answer(self, method: str, p: dict[str, Any], request: web.Request) -> dict[str, Any]:
        ok: dict[str, Any] = {"ok": True}
        if method == "auth.test":
            return {**ok, "user_id": self.bot_user_id, "bot_id": "BBOT", "team_id": "T1", "user": "hoop"}
        if method in ("chat.postMessage", "chat.update"):
            ts = p.get("ts") or self._next_ts()
            return {**ok, "channel": p.get("channel"), "ts": ts, "message": {"text": p.get("text", ""), "ts": ts}}
        if method == "chat.postEphemeral":
            return {**ok, "message_ts": self._next_ts()}
        if method == "users.info":
            uid = str(p.get("user"))
            info = self.users.get(uid)
            if info is None:
                return {"ok": False, "error": "user_not_found"}
            profile = {"real_name": info.get("name", uid)}
            if info.get("email"):
                profile["email"] = info["email"]
            return {**ok, "user": {"id": uid, "name": info.get("name", uid), "real_name": info.get("name", uid),
                                   "profile": profile}}
        if method == "users.lookupByEmail":
            for uid, info in self.users.items():
                if info.get("email", "").lower() == str(p.get("email", "")).lower():
                    return {**ok, "user": {"id": uid}}
            return {"ok": False, "error": "users_not_found"}
        if method == "usergroups.users.list":
            return {**ok, "users": list(self.usergroups.get(str(p.get("usergroup")), []))}
        if method == "conversations.open":
            return {**ok, "channel": {"id": "D" + str(p.get("users", "")).split(",")[0]}}
        if method in ("views.open", "views.publish", "views.update"):
            return {**ok, "view": {"id": "V" + self._next_ts().replace(".", "")}}
        if method == "files.getUploadURLExternal":
            fid = "F" + self._next_ts().replace(".", "")
            return {**ok, "upload_url": f"{self.url}/upload/{fid}", "file_id": fid}
        if method == "files.completeUploadExternal":
            files = p.get("files") or []
            return {**ok, "files": [{"id": f.get("id"), "title": f.get("title")} for f in files]}
        if method == "reactions.get":
            channel, ts = str(p.get("channel")), str(p.get("timestamp"))
            on = self.reactions.get((channel, ts), {})
            return {**ok, "type": "message", "channel": channel, "message": {"ts": ts, "reactions": [
                {"name": name, "users": users, "count": len(users)} for name, users in on.items() if users]}}
        if method == "apps.connections.open":
            return {**ok, "url": self.socket_url}
        return ok

    async def _upload(self, request: web.Request) -> web.Response:
        body = await request.read()
        self._record("upload", {"file_id": request.match_info["file_id"]}, body)
        return web.Response(text="OK - " + str(len(body)))

    async def _socket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_json({"type": "hello", "num_connections": 1, "debug_info": {"host": "fake"},
                            "connection_info": {"app_id": "A1"}})
        for envelope in self.socket_envelopes:
            await ws.send_json(envelope)
        async for msg in ws:
            if msg.type == web.WSMsgType.TEXT:
                self.socket_acks.append(json.loads(msg.data))
                self.changed.set()
        return ws

    async def _respond(self, request: web.Request) -> web.Response:
        self._record("respond", await self._params(request))
        return web.Response(text="ok")
