"""Text that came from users, made safe to print on a terminal: the one escaping hoop's output shares.

What users typed (SQL, commands, paths, bodies, reasons, names) and what another party said (an API's
error message, a stored close reason) must not steer the reader's terminal. C0 and C1 controls (ESC,
CR, the 8-bit CSI) and bidi controls (embeddings, overrides, isolates and marks, which reorder what is
shown) are printed as escapes (``\\x1b``, ``\\u202e``), never sent. Line feeds and tabs are kept,
except in :func:`one_line`. ``--json`` output is the exact data instead; :func:`json_visible` keeps it
valid JSON that decodes to the same data.
"""

from __future__ import annotations

import re

__all__ = ["json_visible", "one_line", "visible"]

_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _escape(m: re.Match[str]) -> str:
    code = ord(m.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def visible(text: str) -> str:
    """``text`` with its control and bidi characters as escapes (CR LF read as a line feed)."""
    return _UNSAFE.sub(_escape, text.replace("\r\n", "\n"))


def one_line(text: str) -> str:
    """``text`` as one line, for an error message on stderr: :func:`visible`, its lines joined with "; "."""
    return "; ".join(line.strip() for line in visible(text).replace("\t", " ").split("\n") if line.strip())


def json_visible(encoded: str) -> str:
    """JSON text (from ``json.dumps(..., ensure_ascii=False)``) with the characters :func:`visible`
    escapes written as JSON ``\\u`` escapes: still valid JSON, decoding to the same data, but safe to
    print. (JSON escapes C0 controls itself; DEL, C1 and bidi controls it leaves raw.)"""
    return _UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", encoded)
