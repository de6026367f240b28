"""Session events as JSON lines: the one form the proxies' spools and the store's recordings share.

One event is one line, ``{"seq":N,"at":"<ISO 8601 with µs and offset>","kind":"<kind>","data":{…}}``
and a newline. A proxy encodes each event once (:func:`line`); the same text goes to the
session's crash spool and, a flush later, into the store as part of a chunk (the
``session_event_chunks`` table: one row holds a run of one session's events). Storing chunks
instead of a row per event is what keeps recording off the PostgreSQL proxy's critical path: a
row per statement cost 3-6 µs of proxy CPU per statement (bench/pg_proxy.py); a chunk of ~64 KiB
holds a few hundred statements.

A chunk of at least :data:`PACK_MIN` characters is stored packed (:func:`pack`: zlib, level 1,
of its UTF-8 text). Recordings are the largest thing hoop stores, and their lines repeat
themselves (the same statements, the same JSON keys, often the same response bodies): packing
shrinks them 5-60 times, and it costs less CPU than writing the text it saves (an HTTP event
with a 1.4 KB body: 1.7 µs to pack against 4 µs to store it unpacked; zlib's fixed ~40 µs per
call is why small chunks stay text).
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import orjson

from broker.model import SessionEvent

__all__ = ["PACK_MIN", "decode", "encode_data", "join", "line", "pack", "parse", "unpack"]

#: chunks at least this long (in characters) are stored packed
PACK_MIN = 4096

_JSON_ENCODE = json.JSONEncoder(separators=(",", ":"), default=str).encode


def encode_data(value: Any) -> str:
    """Compact JSON: orjson (several times faster on the recording hot path), with the standard
    encoder as the fallback for what orjson refuses (lone surrogates from undecodable bytes)."""
    try:
        return orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
    except (TypeError, orjson.JSONEncodeError):
        return _JSON_ENCODE(value)


def line(seq: int, iso: str, kind: str, data_json: str) -> str:
    """One event's line; ``iso`` is its time from ``isoformat``, ``data_json`` its data encoded."""
    if kind.isidentifier():
        return f'{{"seq":{seq},"at":"{iso}","kind":"{kind}","data":{data_json}}}\n'
    return f'{{"seq":{seq},"at":"{iso}","kind":{encode_data(kind)},"data":{data_json}}}\n'


def parse(text: str) -> tuple[int, datetime, str, dict[str, Any]] | None:
    """(seq, time in UTC, kind, data) of one line; None for a torn or foreign line."""
    try:
        try:
            item = orjson.loads(text)
        except orjson.JSONDecodeError:  # orjson refuses lone surrogates, which encode_data may write
            item = json.loads(text)
        at = datetime.fromisoformat(item["at"])
        seq, kind, data = item["seq"], item["kind"], item["data"]
    except (KeyError, TypeError, ValueError):  # (JSONDecodeError is a ValueError)
        return None
    if type(seq) is not int or not isinstance(kind, str) or not isinstance(data, dict):
        return None
    return seq, (at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)), kind, data


def decode(session_id: str, text: str) -> list[SessionEvent]:
    """The events of a chunk (or a spool segment), skipping lines that do not parse."""
    out = []
    for raw in text.split("\n"):  # (not splitlines: U+2028 and friends may be in the JSON)
        got = parse(raw)
        if got is not None:
            out.append(SessionEvent(session_id=session_id, seq=got[0], at=got[1], kind=got[2], data=got[3]))
    return out


def join(events: Iterable[SessionEvent]) -> str:
    """Events as the lines of one chunk."""
    return "".join(line(e.seq, e.at.isoformat(timespec="microseconds"), e.kind, encode_data(e.data))
                   for e in events)


def pack(text: str) -> bytes:
    """A chunk's lines as the store keeps them packed: zlib (RFC 1950), level 1, of the UTF-8 text
    (``surrogatepass``: a lone surrogate, should one ever reach a line, is kept, not refused)."""
    return zlib.compress(text.encode("utf-8", "surrogatepass"), 1)


def unpack(data: bytes) -> str:
    """The lines of a packed chunk; raises ``zlib.error`` or ``UnicodeDecodeError`` when it is damaged."""
    return zlib.decompress(data).decode("utf-8", "surrogatepass")
