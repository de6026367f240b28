"""Fixes from the HTTP proxy review, second round: each test failed before its fix.

M2 types the client steers with Accept, M3 JSON the masker lost track of, M4 recorded request bodies cut at
the cap, L1 a close-delimited upstream body cut by a reset, L3 a grant ended while its session opened, L4
URL-encoded values, L5 forwarding and identity headers, L6 a cut HTTP/1.0 answer, L7 retried POSTs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from broker.config import HttpResource, Masking
from broker.model import Grant
from proxy.contracts import Live
from proxy.http import HttpProxy
from proxy.http.headers import upstream_headers
from proxy.http.pool import Origin, UpstreamFailed, UpstreamPool
from proxy.mask import Masker
from tests.proxy.http.conftest import UPSTREAM_TOKEN, Env, curl, http_resources, make_env
from tests.proxy.http.upstream import USERS

MASKER = Masker(Masking.model_validate({"json_keys": [{"match": "password"}]}), b"k" * 32)
BINARY = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + b"alice@example.com 4111111111111111 " + bytes(range(256)) * 4
BODIES = {
    "users": USERS,
    "nan": b'[{"score": NaN, "password": "hunter2"}, {"password": "s3cret-pw", "n": Infinity}]',
    "bom": b'\xef\xbb\xbf{"password": "hunter2"}',
    "xssi": b')]}\',\n{"password": "hunter2"}',
    "broken": b'{"note": oops, "password": "hunter2", "pin": 123456}',
    "binary": BINARY,
}


def auth(secret: str) -> str:
    return f"Authorization: Bearer {secret}"


class Extra:
    """An upstream for this file: ``/typed`` (a body of ``BODIES`` under any ``Content-Type``, or none;
    ``times`` copies, ``stream=1`` chunked in small writes), ``/rst`` (a close-delimited body ended by a
    reset), ``/slow`` (text, a line every 20 ms) and ``/echo-headers``."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.runner: web.AppRunner | None = None
        app = web.Application()
        app.router.add_route("*", "/typed", self.typed)
        app.router.add_get("/rst", self.rst)
        app.router.add_route("*", "/echo-headers", self.echo_headers)
        app.router.add_route("*", "/upload", self.echo_headers)
        self.app = app

    async def start(self) -> str:
        self.runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=0.5)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def echo_headers(self, request: web.Request) -> web.Response:
        self.seen.append({"method": request.method, "headers": dict(request.headers), "body": await request.read()})
        return web.json_response({"ok": True})

    async def typed(self, request: web.Request) -> web.StreamResponse:
        body = BODIES[request.query.get("body", "users")] * int(request.query.get("times", "1"))
        ctype = request.query.get("type", "none")
        transport = request.transport
        assert transport is not None
        if ctype == "none":  # aiohttp always adds a Content-Type: write the answer ourselves
            transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%b"
                            % (len(body), body))
            await asyncio.sleep(0.05)
            transport.close()
            raise ConnectionResetError("raw answer sent")
        if request.query.get("stream") != "1":
            return web.Response(body=body, headers={"Content-Type": ctype})
        resp = web.StreamResponse(headers={"Content-Type": ctype})
        await resp.prepare(request)
        for i in range(0, len(body), 997):
            await resp.write(body[i:i + 997])
        await resp.write_eof()
        return resp

    async def rst(self, request: web.Request) -> web.Response:
        transport = request.transport
        assert transport is not None
        transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npartial answer\n")
        await asyncio.sleep(0.2)
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()  # a reset, not a close: the body is cut, not ended
        raise ConnectionResetError("reset")


@pytest.fixture
async def extra(tmp_path: Path) -> AsyncIterator[tuple[Env, Extra]]:
    up = Extra()
    address = await up.start()
    try:
        async for e in make_env(tmp_path, resources=lambda _: http_resources(address)):
            yield e, up
    finally:
        await up.stop()


async def recording(env: Env, resource: str = "k8s") -> list[dict[str, Any]]:
    """The ``http`` events of the resource's session (the session is closed to store them)."""
    [live] = env.hub.live(resource)
    await env.proxy.pool.close_all("test over")
    async with env.service.store.tx() as tx:
        events = await tx.events(live.id)
    return [e.data for e in events if e.kind == "http"]


# -- M4: a ruled value the recording cap cuts in two ---------------------------------------------------


async def test_recorded_request_body_never_holds_part_of_a_value_cut_by_the_cap(extra: tuple[Env, Extra]) -> None:
    env, _ = extra
    _, secret = await env.grant("k8s")  # max_body_record: 4096; json_keys: password
    password = "correct-horse-battery-staple-0123456789"
    pad = "x" * (4096 - len('{"user": "bob", "pad": "", "password": "') - 10)
    body = json.dumps({"user": "bob", "pad": pad, "password": password, "n": 1}, separators=(", ", ": "))
    assert body.index(password) == 4086  # the value straddles the cap
    card = "4111111111111111"
    form = "pad=" + "y" * (4096 - len("pad=&card=") - 6) + "&card=" + card + "&x=1"
    for data, ctype in ((body, "application/json"), (form, "application/x-www-form-urlencoded")):
        rc, out, err = await curl("-H", auth(secret), "-H", f"Content-Type: {ctype}", "--data-binary", data,
                                  f"{env.base}/k8s/upload")
        assert rc == 0 and json.loads(out) == {"ok": True}, err
    recorded = [e["req_body"] for e in await recording(env)]
    assert len(recorded) == 2 and all(r.endswith("…") for r in recorded)
    for part in (password[i:i + 4] for i in range(len(password) - 3)):
        assert part not in recorded[0], part
    assert card[:4] not in recorded[1]


# -- M3: JSON the masker could not follow ----------------------------------------------------------------


@pytest.mark.parametrize("body", ["nan", "bom", "xssi", "broken"])
@pytest.mark.parametrize("stream", ["0", "1"])
async def test_ruled_keys_hold_in_json_with_nan_bom_xssi_or_errors(extra: tuple[Env, Extra], body: str,
                                                                   stream: str) -> None:
    env, _ = extra
    _, secret = await env.grant("k8s")
    rc, out, err = await curl("-H", auth(secret),
                              f"{env.base}/k8s/typed?type=application/json&body={body}&stream={stream}&times=3")
    assert rc == 0, err
    assert b"hunter2" not in out and b"s3cret" not in out and b"123456" not in out
    assert b"[masked]" in out


# -- M2: a type the client chose with Accept, or none ------------------------------------------------------


@pytest.mark.parametrize("ctype", ["none", "application/octet-stream", "application/vnd.kubernetes.protobuf",
                                   "application/ndjson"])
@pytest.mark.parametrize("stream", ["0", "1"])
async def test_text_under_another_type_is_masked(extra: tuple[Env, Extra], ctype: str, stream: str) -> None:
    env, _ = extra
    _, secret = await env.grant("k8s")
    times = "1" if ctype == "none" else "300"  # (300 copies: over the size read whole)
    rc, out, err = await curl("-H", auth(secret), f"{env.base}/k8s/typed?type={ctype}&stream={stream}&times={times}")
    assert rc == 0, err
    assert b"hunter2" not in out and b"alice.smith" not in out and b"4111111111111111" not in out
    assert b'"password": "[masked]"' in out and b"[email]" in out


@pytest.mark.parametrize("ctype", ["none", "application/octet-stream"])
@pytest.mark.parametrize("times", ["1", "300"])
async def test_binary_under_another_type_passes_unchanged(extra: tuple[Env, Extra], ctype: str, times: str) -> None:
    env, _ = extra
    _, secret = await env.grant("k8s")
    if ctype == "none" and times != "1":
        return
    rc, out, err = await curl("-H", auth(secret), f"{env.base}/k8s/typed?type={ctype}&body=binary&times={times}")
    assert rc == 0, err
    assert out == BINARY * int(times)


def test_sniff_kind() -> None:
    from proxy.http.body import sniff_kind  # (new with the fix)

    assert sniff_kind(b'{"a": 1}') == "json" and sniff_kind(b'\n [ {"a"') == "json"
    assert sniff_kind(b")]}'\n{}") == "json" and sniff_kind(b'\xef\xbb\xbf{"a": 1}') == "json"
    assert sniff_kind(b"[INFO] started") == "text" and sniff_kind("Zoë, café".encode()) == "text"
    assert sniff_kind("ünï".encode()[:-1]) == "text"  # a UTF-8 sequence cut at the end is still text
    assert sniff_kind(b"") is None and sniff_kind(BINARY) is None and sniff_kind(b"a\xffb") is None
    assert sniff_kind(b"k8s\x00\n\x0b\n\x02v1") is None  # Kubernetes protobuf


# -- L4: URL-encoded values in recorded paths and form bodies ----------------------------------------------


def test_shown_target_reads_percent_encoding() -> None:
    from proxy.http.body import form_decoded  # (new with the fix)
    from proxy.http.respond import shown_target

    assert shown_target(MASKER, "/users?email=alice%40example.com") == "/users?email=[email]"
    assert shown_target(MASKER, "/pay?card=4111+1111+1111+1111&x=1") == "/pay?card=[card]&x=1"
    assert shown_target(MASKER, "/a%20b?q=x+y") == "/a%20b?q=x+y"  # nothing found: shown as sent
    assert form_decoded(b"email=bob%40x.org&n=a+b") == b"email=bob@x.org&n=a b"


async def test_recorded_path_and_form_body_are_masked_decoded(extra: tuple[Env, Extra]) -> None:
    env, up = extra
    _, secret = await env.grant("k8s")
    rc, _, err = await curl("-H", auth(secret), "-H", "Content-Type: application/x-www-form-urlencoded",
                            "--data-binary", "email=bob%40corp.example&card=4111+1111+1111+1111",
                            f"{env.base}/k8s/upload?who=alice%40example.com")
    assert rc == 0, err
    assert up.seen[-1]["body"] == b"email=bob%40corp.example&card=4111+1111+1111+1111"  # forwarded as sent
    [event] = await recording(env)
    assert "alice" not in event["path"] and "[email]" in event["path"]
    assert "bob" not in event["req_body"] and "4111" not in event["req_body"]


# -- L1: a close-delimited upstream body cut by a reset -------------------------------------------------


async def test_upstream_reset_cuts_the_answer(extra: tuple[Env, Extra]) -> None:
    env, _ = extra
    _, secret = await env.grant("header-api")
    rc, out, _ = await curl("-H", auth(secret), f"{env.base}/header-api/rst")
    assert rc == 18, (rc, out)  # curl: the transfer ended before the chunked body's end; before: 0, a whole body


# -- L6: a cut HTTP/1.0 answer ------------------------------------------------------------------------------


async def test_cut_http10_answer_ends_with_a_reset(env: Env) -> None:
    grant, secret = await env.grant("k8s")
    reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
    writer.write(f"GET /k8s/slow HTTP/1.0\r\nAuthorization: Bearer {secret}\r\n\r\n".encode())
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200") and b"chunked" not in head.lower()
    await asyncio.wait_for(reader.readuntil(b"line 3\n"), 5)
    await env.service.revoke(grant.id, env.who("root@example.com"), "incident over")
    with pytest.raises(ConnectionResetError):  # before: a clean end of file, as after a whole body
        async with asyncio.timeout(5):
            while await reader.read(65536):
                pass
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


# -- L5: forwarding and identity headers --------------------------------------------------------------------


async def test_client_forwarding_and_identity_headers_do_not_reach_the_upstream(extra: tuple[Env, Extra]) -> None:
    env, up = extra
    _, secret = await env.grant("k8s")
    rc, out, err = await curl("-H", auth(secret), "-H", "X-Forwarded-For: 10.9.9.9", "-H", "X-Forwarded-Proto: https",
                              "-H", "X-Forwarded-Host: admin.internal", "-H", "Forwarded: for=10.9.9.9",
                              "-H", "X-Real-IP: 10.9.9.9", "-H", "X-Remote-User: system:admin",
                              "-H", "X-Remote-Group: system:masters", "-H", "X-Forwarded-User: root",
                              f"{env.base}/k8s/echo-headers")
    assert rc == 0 and json.loads(out) == {"ok": True}, err
    headers = {k.lower(): v for k, v in up.seen[-1]["headers"].items()}
    assert headers["x-forwarded-for"] == "127.0.0.1" and headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-host"] == f"127.0.0.1:{env.port}"
    for name in ("forwarded", "x-real-ip", "x-remote-user", "x-remote-group", "x-forwarded-user"):
        assert name not in headers, name


@pytest.mark.parametrize("header", ["Impersonate-User: system:admin", "Impersonate-Group: system:masters",
                                   "Impersonate-Extra-Scopes: all", "X-HTTP-Method-Override: DELETE",
                                   "X-Original-URL: /api/v1/namespaces/prod"])
async def test_impersonation_and_overrides_are_refused(extra: tuple[Env, Extra], header: str) -> None:
    env, up = extra
    _, secret = await env.grant("k8s")
    rc, out, _ = await curl("-w", "\n%{http_code}", "-H", auth(secret), "-H", header, f"{env.base}/k8s/echo-headers")
    body, code = out.rsplit(b"\n", 1)
    assert rc == 0 and int(code) == 403 and json.loads(body)["error"] == "header_refused"
    assert not up.seen


def test_upstream_headers_set_forwarding_headers_of_their_own() -> None:
    from proxy.http.headers import refused_header  # (new with the fix)

    res = HttpResource(name="api", kind="http", address="http://up", credential={"env": "T"})  # type: ignore[arg-type]
    incoming = CIMultiDictProxy(CIMultiDict([("Host", "hoop:18080"), ("X-Forwarded-For", "1.2.3.4"),
                                             ("X-Forwarded-Proto", "http"), ("X-Forwarded-Port", "1"),
                                             ("True-Client-IP", "1.2.3.4"), ("X-Remote-Extra-Scopes", "x")]))
    out = upstream_headers(incoming, res, "held", "10.0.0.7", identity_encoding=False, proto="https")
    assert dict(out) == {"Authorization": "Bearer held", "X-Forwarded-For": "10.0.0.7",
                         "X-Forwarded-Proto": "https", "X-Forwarded-Host": "hoop:18080"}
    assert refused_header(incoming) is None
    assert refused_header(CIMultiDict([("impersonate-uid", "1")])) == "impersonate-uid"


# -- L3: the grant ends while its session is being opened -----------------------------------------------------


class _RacingHub:
    """The real hub, with the grant revoked while a session opens (its GrantEnded finds no session yet)."""

    def __init__(self, env: Env) -> None:
        self.env = env

    async def open(self, grant: Grant, resource: str, protocol: str, client_addr: str,
                   on_end: Callable[[str], None], detail: Mapping[str, Any] | None = None) -> Live:
        await self.env.service.revoke(grant.id, self.env.who("root@example.com"), "incident over")
        return await self.env.hub.open(grant, resource, protocol, client_addr, on_end, detail)


async def test_revocation_while_the_session_opens_refuses_the_request(env: Env) -> None:
    _, secret = await env.grant("k8s")
    proxy = HttpProxy(env.config, env.proxy.gate, _RacingHub(env), env.clock, {"K8S_TOKEN": UPSTREAM_TOKEN})
    port = await proxy.start("127.0.0.1", 0)
    try:
        rc, out, _ = await curl("-w", "\n%{http_code}", "-H", auth(secret),
                                f"http://127.0.0.1:{port}/k8s/api/v1/namespaces/x")
        body, code = out.rsplit(b"\n", 1)
        assert rc == 0 and int(code) == 403 and json.loads(body)["error"] == "revoked", out
        assert not env.upstream.seen
        assert not env.hub.live("k8s")  # the session opened in the race is ended
    finally:
        await proxy.stop()


# -- L7: a stale keep-alive connection re-sends only idempotent requests ---------------------------------------


async def test_stale_connection_retries_only_idempotent_requests() -> None:
    seen: list[bytes] = []
    writers: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        first = True
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                seen.append(head.split(b" ", 1)[0])
                if not first:  # the keep-alive connection was closed as the request arrived
                    break
                first = False
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except asyncio.IncompleteReadError:
            pass
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    origin = Origin.parse(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    pool = UpstreamPool()

    async def once(method: str) -> int:
        resp = await pool.request(origin, method, "/", CIMultiDict())
        try:
            await resp.read()
            return resp.status
        finally:
            resp.release()

    try:
        assert await once("GET") == 200  # parks a keep-alive connection
        with pytest.raises(UpstreamFailed):
            await once("POST")  # before: sent again on a new connection
        assert seen == [b"GET", b"POST"]
        assert await once("GET") == 200
        assert await once("GET") == 200  # the stale one is retried: the upstream saw it twice
        assert seen == [b"GET", b"POST", b"GET", b"GET", b"GET"]
    finally:
        await pool.close()
        server.close()
        for writer in writers:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        await server.wait_closed()
