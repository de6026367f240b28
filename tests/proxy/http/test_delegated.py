"""Nested agents on the HTTP proxy, with real curl: a credential delegated twice (… → alice → ci-runner →
migration-script) works through the proxy and is recorded with the whole chain; revoking the root ends
the grandchild's live keep-alive connection and its credential."""

from __future__ import annotations

import asyncio
import json

from broker.delegation import delegate
from broker.model import SessionStatus
from tests.proxy.http.conftest import UPSTREAM_TOKEN, Env, answer, curl
from tests.support.closing import close_reason


async def test_a_grandchild_credential_works_until_its_root_is_revoked(env: Env) -> None:
    root, _ = await env.grant("k8s")
    alice = env.who("alice@example.com")
    child, _ = await delegate(env.service, root, alice, ["k8s"], "20m", "ci-runner")
    grandchild, secret = await delegate(env.service, child, alice, ["k8s"], "10m", "migration-script")
    chain = (*root.chain, "ci-runner", "migration-script")  # root (break-glass) → alice → …
    assert grandchild.chain == chain and chain[1] == "alice@example.com"

    rc, out, err = await curl("-H", f"Authorization: Bearer {secret}", f"{env.base}/k8s/echo-headers")
    assert rc == 0 and json.loads(out) == {"ok": True}, err
    assert env.upstream.seen[-1]["headers"]["Authorization"] == f"Bearer {UPSTREAM_TOKEN}"

    request = b"GET /k8s/echo-headers HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + secret.encode() + b"\r\n\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
    try:
        writer.write(request)
        assert (await answer(reader))[0] == 200
        [live] = [s for s in env.hub.live("k8s") if s.grant.id == grandchild.id]
        assert live.chain == chain

        await env.service.revoke(root.id, env.who("root@example.com"), "job finished")
        assert await close_reason(env) is not None
        seen = len(env.upstream.seen)
        try:
            writer.write(request)
            status, body = await answer(reader)
        except (ConnectionError, asyncio.IncompleteReadError):
            status, body = 0, b""  # the connection closed with its session: refused as well
        if status:
            assert status == 403 and json.loads(body)["error"] == "revoked"
        assert len(env.upstream.seen) == seen
    finally:
        writer.close()

    rc, out, _ = await curl("-w", "\n%{http_code}", "-H", f"Authorization: Bearer {secret}",
                            f"{env.base}/k8s/echo-headers")
    body, code = out.rsplit(b"\n", 1)
    assert int(code) == 403 and json.loads(body)["error"] == "revoked"
    async with env.service.store.tx() as tx:
        sessions = [s for s in await tx.list_sessions() if s.grant_id == grandchild.id]
    assert sessions and all(s.status is SessionStatus.CLOSED and s.chain == chain for s in sessions)
