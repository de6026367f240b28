"""A small aiohttp upstream for the HTTP proxy tests: it records what it received."""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import ssl
import zlib
from typing import Any

from aiohttp import WSMsgType, web

CHUNK = 64 * 1024
USERS = (b'{"items": [{"name": "Alice", "email": "alice.smith@example.com", "password": "hunter2-secret",'
         b' "card": "4111111111111111", "note": "call me"}, {"name": "Bob", "email": "bob@corp.example",'
         b' "password": 12345, "api_token": "tok-abcdefghijkl"}]}')


class Upstream:
    """Routes: /echo-headers, /echo (the request head back as ``?type=``, ``?chunked=1`` in small pieces),
    /redir (302 to ``?to=``), /ws-slow (a WebSocket that takes a second to answer), /api/v1/namespaces/{ns},
    /users (chunked JSON), /users-whole (the same with a Content-Length), /doc (a large JSON document of
    known length), /text, /big, /slow, /ws, /upload."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.slow_started = asyncio.Event()
        self.ws_slow_started = asyncio.Event()
        self.ws_slow_closed: asyncio.Future[int | None] | None = None
        self.runner: web.AppRunner | None = None
        self.port = 0
        app = web.Application()
        app.router.add_route("*", "/echo-headers", self.echo_headers)
        app.router.add_get("/echo", self.echo)
        app.router.add_get("/redir", self.redir)
        app.router.add_get("/ws-slow", self.ws_slow)
        app.router.add_route("*", "/api/v1/namespaces/{ns}", self.namespace)
        app.router.add_get("/users", self.users)
        app.router.add_get("/users-whole", self.users_whole)
        app.router.add_get("/doc", self.doc)
        app.router.add_get("/text", self.text)
        app.router.add_get("/big", self.big)
        app.router.add_get("/slow", self.slow)
        app.router.add_get("/ws", self.ws)
        app.router.add_get("/exec", self.exec)
        app.router.add_post("/upload", self.upload)
        app.router.add_get("/gz", self.gz)
        app.router.add_get("/br", self.br)
        app.router.add_get("/garbage", self.garbage)
        app.router.add_get("/cut", self.cut)
        self.app = app

    async def start(self, tls: ssl.SSLContext | None = None) -> str:
        """Serve on a free loopback port (https with ``tls``); returns the base URL."""
        self.runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=0.5)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=tls)
        await site.start()
        self.port = self.runner.addresses[0][1]
        return f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    def _seen(self, request: web.Request) -> None:
        peer = request.transport.get_extra_info("peercert") if request.transport is not None else None
        self.seen.append({"method": request.method, "path": request.path_qs, "headers": dict(request.headers),
                          "peer": dict(x[0] for x in peer["subject"]).get("commonName") if peer else None})

    async def echo_headers(self, request: web.Request) -> web.Response:
        self._seen(request)
        return web.json_response({"ok": True})

    async def echo(self, request: web.Request) -> web.StreamResponse:
        """What a TRACE answer or a debug endpoint does: the request head back, with the ``Authorization``
        it got also in a response header."""
        self._seen(request)
        head = f"{request.method} {request.path_qs} HTTP/1.1\r\n" + "".join(
            f"{n}: {v}\r\n" for n, v in request.headers.items()) + "\r\n"
        ctype = request.query.get("type", "text/plain")
        headers = {"Content-Type": ctype, "X-Seen-Auth": request.headers.get("Authorization", "-")}
        data = head.encode()
        encoding = request.query.get("encoding")  # sent compressed whatever the request asked for
        if encoding is not None:
            headers["Content-Encoding"] = encoding
            data = gzip.compress(data) if encoding == "gzip" else zlib.compress(data) if encoding == "deflate" \
                else b"\x0b\x02\x80" + data  # (br: only the label; the proxy must not pass it)
        if request.query.get("chunked") != "1":
            return web.Response(body=data, headers=headers)
        resp = web.StreamResponse(headers=headers)
        await resp.prepare(request)
        for i in range(0, len(data), 5):  # the credential spans writes
            await resp.write(data[i:i + 5])
        await resp.write_eof()
        return resp

    async def redir(self, request: web.Request) -> web.Response:
        self._seen(request)
        raise web.HTTPFound(request.query["to"])

    async def ws_slow(self, request: web.Request) -> web.WebSocketResponse:
        """A WebSocket whose handshake takes a second (a kubelet behind the API server)."""
        self._seen(request)
        self.ws_slow_closed = asyncio.get_running_loop().create_future()
        self.ws_slow_started.set()
        await asyncio.sleep(1.0)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type is WSMsgType.TEXT:
                await ws.send_str(f"echo: {msg.data}")
        self.ws_slow_closed.set_result(ws.close_code)
        return ws

    async def namespace(self, request: web.Request) -> web.Response:
        self._seen(request)
        return web.json_response({"kind": "Namespace", "name": request.match_info["ns"], "method": request.method})

    async def users(self, request: web.Request) -> web.StreamResponse:
        """JSON written in small chunks that cut values in two."""
        self._seen(request)
        body = USERS
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        for i in range(0, len(body), 7):
            await resp.write(body[i:i + 7])
        await resp.write_eof()
        return resp

    async def users_whole(self, request: web.Request) -> web.Response:
        self._seen(request)
        return web.Response(body=USERS, content_type="application/json")

    async def doc(self, request: web.Request) -> web.Response:
        """``n`` users (``?n=``), with a ``Content-Length``."""
        n = int(request.query.get("n", "1000"))
        items = [{"id": i, "email": f"user{i}@example.com", "password": f"pw-{i}", "name": f"User {i} Zoë",
                  "note": f'says "hi" from user{i}@example.com'} for i in range(n)]  # escapes in the body
        return web.json_response({"items": items})

    async def text(self, request: web.Request) -> web.Response:
        self._seen(request)
        return web.Response(text="contact: carol@example.com, card 4242 4242 4242 4242\n")

    async def big(self, request: web.Request) -> web.StreamResponse:
        size = int(request.query.get("mb", "100")) * 1024 * 1024
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = size
        await resp.prepare(request)
        block = b"x" * CHUNK
        for _ in range(size // CHUNK):
            await resp.write(block)
        await resp.write_eof()
        return resp

    async def slow(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await resp.prepare(request)
        self.slow_started.set()
        try:
            for i in range(10_000):
                await resp.write(f"line {i}\n".encode())
                await asyncio.sleep(0.02)
            await resp.write_eof()
        except ConnectionResetError:
            pass  # the proxy cut the stream: what the test wants
        return resp

    async def ws(self, request: web.Request) -> web.WebSocketResponse:
        self._seen(request)
        ws = web.WebSocketResponse(protocols=("v4.channel.k8s.io",))
        await ws.prepare(request)
        async for msg in ws:
            if msg.type is WSMsgType.TEXT:
                await ws.send_str(f"echo: {msg.data}")
            elif msg.type is WSMsgType.BINARY:
                await ws.send_bytes(msg.data[::-1])
        return ws

    async def exec(self, request: web.Request) -> web.WebSocketResponse:
        """A ``kubectl exec`` stand-in: stdin (stream 0) comes back on stdout (1) in 16-byte frames
        and on stderr (2) whole (``1>``/``2>`` first: that stream only), in the binary channel protocol or
        its base64 form."""
        self._seen(request)
        ws = web.WebSocketResponse(protocols=("v5.channel.k8s.io", "v4.base64.channel.k8s.io"))
        await ws.prepare(request)
        b64 = ws.ws_protocol == "v4.base64.channel.k8s.io"
        async for msg in ws:
            if b64:
                sid, data = int(msg.data[0]), base64.b64decode(msg.data[1:])
            else:
                sid, data = msg.data[0], msg.data[1:]
            if sid != 0:
                continue
            streams = {1, 2}
            if data[:2] in (b"1>", b"2>"):  # to that stream only
                streams, data = {data[0] - 0x30}, data[2:]
            for out, pieces in ((1, [data[i:i + 16] for i in range(0, len(data), 16)]), (2, [data])):
                if out not in streams:
                    continue
                for piece in pieces:
                    if b64:
                        await ws.send_str(str(out) + base64.b64encode(piece).decode())
                    else:
                        await ws.send_bytes(bytes([out]) + piece)
        return ws

    async def upload(self, request: web.Request) -> web.Response:
        self._seen(request)
        h = hashlib.sha256()
        n = 0
        async for chunk in request.content.iter_any():
            h.update(chunk)
            n += len(chunk)
        return web.json_response({"size": n, "sha256": h.hexdigest(),
                                  "content_length": request.headers.get("Content-Length")})

    async def gz(self, request: web.Request) -> web.StreamResponse:
        """Compressed although the proxy asked for identity (some upstreams do that); ``chunked=1`` streams it
        in small writes, ``corrupt=1`` damages the stream after its first bytes."""
        body = gzip.compress(b'{"email": "dave@example.com", "password": "p4ss", "n": 1}')
        if request.query.get("corrupt") == "1":
            body = body[:12] + b"\xff" * 8 + body[20:]
        headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
        if request.query.get("chunked") != "1":
            return web.Response(body=body, headers=headers)
        resp = web.StreamResponse(headers=headers)
        await resp.prepare(request)
        for i in range(0, len(body), 7):
            await resp.write(body[i:i + 7])
        await resp.write_eof()
        return resp

    async def br(self, request: web.Request) -> web.Response:
        return web.Response(body=b"\x0b\x02\x80not-really-brotli",
                            headers={"Content-Type": "application/json", "Content-Encoding": "br"})

    async def garbage(self, request: web.Request) -> web.Response:
        """Not HTTP at all (a misconfigured address pointing at another protocol)."""
        return await self._raw(request, b"SSH-2.0-OpenSSH_9.6\r\n\r\n")

    async def cut(self, request: web.Request) -> web.Response:
        """A body that ends before its announced length."""
        return await self._raw(request, b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                        b"Content-Length: 100\r\n\r\n{\"partial\": ")

    @staticmethod
    async def _raw(request: web.Request, data: bytes) -> web.Response:
        transport = request.transport
        assert transport is not None
        transport.write(data)
        await asyncio.sleep(0.05)
        transport.close()
        raise ConnectionResetError("raw answer sent")
