"""The HTTP proxy end to end: real curl and aiohttp clients, a real aiohttp upstream, the real gate and hub."""

from __future__ import annotations

import asyncio
import base64
import json
import tracemalloc
from datetime import timedelta
from pathlib import Path

import aiohttp

from broker.events import ReviewRequested
from tests.proxy.http.conftest import UPSTREAM_TOKEN, Env, curl


def auth(secret: str) -> str:
    return f"Authorization: Bearer {secret}"


async def test_credential_swap_seen_by_upstream(env: Env) -> None:
    _, secret = await env.grant("k8s")
    rc, out, err = await curl("-H", auth(secret), "-H", "Proxy-Authorization: Basic eDp5",
                              "-H", "Connection: keep-alive, X-Hop", "-H", "X-Hop: 1",
                              "-H", "X-Forwarded-For: 10.9.9.9",
                              f"{env.base}/k8s/echo-headers?x=1")
    assert rc == 0, err
    assert json.loads(out) == {"ok": True}
    seen = env.upstream.seen[-1]
    assert seen["path"] == "/echo-headers?x=1"
    headers = seen["headers"]
    assert headers["Authorization"] == f"Bearer {UPSTREAM_TOKEN}"
    assert all(secret not in v for v in headers.values())
    assert "Proxy-Authorization" not in headers and "X-Hop" not in headers
    assert headers["X-Forwarded-For"] == "127.0.0.1"  # the client's own list is dropped (review L5)
    assert headers["Host"] == f"127.0.0.1:{env.upstream.port}"

    _, basic_secret = await env.grant("basic-api")
    rc, out, err = await curl("-H", auth(basic_secret), f"{env.base}/basic-api/echo-headers")
    assert rc == 0, err
    assert env.upstream.seen[-1]["headers"]["Authorization"] == \
        "Basic " + base64.b64encode(f"svc:{UPSTREAM_TOKEN}".encode()).decode()

    _, header_secret = await env.grant("header-api")
    rc, out, err = await curl("-H", auth(header_secret), f"{env.base}/header-api/echo-headers")
    assert rc == 0, err
    headers = env.upstream.seen[-1]["headers"]
    assert headers["X-Api-Key"] == UPSTREAM_TOKEN and "Authorization" not in headers


async def test_refusals_are_json_and_never_echo_the_secret(env: Env) -> None:
    _, secret = await env.grant("k8s")
    _, other_secret = await env.grant("basic-api")
    cases = [
        ((f"{env.base}/k8s/echo-headers",), 401, "unauthenticated"),
        (("-H", auth("hoop_not-a-real-secret"), f"{env.base}/k8s/echo-headers"), 401, "bad_credentials"),
        (("-H", auth(other_secret), f"{env.base}/k8s/echo-headers"), 403, "wrong_resource"),
        (("-H", auth(secret), f"{env.base}/nope/echo-headers"), 404, "unknown_resource"),
    ]
    for args, status, error in cases:
        rc, out, _ = await curl("-w", "\n%{http_code}", *args)
        body, code = out.rsplit(b"\n", 1)
        assert rc == 0 and int(code) == status, (args, out)
        doc = json.loads(body)
        assert doc["error"] == error and doc["reason"]
        assert secret.encode() not in body and other_secret.encode() not in body and b"not-a-real" not in body
    assert not env.upstream.seen  # nothing refused reached the upstream

    env.clock.advance(timedelta(minutes=31))
    rc, out, _ = await curl("-w", "\n%{http_code}", "-H", auth(secret), f"{env.base}/k8s/echo-headers")
    body, code = out.rsplit(b"\n", 1)
    assert int(code) == 403 and json.loads(body)["error"] == "expired"
    assert secret.encode() not in body


async def test_unresolvable_upstream_credential_is_a_502_naming_the_reference(env: Env) -> None:
    _, secret = await env.grant("unset-api")
    rc, out, _ = await curl("-w", "\n%{http_code}", "-H", auth(secret), f"{env.base}/unset-api/echo-headers")
    assert rc == 0
    body, code = out.rsplit(b"\n", 1)
    doc = json.loads(body)
    assert int(code) == 502 and doc["error"] == "upstream_credential" and "env:UNSET_TOKEN is not set" in doc["reason"]
    assert not env.upstream.seen


async def test_blocked_delete_is_a_403_with_the_rule(env: Env) -> None:
    _, secret = await env.grant("k8s")
    for path in ("/api/v1/namespaces/x", "/api/v1//namespaces/%78/", "/API/v1/namespaces/x?dryRun=All"):
        _, out, _ = await curl("-X", "DELETE", "-w", "\n%{http_code}", "-H", auth(secret), f"{env.base}/k8s{path}")
        body, code = out.rsplit(b"\n", 1)
        assert int(code) == 403, path
        doc = json.loads(body)
        assert doc["error"] == "blocked" and doc["rule"] == "no-namespace-delete" and doc["reason"]
    assert not [s for s in env.upstream.seen if s["method"] == "DELETE"]
    _, out, _ = await curl("-H", auth(secret), f"{env.base}/k8s/api/v1/namespaces/x")
    assert json.loads(out) == {"kind": "Namespace", "name": "x", "method": "GET"}
    # the block is on the session's record, with the rule
    [live] = env.hub.live("k8s")
    await env.proxy.pool.close_all("test over")
    async with env.service.store.tx() as tx:
        events = await tx.events(live.id)
    http = [e.data for e in events if e.kind == "http"]
    assert [(e["method"], e["status"], e["decision"]) for e in http][:3] == [("DELETE", 403, "block")] * 3
    assert http[-1]["status"] == 200 and http[-1]["resp_body"] and http[-1]["resp_bytes"] > 0


async def test_json_and_text_masked_while_streaming(env: Env) -> None:
    _, secret = await env.grant("k8s")
    rc, out, err = await curl("-i", "-H", auth(secret), f"{env.base}/k8s/users")
    assert rc == 0, err
    head, _, body = out.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower() and b"content-length" not in head.lower()
    doc = json.loads(body)
    alice, bob = doc["items"]
    assert alice["email"] == "[email]" and bob["email"] == "[email]"
    assert alice["password"] == "[masked]" and bob["password"] == "[masked]"
    assert alice["card"] == "[card]" and alice["note"] == "call me" and alice["name"] == "Alice"
    assert bob["api_token"] == "*" * 12 + "ijkl"
    assert b"hunter2" not in body and b"alice.smith" not in body
    assert env.upstream.seen[-1]["headers"]["Accept-Encoding"] == "identity"

    rc, out, _ = await curl("-H", auth(secret), f"{env.base}/k8s/text")
    assert out == b"contact: [email], card [card]\n"

    _, raw_secret = await env.grant("header-api")  # masking disabled there: untouched, length kept
    rc, out, _ = await curl("-i", "-H", auth(raw_secret), f"{env.base}/header-api/text")
    head, _, body = out.partition(b"\r\n\r\n")
    assert body == b"contact: carol@example.com, card 4242 4242 4242 4242\n"
    assert b"content-length: 53" in head.lower()


async def test_100mb_download_and_upload_stream_in_constant_memory(env: Env, tmp_path: Path) -> None:
    _, secret = await env.grant("k8s")
    upload = tmp_path / "upload.bin"
    upload.write_bytes(b"y" * (20 * 1024 * 1024))
    tracemalloc.start()
    try:
        rc, out, err = await curl("-o", "/dev/null", "-w", "%{size_download} %{http_code}", "-H", auth(secret),
                                  f"{env.base}/k8s/big?mb=100", timeout=60)
        assert rc == 0, err
        assert out == f"{100 * 1024 * 1024} 200".encode()
        rc, out, err = await curl("-T", str(upload), "-X", "POST", "-H", auth(secret),
                                  "-H", "Content-Type: application/octet-stream", f"{env.base}/k8s/upload", timeout=60)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["size"] == 20 * 1024 * 1024 and doc["content_length"] == str(20 * 1024 * 1024)
    assert peak < 8 * 1024 * 1024, f"peak traced memory {peak} bytes"


async def test_websocket_echo_through_the_proxy(env: Env) -> None:
    _, secret = await env.grant("k8s")
    async with aiohttp.ClientSession() as http, \
            http.ws_connect(f"{env.base}/k8s/ws", headers={"Authorization": f"Bearer {secret}"},
                            protocols=("v4.channel.k8s.io",)) as ws:
        assert ws.protocol == "v4.channel.k8s.io"
        await ws.send_str("hello from alice@example.com")
        assert await ws.receive_str(timeout=5) == "echo: hello from [email]"
        await ws.send_bytes(b"\x01abc")
        assert await ws.receive_bytes(timeout=5) == b"cba\x01"
    assert env.upstream.seen[-1]["headers"]["Authorization"] == f"Bearer {UPSTREAM_TOKEN}"
    upgrade = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
               "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
    async with aiohttp.ClientSession() as http, http.get(f"{env.base}/k8s/ws", headers=upgrade) as r:
        assert r.status == 401 and (await r.json())["error"] == "unauthenticated"


async def test_revocation_cuts_a_stream_and_a_websocket_mid_flight(env: Env) -> None:
    grant, secret = await env.grant("k8s")
    proc = await asyncio.create_subprocess_exec("curl", "-sS", "-N", "-H", auth(secret), f"{env.base}/k8s/slow",
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    async with aiohttp.ClientSession() as http, \
            http.ws_connect(f"{env.base}/k8s/ws", headers={"Authorization": f"Bearer {secret}"}) as ws:
        async with asyncio.timeout(10):
            await env.upstream.slow_started.wait()
        assert proc.stdout is not None
        first = await proc.stdout.readline()
        assert first == b"line 0\n"
        await env.service.revoke(grant.id, env.who("root@example.com"), "incident over")
        msg = await ws.receive(timeout=5)
        assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 1008
        assert "revoked" in msg.extra
    async with asyncio.timeout(10):
        rest, err = await proc.communicate()
    assert proc.returncode != 0, (rest, err)  # cut, never ended as if complete
    assert len(rest) < 10_000 * 7
    _, out, _ = await curl("-w", "\n%{http_code}", "-H", auth(secret), f"{env.base}/k8s/echo-headers")
    body, code = out.rsplit(b"\n", 1)
    assert int(code) == 403 and json.loads(body)["error"] == "revoked"


async def test_review_holds_a_request_until_approved(env: Env) -> None:
    _, secret = await env.grant("k8s")
    task = asyncio.create_task(curl("-X", "PATCH", "-w", "\n%{http_code}", "-H", auth(secret),
                                    "-H", "Content-Type: application/json", "--data", '{"x": 1}',
                                    f"{env.base}/k8s/api/v1/namespaces/prod"))
    async with asyncio.timeout(10):
        while not env.notifier.of(ReviewRequested):
            await asyncio.sleep(0.02)
    [event] = env.notifier.of(ReviewRequested)
    assert not [s for s in env.upstream.seen if s["method"] == "PATCH"]
    # (an admin other than root, who is behind this break-glass grant and so may not review its requests)
    await env.hub.reviews.decide(event.review.id, env.who("ops@example.com"), True)
    _, out, _ = await task
    body, code = out.rsplit(b"\n", 1)
    assert int(code) == 200 and json.loads(body)["method"] == "PATCH"


async def test_compressed_upstream_bodies_are_decoded_or_refused(env: Env) -> None:
    _, secret = await env.grant("k8s")
    _, out, _ = await curl("-i", "-H", auth(secret), f"{env.base}/k8s/gz")
    head, _, body = out.partition(b"\r\n\r\n")
    assert json.loads(body) == {"email": "[email]", "password": "[masked]", "n": 1}
    assert b"content-encoding" not in head.lower()
    _, out, _ = await curl("-w", "\n%{http_code}", "-H", auth(secret), f"{env.base}/k8s/br")
    body, code = out.rsplit(b"\n", 1)
    assert int(code) == 502 and json.loads(body)["error"] == "unmaskable_encoding"


async def test_malformed_or_cut_upstream_answers_are_502_and_head_has_no_body(env: Env) -> None:
    _, secret = await env.grant("k8s")
    for path in ("garbage", "cut"):
        _, out, _ = await curl("-w", "\n%{http_code}", "-H", auth(secret), f"{env.base}/k8s/{path}")
        body, code = out.rsplit(b"\n", 1)
        assert int(code) == 502 and json.loads(body)["error"] == "upstream_error", (path, out)
    rc, out, err = await curl("-I", "-H", auth(secret), f"{env.base}/k8s/users-whole")
    assert rc == 0, err
    assert out.startswith(b"HTTP/1.1 200") and b"content-length" in out.lower()
    rc, out, err = await curl("-H", auth(secret), f"{env.base}/k8s/echo-headers")  # the proxy still serves
    assert rc == 0 and json.loads(out) == {"ok": True}, err

