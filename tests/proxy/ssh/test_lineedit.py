"""Reconstructing typed lines from keystrokes (bytes in, lines out)."""

from __future__ import annotations

import pytest

from proxy.ssh.lineedit import Line, LineEditor


def typed(*chunks: bytes, bracketed: bool = False, every: bool = False) -> list[Line]:
    """The lines decided at Enter (``every``: also those decided inside a paste, at ^D, ^X)."""
    ed, lines = LineEditor(), []
    ed.bracketed = bracketed
    for chunk in chunks:
        data = chunk
        while data:
            _, line, data = ed.feed(data)
            if line is None:
                break
            if line.final or every:
                lines.append(line)
    return lines


@pytest.mark.parametrize(("keys", "text", "opaque"), [
    (b"ls -l\r", "ls -l", False),
    (b"rm -rf /tmpx\x7f\r", "rm -rf /tmp", False),
    (b"rm -rf /tmpx\x08\r", "rm -rf /tmp", False),
    (b"garbage\x15echo ok\r", "echo ok", False),
    (b"echo one two\x17three\r", "echo one three", False),
    (b"echo a  \x17\r", "echo ", False),
    (b"sutdown" + b"\x1b[D" * 6 + b"h\r", "shutdown", False),
    (b"down\x01shut\r", "shutdown", False),
    (b"shutX\x02\x1b[3~down\r", "shutdown", False),
    (b"echo hi\x01\x0b\r", "", False),
    (b"ab\x1bOD\x1bOC\x1b[Hx\x1b[Fy\r", "xaby", False),
    ("echo h\u00e9llo\r".encode(), "echo h\u00e9llo", False),
    (b"rm -rf /t\t\r", "rm -rf /t", True),
    (b"\x1b[A\r", "", True),
    (b"\x12shut\r", "shut", True),
    (b"echo \x1bb\r", "echo ", True),
])
def test_lines(keys: bytes, text: str, opaque: bool) -> None:
    assert [(x.text, x.opaque) for x in typed(keys)] == [(text, opaque)]


def test_every_split_point_gives_the_same_line() -> None:
    keys = ("sutdown" + "\x1b[D" * 6 + "h\x05 \u00e9\x7f\r").encode()
    for i in range(len(keys) + 1):
        assert typed(keys[:i], keys[i:]) == [Line("shutdown ", False)], i


def test_feed_stops_at_enter_and_returns_the_rest() -> None:
    ed = LineEditor()
    send, line, rest = ed.feed(b"echo 1\r\necho 2\r")
    assert (send, line, rest) == (b"echo 1", Line("echo 1", key=b"\r"), b"echo 2\r")
    send, line, rest = ed.feed(rest)
    assert (send, line, rest) == (b"echo 2", Line("echo 2"), b"")
    assert ed.feed(b"partial") == (b"partial", None, b"")
    assert ed.text == "partial"


def test_opaque_is_cleared_by_enter_and_by_ctrl_c_once_settled() -> None:
    assert typed(b"x\t\rls\r", b"\tls\r", b"pwd\r") == [Line("x", True), Line("ls"), Line("ls", True), Line("pwd")]
    ed = LineEditor()
    assert ed.feed(b"x\t\x03ls\r")[1] == Line("ls", True, prefix="x")  # the remote may still hold "x<Tab>"
    ed.feed(b"x\t\x03")
    ed.settled()  # the output showed a fresh line: ^C did clear the remote line
    assert ed.feed(b"ls\r")[1] == Line("ls")


# -- keys that make the remote side run the line (review H2) ------------------------------------
@pytest.mark.parametrize(("keys", "line"), [
    # bash's ^O (operate-and-get-next) runs the line: it is decided like Enter, and the key is held
    (b"reboot\x0f", Line("reboot", key=b"\x0f")),
    (b"reboot\n", Line("reboot", key=b"\n")),  # ^J
    # ^X prefixes edit-and-execute (^X^E): the line is opaque, so on_unparsed decides it at ^X
    (b"reboot\x18", Line("reboot", True, b"\x18", final=False)),
    # ^D on a non-empty line ends a canonical terminal's read: the line goes to the remote now
    (b"reboot\x04", Line("reboot", False, b"\x04", final=False)),
    # an escape sequence cut short by Enter: a canonical terminal still ends the line there
    (b"reboot #\x1b[\r", Line("reboot #", True)),
    (b"reboot #\x1b[1\r", Line("reboot #", True)),
    (b"reboot #\x1b\r", Line("reboot #", True)),
    # paste markers the remote did not ask for are unknown keys; the CR inside is an Enter
    (b"\x1b[200~\rreboot\r", Line("", True)),
])
def test_keys_that_run_the_line_are_decided_first(keys: bytes, line: Line) -> None:
    send, got, _ = LineEditor().feed(keys)
    assert got == line
    assert line.key not in send


def test_ctrl_d_on_an_empty_line_is_an_ordinary_key() -> None:
    assert LineEditor().feed(b"\x04") == (b"\x04", None, b"")


def test_after_ctrl_o_and_ctrl_d_the_line_is_opaque() -> None:
    assert typed(b"ls\x0fx\r", every=True) == [Line("ls", key=b"\x0f"), Line("x", True)]
    assert typed(b"ls\x04\x15reboot\r", every=True) == [Line("ls", key=b"\x04", final=False),
                                                         Line("reboot", True)]


def test_paste_is_followed_only_when_the_remote_turned_it_on() -> None:
    keys = b"\x1b[200~echo a\necho b\x1b[201~\r"
    assert typed(keys, bracketed=True) == [Line("echo a\necho b")]
    # every line feed inside the paste is still decided before it is sent
    assert typed(keys, bracketed=True, every=True)[0] == Line("echo a", key=b"\n", final=False)
    assert typed(keys) == [Line("echo a", True, key=b"\n"), Line("echo b", True)]


def test_a_refused_line_stays_a_prefix_until_the_remote_shows_a_fresh_line() -> None:
    ed = LineEditor()
    refused = ed.feed(b"reboot #\r")[1]
    assert refused is not None
    ed.refused(refused)  # the kill keys may be remapped (stty kill, bind): the remote may hold it
    assert ed.feed(b"\r")[1] == Line("", prefix="reboot #")
    ed.refused(Line("", prefix="reboot #"))
    ed.settled()
    assert ed.feed(b"ls\r")[1] == Line("ls")


def test_ctrl_c_keeps_the_text_for_a_terminal_that_does_not_interrupt() -> None:
    # stty -isig: ^C is an ordinary character, the remote line still holds "reboot #"
    assert typed(b"reboot #\x03\r") == [Line("", prefix="reboot #")]
