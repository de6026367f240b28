"""hoop.yaml and the environment, validated once into pydantic models.

Nothing below the CLI reads ``os.environ``: :func:`load_settings` resolves the environment
once and everything else receives :class:`Settings`. A bad file raises :class:`ConfigError`
whose message names the file, the key path (``resources[0](prod-db).approval[1].count``)
and the reason.
"""

from __future__ import annotations

import base64
import binascii
import math
import os
import struct
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from broker.duration import parse_duration
from broker.errors import ConfigError, InvalidInput
from broker.terminal import one_line

_MAX_SECONDS = 366 * 86400


def _duration(value: object) -> object:
    if isinstance(value, bool):  # (pydantic would take true as 1 second: YAML reads yes, on and true so)
        raise ValueError(f"duration {value!r} is not a duration; use e.g. 30m, 2h, 1h30m, or a number of seconds")
    if isinstance(value, str):
        try:
            return parse_duration(value)
        except InvalidInput as exc:
            raise ValueError(exc.message) from None
    if isinstance(value, int | float):
        # a bare number is seconds, held to the bounds of the text form (and timedelta's range)
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"duration {value!r} is not a positive number of seconds; use e.g. 30m, 2h, 1h30m")
        if value > _MAX_SECONDS:
            raise ValueError(f"duration {value!r} is longer than a year")
        return timedelta(seconds=value)
    return value


Duration = Annotated[timedelta, BeforeValidator(_duration)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class SecretRef(_Model):
    """A reference to a secret held outside hoop: ``{env: NAME}`` or ``{file: PATH}``.

    The value is never written in the config, never stored and never logged.
    """

    env: str | None = None
    file: Path | None = None

    @model_validator(mode="before")
    @classmethod
    def _a_reference(cls, value: object) -> object:
        # pydantic said "Input should be a valid dictionary or instance of SecretRef"; the value itself is
        # never repeated, since what was written inline may well be the secret
        if isinstance(value, str | int | float | bool | list):
            raise ValueError("a secret is given by reference, {env: NAME} or {file: PATH}, never written in the "
                             "config")
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> SecretRef:
        if (self.env is None) == (self.file is None):
            raise ValueError("a credential reference is exactly one of {env: NAME} or {file: PATH}")
        return self

    def describe(self) -> str:
        return f"env:{self.env}" if self.env is not None else f"file:{self.file}"

    def resolve(self, environ: Mapping[str, str]) -> str:
        """Return the secret. Raises :class:`ConfigError` (naming the reference, not the value)."""
        if self.env is not None:
            value = environ.get(self.env)
            if not value:
                raise ConfigError(f"credential reference env:{self.env} is not set")
            return value
        assert self.file is not None
        try:
            value = self.file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"credential reference file:{self.file} cannot be read: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"credential reference file:{self.file} is not UTF-8 text") from None
        if not value:  # as for an unset variable: an empty secret is a mistake, never a credential
            raise ConfigError(f"credential reference file:{self.file} is empty")
        return value


class Group(_Model):
    members: list[str] = Field(default_factory=list, description="member emails")
    slack_usergroup: str | None = Field(default=None, description="Slack user group id, e.g. S0123ABC")

    @field_validator("members")
    @classmethod
    def _lower(cls, value: list[str]) -> list[str]:
        for email in value:
            if "@" not in email:
                raise ValueError(f"{email!r} is not an email address")
        return [m.strip().lower() for m in value]


class RequestRules(_Model):
    groups: list[str] = Field(default_factory=list, description="groups whose members may request")
    reason_required: bool = True
    default_duration: Duration = timedelta(minutes=30)
    max_duration: Duration = timedelta(hours=4)

    @model_validator(mode="after")
    def _bounds(self) -> RequestRules:
        if self.default_duration > self.max_duration:
            raise ValueError("default_duration is longer than max_duration")
        return self


class ApprovalStep(_Model):
    from_: str = Field(alias="from", description="group that fills this step")
    count: int = Field(default=1, ge=1, le=20)


class ExtensionRules(_Model):
    requires_approval: bool = True


# Statement kinds the SQL guard classifies. ``write`` is any data change, ``ddl`` any schema change.
SqlKind = Literal[
    "select", "insert", "update", "delete", "merge", "write",
    "drop", "truncate", "alter", "create", "ddl",
    "grant", "revoke", "copy", "copy_to_program", "copy_from_program", "copy_to_file",
    "copy_from_file", "update_without_where", "delete_without_where",
    "do", "call", "set", "lock", "vacuum", "listen", "other",
]
Action = Literal["block", "review", "allow"]


class Rule(_Model):
    """A guard rule. Non-empty selectors are ANDed; the entries of one selector are ORed.

    SQL resources use ``statements``, ``tables`` and ``functions``; SSH resources use
    ``commands``; HTTP resources use ``methods`` and ``paths``. Rules are tried in order and
    the first that matches decides; no match means ``guardrails.default``.
    """

    name: str
    action: Action
    statements: list[SqlKind] = Field(default_factory=list)
    tables: list[str] = Field(default_factory=list, description="table names, optionally schema-qualified; globs")
    functions: list[str] = Field(default_factory=list, description="function names; globs")
    commands: list[str] = Field(default_factory=list, description="shell command patterns, e.g. 'rm -rf /'")
    methods: list[str] = Field(default_factory=list, description="HTTP methods")
    paths: list[str] = Field(default_factory=list, description="HTTP path globs, e.g. /api/v1/namespaces/*")

    @model_validator(mode="after")
    def _has_selector(self) -> Rule:
        if not (self.statements or self.tables or self.functions or self.commands or self.methods or self.paths):
            raise ValueError(f"rule {self.name!r} has no selector (statements, tables, functions, commands, ...)")
        return self

    @field_validator("methods")
    @classmethod
    def _upper(cls, value: list[str]) -> list[str]:
        return [m.upper() for m in value]


class Guardrails(_Model):
    rules: list[Rule] = Field(default_factory=list)
    default: Action = "allow"
    on_unparsed: Action = "block"
    review_timeout: Duration = timedelta(minutes=5)
    read_only: bool = False


Detector = Literal["email", "card", "ssn", "iban", "phone", "secret"]
Strategy = Literal["redact", "partial", "hash"]
ALL_DETECTORS: tuple[Detector, ...] = ("email", "card", "ssn", "iban", "phone", "secret")


class MaskRule(_Model):
    """Mask a column (SQL: ``email``, ``users.email``, globs) or a JSON key (HTTP)."""

    match: str
    strategy: Strategy = "redact"


class Masking(_Model):
    enabled: bool = True
    detectors: list[Detector] = Field(default_factory=lambda: list(ALL_DETECTORS))
    strategy: Strategy = "redact"
    columns: list[MaskRule] = Field(default_factory=list)
    json_keys: list[MaskRule] = Field(default_factory=list)
    #: how many masked rows of each result the recording keeps
    sample_rows: int = Field(default=20, ge=0, le=10_000)


class _ResourceBase(_Model):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}$")
    address: str
    credential: SecretRef | None = None
    channel: str | None = None
    request: RequestRules = Field(default_factory=RequestRules)
    approval: list[ApprovalStep] = Field(default_factory=list)
    extension: ExtensionRules = Field(default_factory=ExtensionRules)
    pending_ttl: Duration = timedelta(hours=1)
    reminder_before: Duration = timedelta(minutes=5)
    guardrails: Guardrails = Field(default_factory=Guardrails)
    masking: Masking = Field(default_factory=Masking)

    def host_port(self, default_port: int) -> tuple[str, int]:
        host, sep, port = self.address.rpartition(":")
        if not sep:
            return self.address, default_port
        return host.strip("[]"), int(port)


def _host_port(address: str) -> str:
    """``host`` or ``host:port`` as :meth:`_ResourceBase.host_port` reads it: a port that is not a number
    fails at start, naming the key, not when the first client connects."""
    host, sep, port = address.rpartition(":")
    if sep and not (port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError(f"address {address!r}: port {port!r} is not a number from 1 to 65535")
    if not (host if sep else address).strip("[] "):
        raise ValueError(f"address {address!r} has no host")
    return address


#: the OpenSSH public key types an upstream host may present (certificates are not pinned by key)
_HOST_KEY_TYPES = frozenset({
    "ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521", "ssh-ed448",
    "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com",
})


def _ssh_fields(blob: bytes) -> list[bytes]:
    """An SSH wire-format key blob as its length-prefixed fields (RFC 4253 §6.6); ValueError if it is not."""
    fields: list[bytes] = []
    pos = 0
    while pos < len(blob) and len(fields) < 8:
        (length,) = struct.unpack_from(">I", blob, pos)
        if pos + 4 + length > len(blob):
            raise ValueError("a field runs past the end")
        fields.append(blob[pos + 4:pos + 4 + length])
        pos += 4 + length
    if pos != len(blob) or len(fields) < 2:
        raise ValueError("not a key blob")
    return fields


def _openssh_public_key(value: str) -> str:
    """``host_key`` as an OpenSSH public key line (``ssh-ed25519 AAAA… [comment]``): a garbled or
    mis-pasted key passed ``hoop check`` and failed only when the first user connected."""
    fields = value.split()
    if fields and fields[0] not in _HOST_KEY_TYPES and len(fields) >= 3 and fields[1] in _HOST_KEY_TYPES:
        raise ValueError(f"it starts with {one_line(fields[0])[:64]!r}, a host name as in known_hosts: "
                         "give the key alone ('ssh-ed25519 AAAA...'), or use known_hosts")
    if len(fields) < 2 or fields[0] not in _HOST_KEY_TYPES:
        raise ValueError("not an OpenSSH public key line ('ssh-ed25519 AAAA...'); key types: "
                         + ", ".join(sorted(_HOST_KEY_TYPES)))
    try:
        blob = _ssh_fields(base64.b64decode(fields[1], validate=True))
        inner = blob[0].decode("ascii")
    except (binascii.Error, struct.error, ValueError):  # UnicodeDecodeError is a ValueError
        raise ValueError(f"the {fields[0]} key's data is not the base64 of an SSH public key") from None
    if inner != fields[0]:
        raise ValueError(f"the key's data is a {one_line(inner)[:64]!r} key, not {fields[0]}")
    return value


def _base_url(address: str) -> str:
    """An http resource's ``http(s)://host[:port][/prefix]``, as the HTTP proxy reads it: anything else was
    accepted and made every request a 502, so it fails at start instead, naming the key."""
    parts = urlsplit(address)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"address {address!r} is not an http:// or https:// base URL (e.g. "
                         "https://api.internal:8443/v1)")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise ValueError(f"address {address!r}: the port is not a number from 1 to 65535")
    return address


class PostgresResource(_ResourceBase):
    kind: Literal["postgres"]
    address: Annotated[str, AfterValidator(_host_port)]
    database: str = "postgres"
    user: str = "postgres"
    sslmode: Literal["disable", "prefer", "require", "verify-full"] = "prefer"
    sslrootcert: Path | None = None
    #: answer a server's request for a cleartext or md5 password without verify-full TLS (exposes the
    #: held password to anything between hoop and the database; SCRAM is always used when offered)
    insecure_password_auth: bool = False
    credentials: Literal["static", "ephemeral"] = "static"
    admin_user: str | None = None
    admin_credential: SecretRef | None = None
    roles: list[str] = Field(default_factory=list, description="roles an ephemeral login is granted")
    #: with masking on, the largest result row (DataRow or COPY row, in bytes) hoop holds whole to mask;
    #: a larger one ends the session with SQLSTATE 54000 (without masking, rows are streamed, no limit)
    max_row_bytes: int = Field(default=64 << 20, ge=1 << 20, le=1 << 30)

    @model_validator(mode="after")
    def _ephemeral(self) -> PostgresResource:
        if self.credentials == "ephemeral" and (self.admin_credential is None or not self.roles):
            raise ValueError("credentials: ephemeral needs admin_credential and at least one role in roles")
        return self


class SshAllow(_Model):
    sftp: bool = False
    port_forwarding: bool = False
    agent_forwarding: bool = False
    x11: bool = False


class SshResource(_ResourceBase):
    kind: Literal["ssh"]
    address: Annotated[str, AfterValidator(_host_port)]
    user: str
    password: SecretRef | None = None
    host_key: Annotated[str, AfterValidator(_openssh_public_key)] | None = Field(
        default=None, description="pinned upstream host key, 'ssh-ed25519 AAAA...'")
    known_hosts: Path | None = None
    allow: SshAllow = Field(default_factory=SshAllow)

    @model_validator(mode="after")
    def _pinned(self) -> SshResource:
        if self.host_key is None and self.known_hosts is None:
            raise ValueError("an ssh resource pins its upstream host key: set host_key or known_hosts")
        if self.credential is None and self.password is None:
            raise ValueError("an ssh resource needs credential (private key) or password")
        return self


class UpstreamTls(_Model):
    """How the HTTP proxy checks an https upstream and, optionally, proves itself to it (a Kubernetes API
    server, say: its certificate comes from the cluster's own CA and it may ask for a client certificate)."""

    ca: Path | None = Field(default=None, description="PEM bundle trusted instead of the system's CAs")
    server_name: str | None = Field(default=None, description="name checked in the upstream's certificate "
                                                              "(and sent as SNI) instead of the address's host")
    client_cert: Path | None = Field(default=None, description="PEM certificate hoop presents (mutual TLS)")
    client_key: Path | None = Field(default=None, description="its private key (PEM file, kept by hoop)")

    @model_validator(mode="after")
    def _pair(self) -> UpstreamTls:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("tls: client_cert and client_key go together")
        return self


class HttpResource(_ResourceBase):
    kind: Literal["http"]
    address: Annotated[str, AfterValidator(_base_url)]
    auth: Literal["bearer", "basic", "header", "none"] = "bearer"
    header: str | None = Field(default=None, description="header name when auth is 'header'")
    username: str | None = Field(default=None, description="user name when auth is 'basic'")
    max_body_record: int = Field(default=16_384, ge=0)
    tls: UpstreamTls | None = None

    @model_validator(mode="after")
    def _auth(self) -> HttpResource:
        if self.auth == "header" and not self.header:
            raise ValueError("auth: header needs header: NAME")
        if self.auth != "none" and self.credential is None:
            raise ValueError(f"auth: {self.auth} needs credential")
        if self.tls is not None and not self.address.lower().startswith("https://"):
            raise ValueError("tls is for an https:// address")
        return self


Resource = Annotated[PostgresResource | SshResource | HttpResource, Field(discriminator="kind")]


class Listen(_Model):
    host: str = "127.0.0.1"
    advertise: str | None = Field(default=None, description="host name shown in connection hints")
    http: int = Field(default=8080, ge=0, le=65535)
    postgres: int = Field(default=15432, ge=0, le=65535)
    ssh: int = Field(default=2222, ge=0, le=65535)
    http_proxy: int = Field(default=18080, ge=0, le=65535)


class Tls(_Model):
    cert: Path | None = None
    key: Path | None = None
    #: ask PostgreSQL clients for a cleartext password instead of SCRAM, but only on TLS connections
    #: (for clients without SCRAM support); plain TCP always uses SCRAM
    cleartext_in_tls: bool = False
    #: serve the HTTP proxy over TLS (https) with the same certificate: its clients present their grant
    #: secret as a bearer token, which must not cross a network in clear
    http_proxy: bool = False

    @model_validator(mode="after")
    def _pair(self) -> Tls:
        # one without the other was ignored: hoop served a generated self-signed pair instead, and the
        # clients that pinned the configured certificate failed with nothing in the config to say why
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert and key go together: set both, or neither for a generated self-signed pair")
        return self


class Agent(_Model):
    """A service identity (OIDC client-credentials subject) that may act as an agent."""

    subject: str
    name: str
    acts_for: str | None = Field(default=None, description="the human (email) or group it acts for")
    groups: list[str] = Field(default_factory=list)


class Oidc(_Model):
    issuer: str
    audience: str
    jwks_url: str | None = None
    groups_claim: str = "groups"
    email_claim: str = "email"
    #: refuse a person's token unless its ``email_verified`` claim is true: with an identity provider
    #: that lets users sign up with an address they do not own, the email alone names anyone, admins too
    require_email_verified: bool = True
    agents: list[Agent] = Field(default_factory=list)


class Delegation(_Model):
    max_depth: int = Field(default=3, ge=0, le=10)
    #: live (active, unexpired) children one grant may have at once; more are refused
    max_children: int = Field(default=100, ge=1, le=10_000)


class Transcripts(_Model):
    max_bytes: int = Field(default=256_000, ge=1024)


class HoopConfig(_Model):
    admins: str = Field(description="the group whose members are hoop admins")
    groups: dict[str, Group]
    resources: list[Resource]
    listen: Listen = Field(default_factory=Listen)
    tls: Tls = Field(default_factory=Tls)
    state_dir: Path = Path(".hoop")
    masking_key: SecretRef | None = None
    oidc: Oidc | None = None
    delegation: Delegation = Field(default_factory=Delegation)
    transcripts: Transcripts = Field(default_factory=Transcripts)

    @model_validator(mode="after")
    def _references(self) -> HoopConfig:
        if self.admins not in self.groups:
            raise ValueError(f"admins names group {self.admins!r}, which is not defined under groups")
        seen: set[str] = set()
        for res in self.resources:
            if res.name in seen:
                raise ValueError(f"resource name {res.name!r} is used twice")
            seen.add(res.name)
            for group in res.request.groups:
                if group not in self.groups:
                    raise ValueError(f"resource {res.name!r}: request.groups names unknown group {group!r}")
            for step in res.approval:
                if step.from_ not in self.groups:
                    raise ValueError(f"resource {res.name!r}: approval step names unknown group {step.from_!r}")
        return self

    def resource(self, name: str) -> PostgresResource | SshResource | HttpResource | None:
        for res in self.resources:
            if res.name == name:
                return res
        return None


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
