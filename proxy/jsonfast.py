"""The C-backed fast path of :mod:`proxy.jsonmask`: what lets most bytes skip the Python tokenizer.

How this works. Two things are done in C. (1) :func:`fast_patterns` builds, per set of
``json_keys`` globs, regexes that consume a *run* of members needing no key rule: keys that are
ASCII, escape-free and match no glob (a negative lookahead), values that are escape-free
strings, scalars or flat containers of those. (2) :class:`proxy.jsonmask.JsonStreamMasker`
hands a whole container that starts and ends in the chunk to the C JSON decoder
(``raw_decode``), which validates it and finds its end; :func:`has_ruled_key` then checks its
decoded keys when escapes make the raw bytes unreliable. A run or container that needs a
change is never rewritten here: the exact tokenizer takes it.

A whole document in one chunk. :func:`mask_document` handles the common HTTP case, a
response that arrives whole (or a chunk that is one complete value), without tokenizing:
orjson validates it in C; then, since a valid document without backslashes has every
quote delimiting a string, the parity of the quotes before an offset says whether it is
inside a string. Ruled keys are found by one regex (``ruled_key``), their values located
from there; detector hits come from one scan of the document, and each string a hit
touches is masked as the tokenizer would mask it. Only the replaced strings and numbers
cost Python work. Anything it does not handle (backslashes, invalid JSON, deep nesting,
non-ASCII key rules, Unicode case folds onto ASCII) returns None and the tokenizer runs.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable

import orjson

from broker.config import Strategy
from proxy.detectors import Hit
from proxy.mask import RULE_MARKER, Masker

__all__ = ["STRINGS", "Fast", "decode_string", "encode_string", "fast_patterns", "has_ruled_key",
           "mask_document", "reject_constant"]

_W = rb"[ \t\r\n]*"
_SIMPLE_SCALAR = rb"(?:-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?|true|false|null)(?![-+.0-9A-Za-z])"
STRINGS = re.compile(rb'"[^"\\]*"')  # a string without escapes


def _glob(pattern: str) -> bytes | None:
    """A bytes regex for an ``fnmatch`` glob over an ASCII key (no quote/backslash); None if not ASCII."""
    if not pattern.isascii():
        return None
    out, i, n = [], 0, len(pattern)
    while i < n:
        c = pattern[i]
        i += 1
        if c == "*":
            out.append('[^"]*')
        elif c == "?":
            out.append('[^"]')
        elif c == "[" and (j := pattern.find("]", i + 1 if pattern[i : i + 1] in ("!", "]") else i)) != -1:
            body = pattern[i:j].replace("\\", "\\\\")
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = j + 1
        else:
            out.append(re.escape(c))
    return "".join(out).encode("ascii")


Fast = tuple[re.Pattern[bytes], re.Pattern[bytes], re.Pattern[bytes] | None]


@functools.lru_cache(maxsize=64)
def fast_patterns(globs_in: tuple[str, ...], max_string: int) -> Fast | None:
    """Regexes consuming, in C, runs of members that need no key rule (see :meth:`JsonStreamMasker._skip`).

    A run is a sequence of ``key: value,`` (object) or ``value,`` (array) where keys are ASCII
    without escapes and match no ``json_keys`` glob, and values are strings without escapes,
    scalars, or flat objects/arrays of those; an optional last member with the closing bracket
    ends it. None when a glob is not ASCII (then everything takes the exact path).
    """
    globs = [_glob(g) for g in globs_in]
    if any(g is None for g in globs):
        return None
    ruled = (rb'(?!"(?i:' + b"|".join(g for g in globs if g is not None) + rb')"' + _W + b":)") if globs else b""
    key = ruled + rb'"[\x20\x21\x23-\x5b\x5d-\x7e]*"'
    value = b'(?:"[^"\\\\]{0,%d}"|' % max_string + _SIMPLE_SCALAR + b")"
    any_value = value
    for _ in range(1):  # flat containers of simple values (deeper ones: _skip_container)
        pair = key + _W + b":" + _W + any_value
        flat_obj = rb"\{" + _W + b"(?:" + pair + _W + b"," + _W + b")*+(?:" + pair + _W + rb")?\}"
        flat_arr = rb"\[" + _W + b"(?:" + any_value + _W + b"," + _W + b")*+(?:" + any_value + _W + rb")?\]"
        any_value = b"(?:" + value + b"|" + flat_obj + b"|" + flat_arr + b")"
    member = key + _W + b":" + _W + any_value
    obj = (_W + b"(?:" + member + _W + b"," + _W + b")*+(?:(?P<close>" + member + _W + rb"\})"
           + b"|(?P<open>" + key + _W + b":" + _W + rb")(?=[\[{]))?")
    arr = _W + b"(?:" + any_value + _W + b"," + _W + b")*+(?P<close>" + any_value + _W + rb"\])?"
    alternatives = b"|".join(g for g in globs if g is not None)
    ruled_key = re.compile(rb'"(?i:' + alternatives + rb')"' + _W + b":") if globs else None
    return re.compile(obj), re.compile(arr), ruled_key


def reject_constant(name: str) -> None:
    raise ValueError(name)  # NaN and Infinity are not JSON


def has_ruled_key(value: object, strategy_of: Callable[[str], Strategy | None]) -> bool:
    """True when a key anywhere in the decoded ``value`` matches a ``json_keys`` rule."""
    todo = [value]
    while todo:
        node = todo.pop()
        if isinstance(node, dict):
            for k, v in node.items():
                if strategy_of(k) is not None:
                    return True
                if isinstance(v, dict | list):
                    todo.append(v)
        elif isinstance(node, list):
            todo.extend(v for v in node if isinstance(v, dict | list))
    return False


def decode_string(raw: bytes) -> str:
    """The text of a JSON string's raw bytes (between the quotes), escapes resolved."""
    try:
        value = json.loads(b'"' + raw + b'"')
    except ValueError:
        return raw.decode("utf-8", "replace")
    return value if isinstance(value, str) else str(value)


def encode_string(text: str) -> bytes:
    """``text`` as a JSON string, quotes included (non-ASCII kept as UTF-8)."""
    return json.dumps(text, ensure_ascii=False).encode("utf-8", "surrogatepass")


_WS_RUN = re.compile(_W)
_REDACTED = ('"' + RULE_MARKER + '"').encode()
_NUMBER_END = re.compile(rb"[-+.0-9A-Za-z]*")
# Unicode case folding maps these onto ASCII letters ("ſ" -> s, "K" -> k, "İ"/"ı" -> i), so a
# key holding one may match a glob under str IGNORECASE and not under the bytes regex.
_ASCII_FOLDS = tuple(c.encode() for c in "\u017f\u212a\u0130\u0131")
# inside an array under a ruled key: the next element or bracket
_ARRAY_TOKEN = re.compile(rb'[ \t\r\n,]*("[^"]*"|[-0-9][-+.0-9A-Za-z]*|[tfn][a-z]*|[\[\]{])')
_BRACES = re.compile(rb'"[^"]*"|[{}]')


def mask_document(masker: Masker, doc: bytes, ruled_key: re.Pattern[bytes] | None, max_depth: int) -> bytes | None:
    """``doc`` (one complete JSON value) masked as the tokenizer masks it; None when not handled here.

    ``ruled_key`` finds ``"<key matching a json_keys glob>":`` (the third pattern of
    :func:`fast_patterns`), None when there are no key rules.
    """
    if b"\\" in doc or doc.count(b"[") + doc.count(b"{") >= max_depth:
        return None
    if not doc.isascii() and any(f in doc for f in _ASCII_FOLDS):
        return None
    try:
        orjson.loads(doc)
    except orjson.JSONDecodeError:
        return None
    edits: dict[int, tuple[int, bytes]] = {}  # token start -> (token end, replacement)
    if ruled_key is not None:
        _rule_edits(masker, doc, ruled_key, edits)
    if masker.might_contain(doc):
        hits = masker.scan(doc)
        if hits:
            _detector_edits(masker, doc, hits, edits)
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


class _Parity:
    """Whether offsets (asked in increasing order) of a backslash-free document fall inside a string."""

    def __init__(self, doc: bytes) -> None:
        self._doc = doc
        self._pos = 0
        self._quotes = 0

    def inside(self, pos: int) -> bool:
        self._quotes += self._doc.count(b'"', self._pos, pos)
        self._pos = pos
        return self._quotes % 2 == 1


def _rule_edits(masker: Masker, doc: bytes, ruled_key: re.Pattern[bytes], edits: dict[int, tuple[int, bytes]]) -> None:
    parity = _Parity(doc)
    m = ruled_key.search(doc)
    while m is not None:
        start = m.start()
        if parity.inside(start):  # the match began at a closing quote: not a key
            m = ruled_key.search(doc, start + 1)
            continue
        close = doc.index(b'"', start + 1)
        strategy = masker.json_key_strategy(doc[start + 1 : close].decode("utf-8"))
        if strategy is not None:
            _value_edits(masker, doc, _WS_RUN.match(doc, m.end()).end(), strategy, edits)  # type: ignore[union-attr]
        m = ruled_key.search(doc, m.end())


def _value_edits(masker: Masker, doc: bytes, pos: int, strategy: Strategy, edits: dict[int, tuple[int, bytes]]) -> None:
    """Mask the value at ``pos`` (after a ruled key) whole: a string or number; an array's scalars."""
    c = doc[pos]
    if c == 0x22:  # "
        end = doc.index(b'"', pos + 1) + 1
        edits[pos] = (end, _REDACTED if strategy == "redact"
                      else encode_string(masker.apply(doc[pos + 1 : end - 1].decode("utf-8"), strategy)))
    elif c == 0x2D or 0x30 <= c <= 0x39:  # - 0-9
        end = _NUMBER_END.match(doc, pos).end()  # type: ignore[union-attr]
        edits[pos] = (end, _REDACTED if strategy == "redact"
                      else encode_string(masker.apply(doc[pos:end].decode("ascii"), strategy)))
    elif c == 0x5B:  # [ : every scalar in it and in nested arrays; an object's own keys decide
        depth, i = 0, pos
        while True:
            m = _ARRAY_TOKEN.match(doc, i)
            assert m is not None  # the document is valid JSON
            i = m.end()
            t = doc[i - 1]
            if t == 0x5B:
                depth += 1
            elif t == 0x5D:
                depth -= 1
                if depth == 0:
                    return
            elif t == 0x7B:
                i = _object_end(doc, i)
            else:
                _value_edits(masker, doc, m.start(1), strategy, edits)


def _object_end(doc: bytes, i: int) -> int:
    """The end of the object whose ``{`` is just before ``i``."""
    depth = 1
    for m in _BRACES.finditer(doc, i):
        t = doc[m.start()]
        if t == 0x7B:
            depth += 1
        elif t == 0x7D:
            depth -= 1
            if depth == 0:
                return m.end()
    raise AssertionError("unbalanced object in a valid document")


def _detector_edits(masker: Masker, doc: bytes, hits: list[Hit], edits: dict[int, tuple[int, bytes]]) -> None:
    """Mask every string a hit touches (keys included), unless a key rule already replaced it."""
    parity = _Parity(doc)
    marked: list[tuple[int, int]] = []  # (opening quote, closing quote)
    for hs, he, _ in hits:
        a = doc.rfind(b'"', 0, hs) if parity.inside(hs) else doc.find(b'"', hs)
        while a != -1 and a < he:
            b = doc.index(b'"', a + 1)
            if not marked or marked[-1][0] != a:
                marked.append((a, b))
            a = doc.find(b'"', b + 1)
    k = 0
    for a, b in marked:
        if a in edits:
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
