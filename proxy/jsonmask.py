"""Streaming JSON masking for the HTTP proxy: constant memory, output stays valid JSON.

How this works. :class:`JsonStreamMasker` is a small incremental JSON tokenizer. It keeps
a stack of open containers (bounded by ``max_depth``), what it expects next (key, colon,
value, or what follows a value), and the strategy of the current key. Structure,
whitespace and unmasked values are forwarded as unchanged slices of the input; only a
string or scalar that is replaced is re-encoded. A string or scalar cut by a chunk
boundary is collected until it ends (bounded by ``max_string``).

What is masked:

* a string or number value whose key matches ``json_keys`` is masked whole with that
  rule's strategy and is written as a JSON string (``"[masked]"``, ``"h:…"``, ``"****1234"``);
  ``true``/``false``/``null`` are left alone. Scalars in an array under such a key get
  the same treatment; an object under it does not (its own keys decide).
* every other string, keys included, goes through the detectors (``Masker.mask_text``); so does
  every other number, on its own, and one they fire on becomes a JSON string of its masked
  text (``4111111111111111`` -> ``"[card]"``).
* a string longer than ``max_string`` bytes (1 MiB by default) is not held: it is
  replaced whole by ``"[masked]"``.

Speed. A chunk that is one whole value (an HTTP response read whole, up to 256 KiB) at the
top level is masked in one pass by :func:`proxy.jsondoc.mask_document`, with the same
bytes as a result; it returns None for what it does not handle and the tokenizer runs. Otherwise
most bytes never reach the per-token Python loop: runs of members that no key rule
applies to are consumed by one regex, and a container whole in the chunk is validated and
skipped by the C JSON decoder (:mod:`proxy.jsonfast`) when it holds no ruled key and no
detector hit (the chunk is scanned once). Only what may change takes the exact path, which
gives the same bytes (``fast=False`` forces it, ``whole=False`` turns the one-pass path off;
tests compare them).

What JSON producers add is accepted: a byte order mark and an XSSI guard (``)]}'``, ``)]}',``,
``while(1);``, ``for(;;);``) at the start pass unchanged, and ``NaN``, ``Infinity`` and
``-Infinity`` are scalars (Python's ``json.dumps`` writes them by default). Several top-level
values in a row (JSON lines) are accepted.

Invalid JSON never raises. At the first byte that cannot be JSON (or past ``max_depth``
nesting), the masker has lost track of which key a value belongs to, and
:attr:`JsonStreamMasker.fallback` becomes True. The rest of the stream, including any unsent
part of the current token, then goes through text detector masking
(:class:`proxy.mask.StreamMasker`) when there are no key rules; with key rules it goes
through :class:`_Lost`, which fails closed: every string and every bare word (numbers
included, ``true``/``false``/``null`` excepted) becomes ``"[masked]"``, whatever key it may
be under. A value of a ruled key can then not leak, at the price of an unreadable rest in a
body that was not JSON anyway; detectors alone would let ``"password": "..."`` through.

Where the code is: this module holds the tokenizer; its fast paths are the base class
:class:`proxy.jsonskip._FastPaths`, :class:`_Lost` lives in :mod:`proxy.jsonlost`, and the
vocabulary all three share (structural bytes, tokenizer states) in :mod:`proxy.jsontokens`.
"""

from __future__ import annotations

import re

from broker.config import Strategy
from proxy.detectors import Hit
from proxy.jsondoc import mask_document
from proxy.jsonfast import decode_string, encode_string, fast_patterns
from proxy.jsonlost import _Lost
from proxy.jsonskip import _FastPaths, _mask_number
from proxy.jsontokens import (
    _AFTER,
    _BACKSLASH,
    _COLON,
    _COLON_NEXT,
    _COMMA,
    _KEY,
    _KEY_OR_END,
    _LBRACE,
    _LBRACKET,
    _OVERFLOW,
    _QUOTE,
    _RBRACE,
    _RBRACKET,
    _SCALAR_MAX,
    _SCALAR_TOK,
    _STRING,
    _STRUCT,
    _VALUE,
    _VALUE_OR_END,
    _match_end,
)
from proxy.mask import Masker, StreamMasker

_WS = re.compile(rb"[ \t\r\n]*")
_SCALAR = re.compile(rb"[-+.0-9A-Za-z]*")
_SCALAR_OK = re.compile(rb"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?|true|false|null|NaN|-?Infinity")
_SCALAR_START = frozenset(b"-0123456789tfnNI")
# what may come before the value: a byte order mark, then an XSSI guard
_BOM = b"\xef\xbb\xbf"
_GUARDS = (b")]}',", b"while(1);", b"for(;;);")
_LEAD = re.compile(rb"(?:\xef\xbb\xbf)?(?:[ \t\r\n]*(?:\)\]\}',?|while\(1\);|for\(;;\);))?")
_LEAD_MAX = 64  # the first bytes are held at most this long while they may still become one
_WHOLE_MAX = 256 * 1024  # a chunk that is one whole value up to this size takes mask_document
# ...and ends like a container or a string (a number could go on in the next chunk: "1" then "e5")
_WHOLE_ENDS = (b"}", b"]", b'"')


class _Invalid(Exception):
    pass


class JsonStreamMasker(_FastPaths):
    """Rewrites a JSON byte stream, masking values as they pass. See the module docstring."""

    def __init__(self, masker: Masker, *, max_string: int = 1 << 20, max_depth: int = 512, fast: bool = True,
                 whole: bool = True) -> None:
        self._m = masker
        self._max_string = max_string
        self._max_depth = max_depth
        self._stack: list[tuple[bool, Strategy | None]] = []  # (is_object, strategy of array)
        self._expect = _VALUE
        self._key_strategy: Strategy | None = None
        self._state = _STRUCT
        self._is_key = False
        self._buf = bytearray()  # the part of the current token from earlier chunks
        self._crossed = False  # the current token began in an earlier chunk
        self._bs_odd = False  # the string so far ends in an odd run of backslashes
        self._overflow = False
        self._text: StreamMasker | _Lost | None = None
        self._lead: bytes | None = b""  # the body's first bytes while they may be a BOM or XSSI guard
        globs = tuple(r.match for r in masker.config.json_keys)
        self._fast = fast_patterns(globs, max_string) if masker.enabled and fast else None
        self._ruled = self._fast[2] if self._fast is not None else None
        # a chunk up to this that is one whole value takes mask_document (0: never; the C-backed
        # tokenizer alone, for comparisons); no string in such a chunk can overflow max_string
        self._whole_max = min(_WHOLE_MAX, max_string) if whole else 0
        self._hits: list[Hit] | None = None  # detector hits of the current chunk (None: not computed)
        self._hit_ends: list[int] = []

    @property
    def fallback(self) -> bool:
        """True once invalid JSON switched the stream to text masking."""
        return self._text is not None

    def feed(self, chunk: bytes) -> bytes:
        """Take the next chunk of the body; return the masked bytes that may be sent now."""
        if not self._m.enabled:
            return chunk
        if self._text is not None:
            return self._text.feed(chunk)
        if self._lead is not None:
            return self._start(chunk, final=False)
        return self._value(chunk)

    def _start(self, chunk: bytes, *, final: bool) -> bytes:
        """The body's first bytes: a BOM or XSSI guard passes unchanged, then the JSON begins."""
        assert self._lead is not None
        data = self._lead + chunk if self._lead else chunk
        if not final and len(data) < _LEAD_MAX and _may_lead(data):
            self._lead = data
            return b""
        self._lead = None
        m = _LEAD.match(data)
        end = m.end() if m is not None else 0
        return data[:end] + self._value(data[end:]) if end else self._value(data)

    def _value(self, chunk: bytes) -> bytes:
        if (self._fast is not None and not self._stack and self._state == _STRUCT and len(chunk) <= self._whole_max
                and self._expect in (_VALUE, _AFTER) and chunk.rstrip(b" \t\r\n")[-1:] in _WHOLE_ENDS):
            whole = mask_document(self._m, chunk, self._ruled, self._max_depth)
            if whole is not None:  # the chunk was one complete value
                self._expect = _AFTER
                return whole
        return self._feed(chunk)

    def flush(self) -> bytes:
        """End of body: return whatever is still held (an unterminated token goes out masked)."""
        if not self._m.enabled:
            return b""
        if self._lead is not None:
            return self._start(b"", final=True) + self.flush()
        if self._text is not None:
            return self._text.flush()
        held = bytes(self._buf)
        self._buf.clear()
        if self._state == _SCALAR_TOK and self._crossed:
            self._crossed = False
            try:
                new = self._finish_scalar(held)
            except _Invalid:
                return self._m.mask_bytes(held) or held
            return held if new is None else new
        if self._state == _STRING and self._crossed:  # truncated body: mask what we have as text
            self._crossed = False
            self._state = _STRUCT
            if self._overflow or (not self._is_key and self._strategy() is not None):
                return _OVERFLOW[:-1]  # a ruled value cut short: masked whole, as the rule would have
            return self._m.mask_bytes(b'"' + held) or b'"' + held
        return b""

    # -- the tokenizer -----------------------------------------------------------------

    def _feed(self, chunk: bytes) -> bytes:
        out: list[bytes] = []
        n = len(chunk)
        i = emit = 0  # chunk[emit:i] is forwarded as is, not yet appended to out
        tok = 0  # where the current string/scalar starts in this chunk (when not crossed)
        clean: bool | None = None  # no detector can fire anywhere in this chunk
        self._hits = None
        fast = self._fast
        text: str | None = None  # the chunk as str, when it is ASCII ("" otherwise)
        try:
            while i < n:
                if (fast is not None and self._state == _STRUCT and self._stack
                        and (self._expect in (_KEY, _KEY_OR_END) if self._stack[-1][0]
                             else self._expect in (_VALUE, _VALUE_OR_END) and self._stack[-1][1] is None)):
                    end = self._skip(fast, chunk, i)
                    if end > i:
                        if clean is None:
                            clean = not self._m.might_contain(chunk)
                        if not clean:
                            emit = self._detect_run(chunk, i, end, out, emit)
                        i = end
                        if i == n:
                            break
                if self._state == _STRING:
                    q = self._closing_quote(chunk, i)
                    if q == -1:
                        self._keep(chunk, i, out, emit, tok)
                        return b"".join(out)
                    self._state = _STRUCT
                    if self._crossed:
                        raw = bytes(self._buf) + chunk[i:q]
                        self._crossed = False
                        self._buf.clear()
                        new = self._string_done(raw, clean=False)
                        out.append(b'"' + raw + b'"' if new is None else new)
                        emit = q + 1
                    else:
                        if clean is None:
                            clean = not self._m.might_contain(chunk)
                        new = self._string_done(chunk[i:q], clean=clean or not self._hit_in(chunk, i, q))
                        if new is not None:
                            out.append(chunk[emit:tok])
                            out.append(new)
                            emit = q + 1
                    i = q + 1
                    continue
                if self._state == _SCALAR_TOK:
                    end = _match_end(_SCALAR, chunk, i)
                    if end == n:
                        self._keep(chunk, i, out, emit, tok)
                        return b"".join(out)
                    if self._crossed:
                        raw = bytes(self._buf) + chunk[i:end]
                        new = self._finish_scalar(raw)
                        self._crossed = False
                        self._buf.clear()
                        out.append(raw if new is None else new)
                        emit = end
                    else:
                        new = self._finish_scalar(chunk[tok:end])
                        if new is not None:
                            out.append(chunk[emit:tok])
                            out.append(new)
                            emit = end
                    i = end
                    continue
                i = _match_end(_WS, chunk, i)
                if i == n:
                    break
                c = chunk[i]
                if c == _QUOTE:
                    self._open_value(is_key=self._expect in (_KEY, _KEY_OR_END))
                    self._state, self._bs_odd, self._overflow = _STRING, False, False
                    tok = i
                    i += 1
                elif c in _SCALAR_START:
                    self._open_value(is_key=False)
                    self._state = _SCALAR_TOK
                    tok = i
                elif c in (_LBRACE, _LBRACKET):
                    strategy = self._strategy()
                    self._open_value(is_key=False)
                    if strategy is None and fast is not None and self._stack:
                        if text is None:
                            text = chunk.decode("ascii") if chunk.isascii() else ""
                        end = self._skip_container(chunk, text, i) if text else -1
                        if end != -1:
                            i = end
                            continue
                    if len(self._stack) >= self._max_depth:
                        raise _Invalid
                    self._stack.append((c == _LBRACE, strategy))
                    self._expect = _KEY_OR_END if c == _LBRACE else _VALUE_OR_END
                    i += 1
                elif c in (_RBRACE, _RBRACKET):
                    if not self._stack or self._stack[-1][0] != (c == _RBRACE):
                        raise _Invalid
                    if self._expect not in (_AFTER, _KEY_OR_END, _VALUE_OR_END):
                        raise _Invalid
                    self._stack.pop()
                    self._expect = _AFTER
                    i += 1
                elif c == _COLON and self._expect == _COLON_NEXT:
                    self._expect = _VALUE
                    i += 1
                elif c == _COMMA and self._expect == _AFTER and self._stack:
                    self._expect = _KEY if self._stack[-1][0] else _VALUE
                    i += 1
                else:
                    raise _Invalid
            if self._state != _STRUCT:  # a string opened at the very end of the chunk
                self._keep(chunk, n, out, emit, tok)
                return b"".join(out)
        except _Invalid:
            return self._fall_back(chunk, out, emit)
        out.append(chunk[emit:])
        return b"".join(out)

    def _open_value(self, *, is_key: bool) -> None:
        """Check a value (or key) may start here and move the expectation past it."""
        if is_key:
            self._is_key = True
            self._expect = _COLON_NEXT
            return
        if self._expect not in (_VALUE, _VALUE_OR_END) and not (self._expect == _AFTER and not self._stack):
            raise _Invalid
        self._is_key = False
        self._expect = _AFTER

    def _strategy(self) -> Strategy | None:
        """The rule strategy for a value in the current container (None: detectors)."""
        if not self._stack:
            return None
        is_object, strategy = self._stack[-1]
        return self._key_strategy if is_object else strategy

    def _closing_quote(self, chunk: bytes, i: int) -> int:
        """Offset of the unescaped quote ending the string, or -1 (parity kept for later)."""
        j = i
        while True:
            q = chunk.find(b'"', j)
            if q == -1:
                return -1
            k = q
            while k > i and chunk[k - 1] == _BACKSLASH:
                k -= 1
            run = q - k + (self._bs_odd if k == i else 0)
            if run % 2 == 0:
                return q
            j = q + 1

    def _keep(self, chunk: bytes, seg: int, out: list[bytes], emit: int, tok: int) -> None:
        """The chunk ends inside a token: forward what precedes it and hold the token."""
        if not self._crossed:
            out.append(chunk[emit:tok])
            self._buf.clear()
            seg = tok + 1 if self._state == _STRING else tok
            self._crossed = True
        piece = chunk[seg:]
        if self._state == _STRING:
            stripped = len(piece) - len(piece.rstrip(b"\\"))
            self._bs_odd = (self._bs_odd if stripped == len(piece) else False) ^ (stripped % 2 == 1)
            if self._overflow or len(self._buf) + len(piece) > self._max_string:
                self._overflow = True
                self._buf.clear()
                return
        elif len(self._buf) + len(piece) > _SCALAR_MAX:
            raise _Invalid
        self._buf += piece

    def _string_done(self, raw: bytes, *, clean: bool) -> bytes | None:
        """The replacement of a complete string (quotes included), or None to keep it."""
        if self._overflow or len(raw) > self._max_string:
            self._overflow = False
            if self._is_key:
                self._key_strategy = None
            return _OVERFLOW
        if self._is_key:
            text = decode_string(raw) if b"\\" in raw else raw.decode("utf-8", "replace")
            self._key_strategy = self._m.json_key_strategy(text)
            return self._detect(raw, clean)
        strategy = self._strategy()
        if strategy is not None:
            return encode_string(self._m.apply(decode_string(raw), strategy))
        return self._detect(raw, clean)

    def _detect(self, raw: bytes, clean: bool) -> bytes | None:
        if b"\\" in raw:
            text = decode_string(raw)
            masked = self._m.mask_text(text)
            return None if masked == text else encode_string(masked)
        if clean:
            return None
        masked_raw = self._m.mask_bytes(raw)
        return None if masked_raw is None else b'"' + masked_raw + b'"'

    def _finish_scalar(self, raw: bytes) -> bytes | None:
        """The replacement of a complete number or literal, or None to keep it."""
        self._state = _STRUCT
        if not _SCALAR_OK.fullmatch(raw):
            raise _Invalid
        strategy = self._strategy()
        if strategy is None:
            return _mask_number(self._m, raw)
        if raw[0] in b"tfn":
            return None
        return encode_string(self._m.apply(raw.decode("ascii"), strategy))

    def _fall_back(self, chunk: bytes, out: list[bytes], emit: int) -> bytes:
        self._text = _Lost() if self._m.config.json_keys else StreamMasker(self._m)
        held = b""  # the token began in an earlier chunk, and nothing of it was sent
        if self._crossed and self._overflow:
            held = _OVERFLOW[:-1]
        elif self._crossed:
            held = (b'"' if self._state == _STRING else b"") + bytes(self._buf)
        self._buf.clear()
        out.append(self._text.feed(held + chunk[emit:]))
        return b"".join(out)


def _may_lead(data: bytes) -> bool:
    """True while ``data`` (the body's first bytes) may still grow into a BOM or an XSSI guard."""
    if len(data) < len(_BOM) and _BOM.startswith(data):
        return True
    rest = data.removeprefix(_BOM).lstrip(b" \t\r\n")
    return any(guard.startswith(rest) for guard in _GUARDS)
