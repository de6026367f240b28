"""Test-only oracle: :func:`proxy.jsondoc.mask_document` as it was before it was sped up (kept verbatim
below), over the oracle scanner of :mod:`tests.proxy.oracle_detectors`.

tests/proxy/test_jsondiff.py checks that the current code gives exactly the bytes this one gives.
Added since, with the behaviour it checks: :func:`_number_edits` (numbers go through the
detectors too), written the plain way: every number of the document is masked on its own.
"""

# ruff: noqa
from __future__ import annotations

import re

import orjson

from broker.config import Masking, Strategy
from proxy.detectors import Hit
from tests.proxy.oracle_detectors import Scanner
from proxy.jsonfast import decode_string, encode_string
from proxy.mask import RULE_MARKER, Masker

__all__ = ["OracleMasker", "mask_document"]


class OracleMasker(Masker):
    """A :class:`Masker` whose detectors are the oracle scanner's (the rest is shared code)."""

    def __init__(self, config: Masking, hash_key: bytes) -> None:
        super().__init__(config, hash_key)
        self._oracle = Scanner(config.detectors if config.enabled else ())

    def might_contain(self, data: bytes | memoryview) -> bool:
        return self.enabled and self._oracle.might_contain(data)

    def scan(self, data: bytes) -> list[Hit]:
        return self._oracle.scan(data) if self.enabled else []

    def mask_bytes(self, data: bytes | memoryview) -> bytes | None:
        if not self.enabled:
            return None
        raw = data.tobytes() if isinstance(data, memoryview) else data
        hits = self._oracle.scan(raw)
        return self.replace(raw, hits, self.strategy) if hits else None


_WS = re.compile(rb"[ \t\r\n]*")
_NUMBER_END = re.compile(rb"[-+.0-9A-Za-z]*")
_REDACTED = ('"' + RULE_MARKER + '"').encode()
# Unicode case folding maps these onto ASCII letters (long s, Kelvin sign, dotted/dotless i), so
# a key holding one may match a glob under str IGNORECASE and not under the bytes regex.
_ASCII_FOLDS = tuple(c.encode() for c in "\u017f\u212a\u0130\u0131")
# inside an array under a ruled key (run on the shape): the next element or bracket
_ARRAY_TOKEN = re.compile(rb'[ \t\r\n,]*("[^"]*"|[-0-9][-+.0-9A-Za-z]*|[tfn][a-z]*|[\[\]{])')
_BRACES = re.compile(rb'"[^"]*"|[{}]')
_NOT_STRUCTURE = bytes(c for c in range(256) if c not in b'"{}[]')
_CURLY = bytes.maketrans(b"[]", b"{}")
_QUOTED = re.compile(rb'"[^"]*"')

Edits = dict[int, tuple[int, bytes]]  # token start -> (token end, replacement)


def mask_document(masker: Masker, doc: bytes, ruled_key: re.Pattern[bytes] | None, max_depth: int) -> bytes | None:
    """``doc`` (one complete JSON value) masked as the tokenizer masks it; None when not handled here.

    ``ruled_key`` finds ``"<key matching a json_keys glob>":`` (the third pattern of
    :func:`proxy.jsonfast.fast_patterns`), None when there are no key rules.
    """
    if not doc.isascii() and any(f in doc for f in _ASCII_FOLDS):
        return None
    try:
        orjson.loads(doc)
    except orjson.JSONDecodeError:
        return None
    escaped = b"\\" in doc
    shape = doc.replace(b"\\\\", b"__").replace(b'\\"', b"__") if escaped else doc
    if not _depth_within(shape, max_depth):
        return None
    edits: Edits = {}
    if ruled_key is not None:
        _rule_edits(masker, doc, shape, ruled_key, edits)
    with_escapes = _escaped_strings(doc, shape) if escaped else {}
    for a, b in with_escapes.items():
        if a not in edits and masker.config.json_keys and _is_key(shape, b):
            strategy = masker.json_key_strategy(decode_string(doc[a + 1 : b]))
            if strategy is not None:
                _value_edits(masker, doc, shape, _after_colon(shape, b), strategy, edits)
    if masker.might_contain(doc):
        hits = masker.scan(doc)
        if hits:
            _detector_edits(masker, doc, shape, hits, with_escapes, edits)
            _number_edits(masker, doc, shape, edits)
    for a, b in with_escapes.items():
        if a not in edits:
            text = decode_string(doc[a + 1 : b])
            masked = masker.mask_text(text)
            if masked != text:
                edits[a] = (b + 1, encode_string(masked))
    if not edits:
        return doc
    out: list[bytes] = []
    last = 0
    for start in sorted(edits):
        end, new = edits[start]
        out.append(doc[last:start])
        out.append(new)
        last = end
    out.append(doc[last:])
    return b"".join(out)


def _depth_within(shape: bytes, max_depth: int) -> bool:
    """True when the (valid) document nests at most ``max_depth`` deep (where the tokenizer gives up).

    The brackets outside strings, all made ``{}`` (a valid document nests them properly), lose
    their innermost level with each ``replace``: the number of passes is the depth.
    """
    if shape.count(b"[") + shape.count(b"{") <= max_depth:
        return True
    brackets = shape.translate(_CURLY, _NOT_STRUCTURE).replace(b'""', b"")  # the strings without brackets go
    if b'"' in brackets:  # some string holds a bracket
        brackets = _QUOTED.sub(b"", brackets)
    for _ in range(max_depth):
        brackets = brackets.replace(b"{}", b"")
        if not brackets:
            return True
    return False


class _Parity:
    """Whether offsets (asked in increasing order) fall inside a string of the shape."""

    def __init__(self, shape: bytes) -> None:
        self._shape = shape
        self._pos = 0
        self._quotes = 0

    def inside(self, pos: int) -> bool:
        self._quotes += self._shape.count(b'"', self._pos, pos)
        self._pos = pos
        return self._quotes % 2 == 1


def _is_key(shape: bytes, close: int) -> bool:
    end = _WS.match(shape, close + 1).end()  # type: ignore[union-attr]
    return end < len(shape) and shape[end] == 0x3A  # ':'


def _after_colon(shape: bytes, close: int) -> int:
    colon = _WS.match(shape, close + 1).end()  # type: ignore[union-attr]
    return _WS.match(shape, colon + 1).end()  # type: ignore[union-attr]


def _escaped_strings(doc: bytes, shape: bytes) -> dict[int, int]:
    """Opening -> closing quote of every string that holds a backslash."""
    out: dict[int, int] = {}
    pos = doc.find(b"\\")
    while pos != -1:
        a = shape.rfind(b'"', 0, pos)
        b = shape.index(b'"', pos)
        out[a] = b
        pos = doc.find(b"\\", b + 1)
    return out


def _text(doc: bytes, a: int, b: int) -> str:
    raw = doc[a + 1 : b]
    return decode_string(raw) if b"\\" in raw else raw.decode("utf-8")


def _rule_edits(masker: Masker, doc: bytes, shape: bytes, ruled_key: re.Pattern[bytes], edits: Edits) -> None:
    parity = _Parity(shape)
    m = ruled_key.search(doc)
    while m is not None:
        start = m.start()
        if parity.inside(start):  # the match began at a closing quote: not a key
            m = ruled_key.search(doc, start + 1)
            continue
        close = shape.index(b'"', start + 1)
        if _is_key(shape, close):  # (the regex may have stopped at an escaped quote)
            strategy = masker.json_key_strategy(_text(doc, start, close))
            if strategy is not None:
                _value_edits(masker, doc, shape, _after_colon(shape, close), strategy, edits)
        m = ruled_key.search(doc, close + 1)


def _value_edits(masker: Masker, doc: bytes, shape: bytes, pos: int, strategy: Strategy, edits: Edits) -> None:
    """Mask the value at ``pos`` (after a ruled key) whole: a string or number; an array's scalars."""
    c = doc[pos]
    if c == 0x22:  # "
        end = shape.index(b'"', pos + 1) + 1
        edits[pos] = (end, _REDACTED if strategy == "redact"
                      else encode_string(masker.apply(_text(doc, pos, end - 1), strategy)))
    elif c == 0x2D or 0x30 <= c <= 0x39:  # - 0-9
        end = _NUMBER_END.match(doc, pos).end()  # type: ignore[union-attr]
        edits[pos] = (end, _REDACTED if strategy == "redact"
                      else encode_string(masker.apply(doc[pos:end].decode("ascii"), strategy)))
    elif c == 0x5B:  # [ : every scalar in it and in nested arrays; an object's own keys decide
        depth, i = 0, pos
        while True:
            m = _ARRAY_TOKEN.match(shape, i)
            assert m is not None  # the document is valid JSON
            i = m.end()
            t = shape[i - 1]
            if t == 0x5B:
                depth += 1
            elif t == 0x5D:
                depth -= 1
                if depth == 0:
                    return
            elif t == 0x7B:
                i = _object_end(shape, i)
            else:
                _value_edits(masker, doc, shape, m.start(1), strategy, edits)


def _object_end(shape: bytes, i: int) -> int:
    """The end of the object whose ``{`` is just before ``i``."""
    depth = 1
    for m in _BRACES.finditer(shape, i):
        t = shape[m.start()]
        if t == 0x7B:
            depth += 1
        elif t == 0x7D:
            depth -= 1
            if depth == 0:
                return m.end()
    raise AssertionError("unbalanced object in a valid document")


def _detector_edits(masker: Masker, doc: bytes, shape: bytes, hits: list[Hit], escaped: dict[int, int],
                    edits: Edits) -> None:
    """Mask every string a hit touches (keys included), unless a rule replaced it or it has escapes."""
    parity = _Parity(shape)
    marked: list[tuple[int, int]] = []  # (opening quote, closing quote)
    for hs, he, _ in hits:
        a = shape.rfind(b'"', 0, hs) if parity.inside(hs) else shape.find(b'"', hs)
        while a != -1 and a < he:
            b = shape.index(b'"', a + 1)
            if not marked or marked[-1][0] != a:
                marked.append((a, b))
            a = shape.find(b'"', b + 1)
    k = 0
    for a, b in marked:
        if a in edits or a in escaped:
            continue
        while k < len(hits) and hits[k][1] <= a:
            k += 1
        inside: list[Hit] = []
        whole = True
        for hs, he, det in hits[k:]:
            if hs >= b:
                break
            if hs <= a or he > b:
                whole = False
                break
            inside.append((hs - a - 1, he - a - 1, det))
        raw = doc[a + 1 : b]
        masked = masker.replace(raw, inside, masker.strategy) if whole else masker.mask_bytes(raw)
        if masked is not None:
            edits[a] = (b + 1, b'"' + masked + b'"')


_NUMBER = re.compile(rb'"[^"]*"|-?[0-9][-+.0-9eE]*')


def _number_edits(masker: Masker, doc: bytes, shape: bytes, edits: Edits) -> None:
    """Every number outside a rule's value, masked on its own: a JSON string of its masked text."""
    for m in _NUMBER.finditer(shape):
        a, b = m.span()
        if shape[a] == 0x22 or a in edits:
            continue
        masked = masker.mask_bytes(doc[a:b])
        if masked is not None:
            edits[a] = (b, encode_string(masked.decode("ascii")))
