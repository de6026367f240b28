"""The ``resources`` of hoop.yaml: one model per kind (postgres, ssh, http) and what they share.

Addresses, pinned SSH host keys and HTTP base URLs are checked here, so that a bad one fails
at start, naming the key, rather than when the first client connects.
"""

from __future__ import annotations

import base64
import binascii
import struct
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field, model_validator

from broker.config.base import Duration, SecretRef, _Model
from broker.config.rules import Guardrails, Masking
from broker.terminal import one_line

__all__ = ["ApprovalStep", "ExtensionRules", "HttpResource", "PostgresResource", "RequestRules", "Resource",
           "SshAllow", "SshResource", "UpstreamTls"]


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
