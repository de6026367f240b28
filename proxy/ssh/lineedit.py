"""Reconstruct the command lines a person types into an interactive shell. Pure code, no I/O.

How this works. Keystrokes pass through to the remote shell as they are typed, so the
remote shell echoes them and its line editor works as usual. :class:`LineEditor` keeps its
own model of the line (text and cursor) from the same keystrokes. At Enter (``\\r`` or
``\\n``) :meth:`LineEditor.feed` stops and hands back the bytes before the Enter (to send
now), the finished :class:`Line` and the unconsumed rest. The caller holds the Enter until
the guard has decided: allowed, the Enter is sent; blocked, the caller sends
:data:`LINE_KILL` instead, which empties the remote line (``^E`` end of line, then ``^U``
kill to start, for readline and for a terminal in canonical mode alike).

Understood exactly: printable text (UTF-8), Backspace and DEL, ``^U`` (kill to start),
``^K`` (kill to end), ``^W`` (kill previous word), ``^C`` (clears the line), ``^D`` (delete
at cursor), ``^A``/``^E``/Home/End, ``^B``/``^F``/left/right arrows, Delete (``ESC[3~``),
and bracketed paste (newlines inside a paste are part of the line, not Enter).

The limit. Keys that make the *remote* side put text into the line cannot be followed from
the input alone: Tab completion, history (up/down arrows, ``^P``/``^N``, ``^R`` search),
yank (``^Y``), transpose, and Meta/Alt editing keys. A line touched by any of them is marked
``opaque``; the proxy decides such a line with the resource's ``on_unparsed`` action (block
by default) and tells the user to type the command out in full. Full-screen programs (after
the alternate-screen switch in the output) are passed through without line checks; see
:mod:`proxy.ssh.channel`.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass

__all__ = ["LINE_KILL", "Line", "LineEditor"]

#: Sent upstream instead of Enter for a refused line: end of line, then kill to start.
LINE_KILL = b"\x05\x15"

_PASTE_START = "\x1b[200~"
_PASTE_END = "\x1b[201~"


@dataclass(frozen=True, slots=True)
class Line:
    """A finished line: its reconstructed text and whether it could be followed exactly."""

    text: str
    opaque: bool = False


class LineEditor:
    """The model of one interactive command line, fed the client's input bytes."""

    def __init__(self) -> None:
        self._buf: list[str] = []
        self._cur = 0
        self._opaque = False
        self._esc = ""  # an escape sequence in progress
        self._paste = False
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    @property
    def text(self) -> str:
        return "".join(self._buf)

    def reset(self) -> None:
        self._buf, self._cur, self._opaque, self._esc, self._paste = [], 0, False, "", False

    def feed(self, data: bytes) -> tuple[bytes, Line | None, bytes]:
        """Consume ``data`` up to the first Enter.

        Returns ``(send_now, line, rest)``: the bytes before the Enter (forward them), the
        finished line (None when no Enter was seen; then ``rest`` is empty) and the bytes
        after the Enter, unconsumed. The Enter itself is in neither.
        """
        start = 0
        for i, byte in enumerate(data):
            if byte not in (0x0D, 0x0A):
                continue
            self._take(data[start:i])
            start = i
            if self._esc or self._paste:
                continue  # part of an escape sequence or a paste: an ordinary key
            line = Line(self.text, self._opaque)
            self.reset()
            rest = data[i + 1:]
            if byte == 0x0D and rest[:1] == b"\n":
                rest = rest[1:]  # CR LF is one Enter
            return data[:i], line, rest
        self._take(data[start:])
        return data, None, b""

    def _take(self, data: bytes) -> None:
        for ch in self._decoder.decode(data):
            self._key(ch)

    def _key(self, ch: str) -> None:
        if self._esc:
            self._escape(ch)
            return
        if ch == "\x1b":
            self._esc = ch
            return
        if self._paste:
            self._insert("\n" if ch == "\r" else ch)
            return
        code = ord(ch)
        if code >= 0x20 and code != 0x7F:
            self._insert(ch)
        elif ch in ("\x7f", "\x08"):
            if self._cur:
                del self._buf[self._cur - 1]
                self._cur -= 1
        elif ch == "\x15":  # ^U
            del self._buf[:self._cur]
            self._cur = 0
        elif ch == "\x0b":  # ^K
            del self._buf[self._cur:]
        elif ch == "\x17":  # ^W
            start = self._cur
            while start and self._buf[start - 1] in " \t":
                start -= 1
            while start and self._buf[start - 1] not in " \t":
                start -= 1
            del self._buf[start:self._cur]
            self._cur = start
        elif ch == "\x03":  # ^C abandons the line
            self._buf, self._cur, self._opaque = [], 0, False
        elif ch == "\x04":
            if self._cur < len(self._buf):
                del self._buf[self._cur]
        elif ch == "\x01":
            self._cur = 0
        elif ch == "\x05":
            self._cur = len(self._buf)
        elif ch == "\x02":
            self._cur = max(0, self._cur - 1)
        elif ch == "\x06":
            self._cur = min(len(self._buf), self._cur + 1)
        elif ch in ("\x07", "\x0c"):  # bell, clear screen: no change to the line
            pass
        else:  # Tab, ^P, ^N, ^R, ^Y, ^T, ^X ...: the remote side changes the line
            self._opaque = True

    def _insert(self, ch: str) -> None:
        self._buf.insert(self._cur, ch)
        self._cur += 1

    def _escape(self, ch: str) -> None:
        seq = self._esc + ch
        if len(seq) == 2:
            if ch in "[O":
                self._esc = seq
                return
            self._esc = ""
            self._opaque = True  # Meta/Alt + key
            return
        if seq[1] == "[" and (ch.isdigit() or ch == ";") and len(seq) < 16:
            self._esc = seq
            return
        self._esc = ""
        if seq == _PASTE_START:
            self._paste = True
        elif seq == _PASTE_END:
            self._paste = False
        elif self._paste:
            self._opaque = True
        elif ch == "C":
            self._cur = min(len(self._buf), self._cur + 1)
        elif ch == "D":
            self._cur = max(0, self._cur - 1)
        elif ch == "H" or seq in ("\x1b[1~", "\x1b[7~"):
            self._cur = 0
        elif ch == "F" or seq in ("\x1b[4~", "\x1b[8~"):
            self._cur = len(self._buf)
        elif seq == "\x1b[3~":
            if self._cur < len(self._buf):
                del self._buf[self._cur]
        else:  # up/down (history), function keys, anything else
            self._opaque = True
