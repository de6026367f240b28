"""Config validation: every error names the file, the key path and the reason."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from broker.config import load_config, parse_config
from broker.duration import format_duration, parse_duration
from broker.errors import ConfigError, InvalidInput
from tests.conftest import base_config

#: a real ed25519 public key (its private half was thrown away)
_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIC7lmSI4NyIHf4bTaoNNhQnJpNyElvWNrV/DNPIjjMDg"


def test_a_well_formed_host_key_is_accepted() -> None:
    data = {**base_config(), "resources": [{"name": "web", "kind": "ssh", "address": "web.internal", "user": "u",
                                            "credential": {"env": "K"}, "host_key": f"{_KEY} web@example"}]}
    assert parse_config(data).resources[0].host_key == f"{_KEY} web@example"  # type: ignore[union-attr]


def _with_resource(**changes: Any) -> dict[str, Any]:
    data = base_config()
    data["resources"][0].update(changes)
    return data


@pytest.mark.parametrize(("data", "expected"), [
    (_with_resource(kind="oracle"), "resources[0](prod-db): Input tag 'oracle' found using 'kind'"),
    (_with_resource(approval=[{"from": "nobody", "count": 1}]), "approval step names unknown group 'nobody'"),
    (_with_resource(approval=[{"from": "dba", "count": 0}]), "resources[0](prod-db).approval[0].count"),
    (_with_resource(credential={"env": "X", "file": "/y"}), "exactly one of {env: NAME} or {file: PATH}"),
    (_with_resource(credential="hunter2"), "resources[0](prod-db).credential: a secret is given by reference, "
                                           "{env: NAME} or {file: PATH}, never written in the config"),
    ({**base_config(), "masking_key": 12345}, "masking_key: a secret is given by reference"),
    (_with_resource(request={"max_duration": "10x"}), "resources[0](prod-db).request.max_duration: duration '10x'"),
    (_with_resource(request={"default_duration": "5h", "max_duration": "1h"}), "default_duration is longer"),
    (_with_resource(guardrails={"rules": [{"name": "r", "action": "block"}]}), "rule 'r' has no selector"),
    (_with_resource(guardrails={"rules": [{"name": "r", "action": "nuke", "statements": ["drop"]}]}),
     "guardrails.rules[0](r).action"),
    (_with_resource(masking={"detectors": ["dna"]}), "masking.detectors[0]"),
    (_with_resource(surprise=1), "resources[0](prod-db).surprise: Extra inputs are not permitted"),
    (_with_resource(credentials="ephemeral"), "credentials: ephemeral needs admin_credential"),
    ({**base_config(), "admins": "root"}, "admins names group 'root'"),
    ({**base_config(), "resources": [base_config()["resources"][0]] * 2}, "resource name 'prod-db' is used twice"),
    ({**base_config(), "listen": {"http": 70000}}, "listen.http: Input should be less than or equal to 65535"),
    # once tracebacks (TypeError, OverflowError) or accepted, to fail when the first client connected
    ({**base_config(), "listen": 8080}, "listen: Input should be a valid dictionary"),
    (_with_resource(pending_ttl=10**30), "resources[0](prod-db).pending_ttl: duration 10000"),
    (_with_resource(pending_ttl=-60), "resources[0](prod-db).pending_ttl: duration -60 is not a positive number"),
    (_with_resource(reminder_before=0), "resources[0](prod-db).reminder_before: duration 0 is not a positive"),
    # once taken as 1 second (YAML reads `yes` and `on` as true too)
    (_with_resource(request={"max_duration": True}), "request.max_duration: duration True is not a duration"),
    (_with_resource(address="db.internal:543x"), "resources[0](prod-db).address: address 'db.internal:543x': port"),
    (_with_resource(address=":5432"), "resources[0](prod-db).address: address ':5432' has no host"),
    # once accepted, and every request through the HTTP proxy was a 502
    *[({**base_config(), "resources": [{"name": "api", "kind": "http", "address": address, "auth": "none"}]},
       f"resources[0](api).address: address {address!r}{why}")
      for address, why in (("api.internal:8443", " is not an http:// or https:// base URL"),
                           ("ftp://files.internal", " is not an http:// or https:// base URL"),
                           ("https://api.internal:99999", ": the port is not a number from 1 to 65535"))],
    # once accepted by `hoop check`, to fail only when the first user connected through the SSH proxy
    *[({**base_config(), "resources": [{"name": "web", "kind": "ssh", "address": "web.internal", "user": "u",
                                        "credential": {"env": "K"}, "host_key": key}]},
       f"resources[0](web).host_key: {why}")
      for key, why in (("garbage", "not an OpenSSH public key line"),
                       (f"web.internal {_KEY}", "it starts with 'web.internal', a host name as in known_hosts"),
                       ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEXAMPLE", "the ssh-ed25519 key's data is not the"),
                       ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEXAMPL", "the ssh-ed25519 key's data is not the"),
                       (_KEY.replace("ssh-ed25519", "ssh-rsa"), "the key's data is a 'ssh-ed25519' key, not ssh-rsa"))],
    # once ignored: hoop served a generated self-signed pair instead of the configured certificate
    ({**base_config(), "tls": {"cert": "/etc/hoop/tls.crt"}}, "tls: cert and key go together"),
    ({**base_config(), "tls": {"key": "/etc/hoop/tls.key"}}, "tls: cert and key go together"),
    # once accepted: a typo in acts_for named nobody, so the team's members could approve their own agent
    *[({**base_config(), "oidc": {"issuer": "https://idp.example", "audience": "hoop",
                                  "agents": [{"subject": "s1", "name": "ci-runner", **agent}]}},
       f"oidc.agents[0] (ci-runner): {why}")
      for agent, why in (({"acts_for": "dbas"}, "acts_for 'dbas' is neither an email nor a group defined"),
                         ({"groups": ["dbas"]}, "groups names unknown group 'dbas'"))],
    # its members known only to Slack at run time, hoop could not tell whom such an agent speaks for
    ({**base_config(), "groups": {**base_config()["groups"], "oncall": {"slack_usergroup": "S123"}},
      "oidc": {"issuer": "https://idp.example", "audience": "hoop",
               "agents": [{"subject": "s1", "name": "pager-bot", "acts_for": "oncall"}]}},
     "oidc.agents[0] (pager-bot): acts_for 'oncall', a group whose members come from a Slack user group"),
])
def test_config_errors_name_key_and_reason(data: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config(data, source="hoop.yaml")
    assert exc.value.message.startswith("hoop.yaml: ")
    assert expected in exc.value.message
    assert "hunter2" not in exc.value.message and "12345" not in exc.value.message


def test_yaml_syntax_error_has_line(tmp_path: Path) -> None:
    path = tmp_path / "hoop.yaml"
    path.write_text("admins: [a\ngroups: {}\n")
    with pytest.raises(ConfigError, match=r"hoop.yaml: line \d+, column \d+"):
        load_config(path)


def test_a_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "hoop.yaml"
    path.write_bytes(b"admins: \xff\xfe\n")
    with pytest.raises(ConfigError, match=r"hoop.yaml: not UTF-8 text \(byte 8\)"):
        load_config(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.yaml")


def test_top_level_must_be_mapping() -> None:
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        parse_config(["a"])


def test_env_overrides_ports() -> None:
    cfg = parse_config(base_config(), environ={"HOOP_HTTP_PORT": "9000", "HOOP_PG_PORT": "0", "HOOP_SSH_PORT": "2200",
                                               "HOOP_HTTP_PROXY_PORT": "19000"})
    assert (cfg.listen.http, cfg.listen.postgres, cfg.listen.ssh, cfg.listen.http_proxy) == (9000, 0, 2200, 19000)
    with pytest.raises(ConfigError, match="HOOP_PG_PORT='x' is not a port"):
        parse_config(base_config(), environ={"HOOP_PG_PORT": "x"})


def test_example_config_is_valid() -> None:
    cfg = load_config(Path(__file__).parents[2] / "manifests" / "hoop.example.yaml")
    assert {r.kind for r in cfg.resources} == {"postgres", "ssh", "http"}


def test_secret_ref_resolution_never_shows_value(tmp_path: Path) -> None:
    cfg = parse_config(base_config())
    ref = cfg.resources[0].credential
    assert ref is not None
    assert ref.resolve({"PGPW": "s3cret"}) == "s3cret"
    with pytest.raises(ConfigError) as exc:
        ref.resolve({})
    assert "env:PGPW is not set" in exc.value.message


def test_secret_file_that_is_empty_or_not_text_is_refused(tmp_path: Path) -> None:
    data = base_config()
    data["resources"][0]["credential"] = {"file": str(tmp_path / "pw")}
    ref = parse_config(data).resources[0].credential
    assert ref is not None
    (tmp_path / "pw").write_text("\n")
    with pytest.raises(ConfigError, match=r"file:.*pw is empty"):
        ref.resolve({})
    (tmp_path / "pw").write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match=r"file:.*pw is not UTF-8 text"):
        ref.resolve({})


@pytest.mark.parametrize(("text", "seconds"), [("30m", 1800), ("2h", 7200), ("1h30m", 5400), ("45s", 45),
                                               ("1d", 86400), (" 2H ", 7200)])
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)
    assert parse_duration(format_duration(parse_duration(text))) == parse_duration(text)


@pytest.mark.parametrize(("text", "message"), [("0m", "is zero"), ("-5m", "negative"), ("5y", "unknown unit"),
                                               ("abc", "not understood"), ("", "not understood"),
                                               ("10", "not understood")])
def test_bad_durations(text: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        parse_duration(text)
