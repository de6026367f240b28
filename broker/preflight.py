"""``hoop check``'s pre-flight: what ``hoop serve`` would load at start from what the config and the
environment name, checked without starting, connecting or writing anything.

How this works. Each check calls the loader ``hoop serve`` calls (:mod:`broker.keyfiles`,
:meth:`SecretRef.resolve`, :func:`~broker.runtime.open_store`) and turns the :class:`ConfigError` it
raises into a :class:`Finding` with the very message serve would stop with. Where serve would make
something (a key in ``state_dir``), the check reads it if it is there and says it would be made if not.
The proxies' files (TLS pairs, CA bundles, SSH keys) are checked by probes the CLI passes in
(:mod:`proxy.preflight`), since ``broker`` does not import ``proxy``. A finding never holds a secret's
value: references are named (``env:PG_ADMIN``), values are not.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from broker.config import HoopConfig, SecretRef, Settings
from broker.errors import ConfigError
from broker.keyfiles import read_hex_key, unwritable


@dataclass(frozen=True)
class Finding:
    level: str  # "error" (hoop serve would stop, or fail every use), "warning", or "info"
    resource: str  # the resource's name, or "-" for the config as a whole
    message: str


#: a check of the files a part of hoop loads at start: (config, environment, now) -> findings
Probe = Callable[[HoopConfig, Mapping[str, str], dt.datetime], list[Finding]]


def secret_findings(config: HoopConfig, environ: Mapping[str, str]) -> list[Finding]:
    """Every secret reference resolves to a non-empty value (which is then dropped, never shown)."""
    refs: list[tuple[str, str, SecretRef | None]] = [("-", "masking_key", config.masking_key)]
    for res in config.resources:
        refs.append((res.name, "credential", res.credential))
        if res.kind == "postgres":
            refs.append((res.name, "admin_credential", res.admin_credential))
        if res.kind == "ssh":
            refs.append((res.name, "password", res.password))
    out: list[Finding] = []
    for where, key, ref in refs:
        if ref is None:
            continue
        try:
            ref.resolve(environ)
        except ConfigError as exc:
            out.append(Finding("error", where, f"{key}: {exc.message}"))
    return out


def state_findings(config: HoopConfig) -> list[Finding]:
    """``state_dir`` can be written (keys, the recording spool), and the keys already there load."""
    state = config.state_dir
    why = unwritable(state) or unwritable(state / "spool")
    if why is not None:
        return [Finding("error", "-", f"state_dir {state}: hoop serve cannot keep its keys and recording spool "
                                      f"there ({why})")]
    out: list[Finding] = []
    names = ["roles.key"] + (["masking.key"] if config.masking_key is None else [])
    missing = []
    for name in names:
        try:
            if read_hex_key(state, name) is None:
                missing.append(name)
        except ConfigError as exc:
            out.append(Finding("error", "-", exc.message))
    if missing:
        out.append(Finding("info", "-", f"state_dir {state}: hoop serve makes {' and '.join(missing)} there "
                                        "(replicas must share them: hoop state init)"))
    return out


def slack_findings(settings: Settings) -> list[Finding]:
    """What ``hoop serve`` makes of the Slack variables; only their names are ever shown."""
    bot, secret, app = settings.slack_bot_token, settings.slack_signing_secret, settings.slack_app_token
    out: list[Finding] = []
    if not bot:
        named = [name for name, value in (("SLACK_SIGNING_SECRET", secret), ("SLACK_APP_TOKEN", app)) if value]
        if named:
            out.append(Finding("warning", "-", f"Slack disabled: {' and '.join(named)} "
                                               f"{'is' if len(named) == 1 else 'are'} set but SLACK_BOT_TOKEN is not"))
        else:
            out.append(Finding("info", "-", "Slack disabled: SLACK_BOT_TOKEN is not set (nobody can request or "
                                            "approve in Slack)"))
        return out
    if not (secret or app):
        out.append(Finding("warning", "-", "Slack disabled: SLACK_BOT_TOKEN is set but neither SLACK_SIGNING_SECRET "
                                           "(HTTP mode) nor SLACK_APP_TOKEN (Socket Mode) is"))
    if not bot.startswith("xoxb-"):
        out.append(Finding("warning", "-", "SLACK_BOT_TOKEN is not a bot token (those start with xoxb-)"))
    if app and not app.startswith("xapp-"):
        out.append(Finding("warning", "-", "SLACK_APP_TOKEN is not an app-level token (those start with xapp-)"))
    return out


def oidc_findings(config: HoopConfig) -> list[Finding]:
    """Where the REST API would fetch the identity provider's keys from (not fetched here)."""
    if config.oidc is None:
        return [Finding("info", "-", "REST API disabled (no oidc: section in the config)")]
    key, url = ("oidc.jwks_url", config.oidc.jwks_url) if config.oidc.jwks_url else ("oidc.issuer",
                                                                                       config.oidc.issuer)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return [Finding("error", "-", f"{key}: {url!r} is not an http(s) URL; hoop fetches the identity "
                                      "provider's signing keys from it")]
    if parts.scheme == "http":
        return [Finding("warning", "-", f"{key}: {url!r} is plain http: the signing keys that decide who may "
                                        "use the API could be swapped on the way")]
    return []


def store_findings(settings: Settings) -> list[Finding]:
    """``HOOP_DATABASE_URL`` makes a store as ``hoop serve`` makes it (nothing is connected)."""
    from broker.runtime import open_store

    try:
        store = open_store(settings)
    except ConfigError as exc:
        return [Finding("error", "-", exc.message)]
    store.engine.sync_engine.dispose()  # (never connected: nothing to wait for)
    return []


def preflight(config: HoopConfig, settings: Settings, now: dt.datetime, probes: tuple[Probe, ...] = ()) \
        -> list[Finding]:
    """Everything above, then each probe's findings."""
    out = [*store_findings(settings), *state_findings(config), *secret_findings(config, settings.environ),
           *slack_findings(settings), *oidc_findings(config)]
    for probe in probes:
        out.extend(probe(config, settings.environ, now))
    return out
