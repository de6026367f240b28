"""Body transforms of the HTTP proxy, chunk by chunk in constant memory (no I/O).

How this works. :func:`response_filter` picks what a response body goes through from its
``Content-Type``: JSON (``application/json`` or any ``+json``, JSON lines included) through
:class:`proxy.jsonmask.JsonStreamMasker` (key rules and detectors), ``text/*`` (and XML, JavaScript,
form data) through :class:`proxy.mask.StreamMasker` (detectors). The client steers the type with
``Accept``, so a body of another type, or of none, is not trusted to be data: :func:`sniff_kind`
looks at its first bytes, and one that reads as UTF-8 text is masked as text (as JSON when it opens
like JSON); one with bytes that text does not have (NUL and other controls, invalid UTF-8: images,
archives, protobuf) passes through untouched. A body in ``gzip`` or ``deflate`` that would be masked
is decoded first by :class:`Inflate` (the proxy asks for ``identity``, but an upstream may not
listen); another encoding (``br``, ``zstd``) of a maskable type cannot be masked and is refused by
the proxy (fail closed); :class:`Inflate` yields its output in pieces of at most 256 KiB, so a small
compressed body never sits inflated in memory at once. :class:`Capture` keeps the first ``limit``
bytes of a body for the recording. :class:`Secrets` knows the resource's held credential in the
forms it travels in: the answer is searched for them whatever its type (:class:`SecretStream` holds
back a chunk's tail only while it could be the start of one), replaced by ``[credential]`` in
headers and in bodies that are masked, and refused in bodies that pass through (fail closed).
"""

from __future__ import annotations

import functools
import re
import zlib
from collections.abc import Iterable, Iterator
from typing import Protocol
from urllib.parse import unquote_to_bytes

from proxy.jsonmask import JsonStreamMasker
from proxy.mask import Masker

__all__ = ["BodyFilter", "Capture", "Inflate", "SecretStream", "Secrets", "body_filter", "body_kind", "form_decoded",
           "response_filter", "sniff_kind"]

_TEXT_TYPES = frozenset({
    "application/xml", "application/javascript", "application/x-www-form-urlencoded", "application/yaml",
    "application/x-yaml", "application/x-ndjson", "application/jsonl", "application/graphql",
})
_INFLATE_STEP = 256 * 1024
_SNIFF = 1024  # bytes of a body of unknown type looked at to tell text from data
# bytes that text does not hold (the WHATWG MIME sniffing "binary data bytes")
_BINARY = re.compile(rb"[\x00-\x08\x0b\x0e-\x1a\x1c-\x1f]")
# the start of a JSON document: an object or array opened with what may follow its bracket (a text line
# that begins with "[INFO]" is text), or an XSSI guard
_JSON_START = re.compile(rb"(?:\xef\xbb\xbf)?[ \t\r\n]*(?:\{[ \t\r\n]*[\"}]|\[[ \t\r\n]*[\[{\"\]0-9tfn-]|\)\]\}')")


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
    """The masking filter for a body of this type, or None when it passes through unchanged (or its
    first bytes must decide: :func:`sniff_kind`)."""
    if not masker.enabled:
        return None
    return body_filter(masker, body_kind(content_type))


def body_filter(masker: Masker, kind: str | None) -> BodyFilter | None:
    """The masking filter for a body of ``kind`` (``"json"``, ``"text"``; None: no filter)."""
    if kind == "json":
        return JsonStreamMasker(masker)
    if kind == "text":
        return masker.stream()
    return None


def sniff_kind(data: bytes) -> str | None:
    """What a body of unknown or missing type is, from its first bytes: ``"json"`` when it opens like a
    JSON document, ``"text"`` when it is UTF-8 text, None for data (a byte that text does not hold, or
    invalid UTF-8 before the cut)."""
    head = data[:_SNIFF]
    if not head or _BINARY.search(head):
        return None
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.end < len(head) or len(head) - exc.start > 3:  # invalid, not merely cut at the end
            return None
    return "json" if _JSON_START.match(head) else "text"


def form_decoded(data: bytes) -> bytes:
    """A ``application/x-www-form-urlencoded`` body (or a query) decoded for the detectors: ``+`` is a
    space, ``%XX`` its byte; ``alice%40example.com`` is an email only once decoded."""
    return unquote_to_bytes(data.replace(b"+", b" ")) if b"%" in data or b"+" in data else data


class Inflate:
    """Streaming ``gzip``/``deflate`` decoder: output comes in pieces of at most 256 KiB, one at a time, so
    a chunk that inflates a thousandfold is never held whole (the caller sends each piece before the next
    is decoded)."""

    def __init__(self, encoding: str) -> None:
        # 47 = 32 + 15: zlib or gzip header, detected; -15: raw deflate (some servers send it)
        self._d = zlib.decompressobj(47 if encoding in ("gzip", "x-gzip", "deflate") else -15)
        self._raw_fallback = encoding == "deflate"
        self._started = False

    @staticmethod
    def supports(encoding: str) -> bool:
        return encoding in ("gzip", "x-gzip", "deflate")

    def feed(self, chunk: bytes) -> Iterator[bytes]:
        """Decoded pieces of ``chunk``, each decoded only when the previous one was taken; raises
        ``zlib.error`` on a corrupt stream."""
        if not self._started and self._raw_fallback and chunk:
            self._started = True
            if chunk[0] & 0x0F != 8:  # no zlib header: raw deflate
                self._d = zlib.decompressobj(-15)
        self._started = True
        data = chunk
        while True:
            piece = self._d.decompress(data, _INFLATE_STEP)
            if piece:
                yield piece
            data = self._d.unconsumed_tail
            # a full piece may leave output pending inside zlib even when all input was taken
            if not data and len(piece) < _INFLATE_STEP:
                return

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


_MARK = "[credential]"


class Secrets:
    """The held upstream credential in each form it is sent in (longest first), for the answer's side."""

    def __init__(self, forms: Iterable[str]) -> None:
        self.text = tuple(sorted({f for f in forms if f}, key=len, reverse=True))
        self.raw = tuple(f.encode() for f in self.text)

    def scrub_text(self, value: str) -> str:
        """``value`` with every form replaced by ``[credential]``."""
        for form in self.text:
            if form in value:
                value = value.replace(form, _MARK)
        return value

    def scrub(self, data: bytes) -> bytes:
        for form in self.raw:
            if form in data:
                data = data.replace(form, _MARK.encode())
        return data

    def found(self, data: bytes) -> bool:
        return any(form in data for form in self.raw)

    def stream(self) -> SecretStream:
        return SecretStream(self)


class SecretStream:
    """:meth:`Secrets.scrub` across chunks: a chunk's tail that may be the start of a form is held back
    until the next chunk (or :meth:`flush`) shows whether it is; ``hits`` counts the forms replaced."""

    __slots__ = ("_held", "_secrets", "hits")

    def __init__(self, secrets: Secrets) -> None:
        self._secrets = secrets
        self._held = b""
        self.hits = 0

    @property
    def pending(self) -> bool:
        return bool(self._held)

    def feed(self, chunk: bytes) -> bytes:
        data = self._held + chunk if self._held else chunk
        mark = _MARK.encode()
        for form in self._secrets.raw:
            if form in data:
                self.hits += data.count(form)
                data = data.replace(form, mark)
        keep = self._start_of_form(data)
        self._held = data[keep:]
        return data[:keep]

    def _start_of_form(self, data: bytes) -> int:
        """Where the longest tail of ``data`` that is the start of a form begins (``len(data)``: none)."""
        cut = len(data)
        for form in self._secrets.raw:
            first = form[:1]
            pos = data.find(first, max(0, len(data) - len(form) + 1))
            while pos != -1 and pos < cut:
                if form.startswith(data[pos:]):
                    cut = pos
                    break
                pos = data.find(first, pos + 1)
        return cut

    def flush(self) -> bytes:
        held, self._held = self._held, b""
        return held


class EncodedProbe:
    """A decoded copy of a ``gzip``/``deflate`` body that passes through unchanged: searched for the held
    credential (``secrets``), so an upstream that echoes it in a compressed answer is caught as in a plain
    one, and kept for the recording (``capture``), which would otherwise hold compressed bytes. :meth:`feed`
    decodes in pieces of at most 256 KiB (see :class:`Inflate`) and yields after each, so the caller can let
    other work run while a body that inflates a thousandfold is decoded; ``pending``: the decoded tail may
    be the start of the credential (the caller holds the encoded bytes back until it knows)."""

    __slots__ = ("_inflate", "_lit", "capture")

    def __init__(self, secrets: Secrets | None, encoding: str, capture: Capture | None = None) -> None:
        self._inflate = Inflate(encoding)
        self._lit = secrets.stream() if secrets is not None else None
        self.capture = capture

    @property
    def found(self) -> bool:
        return self._lit is not None and self._lit.hits > 0

    @property
    def pending(self) -> bool:
        return self._lit is not None and self._lit.pending

    def feed(self, chunk: bytes) -> Iterator[None]:
        """Decode ``chunk``, one piece per step; raises ``zlib.error`` on a corrupt stream."""
        for piece in self._inflate.feed(chunk):
            self._take(piece)
            yield None

    def _take(self, piece: bytes) -> None:
        if self._lit is not None:
            self._lit.feed(piece)
        if self.capture is not None:
            self.capture.feed(piece)

    def finish(self) -> bool:
        """The end of the body: decode what zlib still held; True when the credential was found."""
        tail = self._inflate.flush()
        if tail:
            self._take(tail)
        if self._lit is not None:
            self._lit.flush()
        return self.found
