"""The upstream pool against a scripted upstream on a real socket: framing, keep-alive, failures."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.http.pool import Origin, UpstreamFailed, UpstreamPool, request_head

# a handler gets the request head (and body bytes already read) and the writer; it returns
# False to close the connection, True to serve the next request on it
Script = Callable[[bytes, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]]


class Scripted:
    """A loopback upstream that answers each request with what ``script`` writes."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.accepted = 0
        self.heads: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> Origin:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return Origin.parse(f"http://127.0.0.1:{port}")

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                self.heads.append(head)
                if not await self.script(head, reader, writer):
                    return
        finally:
            writer.close()


def _headers(**values: str) -> CIMultiDict[str]:
    return CIMultiDict(values)


async def _get(pool: UpstreamPool, origin: Origin, method: str = "GET", path: str = "/x",
               body: AsyncIterator[bytes] | None = None, headers: CIMultiDict[str] | None = None,
               ) -> tuple[int, bytes, CIMultiDictProxy[str]]:
    resp = await pool.request(origin, method, path, headers if headers is not None else _headers(), body)
    try:
        data = await resp.read()
    finally:
        resp.release()
    return resp.status, data, resp.headers


async def _ok(head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Seen: " + head.split(b" ", 2)[1] + b"\r\n\r\nhello")
    return True


def test_request_head_is_one_piece_and_refuses_line_breaks() -> None:
    head = request_head("GET", "/p?q=1", "up:8080", _headers(Accept="*/*"), chunked=True)
    assert head == b"GET /p?q=1 HTTP/1.1\r\nHost: up:8080\r\nAccept: */*\r\nTransfer-Encoding: chunked\r\n\r\n"
    with pytest.raises(UpstreamFailed):
        request_head("GET", "/", "up", _headers(X="a\r\nInjected: 1"), chunked=False)
    for bad in ("a\nb", "a\rb", "a\n"):
        with pytest.raises(UpstreamFailed, match="'X'"):
            request_head("GET", "/", "up", _headers(Accept="*/*", X=bad), chunked=False)
    with pytest.raises(UpstreamFailed):
        request_head("GET", "/a b", "up", _headers(), chunked=False)


def test_origin_parsing() -> None:
    o = Origin.parse("https://api.example.com/base/")
    assert (o.scheme, o.host, o.port, o.prefix, o.host_header) == ("https", "api.example.com", 443, "/base",
                                                                   "api.example.com")
    assert Origin.parse("http://127.0.0.1:8080").host_header == "127.0.0.1:8080"
    with pytest.raises(ValueError):
        Origin.parse("ftp://x")


async def test_keep_alive_reuses_one_connection() -> None:
    up = Scripted(_ok)
    pool = UpstreamPool()
    async with up as origin:
        seen = {}
        for path in ("/n0", "/n1", "/n0", "/n2", "/n3", "/n1"):
            status, body, headers = await _get(pool, origin, path=path)
            assert (status, body, headers["X-Seen"]) == (200, b"hello", path)
            assert isinstance(headers, CIMultiDictProxy)  # read-only: a repeated block is shared
            assert seen.setdefault(path, headers) is headers  # decoded once per distinct block
        await pool.close()
    assert up.accepted == 1
    assert up.heads[0].startswith(b"GET /n0 HTTP/1.1\r\nHost: 127.0.0.1:")


async def test_connection_close_and_a_silently_closed_idle_connection_open_new_ones() -> None:
    async def close_after(head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        if b"/announced" in head:
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
        else:  # keep-alive announced, but the upstream closes right after (an idle timeout)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        return False

    up = Scripted(close_after)
    pool = UpstreamPool()
    async with up as origin:
        assert (await _get(pool, origin, path="/announced"))[:2] == (200, b"ok")
        assert (await _get(pool, origin, path="/silent"))[:2] == (200, b"ok")
        await asyncio.sleep(0.05)  # the close reaches the pooled connection... or not yet: both must work
        assert (await _get(pool, origin, path="/silent"))[:2] == (200, b"ok")
        await pool.close()
    assert up.accepted == 3


async def test_chunked_and_split_bodies_and_read_until_close() -> None:
    async def pieces(head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        if b"/chunked" in head:
            parts = [b"HTTP/1.1 200 OK\r\nTransfer-", b"Encoding: chunked\r\n\r\n5\r\nhel", b"lo\r\n",
                     b"6\r\n world\r\n0\r\n\r\n"]
        elif b"/length" in head:
            parts = [b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhel", b"lo wo", b"rld"]
        else:
            parts = [b"HTTP/1.1 200 OK\r\n\r\nuntil ", b"close"]
        for part in parts:
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(0.01)  # separate reads on the proxy's side
        return b"/close" not in head

    up = Scripted(pieces)
    pool = UpstreamPool()
    async with up as origin:
        assert (await _get(pool, origin, path="/chunked"))[:2] == (200, b"hello world")
        resp = await pool.request(origin, "GET", "/length", _headers())
        assert resp.content_length == 11
        got = []
        while chunk := await resp.readany():
            got.append(chunk)
        resp.release()
        assert b"".join(got) == b"hello world" and len(got) >= 2
        assert (await _get(pool, origin, path="/close"))[:2] == (200, b"until close")
        assert (await _get(pool, origin, path="/length"))[:2] == (200, b"hello world")
        await pool.close()
    assert up.accepted == 2  # the first three shared a connection; one read until its close is not reused


async def test_head_204_304_and_interim_responses_carry_no_body() -> None:
    async def empty(head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        if head.startswith(b"HEAD"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
        elif b"/204" in head:
            writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        elif b"/304" in head:
            writer.write(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 99\r\n\r\n")
        else:
            writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nz")
        return True

    up = Scripted(empty)
    pool = UpstreamPool()
    async with up as origin:
        status, body, headers = await asyncio.wait_for(_get(pool, origin, method="HEAD"), 2)
        assert (status, body, headers["Content-Length"]) == (200, b"", "1234")
        assert (await asyncio.wait_for(_get(pool, origin, path="/204"), 2))[:2] == (204, b"")
        assert (await asyncio.wait_for(_get(pool, origin, path="/304"), 2))[:2] == (304, b"")
        status, body, headers = await asyncio.wait_for(_get(pool, origin, path="/hints"), 2)
        assert (status, body, "Link" in headers) == (200, b"z", False)
        await pool.close()
    assert up.accepted == 2  # the HEAD's connection is not reused, the others are


async def test_malformed_answers_and_a_cut_body_fail() -> None:
    async def broken(head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        if b"/garbage" in head:
            writer.write(b"SMTP ready\r\n\r\n")
        elif b"/silent" in head:
            pass
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this")
        await writer.drain()
        return False

    up = Scripted(broken)
    pool = UpstreamPool()
    async with up as origin:
        with pytest.raises(UpstreamFailed, match="malformed"):
            await pool.request(origin, "GET", "/garbage", _headers())
        with pytest.raises(UpstreamFailed):
            await pool.request(origin, "GET", "/silent", _headers())
        resp = await pool.request(origin, "GET", "/cut", _headers())
        assert await resp.readany() == b"only this"
        with pytest.raises(UpstreamFailed):
            await resp.readany()
        resp.release()
        await pool.close()
    with pytest.raises(UpstreamFailed, match="cannot connect"):
        await UpstreamPool().request(origin, "GET", "/", _headers())


async def test_request_bodies_are_framed_by_length_or_chunked() -> None:
    bodies: list[bytes] = []

    async def echo(head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        if b"Transfer-Encoding: chunked" in head:
            raw = await reader.readuntil(b"0\r\n\r\n")
        else:
            length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            raw = await reader.readexactly(length)
        bodies.append(raw)
        writer.write(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
        return True

    async def gen() -> AsyncIterator[bytes]:
        for part in (b"abc", b"", b"defg"):
            yield part

    up = Scripted(echo)
    pool = UpstreamPool()
    async with up as origin:
        assert (await _get(pool, origin, "POST", body=gen()))[:2] == (201, b"")
        assert (await _get(pool, origin, "PUT", body=gen(), headers=_headers(**{"Content-Length": "7"})))[:2] \
            == (201, b"")
        await pool.close()
    assert bodies == [b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n", b"abcdefg"]
    assert up.accepted == 1


async def test_a_slow_reader_pauses_the_upstream_socket() -> None:
    size = 8 * 1024 * 1024

    async def big(head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        block = b"x" * 65536
        for _ in range(size // len(block)):
            writer.write(block)
            await writer.drain()
        return True

    up = Scripted(big)
    pool = UpstreamPool()
    async with up as origin:
        resp = await pool.request(origin, "GET", "/big", _headers())
        await asyncio.sleep(0.3)  # nobody reads: the pool must stop reading at its high-water mark
        first = await resp.readany()
        assert len(first) <= 512 * 1024
        total = len(first)
        while chunk := await resp.readany():
            assert len(chunk) <= 512 * 1024
            total += len(chunk)
        resp.release()
        assert total == size
        await pool.close()
