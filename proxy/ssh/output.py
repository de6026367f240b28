"""Upstream to client for one session channel: mask, send, record, follow the screen.

How this works. Each chunk from the host goes through the stream's
:class:`~proxy.mask.StreamMasker` (stdout and stderr have one each; with masking off the
resource's masker passes chunks through untouched), is written to the client channel and
handed to the channel's :class:`~proxy.ssh.recording.Recorder`, so what the client receives
is exactly what is recorded. The masker holds back only a trailing piece that could still
become a secret; a short idle timer flushes it. SFTP is relayed as bytes, neither masked nor
recorded (binary protocol).

For an interactive shell with a terminal (``tty``) the output also tells the line follower
what the remote side's terminal is doing: whether a full-screen program switched to the
alternate screen (:attr:`OutputRelay.fullscreen`), whether it turned bracketed paste on
(:attr:`OutputRelay.bracketed_paste`), how many line feeds it has printed
(:attr:`OutputRelay.newlines`: a fresh line after ^C or a refusal), and whether the output ends in
a password-like prompt (:attr:`OutputRelay.hide_next`: the next line is still checked, but
recorded as ``[hidden]``). The user controls the output, so none of these may turn a check
off: without a terminal they are never set.

Flow control is not done here: the channel pauses the upstream channel while the client's
window is full (asyncssh ``pause_writing``), so nothing is awaited per chunk.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import asyncssh

from proxy.mask import Masker, StreamMasker
from proxy.ssh.recording import Recorder

if TYPE_CHECKING:
    DownChan = asyncssh.SSHServerChannel[bytes]
else:
    DownChan = Any

__all__ = ["OutputRelay"]

FLUSH_IDLE = 0.1  # how long a possible secret prefix may wait for its rest
_ALT_ON = (b"\x1b[?1049h", b"\x1b[?1047h", b"\x1b[?47h")
_ALT_OFF = (b"\x1b[?1049l", b"\x1b[?1047l", b"\x1b[?47l")
_PASTE_ON, _PASTE_OFF = b"\x1b[?2004h", b"\x1b[?2004l"
_CSI = re.compile(rb"\x1b\[[0-9;?]*[ -/]*[@-~]")  # terminal control sequences, such as ESC[?2004h
# a prompt on the current line (no line feed after it), such as "[sudo] password for ann: "
_SECRET_PROMPT = re.compile(rb"(?i)\b(password|passphrase|passcode|pin)\b[^\n]{0,40}:[ \t]*\Z")


class OutputRelay:
    """The output half of a :class:`~proxy.ssh.channel.ProxyChannel`.

    ``done`` is set by the channel once the client side is finished (exit sent or channel
    gone); output arriving after that is dropped.
    """

    def __init__(self, chan: DownChan, rec: Recorder, masker: Masker, stats: dict[str, int]) -> None:
        self.chan = chan
        self.rec = rec
        self.stats = stats
        self.mode = ""  # "shell", "exec" or "sftp", set when the session starts
        self.tty = False  # the session has a terminal: only then is the screen followed
        self.done = False
        self.fullscreen = False
        self.bracketed_paste = False
        self.hide_next = False
        self.newlines = 0
        self._tail = b""
        self.printed = asyncio.Event()  # set at each line feed counted in ``newlines``
        self._out = StreamMasker(masker)
        self._err = StreamMasker(masker)
        self._masking = masker.enabled
        self._timer: asyncio.TimerHandle | None = None
        #: sees an SFTP session's output as it passes (its replies are read for the record)
        self.observe: Callable[[bytes], None] | None = None

    def data(self, data: bytes, datatype: int | None) -> None:
        """One chunk from the host."""
        self.stats["bytes_out"] += len(data)
        if self.mode == "sftp" and not datatype:  # (stderr carries no transfer protocol: masked and recorded)
            if not self.done:
                self.chan.write(data)
                if self.observe is not None:
                    self.observe(data)
            return
        if not self._masking:
            self._send(data, datatype)
            return
        masker = self._err if datatype else self._out
        out = masker.feed(data)
        if out:
            self._send(out, datatype)
        if masker.pending and self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(FLUSH_IDLE, self.flush)

    def _send(self, out: bytes, datatype: int | None) -> None:
        if self.done:
            return
        self.chan.write(out, datatype)
        self.rec.output(out)
        if self.mode == "shell" and self.tty:
            if b"\x1b[?" in out:
                self.fullscreen = _switched(out, _ALT_ON, _ALT_OFF, self.fullscreen)
                self.bracketed_paste = _switched(out, (_PASTE_ON,), (_PASTE_OFF,), self.bracketed_paste)
            if b"\n" in out:
                self.newlines += out.count(b"\n")
                self.printed.set()
            self._tail = (self._tail + out)[-80:]  # the masker may cut a prompt in two
            self.hide_next = _SECRET_PROMPT.search(_CSI.sub(b"", self._tail)) is not None

    def flush(self) -> None:
        """Send (and record) what the maskers hold back."""
        self._timer = None
        if not self._masking:
            return
        for masker, datatype in ((self._out, None), (self._err, asyncssh.EXTENDED_DATA_STDERR)):
            out = masker.flush()
            if out:
                self._send(out, datatype)

    def close(self) -> None:
        """The host's side ended: flush everything, stop the timer, finish the recording."""
        self.flush()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.rec.flush(final=True)


def _switched(out: bytes, on: tuple[bytes, ...], off: tuple[bytes, ...], current: bool) -> bool:
    """A terminal mode after ``out``: the last of its on and off sequences wins."""
    last_on, last_off = max(out.rfind(x) for x in on), max(out.rfind(x) for x in off)
    return current if last_on == last_off else last_on > last_off
