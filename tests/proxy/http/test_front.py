"""The HTTP proxy's own HTTP/1.1 server (proxy.http.front): framing, pipelining, refusals, keep-alive,
100-continue, HTTP/1.0 and the hand-over of upgrades to aiohttp, with raw sockets, curl and aiohttp."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from proxy.http.frontcall import response_head
from tests.proxy.http.conftest import UPSTREAM_TOKEN, Env, curl, make_env


async def _exchange(env: Env, data: bytes, *, until_close: bool = True, timeout: float = 10.0,
                    eof: bool = False) -> bytes:
    """Send ``data`` on one connection (then end it with ``eof``) and read until the proxy closes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
    try:
        writer.write(data)
        await writer.drain()
        if eof:
            writer.write_eof()
        async with asyncio.timeout(timeout):
            return await reader.read(-1) if until_close else await reader.read(65536)
    finally:
        writer.close()


def _responses(raw: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Split a byte stream of Content-Length-framed responses."""
    out = []
    rest = raw
    for _ in range(100):
        if not rest:
            break
        head, _, rest = rest.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        out.append((status, headers, rest[:length]))
        rest = rest[length:]
    return out


def _get(path: str, secret: str, *extra: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: proxy", f"Authorization: Bearer {secret}", *extra, "", ""]
    return "\r\n".join(lines).encode()


async def test_pipelined_requests_are_answered_in_order_on_one_connection(env: Env) -> None:
    _, secret = await env.grant()
    data = (_get("/k8s/api/v1/namespaces/one", secret) + _get("/k8s/api/v1/namespaces/two", secret)
            + _get("/k8s/api/v1/namespaces/three", secret, "Connection: close"))
    answers = _responses(await _exchange(env, data))
    assert [a[0] for a in answers] == [200, 200, 200]
    assert [json.loads(a[2])["name"] for a in answers] == ["one", "two", "three"]
    assert answers[-1][1]["connection"] == "close"
    assert [s["path"] for s in env.upstream.seen[-3:]] == [f"/api/v1/namespaces/{n}" for n in ("one", "two", "three")]


async def test_header_blocks_kept_per_connection_follow_each_request(env: Env) -> None:
    """The upstream header fields are rendered once per distinct client header block on a connection:
    a repeated block reuses them, a changed one (another header, another resource) gets its own."""
    _, secret = await env.grant()
    _, other = await env.grant("header-api")
    data = (_get("/k8s/echo-headers", secret, "X-Trace: one") + _get("/k8s/echo-headers", secret, "X-Trace: two")
            + _get("/k8s/echo-headers", secret, "X-Trace: one")
            + _get("/header-api/echo-headers", other, "X-Trace: one", "Connection: close"))
    answers = _responses(await _exchange(env, data))
    assert [a[0] for a in answers] == [200, 200, 200, 200]
    seen = [s["headers"] for s in env.upstream.seen[-4:]]
    assert [h.get("X-Trace") for h in seen] == ["one", "two", "one", "one"]
    assert [h.get("Authorization") for h in seen[:3]] == [f"Bearer {UPSTREAM_TOKEN}"] * 3
    assert "Authorization" not in seen[3] and seen[3]["X-Api-Key"] == UPSTREAM_TOKEN  # header-api's own swap
    assert all(secret not in str(h) and other not in str(h) for h in seen)


async def test_keep_alive_serves_many_requests_on_one_aiohttp_connection(env: Env) -> None:
    _, secret = await env.grant()
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector) as http:
        for i in range(20):
            async with http.get(f"{env.base}/k8s/api/v1/namespaces/n{i}",
                                headers={"Authorization": f"Bearer {secret}"}) as resp:
                assert resp.status == 200
                assert (await resp.json())["name"] == f"n{i}"
        assert len(connector._conns) == 1  # one pooled connection served all twenty


async def test_malformed_request_is_a_400_json_and_closed(env: Env) -> None:
    raw = await _exchange(env, b"GET /k8s/x HTTP/1.1\r\nHost: a\r\nBad Header Line\r\n\r\n")
    (status, headers, body), = _responses(raw)
    assert status == 400
    assert headers["connection"] == "close"
    assert json.loads(body)["error"] == "bad_request"
    raw = await _exchange(env, b"\x16\x03\x01\x02\x00garbage-not-http\r\n\r\n")  # a TLS hello on the plain port
    assert _responses(raw)[0][0] == 400


async def test_request_smuggling_shapes_are_refused_before_any_upstream_request(env: Env) -> None:
    _, secret = await env.grant()
    before = len(env.upstream.seen)
    auth = f"Authorization: Bearer {secret}\r\n".encode()
    for head in (b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",  # CL.TE
                 b"Content-Length: 5\r\nContent-Length: 6\r\n",  # two lengths
                 b"Transfer-Encoding: chunked, identity\r\n"):  # chunked not last
        raw = await _exchange(env, b"POST /k8s/upload HTTP/1.1\r\nHost: a\r\n" + auth + head
                              + b"\r\n0\r\n\r\nGET /k8s/echo-headers HTTP/1.1\r\nHost: a\r\n\r\n")
        (status, headers, body), = _responses(raw)
        assert status == 400 and headers["connection"] == "close", head
        assert json.loads(body)["error"] == "bad_request"
    assert len(env.upstream.seen) == before  # nothing reached the upstream, the smuggled GET least of all


async def test_oversized_head_is_431_and_long_target_414(env: Env) -> None:
    _, secret = await env.grant()
    huge = "X-Filler: " + "a" * 70_000
    (status, _, body), = _responses(await _exchange(env, _get("/k8s/echo-headers", secret, huge)))
    assert status == 431 and json.loads(body)["error"] == "headers_too_large"
    long_target = "/k8s/echo-headers?q=" + "b" * 70_000
    (status, _, body), = _responses(await _exchange(env, _get(long_target, secret)))
    assert status == 414 and json.loads(body)["error"] == "uri_too_long"
    assert secret not in body.decode()


async def test_the_proxy_survives_bad_clients_and_keeps_serving(env: Env) -> None:
    _, secret = await env.grant()
    for bad in (b"GET / HTTP/1.1\r\nContent-Length: -5\r\n\r\n", b"\r\n\r\n\x00\x00", b"GET /k8s HTTP/9.9\r\n\r\n"):
        await _exchange(env, bad)
    _reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
    writer.write(b"GET /k8s/echo-headers HTTP/1.1\r\nHost: a\r\n")  # a head that never completes
    await writer.drain()
    code, out, _ = await curl("-H", f"Authorization: Bearer {secret}", f"{env.base}/k8s/echo-headers")
    assert code == 0 and json.loads(out) == {"ok": True}
    writer.close()


async def test_random_and_truncated_requests_get_400_or_a_close_and_never_stop_the_proxy(env: Env) -> None:
    import random

    _, secret = await env.grant()
    rng = random.Random(20261201)
    valid = _get("/k8s/echo-headers", secret)
    samples = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))) for _ in range(40)]
    samples += [valid[:cut] + bytes(rng.randrange(256) for _ in range(20)) for cut in range(0, len(valid), 7)]
    for data in samples:  # bounded: ~80 connections, each answered or closed within the timeout
        raw = await _exchange(env, data, timeout=5, eof=True)  # (a cut head would wait for more)
        assert raw == b"" or raw.startswith(b"HTTP/1.1 "), raw[:80]
        if raw.startswith(b"HTTP/1.1 4"):
            assert b"Traceback" not in raw and secret.encode() not in raw
    code, out, _ = await curl("-H", f"Authorization: Bearer {secret}", f"{env.base}/k8s/echo-headers")
    assert code == 0 and json.loads(out) == {"ok": True}
    for _ in range(100):  # every connection, garbage or not, is closed once its client is gone
        if not env.proxy._fronts:
            break
        await asyncio.sleep(0.02)
    assert not env.proxy._fronts


async def test_expect_100_continue_upload_and_refused_upload_without_continue(env: Env, tmp_path: Path) -> None:
    _, secret = await env.grant()
    payload = tmp_path / "up.bin"
    payload.write_bytes(b"z" * 300_000)
    code, out, err = await curl("-H", f"Authorization: Bearer {secret}", "-H", "Expect: 100-continue",
                                "--data-binary", f"@{payload}", f"{env.base}/k8s/upload")
    assert code == 0, err
    assert json.loads(out)["size"] == 300_000
    # refused before the body: the client gets the refusal, never 100 Continue, and the connection closes
    raw = await _exchange(env, b"POST /k8s/upload HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer wrong\r\n"
                               b"Expect: 100-continue\r\nContent-Length: 1000\r\n\r\n")
    assert b"100 Continue" not in raw
    (status, headers, _), = _responses(raw)
    assert status == 401 and headers["connection"] == "close"


async def test_http_1_0_client_gets_a_connection_delimited_stream(env: Env) -> None:
    _, secret = await env.grant()
    raw = await _exchange(env, f"GET /k8s/users HTTP/1.0\r\nAuthorization: Bearer {secret}\r\n\r\n".encode())
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"transfer-encoding" not in head.lower()  # an HTTP/1.0 client cannot read chunks
    doc = json.loads(body)
    assert doc["items"][0]["password"] != "hunter2-secret"  # and it is still masked
    code, out, _ = await curl("--http1.0", "-H", f"Authorization: Bearer {secret}", f"{env.base}/k8s/users-whole")
    assert code == 0 and json.loads(out)["items"][1]["name"] == "Bob"


async def test_head_has_headers_and_no_body(env: Env) -> None:
    _, secret = await env.grant()
    raw = await _exchange(env, f"HEAD /k8s/nowhere HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {secret}\r\n"
                               f"Connection: close\r\n\r\n".encode())
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 404") and body == b""


@pytest.fixture
async def short_env(tmp_path: Path) -> AsyncIterator[Env]:
    async for e in make_env(tmp_path, keepalive=0.3):
        yield e


async def test_idle_connection_and_slow_head_are_closed_after_keepalive(short_env: Env) -> None:
    env = short_env
    _, secret = await env.grant()
    reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
    writer.write(_get("/k8s/echo-headers", secret))
    await writer.drain()
    first = await reader.readuntil(b'{"ok": true}')
    assert first.startswith(b"HTTP/1.1 200")
    async with asyncio.timeout(5):
        assert await reader.read(-1) == b""  # idle: closed by the proxy
    writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
    writer.write(b"GET /k8s/echo-headers HTTP/1.1\r\nHost: a\r\n")  # slowloris: a head that never ends
    async with asyncio.timeout(5):
        assert await reader.read(-1) == b""
    writer.close()


async def test_a_client_that_goes_away_cancels_its_request(env: Env) -> None:
    _, secret = await env.grant()
    reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
    writer.write(_get("/k8s/slow", secret))
    await writer.drain()
    await asyncio.wait_for(env.upstream.slow_started.wait(), 10)
    assert (await reader.readuntil(b"line 0\n")).startswith(b"HTTP/1.1 200")
    assert env.proxy._pool is not None and env.proxy._pool._all  # the upstream stream is open
    writer.close()
    for _ in range(100):  # the handler is cancelled: it stops reading the upstream and closes that connection
        if not env.proxy._pool._all and not env.proxy._fronts:
            break
        await asyncio.sleep(0.05)
    assert not env.proxy._pool._all and not env.proxy._fronts


async def test_websocket_after_plain_requests_on_the_same_connection(env: Env) -> None:
    _, secret = await env.grant()
    reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
    writer.write(_get("/k8s/echo-headers", secret)
                 + _get("/k8s/ws", secret, "Connection: Upgrade", "Upgrade: websocket",
                        "Sec-WebSocket-Version: 13", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="))
    await writer.drain()
    async with asyncio.timeout(10):
        first = await reader.readuntil(b'{"ok": true}')
        upgrade = await reader.readuntil(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 200")
    assert upgrade.startswith(b"HTTP/1.1 101")
    assert b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in upgrade  # the accept key for the sample nonce (RFC 6455)
    writer.write(bytes([0x81, 0x85, 1, 2, 3, 4]) + bytes(b ^ k for b, k in zip(b"hello", b"\x01\x02\x03\x04" * 2,
                                                                                   strict=False)))
    await writer.drain()
    async with asyncio.timeout(10):
        frame = await reader.readexactly(2)
        payload = await reader.readexactly(frame[1] & 0x7F)
    assert frame[0] == 0x81 and payload == b"echo: hello"
    writer.close()


def test_response_head_drops_a_header_with_a_line_break() -> None:
    from multidict import CIMultiDict

    head = response_head(200, None, CIMultiDict({"X-Ok": "1", "X-Bad": "a\r\nSet-Cookie: evil=1"}), "")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"X-Ok: 1\r\n" in head
    assert b"evil" not in head and head.endswith(b"\r\n\r\n")
    head = response_head(502, "Bad\r\nX: 1", CIMultiDict({"X-Lone": "a\nb", "X-Cr": "a\rb", "X-Ok": "2"}), "")
    assert head.startswith(b"HTTP/1.1 502 Bad Gateway\r\n") and b"X-Ok: 2\r\n" in head
    assert b"X-Lone" not in head and b"X-Cr" not in head
