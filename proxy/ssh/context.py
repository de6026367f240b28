"""What every session channel of one client connection shares: resource, session, guard, masker, forwards.

:class:`ChannelContext` is built by the server once the client is authenticated and its
session is open; ``upstream`` returns the connection's (shared) upstream SSH connection.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import asyncssh

from broker.config import SshResource
from proxy.contracts import Live
from proxy.guard import Decision, strictest
from proxy.mask import Masker
from proxy.shellguard import Command, ShellGuard

if TYPE_CHECKING:
    from proxy.ssh.agentx11 import Forwards
    from proxy.ssh.channel import ProxyChannel

__all__ = ["ChannelContext", "transfer_server"]


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
        """The guard's decision on an exec command line, with the exec-only refusals.

        An exec's input goes to the host unchecked, so a program that reads commands from its
        input (``bash``, ``sudo -i``, ``python3``, ``psql``) is refused: the user is sent to an
        interactive session, whose lines are checked. File transfer servers (``scp -t``,
        ``sftp-server``) are refused unless ``allow.sftp``. Both look through wrappers and ``sh -c``.
        """
        decisions = [self.guard.check(command)]
        for cmd in self.guard.resolve(command) or ():
            if cmd.reads_input:
                decisions.append(Decision(
                    "block", "interactive-exec", f"{cmd.reads_input}, which hoop does not check on an exec; "
                    "open an interactive session (ssh without a command) and run it there", cmd.program))
            if not self.resource.allow.sftp and _transfers_files(cmd):
                decisions.append(Decision("block", "allow.sftp", f"{cmd.program} file transfer is not allowed on "
                                          "this resource (allow.sftp is off)", cmd.program))
        return strictest(decisions)

    def transfer_server(self, command: str) -> bool:
        """Whether an allowed exec is, as a whole, a file transfer server end on a resource with
        ``allow.sftp`` (:func:`transfer_server`). Its output is then relayed as bytes, as an SFTP
        subsystem's is: these protocols count the bytes of each file, so masking a value inside one
        would break the transfer (legacy ``scp -O`` hung on a file holding an email)."""
        return self.resource.allow.sftp and transfer_server(self.guard, command)


def transfer_server(guard: ShellGuard, command: str) -> bool:
    """Whether ``command`` is one plain file transfer server command (``scp -t``/``-f``, ``sftp-server``,
    ``rsync --server``): no wrapper, assignment, redirection, substitution or second command."""
    resolved = guard.resolve(command)
    try:
        words = shlex.split(command)
    except ValueError:
        return False
    if not resolved or len(resolved) != 1 or not words:
        return False
    (cmd,) = resolved
    if cmd.dynamic or cmd.reads_input or words != [words[0], *cmd.args] or not _system_program(words[0], cmd.program):
        return False
    if _HOST_EXPANDS.search(command):  # the host's shell would turn these into words hoop did not judge
        return False
    return _server_end(cmd)


#: what the host's shell expands (variables, substitutions, globs, braces, ``~``) or unescapes; the guard reads
#: such text literally, so a command holding any of it is never taken for a transfer server
_HOST_EXPANDS = re.compile(r"[$`*?\[\]{}~\\!]")


#: where a transfer server's program may be named by path: directories only root can write to. Any other
#: path (``./scp``, ``/tmp/x/scp``, ``~/bin/rsync``) may be a program the user uploaded over SFTP, whose
#: output would otherwise leave unmasked and unrecorded.
_SYSTEM_DIRS = ("/usr/bin/", "/bin/", "/usr/sbin/", "/usr/local/bin/", "/usr/lib/openssh/", "/usr/libexec/openssh/",
                "/usr/lib/ssh/", "/usr/libexec/", "/usr/lib/")


def _system_program(word: str, program: str) -> bool:
    """``word`` names ``program`` bare (found on the host's PATH) or by its path in a system directory."""
    return word == program or any(word == d + program for d in _SYSTEM_DIRS)


_SCP_SERVER_FLAGS = frozenset("vrpdtfq")  # what an scp client passes to the scp it starts on the far side
#: the rsync server's short flags: one cluster as a client sends it (``-vlogDtpre.iLsfxCIvu``: the letters, then
#: ``e.`` and the capabilities), without ``s`` (its real arguments would come on its input, unseen) or ``M``
_RSYNC_CLUSTER = re.compile(r"-(?P<flags>[A-Za-z]*?)(?:e\.[A-Za-z]*)?")
#: rsync server options a client sends that read and write files only (none starts a program, a daemon,
#: reads a daemon config, or takes its arguments from the input)
_RSYNC_LONG = frozenset({
    "sender", "delete", "delete-before", "delete-during", "delete-delay", "delete-after", "delete-excluded",
    "partial", "partial-dir", "inplace", "append", "append-verify", "numeric-ids", "ignore-errors", "size-only",
    "ignore-times", "ignore-existing", "existing", "remove-source-files", "safe-links", "copy-unsafe-links",
    "modify-window", "compress-level", "checksum-seed", "timeout", "contimeout", "bwlimit", "max-size",
    "min-size", "max-delete", "backup", "backup-dir", "suffix", "temp-dir", "compare-dest", "copy-dest",
    "link-dest", "fuzzy", "force", "delay-updates", "no-implied-dirs", "no-inc-recursive", "no-i-r",
    "fake-super", "super", "no-super", "preallocate", "sparse", "whole-file", "no-whole-file", "usermap",
    "groupmap", "chmod", "chown", "copy-as", "iconv", "no-iconv", "log-format", "out-format", "info", "debug",
})


def _server_end(cmd: Command) -> bool:
    """Whether ``cmd``'s arguments are exactly a transfer server end as clients start it: ``scp`` with only
    the flags an scp client passes (one of ``-t``/``-f``) and one path; ``sftp-server``, whose options run
    nothing; ``rsync --server`` with no daemon option. An ``scp`` that would act as a client (``-S``,
    ``-o ProxyCommand=…``, ``-F``) runs programs of the user's choosing: it is never relayed raw."""
    args = cmd.args
    if cmd.program == "sftp-server":
        return True
    if cmd.program == "scp":
        if args[-2:-1] == ("--",):
            flags, path = args[:-2], args[-1]
        else:
            flags, path = args[:-1], args[-1] if args else ""
        letters = "".join(f[1:] for f in flags)
        return (bool(path) and not path.startswith("-") and all(f.startswith("-") and len(f) > 1 for f in flags)
                and set(letters) <= _SCP_SERVER_FLAGS and letters.count("t") + letters.count("f") == 1)
    if cmd.program != "rsync" or args[:1] != ("--server",):
        return False
    for arg in args[1:]:
        if arg.startswith("--"):
            if arg[2:].split("=", 1)[0] not in _RSYNC_LONG:
                return False
        elif arg.startswith("-"):
            cluster = _RSYNC_CLUSTER.fullmatch(arg)
            if cluster is None or "s" in cluster["flags"] or "M" in cluster["flags"]:
                return False
    return True


def _transfers_files(cmd: Command) -> bool:
    """An SCP or SFTP server end (what ``scp``, ``sftp -s`` and ``rsync`` start on the far side)."""
    if cmd.program in ("sftp-server", "internal-sftp"):
        return True
    shorts = "".join(a[1:] for a in cmd.args if a.startswith("-") and not a.startswith("--"))
    if cmd.program == "scp":
        return "t" in shorts or "f" in shorts
    if cmd.program == "sftp":
        return "s" in shorts or "S" in shorts
    return cmd.program == "rsync" and "--server" in cmd.args
