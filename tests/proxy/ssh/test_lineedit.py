"""Reconstructing typed lines from keystrokes (bytes in, lines out)."""

from __future__ import annotations

import pytest

from proxy.ssh.lineedit import Line, LineEditor


def typed(*chunks: bytes) -> list[Line]:
    ed, lines = LineEditor(), []
    for chunk in chunks:
        data = chunk
        while data:
            _, line, data = ed.feed(data)
            if line is None:
                break
            lines.append(line)
    return lines


@pytest.mark.parametrize(("keys", "text", "opaque"), [
    (b"ls -l\r", "ls -l", False),
    (b"rm -rf /tmpx\x7f\r", "rm -rf /tmp", False),
    (b"rm -rf /tmpx\x08\r", "rm -rf /tmp", False),
    (b"garbage\x15echo ok\r", "echo ok", False),
    (b"echo one two\x17three\r", "echo one three", False),
    (b"echo a  \x17\r", "echo ", False),
    (b"shutdown\x03echo safe\r", "echo safe", False),
    (b"sutdown" + b"\x1b[D" * 6 + b"h\r", "shutdown", False),
    (b"down\x01shut\r", "shutdown", False),
    (b"shutX\x02\x1b[3~down\r", "shutdown", False),
    (b"echo hi\x01\x0b\r", "", False),
    (b"ab\x1bOD\x1bOC\x1b[Hx\x1b[Fy\r", "xaby", False),
    (b"\x1b[200~echo a\necho b\x1b[201~\r", "echo a\necho b", False),
    ("echo h\u00e9llo\r".encode(), "echo h\u00e9llo", False),
    (b"rm -rf /t\t\r", "rm -rf /t", True),
    (b"\x1b[A\r", "", True),
    (b"\x12shut\r", "shut", True),
    (b"echo \x1bb\r", "echo ", True),
])
def test_lines(keys: bytes, text: str, opaque: bool) -> None:
    assert typed(keys) == [Line(text, opaque)]


def test_every_split_point_gives_the_same_line() -> None:
    keys = ("sutdown" + "\x1b[D" * 6 + "h\x05 \u00e9\x7f\r").encode()
    for i in range(len(keys) + 1):
        assert typed(keys[:i], keys[i:]) == [Line("shutdown ", False)], i


def test_feed_stops_at_enter_and_returns_the_rest() -> None:
    ed = LineEditor()
    send, line, rest = ed.feed(b"echo 1\r\necho 2\r")
    assert (send, line, rest) == (b"echo 1", Line("echo 1"), b"echo 2\r")
    send, line, rest = ed.feed(rest)
    assert (send, line, rest) == (b"echo 2", Line("echo 2"), b"")
    assert ed.feed(b"partial") == (b"partial", None, b"")
    assert ed.text == "partial"


def test_opaque_is_cleared_by_ctrl_c_and_by_enter() -> None:
    assert typed(b"x\t\x03ls\r", b"\tls\r", b"pwd\r") == [Line("ls"), Line("ls", True), Line("pwd")]
