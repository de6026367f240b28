"""The grant's end against HTTP requests in flight: a body upload half sent, and a keep-alive connection
whose next request comes after the end (refused with 403 ``expired``)."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import timedelta
from pathlib import Path

import pytest

from broker.model import Grant, SessionStatus
from tests.proxy.http.conftest import Env, answer, make_env
from tests.support.closing import close_reason
from tests.support.lateclock import ShiftedClock, SlowExtendHooks


async def test_an_upload_half_sent_at_the_deadline_is_cut(env: Env) -> None:
    grant, secret = await env.grant()
    env.clock.set(grant.expires_at - timedelta(seconds=1))
    reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
    try:
        writer.write(b"POST /k8s/upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + secret.encode() +
                     b"\r\nContent-Type: application/octet-stream\r\nContent-Length: 1000000\r\n\r\n" + b"a" * 1000)
        await writer.drain()
        end = time.monotonic() + 10
        while not env.upstream.seen and time.monotonic() < end:  # forwarded: the upstream reads the body
            await asyncio.sleep(0.02)
        assert env.upstream.seen
        async with asyncio.timeout(10):  # cut: EOF or a reset, never a complete answer from the upstream
            got = b""
            try:
                while chunk := await reader.read(65536):
                    got += chunk
            except ConnectionError:
                pass
        assert b'"sha256"' not in got
    finally:
        writer.close()
    assert await close_reason(env) == "access expired"


async def test_a_keep_alive_request_after_the_deadline_is_refused(env: Env) -> None:
    grant, secret = await env.grant()
    env.clock.set(grant.expires_at - timedelta(seconds=1))
    request = b"GET /k8s/echo-headers HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + secret.encode() + b"\r\n\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
    try:
        writer.write(request)
        assert (await answer(reader))[0] == 200
        assert await close_reason(env) == "access expired"  # the proxy's own timer, a second later
        env.clock.set(grant.expires_at + timedelta(seconds=1))
        seen = len(env.upstream.seen)
        try:
            writer.write(request)
            status, body = await answer(reader)
        except (ConnectionError, asyncio.IncompleteReadError):
            status, body = 0, b""  # (the connection was closed with the session: also refused)
        if status:
            assert status == 403 and json.loads(body)["error"] == "expired"
        assert len(env.upstream.seen) == seen
    finally:
        writer.close()


@pytest.mark.parametrize("announced", ["before", "after"], ids=["announced-before", "announced-after"])
async def test_a_grant_extended_shortly_before_its_end_keeps_its_session_until_the_new_end(
        tmp_path: Path, announced: str) -> None:
    """``announced-after``: the extension is stored before the old end but announced only after it (its side
    effects took that long, or on another replica its notification came late). Neither the proxy's own timer
    nor a request's deadline check may end the session at the old end: the session reads the grant first."""
    clock, hooks = ShiftedClock(), SlowExtendHooks()
    async for env in make_env(tmp_path, clock=clock, hooks=hooks):
        grant, secret = await env.grant()
        clock.offset = grant.expires_at - clock.now() - timedelta(seconds=2)  # the grant ends in 2 s
        request = b"GET /k8s/echo-headers HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + secret.encode() + b"\r\n\r\n"
        reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
        try:
            writer.write(request)
            assert (await answer(reader))[0] == 200
            old_end = time.monotonic() + (grant.expires_at - clock.now()).total_seconds()
            await asyncio.sleep(old_end - time.monotonic() - 0.5)
            hooks.delay = 1.5 if announced == "after" else 0.0
            extended = await env.service.extend(grant.id, env.who("root@example.com"), "4s")
            assert isinstance(extended, Grant)
            await asyncio.sleep(max(old_end + 1.5 - time.monotonic(), 0))
            writer.write(request)
            assert (await answer(reader))[0] == 200
            async with env.service.store.tx() as tx:
                sessions = await tx.list_sessions()
            assert [x.status for x in sessions] == [SessionStatus.OPEN], "the session ended at the grant's old end"
            assert await close_reason(env, within=6) == "access expired"
            ended = time.monotonic()
        finally:
            writer.close()
    assert old_end + 4 - 0.1 < ended < old_end + 4 + 2, "the session did not end at the grant's new end"
