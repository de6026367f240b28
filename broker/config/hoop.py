"""The top level of hoop.yaml: :class:`HoopConfig`, and the sections that are not per resource."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator, model_validator

from broker.config.base import SecretRef, _Model
from broker.config.resources import HttpResource, PostgresResource, Resource, SshResource

__all__ = ["Agent", "Delegation", "Group", "HoopConfig", "Listen", "Oidc", "Tls", "Transcripts"]


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
        for i, agent in enumerate(self.oidc.agents if self.oidc is not None else ()):
            # a typo here would name nobody: the agent would act for no one the approval rules know
            if agent.acts_for is not None and "@" not in agent.acts_for and agent.acts_for not in self.groups:
                raise ValueError(f"oidc.agents[{i}] ({agent.name}): acts_for {agent.acts_for!r} is neither an email "
                                 "nor a group defined under groups")
            team = self.groups.get(agent.acts_for or "")
            if team is not None and team.slack_usergroup is not None:
                # the agent speaks for each member, and nobody it speaks for may approve for it, nor it for them:
                # with members known only to Slack at run time, hoop could not tell who they are
                raise ValueError(f"oidc.agents[{i}] ({agent.name}): acts_for {agent.acts_for!r}, a group whose "
                                 "members come from a Slack user group; an agent may act only for a group whose "
                                 "members are listed in the config")
            for group in agent.groups:
                if group not in self.groups:
                    raise ValueError(f"oidc.agents[{i}] ({agent.name}): groups names unknown group {group!r}")
        return self

    def resource(self, name: str) -> PostgresResource | SshResource | HttpResource | None:
        for res in self.resources:
            if res.name == name:
                return res
        return None
