"""Reconstruct the command lines a person types into an interactive shell. Pure code, no I/O.

How this works. Keystrokes pass through to the remote shell as they are typed, so the
remote shell echoes them and its line editor works as usual. :class:`LineEditor` keeps its
own model of the line (text and cursor) from the same keystrokes. At every key that could
make the remote side run the line, :meth:`LineEditor.feed` stops and hands back the bytes
before the key (to send now), the :class:`Line` to decide and the unconsumed rest; the
caller holds the key itself (:attr:`Line.key`) until the guard has decided. Such keys are
Enter (``\\r``, ``\\n`` = ``^J``), ``^O`` (bash: run the line and fetch the next), ``^X`` (prefix
of ``^X^E``, edit-and-run), ``^D`` on a non-empty line (end of file: a terminal in canonical
mode hands the line over), and a line feed inside a bracketed paste. Allowed, the key is sent;
refused, the caller sends :data:`LINE_KILL` instead (``^E`` end of line, ``^U`` kill to start,
``^C`` interrupt) and calls :meth:`LineEditor.refused`.

Understood exactly: printable text (UTF-8), Backspace and DEL, ``^U`` (kill to start),
``^K`` (kill to end), ``^W`` (kill previous word), ``^D`` (delete at cursor), ``^A``/``^E``/
Home/End, ``^B``/``^F``/left/right arrows, Delete (``ESC[3~``), and bracketed paste while the
remote side has turned it on (:attr:`LineEditor.bracketed`, followed from its output).

Fail closed. Keys that make the *remote* side put text into the line cannot be followed from
the input alone: Tab completion, history (up/down arrows, ``^P``/``^N``, ``^R`` search),
yank (``^Y``), transpose, Meta/Alt editing keys, paste markers the remote did not ask for,
``^D`` on a non-empty line, an escape sequence cut short by Enter. A line touched by any of
them is marked ``opaque``; the proxy decides such a line with the resource's ``on_unparsed``
action (block by default) and tells the user to type the command out in full. ``^C`` and a
refused line may leave text in the remote line (``stty -isig``, a remapped kill key): that
text is kept as :attr:`Line.prefix`, checked in front of the next line, until the caller
sees the remote start a fresh line (:meth:`LineEditor.settled`). Full-screen programs (after
the alternate-screen switch in the output) are passed through without line checks; see
:mod:`proxy.ssh.channel`.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass

__all__ = ["LINE_KILL", "Line", "LineEditor"]

#: Sent upstream instead of the key of a refused line: end of line, kill to start, interrupt.
LINE_KILL = b"\x05\x15\x03"

_CR, _LF, _CTRL_D, _CTRL_O, _CTRL_X = 0x0D, 0x0A, 0x04, 0x0F, 0x18
_SUBMIT = frozenset({_CR, _LF, _CTRL_D, _CTRL_O, _CTRL_X})

_PASTE_START = "\x1b[200~"
_PASTE_END = "\x1b[201~"


@dataclass(frozen=True, slots=True)
class Line:
    """A line to decide: its reconstructed text and whether it could be followed exactly.

    ``key`` is the byte that submits it (sent only when allowed). ``final`` is False when the
    line goes on after the key (a line feed inside a paste, ``^D``, ``^X``). ``prefix`` is text the
    remote line may still hold from before a ``^C`` or a refusal: it runs in front of ``text``.
    """

    text: str
    opaque: bool = False
    key: bytes = b"\r"
    final: bool = True
    prefix: str = ""


class LineEditor:
    """The model of one interactive command line, fed the client's input bytes."""

    def __init__(self) -> None:
        self._buf: list[str] = []
        self._cur = 0
        self._opaque = False
        self._esc = ""  # an escape sequence in progress
        self._paste = False
        self._prefix = ""
        self._prefix_opaque = False
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        #: The remote side has turned bracketed paste on (``ESC[?2004h`` in its output).
        self.bracketed = False

    @property
    def text(self) -> str:
        return "".join(self._buf)

    def reset(self) -> None:
        """The remote line is empty (after an allowed Enter)."""
        self._buf, self._cur, self._opaque, self._esc, self._paste = [], 0, False, "", False
        self._prefix, self._prefix_opaque = "", False

    def settled(self) -> None:
        """The remote side started a fresh line: text before a ^C or a refusal is gone."""
        self._prefix, self._prefix_opaque = "", False

    def refused(self, line: Line) -> None:
        """``line`` was refused and :data:`LINE_KILL` sent; keep its text as a prefix until settled."""
        self.reset()
        self._prefix, self._prefix_opaque = line.prefix + line.text, line.opaque

    def feed(self, data: bytes) -> tuple[bytes, Line | None, bytes]:
        """Consume ``data`` up to the first key that could submit the line.

        Returns ``(send_now, line, rest)``: the bytes before the key (forward them), the line
        to decide (None when no such key was seen; then ``rest`` is empty) and the bytes after
        the key, unconsumed. The key itself is in neither: it is ``line.key``.
        """
        start = 0
        for i, byte in enumerate(data):
            if byte not in _SUBMIT:
                continue
            self._take(data[start:i])
            start = i
            if byte == _CTRL_D and not self._buf and not self._prefix and not self._esc:
                continue  # ^D on an empty line: log out or end of input, nothing to run
            line = self._submit(byte)
            rest = data[i + 1:]
            if line.final and byte == _CR and rest[:1] == b"\n":
                rest = rest[1:]  # CR LF is one Enter
            return data[:i], line, rest
        self._take(data[start:])
        return data, None, b""

    def _submit(self, byte: int) -> Line:
        """The line to decide at ``byte``; the model moves on as if the key was sent."""
        if self._esc:  # an escape sequence cut short: what the remote side made of it is unknown
            self._esc, self._opaque = "", True
        if byte == _CTRL_X:
            self._opaque = True  # ^X^E, ^X^R ...: the remote side takes over the line
        pasted = self._paste and byte in (_CR, _LF)
        final = byte in (_CR, _LF, _CTRL_O) and not pasted
        line = Line(self.text, self._opaque or self._prefix_opaque, bytes([byte]), final, self._prefix)
        if final:
            self.reset()
            self._opaque = byte == _CTRL_O  # bash then shows the next history line
        elif pasted:
            self._insert("\n")
        elif byte == _CTRL_D:
            self._key("\x04")
            self._opaque = True  # readline deletes a character, a canonical terminal hands the line over
        return line

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
            self._insert(ch)
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
        elif ch == "\x03":  # ^C abandons the line, unless the terminal does not interrupt (stty -isig)
            self._prefix += self.text
            self._prefix_opaque = self._prefix_opaque or self._opaque
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
        if seq == _PASTE_START and self.bracketed:
            self._paste = True
        elif seq == _PASTE_END and self._paste:
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
