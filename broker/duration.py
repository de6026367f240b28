"""Human durations: ``30m``, ``2h``, ``1h30m``, ``45s``, ``1d``."""

from __future__ import annotations

import re
from datetime import timedelta

from broker.errors import InvalidInput

_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
_PART = re.compile(r"(\d+)([a-zA-Z]+)")
_WHOLE = re.compile(r"(?:\d+[a-zA-Z]+)+")


def parse_duration(text: str) -> timedelta:
    """Parse ``1h30m`` style text. Raises :class:`InvalidInput` on anything else, or zero."""
    raw = text.strip().lower()
    if raw.startswith("-"):
        raise InvalidInput(f"duration {text!r} is negative; use e.g. 30m, 2h, 1h30m, 45s, 1d")
    if not raw or not _WHOLE.fullmatch(raw):
        raise InvalidInput(f"duration {text!r} is not understood; use e.g. 30m, 2h, 1h30m, 45s, 1d")
    seconds = 0
    for number, unit in _PART.findall(raw):
        if unit not in _UNITS:
            raise InvalidInput(f"duration {text!r} has an unknown unit {unit!r}; units are d, h, m, s")
        seconds += int(number) * _UNITS[unit]
    if seconds <= 0:
        raise InvalidInput(f"duration {text!r} is zero; ask for a positive duration")
    if seconds > 366 * 86400:
        raise InvalidInput(f"duration {text!r} is longer than a year")
    return timedelta(seconds=seconds)


def format_duration(value: timedelta) -> str:
    """Inverse of :func:`parse_duration` for display: ``timedelta(minutes=90)`` -> ``1h30m``."""
    seconds = int(value.total_seconds())
    if seconds <= 0:
        return "0s"
    out = []
    for unit, size in _UNITS.items():
        if seconds >= size:
            out.append(f"{seconds // size}{unit}")
            seconds %= size
    return "".join(out)
