"""`hoop check` loads every file and secret the config names, as `hoop serve` would at start, and says
what is wrong with each in one line, never showing a secret; it starts, connects to and writes nothing.

Every file here is made at test time: certificates with `cryptography`, SSH keys with asyncssh."""

from __future__ import annotations

import datetime as dt
import io
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncssh
import pytest
import yaml
from rich.console import Console

from broker.checks import render_check
from broker.config import load_settings, parse_config
from proxy.preflight import proxy_findings
from tests.conftest import base_config
from tests.support.certs import make_pki, self_signed

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
PG_SECRET = "pg-Secret-Value-7f3a9c"  # a value that must never reach the output


def _check(data: dict[str, Any], environ: dict[str, str] | None = None, *,
           now: dt.datetime | None = None) -> tuple[int, list[str]]:
    """``hoop check``'s findings for ``data``: (errors, the finding lines)."""
    settings = load_settings({"PGPW": PG_SECRET, "HOOP_DATABASE_URL": "sqlite+aiosqlite:///unused.db",
                              **(environ or {})})
    buf = io.StringIO()
    console = Console(file=buf, width=400, highlight=False, emoji=False, soft_wrap=True, color_system=None)
    errors = render_check(parse_config(data), settings, console, probes=(proxy_findings,), now=now)
    text = buf.getvalue()
    assert PG_SECRET not in text
    return errors, [line for line in text.splitlines() if line.split(" ", 1)[0] in {"ERROR", "WARNING", "INFO"}]


def _config(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    return base_config(state_dir=str(tmp_path / "state"), **overrides)


def test_a_key_of_another_certificate_is_an_error_naming_both_files_and_no_key(tmp_path: Path) -> None:
    cert, _ = self_signed(tmp_path, "mine", valid_from=NOW - dt.timedelta(days=1),
                          valid_until=NOW + dt.timedelta(days=90))
    _, other_key = self_signed(tmp_path, "other", valid_from=NOW, valid_until=NOW + dt.timedelta(days=90))
    errors, lines = _check(_config(tmp_path, tls={"cert": str(cert), "key": str(other_key)}))
    assert errors == 1
    assert (f"ERROR   tls: cannot load the key {other_key} of the certificate {cert}: it is not this "
            "certificate's key") in lines
    assert not any("PRIVATE KEY" in line or other_key.read_text()[40:80] in line for line in lines)


@pytest.mark.parametrize(("valid_from", "valid_until", "level", "says"), [
    (NOW - dt.timedelta(days=30), NOW - dt.timedelta(days=1), "ERROR  ",
     f"expired on {(NOW - dt.timedelta(days=1)):%Y-%m-%d %H:%M} UTC"),
    (NOW + dt.timedelta(days=2), NOW + dt.timedelta(days=90), "ERROR  ",
     f"is not valid before {(NOW + dt.timedelta(days=2)):%Y-%m-%d %H:%M} UTC"),
    (NOW - dt.timedelta(days=30), NOW + dt.timedelta(days=5, hours=1), "WARNING",
     f"expires on {(NOW + dt.timedelta(days=5, hours=1)):%Y-%m-%d %H:%M} UTC (in 5 days)"),
], ids=["expired", "not-yet-valid", "expiring"])
def test_the_served_certificate_s_dates(tmp_path: Path, valid_from: dt.datetime, valid_until: dt.datetime,
                                        level: str, says: str) -> None:
    cert, key = self_signed(tmp_path, "pg", valid_from=valid_from, valid_until=valid_until)
    errors, lines = _check(_config(tmp_path, tls={"cert": str(cert), "key": str(key)}), now=NOW)
    assert f"{level} tls: the certificate {cert} {says}" in lines, lines
    assert errors == (1 if level == "ERROR  " else 0)


def test_a_certificate_good_for_longer_than_two_weeks_passes(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path, "pg", valid_from=NOW, valid_until=NOW + dt.timedelta(days=15))
    errors, lines = _check(_config(tmp_path, tls={"cert": str(cert), "key": str(key)}), now=NOW)
    assert errors == 0 and not any("tls:" in line for line in lines), lines


def test_files_that_are_not_pem_missing_or_unreadable(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path, "pg", valid_from=NOW, valid_until=NOW + dt.timedelta(days=90))
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    folder = tmp_path / "a-folder"
    folder.mkdir()
    cases = [(junk, key, f"ERROR   tls: cannot load the certificate {junk}: not a PEM certificate"),
             (cert, junk, f"ERROR   tls: cannot load the key {junk} of the certificate {cert}: no PEM private key "
                          "in it"),
             (tmp_path / "nope.crt", key, f"ERROR   tls: cannot load the certificate {tmp_path / 'nope.crt'}: No "
                                          "such file or directory"),
             (folder, key, f"ERROR   tls: cannot load the certificate {folder}: Is a directory")]
    for cert_path, key_path, line in cases:
        errors, lines = _check(_config(tmp_path, tls={"cert": str(cert_path), "key": str(key_path)}))
        assert errors == 1 and line in lines, (line, lines)


def test_a_missing_or_empty_secret_is_named_never_shown(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    data = _config(tmp_path, masking_key={"env": "MASKING_KEY"})
    data["resources"].append({"name": "other-db", "kind": "postgres", "address": "h:1",
                              "credential": {"file": str(empty)}, "channel": "C2", "approval": [{"from": "dba"}]})
    data["resources"].append({"name": "eph-db", "kind": "postgres", "address": "h:1", "credential": {"env": "PGPW"},
                              "credentials": "ephemeral", "admin_credential": {"env": "PG_ADMIN"}, "roles": ["app"],
                              "channel": "C3", "approval": [{"from": "dba"}]})
    errors, lines = _check(data)
    assert errors == 3
    assert "ERROR   masking_key: credential reference env:MASKING_KEY is not set" in lines
    assert f"ERROR   other-db: credential: credential reference file:{empty} is empty" in lines
    assert "ERROR   eph-db: admin_credential: credential reference env:PG_ADMIN is not set" in lines
    # set, they pass, and their values are not shown
    empty.write_text("file-Secret-55aa")
    errors, lines = _check(data, {"MASKING_KEY": "mask-Secret-81d0", "PG_ADMIN": "admin-Secret-3b7e"})
    assert errors == 0, lines
    assert not any("Secret" in line for line in lines)


def test_what_serve_would_make_is_said_and_nothing_is_written(tmp_path: Path) -> None:
    data = _config(tmp_path)
    data["resources"].append(_ssh(tmp_path))
    errors, lines = _check(data)
    state = tmp_path / "state"
    assert errors == 0, lines
    assert f"INFO    state_dir {state}: hoop serve makes roles.key and masking.key there (replicas must share " \
           "them: hoop state init)" in lines
    assert (f"INFO    tls: no cert and key configured: hoop serve generates a self-signed pair (pg-tls.crt, "
            f"pg-tls.key) in {state} and logs its fingerprint") in lines
    assert f"INFO    state_dir {state}: hoop serve makes the SSH proxy's host key (ssh_host_ed25519_key) there " \
           "(replicas must share it: hoop state init)" in lines
    assert not state.exists()


def test_keys_in_state_dir_that_are_not_keys(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "roles.key").write_text("not hex\n")
    (state / "masking.key").write_text("")
    (state / "ssh_host_ed25519_key").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\ngarbage\n")
    (state / "pg-tls.crt").write_text("junk")
    (state / "pg-tls.key").write_text("junk")
    data = _config(tmp_path)
    data["resources"].append(_ssh(tmp_path))
    errors, lines = _check(data)
    assert errors == 4, lines
    assert f"ERROR   state_dir {state}: roles.key is not a key hoop wrote (hex digits)" in lines
    assert f"ERROR   state_dir {state}: masking.key is not a key hoop wrote (hex digits)" in lines
    assert (f"ERROR   state_dir {state}: ssh_host_ed25519_key is not an SSH private key hoop can read (OpenSSH or "
            "PEM, without a passphrase)") in lines
    assert f"ERROR   tls: cannot load the certificate {state / 'pg-tls.crt'}: not a PEM certificate" in lines


def test_a_state_dir_hoop_cannot_make(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    state = tmp_path / "file" / "state"
    errors, lines = _check(base_config(state_dir=str(state)))
    assert errors == 1
    assert f"ERROR   state_dir {state}: hoop serve cannot keep its keys and recording spool there (Not a " \
           "directory)" in lines
    assert not any(line.startswith("INFO    tls:") for line in lines), lines  # (nothing can be made there)


def _ssh_key(path: Path) -> asyncssh.SSHKey:
    key = asyncssh.generate_private_key("ssh-ed25519")
    path.write_bytes(key.export_private_key())
    path.chmod(0o600)
    return key


def _ssh(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    host = _ssh_key(tmp_path / "upstream-host-key")
    _ssh_key(tmp_path / "hoop-client-key")
    res: dict[str, Any] = {"name": "web", "kind": "ssh", "address": "10.0.0.5", "user": "ops", "channel": "C9",
                           "credential": {"file": str(tmp_path / "hoop-client-key")},
                           "host_key": host.export_public_key().decode().strip(), "approval": [{"from": "security"}]}
    res.update(extra)
    return res


def test_ssh_pinned_keys_and_the_private_key(tmp_path: Path) -> None:
    host = _ssh_key(tmp_path / "elsewhere")
    known = tmp_path / "known_hosts"
    known.write_text(f"10.9.9.9 {host.export_public_key().decode().strip()}\n")
    not_a_key = tmp_path / "not-a-key"
    not_a_key.write_text("ssh-Secret-c0ffee\n")
    data = _config(tmp_path)
    data["resources"].append(_ssh(tmp_path, host_key=None, known_hosts=str(known),
                                  credential={"file": str(not_a_key)}))
    data["resources"].append(_ssh(tmp_path, name="db-box", host_key=None, known_hosts=str(tmp_path / "missing")))
    errors, lines = _check(data)
    assert errors == 3, lines
    assert f"ERROR   web: resource web: {known} has no key for 10.0.0.5:22; add the host's key there, or set " \
           "host_key" in lines
    assert f"ERROR   web: resource web: credential file:{not_a_key} is not a readable private key" in lines
    assert (f"ERROR   db-box: resource db-box: pinned host key cannot be read: known_hosts {tmp_path / 'missing'}: "
            "No such file or directory") in lines
    assert not any("Secret" in line for line in lines)


def _http(tls: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"name": "k8s", "kind": "http", "address": "https://10.0.0.6:6443", "credential": {"env": "PGPW"},
            "channel": "C7", "approval": [{"from": "security"}], "tls": tls, **extra}


def test_an_https_upstream_s_ca_and_client_pair(tmp_path: Path) -> None:
    pki, other = make_pki(tmp_path / "pki"), make_pki(tmp_path / "other", ca_name="another CA")
    junk = tmp_path / "junk.pem"
    junk.write_text("junk\n")
    old_ca, _ = self_signed(tmp_path, "old CA", valid_from=NOW - dt.timedelta(days=90),
                            valid_until=NOW - dt.timedelta(days=1))
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(pki.ca_cert.read_bytes() + old_ca.read_bytes())
    expired, expired_key = self_signed(tmp_path, "client", valid_from=NOW - dt.timedelta(days=90),
                                       valid_until=NOW - dt.timedelta(hours=1))
    cases = [({"ca": str(junk)}, f"ERROR   k8s: resources.k8s.tls.ca: cannot load {junk}: no PEM certificate in it"),
             ({"ca": str(pki.ca_cert), "client_cert": str(pki.client_cert), "client_key": str(other.client_key)},
              f"ERROR   k8s: resources.k8s.tls: cannot load client_cert {pki.client_cert} with client_key "
              f"{other.client_key}: the key is not the certificate's"),
             ({"client_cert": str(expired), "client_key": str(expired_key)},
              f"ERROR   k8s: tls.client_cert: the certificate {expired} expired on "
              f"{(NOW - dt.timedelta(hours=1)):%Y-%m-%d %H:%M} UTC"),
             ({"ca": str(bundle)},
              f"WARNING k8s: tls.ca: the CA certificate 'old CA' in {bundle} expired on "
              f"{(NOW - dt.timedelta(days=1)):%Y-%m-%d %H:%M} UTC")]
    for tls, line in cases:
        data = _config(tmp_path, tls={"http_proxy": True})
        data["resources"].append(_http(tls))
        errors, lines = _check(data, now=NOW)
        assert line in lines, (line, lines)
        assert errors == (1 if line.startswith("ERROR") else 0), lines
        assert not any("PRIVATE KEY" in x or other.client_key.read_text()[40:80] in x for x in lines)


def test_a_postgres_upstream_s_sslrootcert(tmp_path: Path) -> None:
    missing = tmp_path / "root.crt"
    data = _config(tmp_path)
    data["resources"][0].update(sslmode="verify-full", sslrootcert=str(missing))
    errors, lines = _check(data)
    assert errors == 1
    assert f"ERROR   prod-db: resources.prod-db.sslrootcert: cannot load {missing}: No such file or directory" in lines
    data["resources"][0]["sslmode"] = "require"
    errors, lines = _check(data)
    assert errors == 0
    assert ("WARNING prod-db: sslrootcert is set but sslmode is require: the server's certificate is not checked "
            "(sslmode: verify-full checks it)") in lines


def test_slack_oidc_and_the_store(tmp_path: Path) -> None:
    data = _config(tmp_path, oidc={"issuer": "idp.example.com", "audience": "hoop"})
    errors, lines = _check(data, {"SLACK_BOT_TOKEN": "xoxp-Secret-user-token", "HOOP_DATABASE_URL": "sqlite:///x.db"})
    assert errors == 2, lines
    assert ("WARNING Slack disabled: SLACK_BOT_TOKEN is set but neither SLACK_SIGNING_SECRET (HTTP mode) nor "
            "SLACK_APP_TOKEN (Socket Mode) is") in lines
    assert "WARNING SLACK_BOT_TOKEN is not a bot token (those start with xoxb-)" in lines
    assert ("ERROR   oidc.issuer: 'idp.example.com' is not an http(s) URL; hoop fetches the identity provider's "
            "signing keys from it") in lines
    assert any(line.startswith("ERROR   HOOP_DATABASE_URL sqlite:///x.db is not a usable store URL") for line in lines)
    assert not any("Secret" in line for line in lines)
    errors, lines = _check(data, {"SLACK_SIGNING_SECRET": "sig-Secret-1"})
    assert "WARNING Slack disabled: SLACK_SIGNING_SECRET is set but SLACK_BOT_TOKEN is not" in lines


def _cli(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "broker.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=60, check=False)


def test_a_config_whose_every_file_loads_passes_check_with_exit_0(tmp_path: Path) -> None:
    """Every kind of reference at once, all good, after `hoop state init`: no error, no warning, exit 0."""
    pki = make_pki(tmp_path / "pki")
    cert, key = self_signed(tmp_path, "proxy", valid_from=NOW, valid_until=NOW + dt.timedelta(days=365))
    client, client_key = self_signed(tmp_path, "hoop-client", valid_from=NOW, valid_until=NOW + dt.timedelta(days=365))
    data = _config(tmp_path, tls={"cert": str(cert), "key": str(key), "http_proxy": True},
                   oidc={"issuer": "https://idp.example.com", "audience": "hoop"})
    data["resources"][0].update(sslmode="verify-full", sslrootcert=str(pki.ca_cert))
    data["resources"].append(_ssh(tmp_path, password={"env": "SSH_PASSWORD"}))
    data["resources"].append(_http({"ca": str(pki.ca_cert), "client_cert": str(client), "client_key": str(client_key)},
                                   credential={"env": "K8S_TOKEN"}))
    (tmp_path / "hoop.yaml").write_text(yaml.safe_dump(data))
    secrets = {"PGPW": PG_SECRET, "SSH_PASSWORD": "ssh-Secret-2d4e", "K8S_TOKEN": "k8s-Secret-9a1b",
               "SLACK_BOT_TOKEN": "xoxb-Secret-bot", "SLACK_SIGNING_SECRET": "sig-Secret-77"}
    env = {**os.environ, **secrets, "HOOP_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'hoop.db'}",
           "PYTHONPATH": str(Path(__file__).parents[2]), "COLUMNS": "300"}
    env.pop("SLACK_APP_TOKEN", None)
    assert _cli(["state", "init"], tmp_path, env).returncode == 0
    out = _cli(["check"], tmp_path, env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "no problems found" in out.stdout and "0 error(s), 0 warning(s)" in out.stdout
    assert not any(value in out.stdout + out.stderr for value in secrets.values())
    # one file gone bad: exit 1, the reason on its line
    key.write_text("junk\n")
    bad = _cli(["check"], tmp_path, env)
    assert bad.returncode == 1
    assert f"ERROR   tls: cannot load the key {key} of the certificate {cert}: no PEM private key in it" \
           in bad.stdout.splitlines(), bad.stdout


def test_serve_still_serves_an_expired_certificate_and_logs_what_check_reports(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from broker.config import Tls
    from proxy.pg.tls import server_tls

    cert, key = self_signed(tmp_path, "pg", valid_from=NOW - dt.timedelta(days=30),
                            valid_until=NOW - dt.timedelta(days=1))
    with caplog.at_level(logging.WARNING, logger="proxy.pg.tls"):
        served = server_tls(Tls(cert=cert, key=key), tmp_path / "state")
    assert served.fingerprint.startswith("SHA256:")
    assert f"tls: the certificate {cert} expired on {(NOW - dt.timedelta(days=1)):%Y-%m-%d %H:%M} UTC" \
           in caplog.messages


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_listening_on_every_address_without_advertise_is_a_warning(tmp_path: Path, host: str) -> None:
    """Connection hints name listen.advertise, else listen.host: behind `host: 0.0.0.0` they told users to
    connect to 0.0.0.0."""
    _, lines = _check(_config(tmp_path, listen={"host": host}))
    assert [line for line in lines if line.startswith("WARNING listen")] == [
        f"WARNING listen: host is {host} and advertise is not set: connection hints would tell users to connect "
        f"to {host}; set listen.advertise to the name users reach hoop by"]
    _, lines = _check(_config(tmp_path, listen={"host": host, "advertise": "hoop.example.com"}))
    assert [line for line in lines if line.startswith("WARNING listen")] == []
