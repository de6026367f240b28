"""A shell channel's input, line by line: follow it, decide each line, forward or refuse it.

How this works. :class:`LineGate` is the input half of a shell channel (:class:`~proxy.ssh.channel.ProxyChannel`).

* With a PTY, keystrokes pass through at once (echo, line editing and completion are the
  remote shell's), while :class:`~proxy.ssh.lineedit.LineEditor` follows the line. Every key
  that could run the line (Enter, ``^O``, ...) is held until the guard allows the line; a
  refused line is killed upstream (``^E^U^C``), the user is told why on the terminal, and input
  waits until the remote side prints a fresh line (at most :data:`FRESH_LINE_WAIT`). After a
  password-like prompt the next line is still checked, but recorded as ``[hidden]``. The line
  is checked as typed at an interactive shell, whose history expansion (``!!``) would rerun
  earlier text. Programs that switch to the alternate screen (vim, less, top) are passed
  through without line checks until they switch back (the channel does not call the gate).
* Without a PTY (commands piped to ``ssh host``), input is buffered per line, and only allowed
  lines are forwarded; the output never switches this off.
* A line longer than :data:`~proxy.ssh.lineedit.LINE_MAX` (piped, or typed at a terminal) is
  not followed past that size: it is refused, and its further bytes are not forwarded.
* A line held for review, or input waiting for a fresh line, holds the channel's input
  (``owner.hold()``): reading from the client pauses until ``owner.release()``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from proxy.guard import Decision, strictest, unparsed
from proxy.ssh.lineedit import LINE_KILL, LINE_MAX, Line, LineEditor

if TYPE_CHECKING:
    from proxy.ssh.channel import ProxyChannel

__all__ = ["FRESH_LINE_WAIT", "LineGate"]

log = logging.getLogger(__name__)

#: After a refused line, how long input waits for the remote side to print a fresh line.
FRESH_LINE_WAIT = 2.0


class LineGate:
    """Decides a shell channel's input line by line before the key that runs a line reaches the host."""

    def __init__(self, owner: ProxyChannel) -> None:
        self.owner = owner
        self.editor = LineEditor()
        self._piped = bytearray()
        self._piped_long = False  # the piped line grew past LINE_MAX: the rest of it is dropped
        self._newlines = 0  # the output's line feeds when the editor last looked

    def feed(self, data: bytes) -> None:
        """Client input of a shell channel, while it is not held."""
        owner = self.owner
        assert owner.up is not None
        while data:
            if owner.pty is None:  # piped input: whole lines, forwarded only when allowed
                head, nl, rest = data.partition(b"\n")
                room = LINE_MAX - len(self._piped)
                self._piped += head[:room]
                self._piped_long = self._piped_long or len(head) > room
                if not nl:
                    return
                line: Line | None = self._piped_line()
            else:
                if owner.out.newlines != self._newlines:
                    self._newlines = owner.out.newlines
                    self.editor.settled()
                self.editor.bracketed = owner.out.bracketed_paste
                send, line, rest = self.editor.feed(data)
                # past LINE_MAX the line is refused: keep it short (the line the Enter ended says so: the
                # editor itself has moved on to a fresh line)
                if send and not self.editor.overlong and not (line is not None and line.overlong):
                    owner.up.write(send)
            if line is None or not self._line(line, rest):
                return
            data = rest

    def eof(self) -> None:
        """The client's input ended: a piped line without its line feed is still decided."""
        if self.owner.pty is None and (self._piped or self._piped_long):
            self._line(self._piped_line(), b"")

    def _piped_line(self) -> Line:
        text = self._piped.decode("utf-8", "replace").removesuffix("\r")
        long, self._piped, self._piped_long = self._piped_long, bytearray(), False
        return Line(text, opaque=long, overlong=long)

    def _line(self, line: Line, rest: bytes) -> bool:
        """Decide one line; False when input is held (for review, or for a fresh line; ``rest`` queued)."""
        owner = self.owner
        assert owner.up is not None
        ctx, tty = owner.ctx, owner.pty is not None
        enter = line.key if tty else line.text.encode() + b"\n"
        # Only a terminal can have a password prompt; the hidden line is still checked.
        hidden = tty and owner.out.hide_next
        if line.final:
            owner.out.hide_next = False
        if not line.text.strip() and not line.opaque and not line.prefix.strip():
            owner.up.write(enter)
            return True
        guardrails = ctx.resource.guardrails
        decision = ctx.guard.check(line.text, history=tty)
        if line.prefix:
            decision = strictest([decision, ctx.guard.check(line.prefix + line.text, history=tty)])
        if line.overlong:  # hoop saw only the start of it, and did not forward the rest
            decision = strictest([Decision("block", "line-length", f"the line is longer than {LINE_MAX // 1024} "
                                           "KiB, which hoop does not check", line.text[:80]), decision])
        if line.opaque:
            decision = strictest([decision, unparsed(guardrails, "the line was changed by completion, history "
                                                     "or editing keys hoop cannot follow; type it out in full",
                                                     line.text[:80])])
        if hidden and decision.needs_review:
            decision = Decision("block", decision.rule, "a line typed after a password prompt is not sent for "
                                "review", "[hidden]")
        text = "[hidden]" if hidden else ctx.masker.mask_text(line.text)
        if line.final or decision.action != "allow":
            owner.rec.input(text + "\r\n")
        if decision.needs_review:
            owner.hold()
            owner.queue.insert(0, rest)
            owner.task = asyncio.create_task(self._held_line(line, decision, enter), name=owner.label)
            return False
        if not self._finish_line(line, decision, enter, decision.reason, hidden):
            owner.queue.insert(0, rest)
            return False
        return True

    async def _held_line(self, line: Line, decision: Decision, enter: bytes) -> None:
        owner = self.owner
        allowed = await owner.review(decision, line.text)
        if owner.ending:  # the grant ended while the line waited: nothing more goes to the host
            return
        if allowed:
            decision = Decision("allow", decision.rule, "approved", decision.subject)
        if self._finish_line(line, decision, enter, "not approved", False):
            owner.release()

    def _finish_line(self, line: Line, decision: Decision, enter: bytes, why: str, hidden: bool) -> bool:
        """Send the line's key or refuse it; False when input now waits for a fresh line."""
        owner = self.owner
        assert owner.up is not None
        if line.final or decision.action != "allow":
            owner.record_command("[hidden]" if hidden else line.text, decision, None)
        if decision.action == "allow":
            owner.up.write(enter)
            return True
        owner.ctx.session.stats["blocked"] += 1
        owner.say(f"hoop: line refused: {why}")
        if owner.pty is None:
            return True
        # Kill the remote line without an Enter. The kill keys may be remapped (stty, bind), so the
        # refused text stays in the editor as a prefix until the remote side prints a fresh line.
        owner.up.write(LINE_KILL)
        self.editor.refused(line)
        owner.hold()
        owner.task = asyncio.create_task(self._fresh_line(owner.out.newlines), name=owner.label)
        return False

    async def _fresh_line(self, newlines: int) -> None:
        """Hold input until the output shows a line feed after the refusal (or the wait is over)."""
        out = self.owner.out
        try:
            async with asyncio.timeout(FRESH_LINE_WAIT):
                while out.newlines == newlines:
                    out.printed.clear()
                    await out.printed.wait()
        except TimeoutError:
            log.info("%s no fresh line after a refused line; its text stays checked", self.owner.label)
        self.owner.release()
