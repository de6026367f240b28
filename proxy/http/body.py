"""Body transforms of the HTTP proxy, chunk by chunk in constant memory (no I/O).

How this works. :func:`response_filter` picks what a response body goes through from its
``Content-Type``: JSON (``application/json`` or any ``+json``, JSON lines included) through
:class:`proxy.jsonmask.JsonStreamMasker` (key rules and detectors), ``text/*`` (and XML,
JavaScript, form data) through :class:`proxy.mask.StreamMasker` (detectors); every other type
(images, archives, ``application/octet-stream``, protobuf) passes through untouched, because
masking cannot tell text from data in it. A body in ``gzip`` or ``deflate`` that would be masked
is decoded first by :class:`Inflate` (the proxy asks for ``identity``, but an upstream may not
listen); another encoding (``br``, ``zstd``) of a maskable type cannot be masked and is refused
by the proxy (fail closed). :class:`Capture` keeps the first ``limit`` bytes of a body for the
recording.
"""

from __future__ import annotations

import functools
import zlib
from typing import Protocol

from proxy.jsonmask import JsonStreamMasker
from proxy.mask import Masker

__all__ = ["BodyFilter", "Capture", "Inflate", "body_kind", "response_filter"]

_TEXT_TYPES = frozenset({
    "application/xml", "application/javascript", "application/x-www-form-urlencoded", "application/yaml",
    "application/x-yaml", "application/x-ndjson", "application/jsonl", "application/graphql",
})
_INFLATE_STEP = 256 * 1024


class BodyFilter(Protocol):
    """Rewrites a body: ``feed`` returns what may be sent now, ``flush`` the rest at the end."""

    def feed(self, chunk: bytes) -> bytes: ...

    def flush(self) -> bytes: ...


@functools.lru_cache(maxsize=256)
def body_kind(content_type: str | None) -> str | None:
    """``"json"``, ``"text"`` or None (pass through) for a ``Content-Type`` header value (kept: an
    upstream repeats a few)."""
    if not content_type:
        return None
    mime = content_type.split(";", 1)[0].strip().lower()
    if mime == "application/json" or mime.endswith("+json") or mime in ("application/x-ndjson", "application/jsonl"):
        return "json"
    if mime.startswith("text/") or mime in _TEXT_TYPES or mime.endswith("+xml"):
        return "text"
    return None


def response_filter(masker: Masker, content_type: str | None) -> BodyFilter | None:
    """The masking filter for a body of this type, or None when it passes through unchanged."""
    if not masker.enabled:
        return None
    kind = body_kind(content_type)
    if kind == "json":
        return JsonStreamMasker(masker)
    if kind == "text":
        return masker.stream()
    return None


class Inflate:
    """Streaming ``gzip``/``deflate`` decoder; each output piece is at most 256 KiB (no bombs)."""

    def __init__(self, encoding: str) -> None:
        # 47 = 32 + 15: zlib or gzip header, detected; -15: raw deflate (some servers send it)
        self._d = zlib.decompressobj(47 if encoding in ("gzip", "x-gzip", "deflate") else -15)
        self._raw_fallback = encoding == "deflate"
        self._started = False

    @staticmethod
    def supports(encoding: str) -> bool:
        return encoding in ("gzip", "x-gzip", "deflate")

    def feed(self, chunk: bytes) -> list[bytes]:
        """Decoded pieces of ``chunk``; raises ``zlib.error`` on a corrupt stream."""
        if not self._started and self._raw_fallback and chunk:
            self._started = True
            if chunk[0] & 0x0F != 8:  # no zlib header: raw deflate
                self._d = zlib.decompressobj(-15)
        self._started = True
        out: list[bytes] = []
        data = chunk
        while data:
            piece = self._d.decompress(data, _INFLATE_STEP)
            if piece:
                out.append(piece)
            data = self._d.unconsumed_tail
        return out

    def flush(self) -> bytes:
        return self._d.flush()


class Capture:
    """The first ``limit`` bytes of a body, and the total size."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self._parts: list[bytes] = []
        self._kept = 0

    def feed(self, chunk: bytes) -> None:
        self.size += len(chunk)
        room = self.limit - self._kept
        if room > 0 and chunk:
            part = chunk[:room]
            self._parts.append(part)
            self._kept += len(part)

    @property
    def truncated(self) -> bool:
        return self.size > self._kept

    def data(self) -> bytes:
        return b"".join(self._parts)
