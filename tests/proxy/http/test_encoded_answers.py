"""The held credential in compressed answers that pass through unchanged.

An upstream that echoes the request (a debug endpoint, TRACE-like handlers) also echoes the credential hoop
added. hoop withholds an unmasked answer that holds it; these tests show that a ``gzip`` or ``deflate``
answer, which reaches the client unchanged, is searched in a decoded copy, that the upstream is offered only
codings hoop can decode, and that an answer in another coding is refused rather than passed unchecked.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from proxy.http.body import EncodedProbe, Secrets
from proxy.http.headers import readable_encodings
from tests.proxy.http.conftest import UPSTREAM_TOKEN, Env, curl, http_resources, make_env


def auth(secret: str) -> str:
    return f"Authorization: Bearer {secret}"


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
@pytest.mark.parametrize("chunked", ["0", "1"])
@pytest.mark.parametrize(("resource", "ctype"), [
    ("header-api", "text/plain"),  # masking off: nothing is masked
    ("k8s", "application/octet-stream"),  # masking on, a type that passes unmasked
])
async def test_credential_in_a_compressed_answer_is_withheld(env: Env, resource: str, ctype: str, encoding: str,
                                                             chunked: str) -> None:
    _, secret = await env.grant(resource)
    rc, out, _ = await curl("--compressed", "-w", "\n%{http_code}", "-H", auth(secret),
                            f"{env.base}/{resource}/echo?type={ctype}&encoding={encoding}&chunked={chunked}")
    assert UPSTREAM_TOKEN.encode() not in out
    if chunked == "0":  # known length: refused whole
        body, code = out.rsplit(b"\n", 1)
        assert int(code) == 502 and json.loads(body)["error"] == "credential_in_answer"
    else:  # streamed: the head was sent, so the connection is cut (the credential spans the upstream's writes)
        assert rc != 0


async def test_compressed_answer_without_the_credential_passes_unchanged(env: Env) -> None:
    _, secret = await env.grant("header-api")
    rc, out, err = await curl("-i", "-H", auth(secret), f"{env.base}/header-api/gz")
    assert rc == 0, err
    head, body = out.split(b"\r\n\r\n", 1)
    assert b"content-encoding: gzip" in head.lower()
    assert json.loads(gzip.decompress(body)) == {"email": "dave@example.com", "password": "p4ss", "n": 1}


@pytest.mark.parametrize("chunked", ["0", "1"])
async def test_answer_in_a_coding_hoop_cannot_decode_is_refused(env: Env, chunked: str) -> None:
    _, secret = await env.grant("header-api")
    rc, out, _ = await curl("-w", "\n%{http_code}", "-H", auth(secret),
                            f"{env.base}/header-api/echo?encoding=br&chunked={chunked}")
    body, code = out.rsplit(b"\n", 1)
    assert rc == 0 and int(code) == 502 and json.loads(body)["error"] == "unreadable_encoding"
    assert UPSTREAM_TOKEN.encode() not in out


@pytest.mark.parametrize(("offered", "sent"), [
    ("br, gzip;q=0.8, zstd, *", "gzip;q=0.8"),
    ("br", "identity"),
    ("gzip, deflate, br", "gzip, deflate"),
])
async def test_upstream_is_offered_only_codings_hoop_decodes(env: Env, offered: str, sent: str) -> None:
    _, secret = await env.grant("header-api")
    rc, _, err = await curl("-o", "/dev/null", "-H", auth(secret), "-H", f"Accept-Encoding: {offered}",
                            f"{env.base}/header-api/echo-headers")
    assert rc == 0, err
    assert env.upstream.seen[-1]["headers"]["Accept-Encoding"] == sent


def test_readable_encodings() -> None:
    assert readable_encodings("GZIP;q=1.0 , X-Gzip") == "GZIP;q=1.0, X-Gzip"
    assert readable_encodings("identity;q=0, br") == "identity;q=0"
    assert readable_encodings("") == "identity"


def test_probe_searches_a_bomb_in_bounded_pieces() -> None:
    secret = "s3cret-" + "x" * 20
    body = b"\0" * (64 * 1024 * 1024) + secret.encode()  # inflates ~1000-fold
    packed = zlib.compress(body, 9)
    probe = EncodedProbe(Secrets([secret]), "deflate")
    steps = 0
    for i in range(0, len(packed), 4096):  # as the upstream's chunks arrive
        for _ in probe.feed(packed[i:i + 4096]):
            steps += 1
    found = probe.finish()
    assert found
    assert steps >= 64 * 1024 * 1024 // (256 * 1024)  # never more than 256 KiB decoded per step


def test_probe_finds_a_credential_split_across_chunks() -> None:
    secret = "s3cret-value-0123456789"
    packed = gzip.compress(b"head " + secret.encode() + b" tail")
    probe = EncodedProbe(Secrets([secret]), "gzip")
    for byte in range(len(packed)):
        for _ in probe.feed(packed[byte:byte + 1]):
            pass
    assert probe.finish()
    clean = EncodedProbe(Secrets([secret]), "gzip")
    for _ in clean.feed(gzip.compress(b"nothing here")):
        pass
    assert not clean.finish() and not clean.pending


def _open_resources(address: str) -> list[dict[str, Any]]:
    return [*http_resources(address),
            {"name": "open-api", "kind": "http", "address": address, "auth": "none", "masking": {"enabled": False}}]


@pytest.fixture
async def open_env(tmp_path: Path) -> AsyncIterator[Env]:
    async for e in make_env(tmp_path, resources=_open_resources):
        yield e


async def _recorded(env: Env, resource: str) -> list[dict[str, Any]]:
    [live] = env.hub.live(resource)
    await env.proxy.pool.close_all("test over")
    async with env.service.store.tx() as tx:
        events = await tx.events(live.id)
    return [e.data for e in events if e.kind == "http"]


@pytest.mark.parametrize("resource", ["header-api", "open-api"])  # with a credential held, and with none
async def test_compressed_pass_through_is_recorded_decoded(open_env: Env, resource: str) -> None:
    _, secret = await open_env.grant(resource)
    for chunked in ("0", "1"):
        rc, out, err = await curl("--compressed", "-H", auth(secret),
                                  f"{open_env.base}/{resource}/gz?chunked={chunked}")
        assert rc == 0, err
        assert json.loads(out)["email"] == "dave@example.com"  # masking off: as the upstream sent it
    http = await _recorded(open_env, resource)
    assert len(http) == 2
    for event in http:
        assert json.loads(event["resp_body"]) == {"email": "dave@example.com", "password": "p4ss", "n": 1}
        assert event["resp_bytes"] == len(gzip.compress(event["resp_body"].encode()))  # the bytes on the wire


@pytest.mark.parametrize("chunked", ["0", "1"])
async def test_corrupt_compressed_answer(open_env: Env, chunked: str) -> None:
    # with a credential held the answer cannot be checked: withheld (502) or cut once streaming
    _, secret = await open_env.grant("header-api")
    rc, out, _ = await curl("-w", "\n%{http_code}", "-H", auth(secret),
                            f"{open_env.base}/header-api/gz?corrupt=1&chunked={chunked}")
    if chunked == "0":
        body, code = out.rsplit(b"\n", 1)
        assert rc == 0 and int(code) == 502 and json.loads(body)["error"] == "undecodable_body"
    else:
        assert rc != 0
    # with none, it passes as it came (the client sees the damage) and is recorded without a body
    _, secret = await open_env.grant("open-api")
    rc, out, err = await curl("-H", auth(secret), f"{open_env.base}/open-api/gz?corrupt=1&chunked={chunked}")
    assert rc == 0, err
    assert out[12:20] == b"\xff" * 8
    [event] = await _recorded(open_env, "open-api")
    assert event["status"] == 200 and event["resp_body"] is None and event["resp_bytes"] == len(out)
