"""WebSocket relay of the HTTP proxy (``kubectl exec``, ``attach``, port-forward, dashboards).

How this works. After the gate and the guard have passed the upgrade request (a ``GET``), the
proxy first opens the upstream WebSocket with the held credential and the client's offered
subprotocols, then accepts the client's handshake with the subprotocol the upstream chose, so
a client never gets a socket the upstream refused (that refusal is relayed as JSON with the
upstream's status). Two pumps then copy messages both ways until either side closes. Text
messages from the upstream are masked whole with the detectors (each message is complete, so
nothing spans a boundary); binary messages pass through unchanged (kubectl's channel frames
carry terminal bytes the masker cannot delimit; document this to operators). :func:`cut` ends
both sides with close code 1008 and the reason when the grant ends.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from proxy.mask import Masker

__all__ = ["WsResult", "cut", "relay"]

_POLICY_VIOLATION = 1008
_MAX_MSG = 16 * 1024 * 1024


@dataclass
class WsResult:
    status: int
    up_bytes: int = 0
    down_bytes: int = 0
    messages: int = 0
    close_code: int | None = None
    response: web.StreamResponse | None = None


@dataclass
class WsPair:
    client: web.WebSocketResponse | None = None
    upstream: aiohttp.ClientWebSocketResponse | None = None


def cut(pair: WsPair, reason: str) -> list[asyncio.Task[None]]:
    """Close both sides with 1008 and ``reason`` (cut to the 123 bytes a close frame allows)."""
    message = reason.encode()[:123]
    tasks: list[asyncio.Task[None]] = []

    async def close_client(ws: web.WebSocketResponse) -> None:
        with contextlib.suppress(Exception):
            await ws.close(code=_POLICY_VIOLATION, message=message)

    async def close_upstream(ws: aiohttp.ClientWebSocketResponse) -> None:
        with contextlib.suppress(Exception):
            await ws.close(code=_POLICY_VIOLATION, message=message)

    loop = asyncio.get_running_loop()
    if pair.client is not None:
        tasks.append(loop.create_task(close_client(pair.client)))
    if pair.upstream is not None:
        tasks.append(loop.create_task(close_upstream(pair.upstream)))
    return tasks


async def relay(request: web.BaseRequest, client: aiohttp.ClientSession, url: URL, headers: CIMultiDict[str],
                masker: Masker, pair: WsPair) -> WsResult:
    """Open the upstream socket, accept the client's, and copy both ways until one side closes."""
    offered = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
    try:
        upstream = await client.ws_connect(url, headers=headers, protocols=offered, max_msg_size=_MAX_MSG,
                                           autoping=True)
    except aiohttp.WSServerHandshakeError as exc:
        status = exc.status if 400 <= exc.status < 600 else 502
        body = {"error": "upstream_refused_websocket", "reason": f"the upstream answered the upgrade with {exc.status}"}
        return WsResult(status=status, response=web.json_response(body, status=status))
    pair.upstream = upstream
    result = WsResult(status=101)
    try:
        ws = web.WebSocketResponse(protocols=[upstream.protocol] if upstream.protocol else (),
                                   max_msg_size=_MAX_MSG, autoping=True)
        pair.client = ws
        await ws.prepare(request)
        result.response = ws

        async def up() -> None:  # client -> upstream
            async for msg in ws:
                if msg.type is aiohttp.WSMsgType.TEXT:
                    result.up_bytes += len(msg.data)
                    await upstream.send_str(msg.data)
                elif msg.type is aiohttp.WSMsgType.BINARY:
                    result.up_bytes += len(msg.data)
                    await upstream.send_bytes(msg.data)
                result.messages += 1
            if not upstream.closed:
                await upstream.close(code=ws.close_code or 1000)

        async def down() -> None:  # upstream -> client
            async for msg in upstream:
                if msg.type is aiohttp.WSMsgType.TEXT:
                    text = masker.mask_text(msg.data)
                    result.down_bytes += len(text)
                    await ws.send_str(text)
                elif msg.type is aiohttp.WSMsgType.BINARY:
                    result.down_bytes += len(msg.data)
                    await ws.send_bytes(msg.data)
                result.messages += 1
            result.close_code = upstream.close_code
            if not ws.closed:
                await ws.close(code=upstream.close_code or 1000)

        async with asyncio.TaskGroup() as tg:
            tg.create_task(up())
            tg.create_task(down())
    except* (aiohttp.ClientError, ConnectionError):
        pass  # one side vanished; both are closed below
    finally:
        if not upstream.closed:
            await upstream.close()
        if pair.client is not None and not pair.client.closed:
            with contextlib.suppress(Exception):
                await pair.client.close()
    return result
