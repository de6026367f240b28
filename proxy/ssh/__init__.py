"""The SSH proxy: grant-authenticated shells and commands with held keys, guardrails, masking and recording.

Public surface: :class:`SshProxy` (``start(host, port) -> port``, ``stop()``),
:func:`replay` / :func:`replay_command` (``hoop replay``), :func:`asciicast` (a recorded channel
as asciicast v2 text, for transcripts).
"""

from proxy.ssh.recording import asciicast, cast_events
from proxy.ssh.replay import replay, replay_command
from proxy.ssh.server import SshProxy

__all__ = ["SshProxy", "asciicast", "cast_events", "replay", "replay_command"]
