"""The cancel-key table and the rate bound, with no I/O; and the single-process case: a
CancelRequest for a key nobody holds is answered with nothing and goes nowhere."""

from __future__ import annotations

import asyncio

import pytest

from broker.fanout import Replicas
from broker.ratebound import RateBound
from broker.store import Store
from proxy.pg import codec
from proxy.pg.cancel import CancelKeys, could_be_ours
from tests.proxy.pg.harness import Hoop


def test_found_by_key_and_by_digest_until_removed() -> None:
    keys: CancelKeys[str] = CancelKeys(b"s" * 32)
    keys.add(7, b"abcd", "seven")
    keys.add(8, b"abcd", "eight")
    digest = keys.digest(7, b"abcd")
    assert len(digest) == 32 and b"abcd" not in digest
    assert keys.get(7, b"abcd") == "seven" and keys.by_digest(digest) == "seven"
    assert keys.by_digest(keys.digest(8, b"abcd")) == "eight"
    assert keys.get(7, b"abce") is None and keys.by_digest(keys.digest(7, b"abce")) is None
    assert keys.by_digest(digest[:16]) is None and keys.by_digest(b"") is None
    keys.remove(7, b"abcd")
    keys.remove(7, b"abcd")  # twice is harmless
    assert keys.get(7, b"abcd") is None and keys.by_digest(digest) is None and len(keys) == 1


def test_digests_are_keyed() -> None:
    one: CancelKeys[str] = CancelKeys(b"a" * 32)
    same: CancelKeys[str] = CancelKeys(b"a" * 32)
    other: CancelKeys[str] = CancelKeys(b"b" * 32)
    assert one.digest(7, b"abcd") == same.digest(7, b"abcd") != other.digest(7, b"abcd")
    assert one.digest(7, b"abcd") != one.digest(7, b"abce") != one.digest(8, b"abcd")


@pytest.mark.parametrize(("pid", "key", "ours"), [
    (1, b"abcd", True), (2**31 - 1, b"abcd", True), (0, b"abcd", False), (-5, b"abcd", False),
    (7, b"abc", False), (7, bytes(32), False),
])
def test_could_be_ours(pid: int, key: bytes, ours: bool) -> None:
    assert could_be_ours(pid, key) is ours


def test_rate_bound_refills_and_reports_once_per_interval() -> None:
    now = [100.0]
    bound = RateBound(2.0, 3, now=lambda: now[0], report_every=10.0)
    assert [bound.take() for _ in range(5)] == [True, True, True, False, False]
    assert bound.report() == 2 and bound.report() == 0
    now[0] += 0.5  # one token back
    assert [bound.take() for _ in range(2)] == [True, False]
    assert bound.report() == 0  # within the interval: counted, not reported
    now[0] += 10.0  # refills to the burst, no more
    assert bound.report() == 1
    assert [bound.take() for _ in range(4)] == [True, True, True, False]
    with pytest.raises(ValueError):
        RateBound(0, 1)


@pytest.mark.postgres
async def test_single_process_drops_an_unknown_key_silently(hoop: Hoop) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", hoop.port)
    writer.write(codec.encode_cancel_request(12345, b"nope"))
    async with asyncio.timeout(5):
        assert await reader.read() == b""  # like PostgreSQL: no answer, the connection closes
    writer.close()
    store = Store.from_url("sqlite+aiosqlite:///:memory:")
    alone = Replicas(store, None, [])
    assert await alone.ask_cancel(bytes(32)) is False  # no fan-out on SQLite: nothing is sent
    await store.close()


async def test_a_cancel_to_an_upstream_that_does_not_answer_is_bounded() -> None:
    """The end of a session with a statement running sends a CancelRequest upstream; only its last read
    was bounded, so a host that stalled the connect or its TLS answer held the end (and hoop's stop) for
    as long as it liked. Here it accepts and says nothing, not even to the SSLRequest."""
    from broker.config.resources import PostgresResource
    from broker.errors import UpstreamError
    from proxy.pg import upstream

    held: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    resource = PostgresResource(kind="postgres", name="db", address=f"127.0.0.1:{port}", sslmode="require")
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(UpstreamError) as info:
            await asyncio.wait_for(upstream.cancel(resource, 7, b"abcd", timeout=0.3), 5)
        assert loop.time() - started < 2 and "abcd" not in info.value.message
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()
