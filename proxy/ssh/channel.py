"""One SSH session channel through hoop: shell, exec or SFTP, relayed to an upstream channel.

How this works. :class:`ProxyChannel` is the asyncssh server-side session; once the client
has asked for a shell, a command or a subsystem it opens the matching channel on the
connection's upstream SSH connection, with the same terminal type, size, modes and
environment, and then relays bytes both ways with flow control (a full client window pauses
the upstream channel, and the other way round).

* exec: the command line is decided by :class:`~proxy.shellguard.ShellGuard` before anything
  reaches the host (:meth:`ChannelContext.check_exec`: a program that would read commands from
  the exec's input, such as ``bash`` or ``sudo -i``, is refused, since that input is not
  checked). ``block`` answers on stderr with exit status 126; ``review`` waits for an
  approver (``LiveSession.review``). A command that is not UTF-8 is refused the same way
  (asyncssh would refuse it with a bare request failure: :class:`~proxy.ssh.agentx11.RequestChannel`
  hands it over instead). Exit status and exit signal are passed back as they come; an exec cut
  short by the grant's end or by the client leaving is recorded with ``ended`` and the reason, and
  its process group on the host is killed (:meth:`ProxyChannel._close_upstream`).
* shell: every input line is decided before it runs (:class:`~proxy.ssh.lines.LineGate`, with a
  PTY or without one). Programs that switch to the alternate screen (vim, less, top) are passed
  through without line checks until they switch back.
* subsystem: only SFTP, and only with ``allow.sftp``; any other request is answered with the
  reason on stderr and exit status 126, not a silent refusal.
* Memory: while input is held (the host connection is being made, a line or an exec waits for
  review, or for a fresh line) reading from the client is paused, so the client's SSH window
  fills up instead of hoop's memory.
* Environment: only locale and terminal variables (:data:`ENV_NAMES`) with plain values go to
  the host; what passed and the names that did not are recorded (``env`` event).
* Output (stdout and stderr): :class:`~proxy.ssh.output.OutputRelay` masks, sends and
  records it (what the client receives is exactly what is recorded); SFTP is relayed as bytes, and
  so is an allowed exec that is only a file transfer server (:meth:`ChannelContext.transfer_server`).
* Bulk output costs no await and no task per chunk: chunks are written as they arrive, and a
  full client window pauses reading from the host (asyncssh flow control, both directions).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import asyncssh

from broker.errors import HoopError
from proxy.guard import Decision
from proxy.ssh import tuning
from proxy.ssh.context import ChannelContext
from proxy.ssh.lines import LineGate
from proxy.ssh.output import OutputRelay
from proxy.ssh.recording import Recorder
from proxy.ssh.sftplog import SftpLog

if TYPE_CHECKING:
    UpChan = asyncssh.SSHClientChannel[bytes]
    DownChan = asyncssh.SSHServerChannel[bytes]
else:
    UpChan = DownChan = Any

__all__ = ["BLOCKED_STATUS", "ENV_NAMES", "ChannelContext", "ProxyChannel"]

log = logging.getLogger(__name__)

#: Exit status of a refused exec or subsystem (the shell's "command found but not executable").
BLOCKED_STATUS = 126
#: Client environment variables passed to the host: locale and terminal, nothing a shell runs.
ENV_NAMES = re.compile(r"LANG|LANGUAGE|LC_[A-Z]+|TERM|COLORTERM|TZ")
#: ... and only with a plain value (a locale, a terminal type, a zone): no spaces, quotes or ``$``.
_ENV_VALUE = re.compile(r"[A-Za-z0-9_.,:@+/=-]{0,128}")


class _Upstream(asyncssh.SSHClientSession):  # type: ignore[type-arg]
    def __init__(self, owner: ProxyChannel) -> None:
        self._owner = owner

    def data_received(self, data: bytes, datatype: int | None) -> None:
        self._owner.out.data(data, datatype)

    def eof_received(self) -> bool:
        self._owner.upstream_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._owner.upstream_closed()

    def pause_writing(self) -> None:
        self._owner._pause("upstream-slow")

    def resume_writing(self) -> None:
        self._owner._resume("upstream-slow")


class ProxyChannel(asyncssh.SSHServerSession):  # type: ignore[type-arg]
    """The client-facing half of one relayed session channel."""

    def __init__(self, ctx: ChannelContext) -> None:
        ctx.counter += 1
        self.ctx = ctx
        self.number = ctx.counter
        self.label = f"{ctx.label} chan={self.number}"
        self.chan: DownChan  # set by connection_made, which asyncssh calls first
        self.up: UpChan | None = None
        self.mode = ""
        self.command: str | None = None
        self.pty: tuple[str, tuple[int, int, int, int], dict[int, int]] | None = None
        self.rec = Recorder(ctx.session, self.number, defer=asyncio.get_running_loop().call_soon)
        self.out: OutputRelay  # set by connection_made
        self.lines = LineGate(self)
        self.closed = asyncio.get_running_loop().create_future()
        #: input that came in the chunk a hold started in (a held line puts the rest of its chunk first)
        self.queue: list[bytes] = []
        #: the grant ended (or hoop stops): nothing more goes to the host
        self.ending = False
        #: the channel's running step (opening upstream, a review, a wait for a fresh line)
        self.task: asyncio.Task[None] | None = None
        self._holding = True  # until the upstream channel is open, and while a line is decided
        self._paused: set[str] = set()  # why reading from the client is paused
        self._eof = False
        self._decision: Decision | None = None
        self._refusal: Decision | None = None  # refused when it was requested (not UTF-8, a subsystem)
        self._exec_recorded = False  # the exec's end (or refusal) is recorded once
        self._sftp: SftpLog | None = None  # an SFTP session's requests and replies, read for the record

    # -- requests from the client ---------------------------------------------------------
    def connection_made(self, chan: DownChan) -> None:
        self.chan = chan
        self.out = OutputRelay(chan, self.rec, self.ctx.masker, self.ctx.session.stats)
        self.ctx.channels.add(self)

    def pty_requested(self, term_type: str, term_size: tuple[int, int, int, int],
                      term_modes: Mapping[int, int]) -> bool:
        self.pty = (term_type, term_size, dict(term_modes))
        return True

    def shell_requested(self) -> bool:
        self.mode = "shell"
        return True

    def exec_requested(self, command: str) -> bool:
        self.mode, self.command = "exec", command
        try:
            command.encode("utf-8")
        except UnicodeEncodeError:  # RequestChannel passes undecodable bytes as surrogates: refuse them
            self.command = command.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            self._refusal = Decision("block", "not-utf8", "the command is not valid UTF-8, which hoop cannot "
                                     "check", self.command[:80])
        return True

    def subsystem_requested(self, subsystem: str) -> bool:
        self.mode = "sftp"
        if subsystem == "sftp" and self.ctx.resource.allow.sftp:
            return True
        rule, why = ("allow.sftp", "allow.sftp is off on this resource") if subsystem == "sftp" else (
            "unsupported", "hoop relays no other subsystem")
        log.info("%s subsystem %r refused: %s", self.label, subsystem[:64], why)
        what = f"subsystem {subsystem[:64]}"
        self.ctx.session.record("blocked", {"what": what, "reason": why, "text": f"{what}: {why}", "rule": rule})
        self.ctx.session.stats["blocked"] += 1
        self._refusal = Decision("block", rule, why, what)
        return True  # answered in _start, on stderr with exit status 126: a request failure carries no reason

    def session_started(self) -> None:
        self.task = asyncio.create_task(self._start(), name=self.label)

    def data_received(self, data: bytes, datatype: int | None) -> None:
        self.ctx.session.stats["bytes_in"] += len(data)
        if self._holding:  # (asyncssh starts reading right after session_started: pause here)
            self.queue.append(data)
            self._pause("hold")
        else:
            self._input(data)

    def eof_received(self) -> bool:
        self._eof = True
        if not self._holding and self.up is not None:
            self._input_eof()
        return True

    def terminal_size_changed(self, width: int, height: int, pixwidth: int, pixheight: int) -> None:
        if self.up is not None:
            self.up.change_terminal_size(width, height, pixwidth, pixheight)
        self.rec.resize(width, height)

    def signal_received(self, signal: str) -> None:
        if self.up is not None:
            self.up.send_signal(signal)

    def break_received(self, msec: int) -> bool:
        if self.up is not None:
            self.up.send_break(msec)
        return True

    def pause_writing(self) -> None:
        if self.up is not None:
            self.up.pause_reading()

    def resume_writing(self) -> None:
        if self.up is not None:
            self.up.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._record_end("client disconnected")
        self.out.done = True
        self.rec.flush(final=True)
        self.ctx.channels.discard(self)
        if self.task is not None and not self.task.done():
            self.task.cancel()
        self._close_upstream()
        if not self.closed.done():
            self.closed.set_result(None)

    def _close_upstream(self) -> None:
        """Close the host's channel, and what runs on it. sshd leaves a command running when its channel
        closes (one without a PTY; with a PTY, one that ignores SIGHUP), so an exec, or a shell without a
        PTY, has its process group killed first (sshd's ``signal`` request is a killpg). A shell with a PTY
        is left to the hangup: bash passes SIGHUP on to its jobs, which killing it first would prevent."""
        up = self.up
        if up is None:
            return
        if self.mode == "exec" or (self.mode == "shell" and self.pty is None):
            try:
                up.send_signal("KILL")
            except Exception:  # (the channel closed already: nothing runs on it)
                log.debug("%s could not signal the host's channel", self.label)
        up.close()

    # -- opening the upstream channel ------------------------------------------------------
    async def _start(self) -> None:
        session, res = self.ctx.session, self.ctx.resource
        notices, self.ctx.notices[:] = list(self.ctx.notices), []
        for notice in notices:
            self.say(notice)
        if self.mode == "sftp" and self._refusal is not None:
            self.say(f"hoop: {self._refusal.subject} refused: {self._refusal.reason}")
            return self._exit(BLOCKED_STATUS)
        if self.mode == "exec":
            assert self.command is not None
            decision = self._refusal or self.ctx.check_exec(self.command)
            self._decision = decision
            if decision.needs_review and not await self.review(decision, self.command):
                return self._refuse_exec(decision, "not approved")
            if decision.blocked:
                return self._refuse_exec(decision, decision.reason)
            if self.ending:  # the grant ended while the exec waited for its approver
                return self._refuse_exec(decision, "the session ended")
        env = self._env()
        try:
            conn = await self.ctx.upstream()
            if self.ending:  # ended while the host connection was made: open nothing on the host
                return
            term = self.pty
            self.up, _ = await self.ctx.forwards.create_session(
                conn, self.chan, self.number, lambda: _Upstream(self), self.command if self.mode == "exec" else None,
                subsystem="sftp" if self.mode == "sftp" else None, env=env,
                term_type=term[0] if term else None, term_size=term[1] if term else None,
                term_modes=term[2] if term else {}, encoding=None,
                window=tuning.UPSTREAM_WINDOW, max_pktsize=tuning.UPSTREAM_MAX_PKTSIZE)
            if self.ending:  # end() ran while the channel was being opened, before self.up was set
                self.up.close()
                return
        except HoopError as exc:
            self._record_end(f"the host could not be reached: {exc.message}")
            self.say(f"hoop: {exc.message}")
            self._exit(255)
            return
        except (asyncssh.Error, OSError) as exc:
            log.warning("%s upstream channel failed: %s", self.label, type(exc).__name__)
            self._record_end(f"{res.name} refused the session channel")
            self.say(f"hoop: {res.name} refused the session channel")
            self._exit(255)
            return
        raw = self.mode == "exec" and self.command is not None and self.ctx.transfer_server(self.command)
        if self.mode == "sftp" or raw:
            session.record("sftp", {"channel": self.number} if not raw else
                           {"channel": self.number, "command": self.ctx.masker.mask_text(self.command or "")})
            if not raw or (self.command or "").split()[0].rsplit("/", 1)[-1] == "sftp-server":
                self._sftp = SftpLog()  # (scp and rsync speak other protocols: their exec line is the record)
                self.out.observe = self._sftp_replies
        else:
            size = term[1] if term else (80, 24, 0, 0)
            command = self.ctx.masker.mask_text(self.command) if self.command is not None else None
            self.rec.header(size[0], size[1], term[0] if term else None, int(time.time()), command,
                            {k: self.ctx.masker.mask_text(v) for k, v in env.items()})
        self.out.mode, self.out.tty = "sftp" if raw else self.mode, self.pty is not None
        log.info("%s %s opened upstream", self.label, self.mode)
        self.release()

    def _env(self) -> dict[str, str]:
        """The client's environment variables that go to the host; what was sent is recorded."""
        sent = self.chan.get_environment_bytes()
        if not sent:
            return {}
        passed: dict[str, str] = {}
        dropped: list[str] = []
        for raw_name, raw_value in sent.items():
            name, value = raw_name.decode("utf-8", "replace"), raw_value.decode("utf-8", "replace")
            if ENV_NAMES.fullmatch(name) and _ENV_VALUE.fullmatch(value):
                passed[name] = value
            else:
                dropped.append(name[:64])
        masked = {k: self.ctx.masker.mask_text(v) for k, v in passed.items()}
        self.ctx.session.record("env", {"channel": self.number, "passed": masked, "dropped": dropped[:100]})
        if dropped:
            log.info("%s environment not passed to the host: %s", self.label, ", ".join(dropped[:20]))
        return passed

    def _refuse_exec(self, decision: Decision, why: str) -> None:
        self.ctx.session.stats["blocked"] += 1
        self.say(f"hoop: command refused: {why}")
        if not self._exec_recorded:
            self._exec_recorded = True
            self.record_command(self.command or "", decision, BLOCKED_STATUS)
        self._exit(BLOCKED_STATUS)

    def _record_end(self, reason: str) -> None:
        """An exec that was allowed (or held) and has not ended is recorded as cut short, with why; so are the
        bytes moved through SFTP files still open."""
        if self._sftp is not None:
            self._record_sftp(self._sftp.finish())
        if self.mode == "exec" and self._decision is not None and not self._exec_recorded:
            self._exec_recorded = True
            self.record_command(self.command or "", self._decision, None, ended=reason)

    async def review(self, decision: Decision, text: str) -> bool:
        """Hold ``text`` for an approver (the user is told); True when it was allowed."""
        masked = self.ctx.masker.mask_text(text)
        self.say(f"hoop: held for review ({decision.reason}); waiting for an approver…")
        timeout = self.ctx.resource.guardrails.review_timeout.total_seconds()
        return await self.ctx.session.review(masked, decision.rule or "default", timeout)

    def record_command(self, command: str, decision: Decision, exit_status: int | None, *,
                       ended: str | None = None) -> None:
        """A ``command`` event: an exec or a line, its decision, and how it ended."""
        data = {"channel": self.number, "command": self.ctx.masker.mask_text(command), "decision": decision.action,
                "rule": decision.rule, "exit_status": exit_status}
        if ended is not None:
            data["ended"] = ended
        self.ctx.session.record("command", data)

    # -- client -> upstream ----------------------------------------------------------------
    def _pause(self, reason: str) -> None:
        if not self._paused:
            self.chan.pause_reading()
        self._paused.add(reason)

    def _resume(self, reason: str) -> None:
        if reason in self._paused:
            self._paused.discard(reason)
            if not self._paused:
                self.chan.resume_reading()  # may deliver buffered input at once (data_received)

    def hold(self) -> None:
        """Input waits (a line under review, or for a fresh line): stop reading from the client."""
        self._holding = True
        self._pause("hold")

    def release(self) -> None:
        """Input flows again: what was queued is fed first, then reading from the client resumes."""
        queue, self.queue = self.queue, []
        self._holding = False
        for data in queue:
            if self._holding:
                self.queue.append(data)
            else:
                self._input(data)
        if self._eof and not self._holding and self.up is not None:
            self._input_eof()
        if not self._holding:  # a replayed line may have started a new hold: then reading stays paused
            self._resume("hold")

    def _input(self, data: bytes) -> None:
        assert self.up is not None
        if self.mode != "shell" or (self.pty is not None and self.out.fullscreen):
            self.up.write(data)
            if self._sftp is not None:
                self._sftp_ops(data)
        else:
            self.lines.feed(data)

    def _sftp_ops(self, data: bytes) -> None:
        """Record the file operations ``data`` completed (the bytes went to the host as they came), paths masked."""
        assert self._sftp is not None
        self._record_sftp(self._sftp.from_client(data))

    def _sftp_replies(self, data: bytes) -> None:
        """The host's SFTP replies (sent on to the client as they came): how much each read returned."""
        assert self._sftp is not None
        self._record_sftp(self._sftp.from_server(data))

    def _record_sftp(self, ops: list[dict[str, Any]]) -> None:
        mask = self.ctx.masker.mask_text
        for op in ops:
            for key in ("path", "to"):
                if key in op:
                    op[key] = mask(op[key])
            op["channel"] = self.number
            self.ctx.session.record("sftp_op", op)

    def _input_eof(self) -> None:
        assert self.up is not None
        if self.mode == "shell":
            self.lines.eof()
        if not self._holding:
            self.up.write_eof()

    # -- upstream -> client (data: OutputRelay) ---------------------------------------------
    def upstream_eof(self) -> None:
        self.out.flush()
        if not self.out.done:
            self.chan.write_eof()

    def upstream_closed(self) -> None:
        self.out.close()
        if self._sftp is not None:
            self._record_sftp(self._sftp.finish())
        up = self.up
        if up is None or self.ending:
            return
        status, signal = up.get_exit_status(), up.get_exit_signal()
        if self.mode == "exec" and self._decision is not None and not self._exec_recorded:
            self._exec_recorded = True
            self.record_command(self.command or "", self._decision, status,
                                ended=None if status is not None or signal is not None else "the host closed it")
        if self.out.done:
            return
        self.out.done = True
        if signal is not None:
            name, core, msg, lang = signal
            self.chan.exit_with_signal(name, core, msg, lang)
        elif status is not None:
            self.chan.exit(status)
        else:
            self.chan.close()

    # -- helpers -----------------------------------------------------------------------------
    def say(self, text: str) -> None:
        """Tell the user: on the terminal, or on stderr without one."""
        if self.out.done:
            return
        if self.pty is not None:
            self.chan.write(f"\r\n{text}\r\n".encode())
        else:
            self.chan.write_stderr(f"{text}\n".encode())

    def _exit(self, status: int) -> None:
        if not self.out.done:
            self.out.done = True
            self.chan.exit(status)

    def end(self, reason: str) -> None:
        """The session is over (grant ended): tell the user, close both halves."""
        self._record_end(reason)
        self.ending = True
        self.out.close()
        self.say(f"hoop: session closed: {reason}")
        self._close_upstream()
        if not self.out.done:
            self.out.done = True
            if self.mode == "exec":
                self.chan.exit(255)
            else:
                self.chan.close()
