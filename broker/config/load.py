"""Reading the config: the YAML file, port overrides from the environment, errors that name the key.

:func:`load_settings` is the one place that reads ``os.environ`` (called by the CLI).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError

from broker.config.base import _Model
from broker.config.hoop import HoopConfig
from broker.errors import ConfigError
from broker.terminal import one_line

__all__ = ["Settings", "load_config", "load_settings", "parse_config"]


class Settings(_Model):
    """The environment, resolved once by the CLI."""

    database_url: str = "sqlite+aiosqlite:///hoop.db"
    slack_bot_token: str | None = None
    slack_signing_secret: str | None = None
    slack_app_token: str | None = None
    slack_api_url: str | None = None
    environ: dict[str, str] = Field(default_factory=dict, repr=False)


_PORT_ENV = {"HOOP_HTTP_PORT": "http", "HOOP_PG_PORT": "postgres", "HOOP_SSH_PORT": "ssh",
             "HOOP_HTTP_PROXY_PORT": "http_proxy"}


def _loc(data: Any, loc: tuple[int | str, ...]) -> str:
    out = ""
    node = data
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            try:
                node = node[part]
                if isinstance(node, dict) and isinstance(node.get("name"), str):
                    out += f"({node['name']})"
            except (IndexError, KeyError, TypeError):
                node = None
        else:
            if part in {"postgres", "ssh", "http"} and isinstance(node, dict) and node.get("kind") == part:
                continue  # the discriminator's own level says nothing to a reader
            out += f".{part}" if out else str(part)
            node = node.get(part) if isinstance(node, dict) else None
    return out or "(top level)"


def parse_config(data: Any, *, source: str = "hoop.yaml", environ: Mapping[str, str] | None = None) -> HoopConfig:
    """Validate a mapping into :class:`HoopConfig`, applying port overrides from ``environ``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys (admins, groups, resources, ...)")
    data = dict(data)
    env = environ or {}
    listen = data.get("listen") or {}
    if isinstance(listen, dict):  # anything else is left for the model to report: listen is not a mapping
        listen = dict(listen)
        for var, key in _PORT_ENV.items():
            if var in env:
                try:
                    listen[key] = int(env[var])
                except ValueError:
                    raise ConfigError(f"{source}: environment {var}={env[var]!r} is not a port number") from None
        if listen:
            data["listen"] = listen
    try:
        return HoopConfig.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            reason = err["msg"].removeprefix("Value error, ")
            lines.append(one_line(f"{source}: {_loc(data, tuple(err['loc']))}: {reason}"))  # (a problem a line)
        raise ConfigError("\n".join(lines)) from None


def load_config(path: str | Path, *, environ: Mapping[str, str] | None = None) -> HoopConfig:
    """Read and validate a config file. Every failure is a :class:`ConfigError`."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{source}: no such file (set --config or HOOP_CONFIG)") from None
    except OSError as exc:
        raise ConfigError(f"{source}: cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: not UTF-8 text (byte {exc.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{source}: {where}{problem}") from None
    return parse_config(data, source=source, environ=environ)


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    env = dict(os.environ if environ is None else environ)
    return Settings(
        database_url=env.get("HOOP_DATABASE_URL") or "sqlite+aiosqlite:///hoop.db",
        slack_bot_token=env.get("SLACK_BOT_TOKEN") or None,
        slack_signing_secret=env.get("SLACK_SIGNING_SECRET") or None,
        slack_app_token=env.get("SLACK_APP_TOKEN") or None,
        slack_api_url=env.get("SLACK_API_URL") or None,
        environ=env,
    )
