"""hoop.yaml and the environment, validated once into pydantic models.

Nothing below the CLI reads ``os.environ``: :func:`load_settings` resolves the environment
once and everything else receives :class:`Settings`. A bad file raises :class:`~broker.errors.ConfigError`
whose message names the file, the key path (``resources[0](prod-db).approval[1].count``)
and the reason.

The models are split by part of the file: :mod:`~broker.config.base` (the strict model,
durations, secret references), :mod:`~broker.config.rules` (guardrails and masking),
:mod:`~broker.config.resources` (one model per resource kind), :mod:`~broker.config.hoop`
(the top level, :class:`HoopConfig`) and :mod:`~broker.config.load` (reading the file and the
environment). Import from ``broker.config``: every public name is here.
"""

from broker.config.base import Duration, SecretRef
from broker.config.hoop import Agent, Delegation, Group, HoopConfig, Listen, Oidc, Tls, Transcripts
from broker.config.load import Settings, load_config, load_settings, parse_config
from broker.config.resources import (
    ApprovalStep,
    ExtensionRules,
    HttpResource,
    PostgresResource,
    RequestRules,
    Resource,
    SshAllow,
    SshResource,
    UpstreamTls,
)
from broker.config.rules import (
    ALL_DETECTORS,
    Action,
    Detector,
    Guardrails,
    Masking,
    MaskRule,
    Rule,
    SqlKind,
    Strategy,
)

__all__ = [
    "ALL_DETECTORS",
    "Action",
    "Agent",
    "ApprovalStep",
    "Delegation",
    "Detector",
    "Duration",
    "ExtensionRules",
    "Group",
    "Guardrails",
    "HoopConfig",
    "HttpResource",
    "Listen",
    "MaskRule",
    "Masking",
    "Oidc",
    "PostgresResource",
    "RequestRules",
    "Resource",
    "Rule",
    "SecretRef",
    "Settings",
    "SqlKind",
    "SshAllow",
    "SshResource",
    "Strategy",
    "Tls",
    "Transcripts",
    "UpstreamTls",
    "load_config",
    "load_settings",
    "parse_config",
]
