"""WebSocket masking through the proxy: Kubernetes channel streams across frames, UTF-8 binary frames."""

from __future__ import annotations

import base64

import aiohttp
import pytest

from tests.proxy.http.conftest import Env

LINE = b"mail alice@example.com, card 4111 1111 1111 1111, ok\n"
MASKED = b"mail [email], card [card], ok\n"


class Exec:
    """A client of the channel protocol (binary or base64), collecting output per stream."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.b64 = ws.protocol == "v4.base64.channel.k8s.io"
        self.out: dict[int, bytes] = {1: b"", 2: b""}
        self.frames = 0

    async def stdin(self, data: bytes) -> None:
        if self.b64:
            await self.ws.send_str("0" + base64.b64encode(data).decode())
        else:
            await self.ws.send_bytes(b"\x00" + data)

    async def until(self, stream: int, size: int) -> bytes:
        while len(self.out[stream]) < size:
            msg = await self.ws.receive(timeout=5)
            if self.b64:
                assert msg.type is aiohttp.WSMsgType.TEXT
                sid, data = int(msg.data[0]), base64.b64decode(msg.data[1:])
            else:
                assert msg.type is aiohttp.WSMsgType.BINARY
                sid, data = msg.data[0], msg.data[1:]
            self.out[sid] += data
            self.frames += 1
        return self.out[stream]


@pytest.mark.parametrize("protocol", ["v5.channel.k8s.io", "v4.base64.channel.k8s.io"])
async def test_exec_streams_are_masked_across_frames(env: Env, protocol: str) -> None:
    _, secret = await env.grant("k8s")
    async with aiohttp.ClientSession() as http, \
            http.ws_connect(f"{env.base}/k8s/exec", headers={"Authorization": f"Bearer {secret}"},
                            protocols=(protocol,)) as ws:
        assert ws.protocol == protocol
        ex = Exec(ws)
        await ex.stdin(LINE)  # the upstream cuts stdout into 16-byte frames: values span frames
        assert await ex.until(1, len(MASKED)) == MASKED
        assert await ex.until(2, len(MASKED)) == MASKED
        await ex.stdin(b"prompt: abcdefgh")  # no newline: the held tail goes out when the upstream is quiet
        assert await ex.until(1, len(MASKED) + 16) == MASKED + b"prompt: abcdefgh"
        binary, raw = b"\xff\xfe binary then bob@x.com\n", b"still raw: bob@x.com\n"
        await ex.stdin(b"1>" + binary)  # not UTF-8: stdout is relayed as is from now on
        out = await ex.until(1, len(MASKED) + 16 + len(binary))
        assert out.endswith(binary)
        await ex.stdin(raw)  # both streams: stdout raw, stderr still masked
        assert (await ex.until(1, len(out) + len(raw))).endswith(raw)
        err = await ex.until(2, len(MASKED) + 16 + len(b"still raw: [email]\n"))
        assert err == MASKED + b"prompt: abcdefgh" + b"still raw: [email]\n"


async def test_binary_frames_are_masked_when_they_are_text(env: Env) -> None:
    _, secret = await env.grant("k8s")
    async with aiohttp.ClientSession() as http, \
            http.ws_connect(f"{env.base}/k8s/ws", headers={"Authorization": f"Bearer {secret}"}) as ws:
        assert ws.protocol is None
        await ws.send_bytes(b"moc.elpmaxe@bob :liam")  # the upstream echoes binary frames reversed
        assert await ws.receive_bytes(timeout=5) == b"mail: [email]"
        raw = b"\x00\xff" + b"moc.elpmaxe@bob"
        await ws.send_bytes(raw)  # not UTF-8: passes through
        assert await ws.receive_bytes(timeout=5) == raw[::-1]
