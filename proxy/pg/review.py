"""What a review of one execution shows: the statement and the values bound to it.

The text goes to Slack and into the recording, so every value is masked by the resource's
masker here, before it leaves. Text-format values are decoded (the session's
``client_encoding`` is pinned to UTF-8); binary ones are shown as a placeholder with their
size, since their type is the server's to know. A value is masked over its first
:data:`SCAN` characters, then clipped to :data:`SHOW`: a detector match cut by the first clip
lies past the second, so no piece of a masked value is shown.
"""

from __future__ import annotations

from collections.abc import Sequence

from proxy.mask import Masker

__all__ = ["SCAN", "SHOW", "parameters"]

SCAN = 4096
SHOW = 200
MAX_SHOWN = 20  # parameters listed; the rest are counted


def _value(masker: Masker | None, fmt: int, value: bytes | None) -> str:
    if value is None:
        return "NULL"
    if fmt != 0:
        return f"[binary, {len(value)} bytes]"
    text = value[: SCAN * 4].decode("utf-8", "replace")[:SCAN]
    if masker is not None:
        text = masker.mask_text(text)
    shown = text[:SHOW]
    # a control character (a newline) must not start a line of its own in the review
    quoted = "'" + "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in shown).replace("'", "''") + "'"
    if len(shown) < len(text) or len(value) > SCAN * 4:
        quoted += f"… ({len(value)} bytes)"
    return quoted


def parameters(masker: Masker | None, formats: Sequence[int], values: Sequence[bytes | None]) -> str:
    """The review's line of bound parameters (``""`` when there are none), masked and clipped."""
    if not values:
        return ""
    shown = []
    for n, value in enumerate(values[:MAX_SHOWN], 1):
        fmt = formats[0] if len(formats) == 1 else formats[n - 1] if len(formats) >= n else 0
        shown.append(f"${n} = {_value(masker, fmt, value)}")
    more = f", … and {len(values) - MAX_SHOWN} more" if len(values) > MAX_SHOWN else ""
    return "\n-- parameters: " + ", ".join(shown) + more
