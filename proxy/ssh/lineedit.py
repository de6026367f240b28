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
sees the remote start a fresh line (:meth:`LineEditor.settled`). A line (or that prefix) that
grows past :data:`LINE_MAX` characters is not followed further: it is marked ``overlong``, which
the proxy refuses, and the model keeps only its first :data:`LINE_MAX` characters (4 bytes
each). Full-screen programs (after the alternate-screen switch in the output) are passed
through without line checks; see :mod:`proxy.ssh.channel`.
"""

from __future__ import annotations

import codecs
import sys
from array import array
from dataclasses import dataclass

__all__ = ["LINE_KILL", "LINE_MAX", "Line", "LineEditor"]

#: Sent upstream instead of the key of a refused line: end of line, kill to start, interrupt.
LINE_KILL = b"\x05\x15\x03"
#: The longest line hoop follows and checks (characters; for piped input, bytes).
LINE_MAX = 64 * 1024

_CR, _LF, _CTRL_D, _CTRL_O, _CTRL_X = 0x0D, 0x0A, 0x04, 0x0F, 0x18
_SUBMIT = frozenset({_CR, _LF, _CTRL_D, _CTRL_O, _CTRL_X})

_PASTE_START = "\x1b[200~"
_PASTE_END = "\x1b[201~"
_BLANKS = (0x20, 0x09)
_UTF32 = "utf-32-le" if sys.byteorder == "little" else "utf-32-be"  # the layout of array("I")


@dataclass(frozen=True, slots=True)
class Line:
    """A line to decide: its reconstructed text and whether it could be followed exactly.

    ``key`` is the byte that submits it (sent only when allowed). ``final`` is False when the
    line goes on after the key (a line feed inside a paste, ``^D``, ``^X``). ``prefix`` is text the
    remote line may still hold from before a ``^C`` or a refusal: it runs in front of ``text``.
    ``overlong``: the line grew past :data:`LINE_MAX`; ``text`` is only its start.
    """

    text: str
    opaque: bool = False
    key: bytes = b"\r"
    final: bool = True
    prefix: str = ""
    overlong: bool = False


class LineEditor:
    """The model of one interactive command line, fed the client's input bytes."""

    def __init__(self) -> None:
        self._buf = array("I")  # code points: 4 bytes a character, at most LINE_MAX of them
        self._cur = 0
        self._opaque = False
        self._long = False  # the line grew past LINE_MAX
        self._esc = ""  # an escape sequence in progress
        self._paste = False
        self._prefix = ""
        self._prefix_opaque = False
        self._prefix_long = False
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        #: The remote side has turned bracketed paste on (``ESC[?2004h`` in its output).
        self.bracketed = False

    @property
    def text(self) -> str:
        return self._buf.tobytes().decode(_UTF32)

    @property
    def overlong(self) -> bool:
        """The line being typed grew past :data:`LINE_MAX` (its keys need not be forwarded)."""
        return self._long

    def reset(self) -> None:
        """The remote line is empty (after an allowed Enter)."""
        self._buf, self._cur, self._opaque, self._long, self._esc, self._paste = array("I"), 0, False, False, "", False
        self.settled()

    def settled(self) -> None:
        """The remote side started a fresh line: text before a ^C or a refusal is gone."""
        self._prefix, self._prefix_opaque, self._prefix_long = "", False, False

    def refused(self, line: Line) -> None:
        """``line`` was refused and :data:`LINE_KILL` sent; keep its text as a prefix until settled."""
        self.reset()
        self._keep(line.prefix + line.text, line.opaque, line.overlong)

    def _keep(self, text: str, opaque: bool, long: bool) -> None:
        """Add ``text`` to the prefix (what the remote line may still hold), up to LINE_MAX."""
        prefix = self._prefix + text
        self._prefix = prefix[:LINE_MAX]
        self._prefix_opaque = self._prefix_opaque or opaque
        self._prefix_long = self._prefix_long or long or len(prefix) > LINE_MAX

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
        line = Line(self.text, self._opaque or self._prefix_opaque, bytes([byte]), final, self._prefix,
                    self._long or self._prefix_long)
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
            while start and self._buf[start - 1] in _BLANKS:
                start -= 1
            while start and self._buf[start - 1] not in _BLANKS:
                start -= 1
            del self._buf[start:self._cur]
            self._cur = start
        elif ch == "\x03":  # ^C abandons the line, unless the terminal does not interrupt (stty -isig)
            self._keep(self.text, self._opaque, self._long)
            self._buf, self._cur, self._opaque, self._long = array("I"), 0, False, False
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
        if len(self._buf) >= LINE_MAX:
            self._long = self._opaque = True  # not followed further: the proxy refuses the line
            return
        self._buf.insert(self._cur, ord(ch))
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
