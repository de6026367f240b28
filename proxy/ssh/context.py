"""What every session channel of one client connection shares: resource, session, guard, masker, forwards.

:class:`ChannelContext` is built by the server once the client is authenticated and its
session is open; ``upstream`` returns the connection's (shared) upstream SSH connection.
"""

from __future__ import annotations

import shlex
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import asyncssh

from broker.config import SshResource
from proxy.contracts import Live
from proxy.guard import Decision, strictest
from proxy.mask import Masker
from proxy.shellguard import ShellGuard

if TYPE_CHECKING:
    from proxy.ssh.agentx11 import Forwards
    from proxy.ssh.channel import ProxyChannel

__all__ = ["ChannelContext"]


class ChannelContext:
    """What every channel of one client connection shares."""

    def __init__(self, *, label: str, resource: SshResource, session: Live, guard: ShellGuard, masker: Masker,
                 upstream: Callable[[], Awaitable[asyncssh.SSHClientConnection]],
                 forwards: Forwards, notices: list[str] | None = None) -> None:
        self.label = label
        self.resource = resource
        self.session = session
        self.guard = guard
        self.masker = masker
        self.upstream = upstream
        #: Agent and X11 forwarding of the connection (decisions and relays).
        self.forwards = forwards
        self.channels: set[ProxyChannel] = set()
        self.counter = 0
        #: Refusals of connection-level requests, told to the client on its next session channel.
        self.notices = notices if notices is not None else []

    def check_exec(self, command: str) -> Decision:
        """The guard's decision on an exec command line; scp is refused unless ``allow.sftp``."""
        decision = self.guard.check(command)
        if not self.resource.allow.sftp:
            try:
                words = shlex.split(command)
            except ValueError:
                words = []
            if words and words[0].rsplit("/", 1)[-1] == "scp" and ("-t" in words or "-f" in words):
                decision = strictest([decision, Decision("block", "allow.sftp", "scp is not allowed on this "
                                                         "resource (allow.sftp is off)", "scp")])
        return decision

