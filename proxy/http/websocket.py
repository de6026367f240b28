"""WebSocket relay of the HTTP proxy (``kubectl exec``, ``attach``, port-forward, dashboards).

How this works. After the gate and the guard have passed the upgrade request (a ``GET``), the
proxy first opens the upstream WebSocket with the held credential and the client's offered
subprotocols, then accepts the client's handshake with the subprotocol the upstream chose, so
a client never gets a socket the upstream refused (that refusal is relayed as JSON with the
upstream's status). Two pumps then copy messages both ways until either side closes. What
the upstream sends is masked by :mod:`proxy.http.channels`: a text message whole, a binary one
whole when it is UTF-8 text (other binary payloads pass unchanged), and under a Kubernetes
channel protocol (``kubectl exec``/``attach``) stdout, stderr and the error stream each as a
stream across messages; a stream that holds bytes back gets them sent after
``_IDLE_FLUSH`` seconds of upstream silence. What the client sends is not masked. The held
credential is replaced by ``[credential]`` in each message from the upstream. :func:`cut` ends both
sides with close code 1008 and the reason when the grant ends; a grant that ends while the upstream
handshake is under way is seen once it completes (the upstream socket is closed and the client refused,
or both closed if the client's handshake was already accepted). The upstream's redirects are never
followed (:func:`no_redirects`): a 3xx to the upgrade is answered as a refusal, so the held credential
never goes to a place the guard did not judge.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from proxy.http.body import Secrets
from proxy.http.channels import Channels, is_base64_channel, is_channel, mask_binary
from proxy.http.live import Stream
from proxy.mask import Masker

__all__ = ["WsRedirected", "WsResult", "cut", "no_redirects", "relay"]

_POLICY_VIOLATION = 1008
_MAX_MSG = 16 * 1024 * 1024
_IDLE_FLUSH = 0.2  # seconds a channel stream's held tail waits for more output before it is sent
_END = (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED)


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


class WsRedirected(aiohttp.ClientError):
    """The upstream answered the upgrade with a redirect, which the proxy does not follow."""

    def __init__(self, status: int) -> None:
        super().__init__(f"the upstream answered the upgrade with a redirect ({status})")
        self.status = status


def no_redirects() -> aiohttp.TraceConfig:
    """A trace for the upgrade session that stops at a redirect (``ws_connect`` has no switch for it):
    aiohttp closes the 3xx and raises :class:`WsRedirected` instead of requesting the ``Location``."""

    async def refuse(session: aiohttp.ClientSession, ctx: object, params: aiohttp.TraceRequestRedirectParams) -> None:
        raise WsRedirected(params.response.status)

    trace = aiohttp.TraceConfig()
    trace.on_request_redirect.append(refuse)
    return trace


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
                masker: Masker, pair: WsPair, flight: Stream, *, secrets: Secrets | None = None,
                tls: ssl.SSLContext | None = None, server_name: str | None = None) -> WsResult:
    """Open the upstream socket, accept the client's, and copy both ways until one side closes. ``flight``:
    the request, whose ``reason`` says the grant ended (checked after each handshake: :func:`cut` cannot
    reach a socket that is still opening); ``secrets``: the held credential, replaced in what the upstream
    sends. ``tls`` and ``server_name``: how a ``wss://`` upstream is checked (None: the system's CAs and the
    URL's host)."""
    offered = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
    try:
        upstream = await client.ws_connect(url, headers=headers, protocols=offered, max_msg_size=_MAX_MSG,
                                           autoping=True, ssl=tls if tls is not None else True,
                                           server_hostname=server_name)
    except (aiohttp.WSServerHandshakeError, WsRedirected) as exc:
        status = exc.status if 400 <= exc.status < 600 else 502
        body = {"error": "upstream_refused_websocket", "reason": f"the upstream answered the upgrade with {exc.status}"}
        return WsResult(status=status, response=web.json_response(body, status=status))
    pair.upstream = upstream
    if flight.reason is not None:  # the grant ended during the upstream handshake
        await upstream.close(code=_POLICY_VIOLATION, message=flight.reason.encode()[:123])
        body = {"error": "expired" if "expired" in flight.reason else "revoked", "reason": flight.reason}
        return WsResult(status=403, response=web.json_response(body, status=403))
    result = WsResult(status=101)
    try:
        ws = web.WebSocketResponse(protocols=[upstream.protocol] if upstream.protocol else (),
                                   max_msg_size=_MAX_MSG, autoping=True)
        pair.client = ws
        await ws.prepare(request)
        result.response = ws
        if flight.reason is not None:  # ended while the client's handshake was answered
            result.close_code = _POLICY_VIOLATION
            await asyncio.gather(*cut(pair, flight.reason))
            return result

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

        protocol = upstream.protocol
        b64 = is_base64_channel(protocol)
        channels = Channels(masker, base64_frames=b64) if masker.enabled and (b64 or is_channel(protocol)) else None

        async def send_held() -> None:
            assert channels is not None
            if b64:
                for text in channels.flush_text():
                    result.down_bytes += len(text)
                    await ws.send_str(text)
            else:
                for frame in channels.flush():
                    result.down_bytes += len(frame)
                    await ws.send_bytes(frame)

        async def down() -> None:  # upstream -> client
            nxt: asyncio.Future[aiohttp.WSMessage] | None = None
            try:
                while True:
                    if nxt is None:
                        nxt = asyncio.ensure_future(upstream.receive())
                    if channels is not None and channels.pending:
                        done, _ = await asyncio.wait({nxt}, timeout=_IDLE_FLUSH)
                        if not done:  # the upstream went quiet: send what the streams hold
                            await send_held()
                            continue
                    msg = await nxt
                    nxt = None
                    if msg.type in _END:
                        break
                    if msg.type is aiohttp.WSMsgType.TEXT:
                        data_text = secrets.scrub_text(msg.data) if secrets is not None else msg.data
                        text = (channels.feed_text(data_text) if b64 and channels is not None
                                else masker.mask_text(data_text))
                        if text is not None:
                            result.down_bytes += len(text)
                            await ws.send_str(text)
                    elif msg.type is aiohttp.WSMsgType.BINARY:
                        raw = secrets.scrub(msg.data) if secrets is not None else msg.data
                        data = channels.feed(raw) if channels is not None else mask_binary(masker, raw)
                        if data is not None:
                            result.down_bytes += len(data)
                            await ws.send_bytes(data)
                    result.messages += 1
            finally:
                if nxt is not None:
                    nxt.cancel()
            if channels is not None and not ws.closed:
                await send_held()
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
