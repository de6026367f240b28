"""The HTTP proxy over TLS (``tls.http_proxy``): curl and aiohttp (including a WebSocket, which the front
hands to aiohttp on the TLS connection) with the proxy's generated certificate; plain HTTP gets nothing."""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from broker.config import Tls
from proxy.pg.tls import server_tls
from tests.proxy.http.conftest import UPSTREAM_TOKEN, Env, curl, make_env


@pytest.fixture
async def tls_env(tmp_path: Path) -> AsyncIterator[Env]:
    served = server_tls(Tls(), tmp_path / "state")  # a self-signed pair for "localhost", made once
    served.context.set_alpn_protocols(["http/1.1"])  # as broker.runtime does
    async for e in make_env(tmp_path, tls=served.context):
        yield e


async def test_https_credential_swap_masking_and_websocket(tls_env: Env, tmp_path: Path) -> None:
    env = tls_env
    _, secret = await env.grant()
    ca = tmp_path / "state" / "pg-tls.crt"
    url = f"https://localhost:{env.port}"
    code, out, err = await curl("--cacert", str(ca), "-H", f"Authorization: Bearer {secret}", f"{url}/k8s/users")
    assert code == 0, err
    items = json.loads(out)["items"]
    assert items[0]["name"] == "Alice" and items[0]["password"] != "hunter2-secret"
    code, out, err = await curl("--http2", "--cacert", str(ca), "-H", f"Authorization: Bearer {secret}",
                                "-w", "\n%{http_version}", f"{url}/k8s/echo-headers")
    assert code == 0 and out.decode().endswith("\n1.1"), err  # an HTTP/2 client falls back to 1.1 by ALPN
    seen = env.upstream.seen[-2]["headers"]
    assert seen["Authorization"] == f"Bearer {UPSTREAM_TOKEN}" and secret not in json.dumps(seen)
    context = ssl.create_default_context(cafile=str(ca))
    async with aiohttp.ClientSession() as http, http.ws_connect(
            f"wss://localhost:{env.port}/k8s/ws", headers={"Authorization": f"Bearer {secret}"}, ssl=context) as ws:
        await ws.send_str("over tls")
        msg = await ws.receive(timeout=10)
        assert msg.data == "echo: over tls"


async def test_https_port_refuses_plain_http_and_unknown_certificates(tls_env: Env) -> None:
    env = tls_env
    _, secret = await env.grant()
    code, out, _ = await curl("-H", f"Authorization: Bearer {secret}", f"http://127.0.0.1:{env.port}/k8s/echo-headers")
    assert code != 0 and b"ok" not in out  # plain HTTP on the TLS port: no answer
    code, _, err = await curl(f"https://localhost:{env.port}/k8s/echo-headers")  # not trusted without the CA
    assert code == 60, err  # curl: peer certificate cannot be authenticated
    assert not env.upstream.seen
