"""Framing of a typed PostgreSQL v3 message stream. No I/O.

How this works. After the start-up packet (see :mod:`proxy.pg.startup`) every message is
*typed*: a type byte, an int32 length that counts itself, then the body.

:class:`Framer` splits a byte stream into typed messages. ``feed(chunk)`` returns the buffer
it worked on and a list of frames ``(type, start, end)``: the message occupies
``buf[start:end]`` and its body is ``buf[start + 5:end]``. Frames are contiguous, so the glue
forwards a run of messages it does not need to look at as ONE slice ``buf[a:b]``, and
decodes (with :mod:`proxy.pg.messages`) only the few it cares about. An incomplete message is
kept as a tail and completed by later chunks; chunks are joined only when enough bytes for
the pending message are held, so a large DataRow costs O(size), not O(size²).

With ``coalesce_rows`` (the server side of the relay), a run of consecutive DataRows is ONE
frame ``(rows_frame(n), start, end)``: its type is ``-1 - n`` (so ``<= -2``), and the
lengths of the run were walked in one tight loop without a tuple per row.

Messages whose type is in ``Framer.stream_types`` (e.g. CopyData, or DataRow when no column
needs masking) need not be buffered whole: once such a message is known to be incomplete
and no whole frame came out of the same ``feed``, its bytes are passed on as frames of type
:data:`RAW`, which the glue forwards verbatim.
"""

from __future__ import annotations

import struct
from typing import Final

from proxy.pg.primitives import I32, Buf, MessageTooLong

try:
    from proxy.pg import _wire
except ImportError:  # not built: the pure-Python twins run
    _wire = None  # type: ignore[assignment]

HEADER: Final = struct.Struct("!Bi")
HEADER_SIZE: Final = 5

#: frame type of pass-through bytes of a streamed message (see :class:`Framer`)
RAW: Final = -1

CLIENT_MAX_MESSAGE: Final = 64 * 1024 * 1024
SERVER_MAX_MESSAGE: Final = 1024 * 1024 * 1024
STREAM_THRESHOLD: Final = 64 * 1024

Frame = tuple[int, int, int]


def rows_frame(count: int) -> int:
    """The frame type of a run of ``count`` DataRows (see :class:`Framer` ``coalesce_rows``)."""
    return -1 - count


def split(buf: Buf, pos: int, max_length: int, out: list[Frame], coalesce_rows: bool = False) -> tuple[int, int]:
    """Append the complete messages of ``buf[pos:]`` to ``out`` as ``(type, start, end)``.

    Returns ``(consumed, need)``: the offset of the first byte not consumed, and how many
    bytes the message starting there occupies once whole (5 while its header is incomplete).
    With ``coalesce_rows``, consecutive DataRows become ONE frame of type ``rows_frame(n)``.
    Runs in C (:mod:`proxy.pg._wire`) when it is built; :func:`py_split` is its twin.
    """
    if _wire is None:
        return py_split(buf, pos, max_length, out, coalesce_rows)
    consumed, need, bad = _wire.split(buf, pos, max_length, out, coalesce_rows)
    if bad >= 0:
        raise MessageTooLong(f"invalid message length {need} for type {chr(bad)!r}", length=need, msg_type=bad)
    return consumed, need


def py_split(buf: Buf, pos: int, max_length: int, out: list[Frame], coalesce_rows: bool = False) -> tuple[int, int]:
    """The pure-Python :func:`split`."""
    end = len(buf)
    unpack = HEADER.unpack_from
    length_at = I32.unpack_from
    append = out.append
    while end - pos >= HEADER_SIZE:
        msg_type, length = unpack(buf, pos)
        if length < 4 or length > max_length:
            raise MessageTooLong(f"invalid message length {length} for type {chr(msg_type)!r}", length=length,
                                 msg_type=msg_type)
        stop = pos + 1 + length
        if stop > end:
            return pos, 1 + length
        if msg_type == 0x44 and coalesce_rows:  # DataRow: walk the run's lengths, one frame
            start = pos
            count = 1
            pos = stop
            while end - pos >= HEADER_SIZE and buf[pos] == 0x44:
                (length,) = length_at(buf, pos + 1)
                if length < 4 or length > max_length:
                    raise MessageTooLong(f"invalid message length {length} for type 'D'", length=length, msg_type=0x44)
                stop = pos + 1 + length
                if stop > end:
                    break
                count += 1
                pos = stop
            append((-1 - count, start, pos))
            continue
        append((msg_type, pos, stop))
        pos = stop
    return pos, HEADER_SIZE


class Framer:
    """Incremental splitter of a typed message stream; see the module docstring.

    ``max_length`` (counting the length field, as on the wire) and ``stream_types`` are plain
    attributes: the glue may change them between feeds (e.g. 64 KiB during authentication).
    """

    __slots__ = ("_held", "_need", "_skip", "_tail", "coalesce_rows", "max_length", "stream_threshold", "stream_types")

    def __init__(
        self,
        max_length: int = CLIENT_MAX_MESSAGE,
        *,
        stream_types: frozenset[int] = frozenset(),
        stream_threshold: int = STREAM_THRESHOLD,
        coalesce_rows: bool = False,
    ) -> None:
        self.max_length = max_length
        self.coalesce_rows = coalesce_rows
        self.stream_types = stream_types
        self.stream_threshold = stream_threshold
        self._tail: list[bytes] = []
        self._held = 0
        self._need = HEADER_SIZE
        self._skip = 0  # bytes of a streamed message still to pass through

    @property
    def pending(self) -> int:
        """Bytes held back waiting for the rest of a message."""
        return self._held

    @property
    def idle(self) -> bool:
        """No message is half-way: the next chunk starts at a message boundary."""
        return not self._held and not self._skip

    def feed(self, data: bytes) -> tuple[bytes, list[Frame]]:
        """Split ``data`` (after any held tail); frames index into the returned buffer."""
        frames: list[Frame] = []
        pos = 0
        if self._skip:
            pos = min(self._skip, len(data))
            self._skip -= pos
            if pos:
                frames.append((RAW, 0, pos))
            buf = data
        elif self._tail:
            self._tail.append(data)
            self._held += len(data)
            if self._held < self._need:
                return self._stream_tail()
            buf = b"".join(self._tail)
            self._tail, self._held = [], 0
        else:
            buf = data
        consumed, need = split(buf, pos, self.max_length, frames, self.coalesce_rows)
        rest = len(buf) - consumed
        if rest:
            # Stream only when no whole message came out of this feed: the glue may change
            # stream_types after acting on those messages (a RowDescription, say).
            if (not frames or frames[-1][0] == RAW) and self._streamable(buf[consumed], rest, need):
                self._skip = need - rest
                frames.append((RAW, consumed, len(buf)))
            else:
                self._tail, self._held, self._need = [buf[consumed:]], rest, need
        return buf, frames

    def _streamable(self, msg_type: int, held: int, need: int) -> bool:
        return held >= HEADER_SIZE and need >= self.stream_threshold and msg_type in self.stream_types

    def _stream_tail(self) -> tuple[bytes, list[Frame]]:
        """Pass the held part of an incomplete streamable message through as RAW."""
        if not self._streamable(self._tail[0][0], self._held, self._need):
            return b"", []
        buf = b"".join(self._tail)
        self._skip = self._need - self._held
        self._tail, self._held, self._need = [], 0, HEADER_SIZE
        return buf, [(RAW, 0, len(buf))]
