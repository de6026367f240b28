"""Upstream to client for one session channel: mask, send, record, follow the screen.

How this works. Each chunk from the host goes through the stream's
:class:`~proxy.mask.StreamMasker` (stdout and stderr have one each; with masking off the
resource's masker passes chunks through untouched), is written to the client channel and
handed to the channel's :class:`~proxy.ssh.recording.Recorder`, so what the client receives
is exactly what is recorded. The masker holds back only a trailing piece that could still
become a secret; a short idle timer flushes it. SFTP is relayed as bytes, neither masked nor
recorded (binary protocol).

For an interactive shell the output also tells the line follower two things: whether a
full-screen program switched to the alternate screen (:attr:`OutputRelay.fullscreen`), and
whether the output ends in a password-like prompt (:attr:`OutputRelay.hide_next`: the next
line is recorded as ``[hidden]``).

Flow control is not done here: the channel pauses the upstream channel while the client's
window is full (asyncssh ``pause_writing``), so nothing is awaited per chunk.
"""

from __future__ import annotations

import asyncio
import re
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
_SECRET_PROMPT = re.compile(rb"(?i)(password|passphrase|passcode|pin)[^\n]{0,40}:\s*$")


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
        self.done = False
        self.fullscreen = False
        self.hide_next = False
        self._out = StreamMasker(masker)
        self._err = StreamMasker(masker)
        self._masking = masker.enabled
        self._timer: asyncio.TimerHandle | None = None

    def data(self, data: bytes, datatype: int | None) -> None:
        """One chunk from the host."""
        self.stats["bytes_out"] += len(data)
        if self.mode == "sftp":
            if not self.done:
                self.chan.write(data, datatype)
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
        if self.mode == "shell":
            if b"\x1b[?" in out:
                if any(s in out for s in _ALT_ON):
                    self.fullscreen = True
                if any(s in out for s in _ALT_OFF):
                    self.fullscreen = False
            self.hide_next = _SECRET_PROMPT.search(out[-80:]) is not None

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
