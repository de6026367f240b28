"""Masked HTTP bodies: whole bodies of known length and chunked ones give the same bytes; lengths are right."""

from __future__ import annotations

import json

from tests.proxy.http.conftest import Env, curl


def auth(secret: str) -> str:
    return f"Authorization: Bearer {secret}"


def split(out: bytes) -> tuple[dict[str, str], bytes]:
    head, _, body = out.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")[1:]
    return {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}, body


async def test_whole_body_is_masked_like_the_chunked_one_with_its_new_length(env: Env) -> None:
    _, secret = await env.grant("k8s")
    rc, out, err = await curl("-i", "-H", auth(secret), f"{env.base}/k8s/users-whole")
    assert rc == 0, err
    headers, body = split(out)
    assert headers["content-length"] == str(len(body)) and "transfer-encoding" not in headers
    rc, out, err = await curl("-i", "-H", auth(secret), f"{env.base}/k8s/users")  # 7-byte chunks
    assert rc == 0, err
    chunked_headers, chunked = split(out)
    assert chunked_headers["transfer-encoding"] == "chunked"
    assert body == chunked  # the one-pass and the streaming masker agree byte for byte
    alice, bob = json.loads(body)["items"]
    assert (alice["email"], alice["password"], alice["card"], bob["password"]) == ("[email]", "[masked]", "[card]",
                                                                                    "[masked]")
    assert bob["api_token"] == "*" * 12 + "ijkl"


async def test_large_document_of_known_length(env: Env) -> None:
    _, secret = await env.grant("k8s")
    for n, framing in ((1700, "content-length"), (6000, "transfer-encoding")):  # ~250 KiB read whole; ~870 KiB streamed
        rc, out, err = await curl("-i", "-H", auth(secret), f"{env.base}/k8s/doc?n={n}", timeout=60)
        assert rc == 0, err
        headers, body = split(out)
        assert framing in headers
        if framing == "content-length":
            assert int(headers["content-length"]) == len(body)
        items = json.loads(body)["items"]
        assert len(items) == n
        assert all(it["email"] == "[email]" and it["password"] == "[masked]" for it in items)
        assert all(it["note"] == 'says "hi" from [email]' for it in items)
        assert items[7]["name"] == "User 7 Zoë"
    await env.proxy.pool.close_all("test over")
