"""The shipped manifests agree with the code: the example configs are valid, the Kubernetes
Deployment mounts exactly the keys `hoop state init` makes where hoop looks for them, ports and
probes match what hoop serves, and every secret the config references is in the Secret."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel
from typer.testing import CliRunner

from broker.cli import app
from broker.config import HoopConfig, SecretRef, parse_config
from broker.metrics import Metrics
from broker.store import Store
from broker.web import build_web

ROOT = Path(__file__).parents[2]
K8S = ROOT / "manifests" / "kubernetes"


def docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def deployment() -> dict[str, Any]:
    (dep,) = docs("deployment.yaml")
    return dep


def cluster_config() -> HoopConfig:
    (cm,) = docs("configmap.yaml")
    return parse_config(yaml.safe_load(cm["data"]["hoop.yaml"]))


def env_refs(config: HoopConfig) -> set[str]:
    """Every ``{env: NAME}`` the config refers to."""
    found: set[str] = set()

    def walk(value: Any) -> None:
        if isinstance(value, SecretRef):
            if value.env:
                found.add(value.env)
        elif hasattr(value, "__pydantic_fields__"):
            for name in type(value).model_fields:
                walk(getattr(value, name))
        elif isinstance(value, list | tuple):
            for v in value:
                walk(v)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)

    walk(config)
    return found


def test_kustomization_lists_files_that_exist() -> None:
    (k,) = docs("kustomization.yaml")
    for name in k["resources"]:
        assert (K8S / name).is_file(), name
        assert docs(name), name


def test_example_and_cluster_configs_are_valid() -> None:
    parse_config(yaml.safe_load((ROOT / "manifests" / "hoop.example.yaml").read_text()))
    config = cluster_config()
    assert config.listen.host == "0.0.0.0"


def test_ports_and_probes_match_what_hoop_serves() -> None:
    config = cluster_config()
    (container,) = deployment()["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": config.listen.http, "postgres": config.listen.postgres, "ssh": config.listen.ssh,
                     "http-proxy": config.listen.http_proxy}
    for svc in docs("service.yaml"):
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in ports, port
    (policy,) = docs("networkpolicy.yaml")
    assert {p["port"] for p in policy["spec"]["ingress"][0]["ports"]} == set(ports.values())
    web_app = build_web(Store.from_url("sqlite+aiosqlite://"), Metrics())
    served = {r.resource.canonical for r in web_app.router.routes() if r.resource is not None}
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] in served
        assert container[probe]["httpGet"]["port"] == "http"


async def test_liveness_does_not_depend_on_the_store_but_readiness_does() -> None:
    """Both probes asked /healthz, which answers 503 while the store is away: a store outage past the
    liveness threshold made Kubernetes restart every replica, ending every live session."""
    import aiohttp
    from aiohttp import web

    from tests.support.pgcluster import free_port

    (container,) = deployment()["spec"]["template"]["spec"]["containers"]
    away = Store.from_url(f"postgresql+asyncpg://hoop:x@127.0.0.1:{free_port()}/hoop")  # nothing listens there
    runner = web.AppRunner(build_web(away, Metrics()), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(url + container["livenessProbe"]["httpGet"]["path"]) as resp:
                assert resp.status == 200
            async with http.get(url + container["readinessProbe"]["httpGet"]["path"]) as resp:
                assert resp.status == 503
    finally:
        await runner.cleanup()
        await away.close()


def test_the_shared_keys_are_mounted_where_hoop_looks(tmp_path: Path) -> None:
    config = cluster_config()
    (tmp_path / "hoop.yaml").write_text(yaml.safe_dump(yaml.safe_load(
        (ROOT / "manifests" / "hoop.example.yaml").read_text())))
    keys = tmp_path / "keys"
    result = CliRunner().invoke(app, ["state", "init", "--config", str(tmp_path / "hoop.yaml"), "--dir", str(keys)])
    assert result.exit_code == 0, result.output
    made = {p.name for p in keys.iterdir()}
    (container,) = deployment()["spec"]["template"]["spec"]["containers"]
    mounted = {m["subPath"]: m["mountPath"] for m in container["volumeMounts"] if m["name"] == "keys"}
    assert set(mounted) == made
    for name, path in mounted.items():
        assert Path(path) == config.state_dir / name
    again = CliRunner().invoke(app, ["state", "init", "--config", str(tmp_path / "hoop.yaml"), "--dir", str(keys)])
    assert again.exit_code == 0 and again.output.count("kept") == len(made)  # made once, then kept


def test_every_referenced_secret_is_in_the_secret_and_nothing_runs_as_root() -> None:
    (secret,) = docs("secret.example.yaml")
    keys = set(secret["stringData"])
    assert env_refs(cluster_config()) | {"HOOP_DATABASE_URL"} <= keys
    assert secret["stringData"]["HOOP_DATABASE_URL"].startswith("postgresql+asyncpg://")  # replicas need PostgreSQL
    spec = deployment()["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["automountServiceAccountToken"] is False
    for c in spec["containers"] + spec["initContainers"]:
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert {"secretRef": {"name": secret["metadata"]["name"]}} in c["envFrom"]


#: the bot scope each Slack Web API method hoop calls needs (docs.slack.dev/reference/methods); views.open
#: and views.publish need none
_METHOD_SCOPES = {
    "chat_postMessage": "chat:write", "chat_postEphemeral": "chat:write", "chat_update": "chat:write",
    "conversations_open": "im:write", "users_info": "users:read", "users_lookupByEmail": "users:read.email",
    "usergroups_users_list": "usergroups:read", "reactions_get": "reactions:read", "files_upload_v2": "files:write",
    "views_open": None, "views_publish": None,
}
#: the scope each event the bot listens to needs
_EVENT_SCOPES = {"reaction_added": "reactions:read", "reaction_removed": "reactions:read", "app_home_opened": None}


def test_the_slack_manifest_asks_for_what_bot_handles_and_no_more() -> None:
    """The manifest asked for channels:history and groups:history, which no code uses (reaction events
    need reactions:read only): they let hoop's token read every message in every channel it is in."""
    import re

    manifest = yaml.safe_load((ROOT / "manifests" / "slack-app.yaml").read_text())
    source = "\n".join(p.read_text() for p in sorted((ROOT / "bot").glob("*.py")))
    methods = set(re.findall(r"client\.([a-zA-Z_0-9]+)\(", source)) - {"session"}
    events = set(re.findall(r'app\.event\("([a-z_]+)"\)', source))
    commands = set(re.findall(r'app\.command\("(/[a-z]+)"\)', source))
    assert methods <= set(_METHOD_SCOPES), methods - set(_METHOD_SCOPES)  # a new method: add its scope above
    assert events <= set(_EVENT_SCOPES), events - set(_EVENT_SCOPES)
    needed = {_METHOD_SCOPES[m] for m in methods} | {_EVENT_SCOPES[e] for e in events} | {"commands"}
    needed.discard(None)
    assert set(manifest["oauth_config"]["scopes"]["bot"]) == needed
    settings = manifest["settings"]
    assert set(settings["event_subscriptions"]["bot_events"]) == events
    assert [c["command"] for c in manifest["features"]["slash_commands"]] == sorted(commands)
    urls = {settings["event_subscriptions"]["request_url"], settings["interactivity"]["request_url"],
            *(c["url"] for c in manifest["features"]["slash_commands"])}
    assert {u.rsplit("/", 2)[-2:] == ["slack", "events"] for u in urls} == {True}  # HTTP mode: one endpoint
    assert settings["interactivity"]["is_enabled"] is True and manifest["features"]["app_home"]["home_tab_enabled"]


def test_the_slash_commands_usage_hint_names_every_verb() -> None:
    """Slack shows the hint as the user types /hoop; it once named six of the ten verbs."""
    from bot.commands import _ARITY

    manifest = yaml.safe_load((ROOT / "manifests" / "slack-app.yaml").read_text())
    (command,) = manifest["features"]["slash_commands"]
    hint = command["usage_hint"]
    assert [verb for verb in _ARITY if verb not in hint] == []


def test_connection_hints_of_the_cluster_config_reach_the_proxies_through_the_services() -> None:
    """The hints a requester gets name `listen.advertise` and hoop's listen ports; the proxy Service
    published 5432, 22 and 443 instead (so every hint named a port nothing answered on), and the HTTP
    hint said http:// while the cluster config serves the HTTP proxy as https (tls.http_proxy)."""
    import re
    from datetime import UTC, datetime, timedelta

    from broker.hints import connection_hints
    from broker.model import Grant, GrantStatus

    config = cluster_config()
    (container,) = deployment()["spec"]["template"]["spec"]["containers"]
    by_name = {p["name"]: p["containerPort"] for p in container["ports"]}
    proxy = next(s for s in docs("service.yaml") if s["metadata"]["name"] == "hoop-proxy")
    published = {by_name[p["targetPort"]]: p["port"] for p in proxy["spec"]["ports"]}
    assert published == {port: port for port in published}, "a hint names the listen port: publish the same one"
    http_res = {"name": "api", "kind": "http", "address": "https://k8s.internal:6443", "channel": "C1",
                "credential": {"env": "K"}}
    config = parse_config({**yaml.safe_load(docs("configmap.yaml")[0]["data"]["hoop.yaml"]),
                           "resources": [r.model_dump(mode="json", exclude_defaults=True) for r in config.resources]
                           + [http_res]})
    now = datetime.now(UTC)
    grant = Grant(id="g1", login="a.b", identity="alice@example.com", chain=("alice@example.com",),
                  resources=tuple(r.name for r in config.resources), status=GrantStatus.ACTIVE, created_at=now,
                  expires_at=now + timedelta(minutes=5))
    hints = connection_hints(config, grant, "hoop_x")
    assert config.listen.advertise is not None and config.tls.http_proxy
    assert re.search(rf"host={config.listen.advertise} port=(\d+)", hints["prod-db"]).group(1) in map(str, published)
    assert f"https://{config.listen.advertise}:{config.listen.http_proxy}/api/" in hints["api"]
    assert config.listen.http_proxy in published and config.listen.postgres in published
    assert config.listen.ssh in published


def _keys(model: type[BaseModel], seen: set[type[BaseModel]]) -> set[str]:
    """Every key a hoop.yaml may hold under ``model``, at any depth (field aliases as written)."""
    if model in seen:
        return set()
    seen.add(model)
    out: set[str] = set()
    for name, field in model.model_fields.items():
        out.add(field.alias or name)
        todo = [field.annotation]
        while todo:
            tp = todo.pop()
            if isinstance(tp, type) and issubclass(tp, BaseModel):
                out |= _keys(tp, seen)
            todo.extend(get_args(tp))
    return out


def test_the_example_config_shows_every_key_hoop_understands() -> None:
    """hoop.example.yaml says it shows every key, with comments; keys added later were missing from it
    (``insecure_password_auth``, ``max_body_record``, ``jwks_url`` …). A key counts when it is written as a
    key, in use or commented out."""
    text = (ROOT / "manifests" / "hoop.example.yaml").read_text()
    written = set(re.findall(r"(?:^|[\s{,#-])([a-z0-9_]+):", text, re.MULTILINE))
    assert sorted(_keys(HoopConfig, set()) - written) == []
