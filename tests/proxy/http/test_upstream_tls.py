"""https upstreams (``tls`` on an HTTP resource): a private CA, a server name, a client certificate.

A Kubernetes API server is the case in mind: its certificate comes from the cluster's own CA, is often
issued for a name other than the address hoop dials, and the server may ask for a client certificate.
The upstream here is a real aiohttp server on TLS (its CA made per test run); clients are real curl and
aiohttp; each refusal is checked to reach no upstream handler."""

from __future__ import annotations

import json
import logging
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from broker.config import parse_config
from broker.errors import ConfigError
from tests.conftest import base_config
from tests.proxy.http.conftest import UPSTREAM_TOKEN, Env, curl, make_env
from tests.support.certs import Pki, make_pki


def _server_tls(pki: Pki, *, want_client_cert: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    if want_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(pki.ca_cert)
    return context


def _resources(pki: Pki, other: Pki) -> Any:
    def make(address: str) -> list[dict[str, Any]]:
        base = {"kind": "http", "address": address, "credential": {"env": "K8S_TOKEN"}}
        return [
            {**base, "name": "k8s", "masking": {"json_keys": [{"match": "password"}]},
             "tls": {"ca": str(pki.ca_cert), "client_cert": str(pki.client_cert), "client_key": str(pki.client_key)}},
            {**base, "name": "by-name",
             "tls": {"ca": str(pki.ca_cert), "server_name": "localhost", "client_cert": str(pki.client_cert),
                     "client_key": str(pki.client_key)}},
            {**base, "name": "system-cas"},  # no tls: the system's CAs, which do not know the test CA
            {**base, "name": "wrong-name", "tls": {"ca": str(pki.ca_cert), "server_name": "api.example.org",
                                                   "client_cert": str(pki.client_cert),
                                                   "client_key": str(pki.client_key)}},
            {**base, "name": "no-client-cert", "tls": {"ca": str(pki.ca_cert)}},
            {**base, "name": "other-client-cert", "tls": {"ca": str(pki.ca_cert), "client_cert": str(other.client_cert),
                                                          "client_key": str(other.client_key)}},
        ]
    return make


@pytest.fixture
async def tls_env(tmp_path: Path) -> AsyncIterator[tuple[Env, Pki]]:
    pki, other = make_pki(tmp_path / "pki"), make_pki(tmp_path / "other", ca_name="another CA")
    async for env in make_env(tmp_path, upstream_tls=_server_tls(pki, want_client_cert=True),
                              resources=_resources(pki, other)):
        yield env, pki


async def test_private_ca_server_name_and_client_certificate(tls_env: tuple[Env, Pki]) -> None:
    env, _ = tls_env
    for resource in ("k8s", "by-name"):
        _, secret = await env.grant(resource)
        code, out, err = await curl("-H", f"Authorization: Bearer {secret}", f"{env.base}/{resource}/users")
        assert code == 0, err
        items = json.loads(out)["items"]
        assert items[0]["name"] == "Alice"
        assert (items[0]["password"] != "hunter2-secret") is (resource == "k8s")  # masked on the way
        seen = env.upstream.seen[-1]
        assert seen["peer"] == "hoop proxy"  # hoop proved itself with the client certificate
        assert seen["headers"]["Authorization"] == f"Bearer {UPSTREAM_TOKEN}" and secret not in json.dumps(seen)
    assert env.upstream.seen[-1]["headers"]["Host"].startswith("127.0.0.1:")  # the address's host, not the name

    _, secret = await env.grant("k8s")
    async with aiohttp.ClientSession() as http, http.ws_connect(
            f"{env.base}/k8s/ws", headers={"Authorization": f"Bearer {secret}"}) as ws:
        await ws.send_str("over wss")
        msg = await ws.receive(timeout=10)
        assert msg.data == "echo: over wss"
    assert env.upstream.seen[-1]["peer"] == "hoop proxy"


@pytest.mark.parametrize(("resource", "cause"), [
    ("system-cas", "certificate of 127.0.0.1"),
    ("wrong-name", "certificate of 127.0.0.1"),
    ("no-client-cert", "client certificate"),
    ("other-client-cert", "client certificate"),
])
async def test_an_upstream_hoop_cannot_trust_or_that_refuses_hoop_is_a_502(
        tls_env: tuple[Env, Pki], resource: str, cause: str, caplog: pytest.LogCaptureFixture) -> None:
    env, _ = tls_env
    _, secret = await env.grant(resource)
    caplog.set_level(logging.WARNING, logger="proxy.http.server")
    code, out, err = await curl("-H", f"Authorization: Bearer {secret}", "-w", "\n%{http_code}",
                                f"{env.base}/{resource}/users")
    assert code == 0, err
    body, status = out.rsplit(b"\n", 1)
    assert status == b"502" and json.loads(body)["error"] == "upstream_error"
    assert f"resource={resource} upstream failed" in caplog.text and cause in caplog.text
    assert not env.upstream.seen  # nothing reached a handler
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
            await http.ws_connect(f"{env.base}/{resource}/ws", headers={"Authorization": f"Bearer {secret}"})
        assert exc.value.status == 502
    assert not env.upstream.seen


def _http(tls: dict[str, Any], address: str = "https://127.0.0.1:6443") -> dict[str, Any]:
    data = base_config()
    data["resources"] = [*data["resources"], {"name": "k8s", "kind": "http", "address": address,
                                              "credential": {"env": "K8S_TOKEN"}, "tls": tls}]
    return data


def test_tls_settings_that_cannot_work_are_config_errors(tmp_path: Path) -> None:
    pki, other = make_pki(tmp_path / "pki"), make_pki(tmp_path / "other", ca_name="another CA")
    with pytest.raises(ConfigError, match="tls is for an https:// address"):
        parse_config(_http({"ca": str(pki.ca_cert)}, "http://127.0.0.1:8080"))
    with pytest.raises(ConfigError, match="client_cert and client_key go together"):
        parse_config(_http({"client_cert": str(pki.client_cert)}))

    from proxy.http.pool import upstream_tls

    with pytest.raises(ConfigError, match=r"resources\.k8s\.tls\.ca: cannot load .*missing\.pem"):
        upstream_tls("k8s", tmp_path / "missing.pem", None, None)
    with pytest.raises(ConfigError, match=r"resources\.k8s\.tls: cannot load client_cert") as exc:
        upstream_tls("k8s", pki.ca_cert, pki.client_cert, other.client_key)  # a key of another pair
    assert "PRIVATE KEY" not in str(exc.value) and other.client_key.read_text()[40:80] not in str(exc.value)
    assert upstream_tls("k8s", pki.ca_cert, pki.client_cert, pki.client_key).verify_mode == ssl.CERT_REQUIRED
