"""One-pass masking of a whole JSON document: the tokenizer's result without the tokenizer.

How this works. Most HTTP responses arrive whole (read in one piece up to 256 KiB), and
:class:`proxy.jsonmask.JsonStreamMasker` hands such a chunk to :func:`mask_document`.
orjson validates it in C (nothing is built from its result). Then a *shape* of the
document is made in which escaped backslashes and escaped quotes are blanked (``\\\\`` and
``\\"`` become ``__``; in valid JSON escapes pair up left to right, and backslashes only
occur in strings), so every quote left in the shape delimits a string, and the parity of
the quotes before an offset says whether the offset is inside one. From there:

* ruled keys are found by one regex (``ruled_key``, built from the ``json_keys`` globs)
  turned into a *walker* (:func:`_walker`): each of its matches skips whole strings, in C,
  up to the next key the globs match, so a match never starts inside a string (literal
  globs need no walking: their key regex cannot match between two strings). Their value
  (a string or number; the scalars of an array, nested arrays included, not objects) is
  replaced whole, as the tokenizer does. A key's rule is decided once per distinct key (an
  array of records repeats its keys). Globs with a ``[...]`` class or a quote fall back to
  a search of the key regex, kept when the match starts outside a string (parity) and is
  followed by ``:``;
* detector hits come from one scan of the document. A hit inside one string (the usual
  case) is replaced in place, which is what masking that string with its hits gives;
  when some hit crosses a quote, each string a hit touches (keys included) is masked, with
  the scan's hits when they lie inside it, rescanned otherwise;
* a string holding a backslash is decoded and masked as text (an escape can hide a value
  from the byte scan); a key holding one is decoded before the rules are checked.

Only replaced tokens cost Python work; everything else is searched in C. What it does not
handle returns None and the tokenizer runs: invalid JSON or several values, nesting
deeper than ``max_depth`` (the tokenizer's limit), a key with a character that Unicode case
folding maps onto ASCII. tests/proxy/test_jsondiff.py holds it to the bytes of the previous
implementation (tests/proxy/oracle_jsondoc.py) on generated documents.
"""

from __future__ import annotations

import functools
import re

import orjson

from broker.config import Strategy
from proxy.detectors import Hit
from proxy.jsonfast import decode_string, encode_string
from proxy.mask import REDACT_MARKERS, RULE_MARKER, Masker

__all__ = ["mask_document"]

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
_NOT_OPENING = bytes(c for c in range(256) if c not in b"[{")
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
        walker = _walker(ruled_key)
        if walker is not None:
            _walk_rule_edits(masker, doc, shape, walker, edits)
        else:
            _rule_edits(masker, doc, shape, escaped, ruled_key, edits)
    with_escapes = _escaped_strings(doc, shape) if escaped else {}
    for a, b in with_escapes.items():
        if a not in edits and masker.config.json_keys and _is_key(shape, b):
            strategy = masker.json_key_strategy(decode_string(doc[a + 1 : b]))
            if strategy is not None:
                _value_edits(masker, doc, shape, _after_colon(shape, b), strategy, edits)
    if masker.might_contain(doc):
        hits = masker.scan(doc)
        if hits and not _hit_edits(masker, doc, shape, hits, with_escapes, edits):
            _detector_edits(masker, doc, shape, hits, with_escapes, edits)
            _number_edits(masker, doc, shape, hits, edits)
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
    if len(shape.translate(None, _NOT_OPENING)) <= max_depth:  # (one pass, not two counts)
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


def _rule_edits(masker: Masker, doc: bytes, shape: bytes, escaped: bool, ruled_key: re.Pattern[bytes],
                edits: Edits) -> None:
    search = _with_space(ruled_key).search
    count, index = shape.count, shape.index
    strategies: dict[bytes, Strategy | None] = {}  # keys repeat (an array of records): decide each once
    pos = quotes = 0  # quotes in shape[:pos]
    m = search(doc)
    while m is not None:
        start = m.start()
        quotes += count(b'"', pos, start)
        pos = start
        if quotes & 1:  # the match began at a closing quote: not a key
            m = search(doc, start + 1)
            continue
        close = index(b'"', start + 1)
        value = m.end()
        if value <= close or doc.find(b'"', close + 1, value) != -1:
            # the key the regex matched does not end at ``close``: it stopped at an escaped
            # quote, or a glob's ``[...]`` took a quote in; what follows ``close`` decides
            if not _is_key(shape, close):
                m = search(doc, close + 1)
                continue
            value = _after_colon(shape, close)
        key = doc[start + 1 : close]
        try:
            strategy = strategies[key]
        except KeyError:
            strategy = strategies[key] = masker.json_key_strategy(
                decode_string(key) if escaped and b"\\" in key else key.decode("utf-8"))
        if strategy is not None:
            if doc[value] == 0x22 and strategy == "redact":  # the usual case, inline
                edits[value] = (index(b'"', value + 1) + 1, _REDACTED)
            else:
                _value_edits(masker, doc, shape, value, strategy, edits)
        m = search(doc, close + 1)


def _walk_rule_edits(masker: Masker, doc: bytes, shape: bytes, walker: re.Pattern[bytes], edits: Edits) -> None:
    """:func:`_rule_edits` with a :func:`_walker`: each match is a key, no parity to keep."""
    strategies: dict[bytes, Strategy | None] = {}  # keys repeat (an array of records): decide each once
    for m in walker.finditer(shape):
        ks, ke = m.span(1)
        if ks == -1:  # the walk reached the end
            return
        vs, ve = m.span(2)
        key = doc[ks + 1 : ke - 1]
        try:
            strategy = strategies[key]
        except KeyError:  # (a key with escapes is decided decoded, here and by mask_document's loop)
            strategy = strategies[key] = masker.json_key_strategy(_text(doc, ks, ke - 1))
        if strategy is not None:
            if vs == ve or strategy != "redact":
                _value_edits(masker, doc, shape, vs, strategy, edits)
            else:  # a string, redacted: the usual case
                edits[vs] = (ve, _REDACTED)


_RULED_HEAD = b'"(?i:'
_RULED_TAIL = b')"' + _WS.pattern + b":"


@functools.lru_cache(maxsize=64)
def _walker(ruled_key: re.Pattern[bytes]) -> re.Pattern[bytes] | None:
    """A regex whose matches, found one after the other on the shape, skip whole strings up to each
    ruled key: group 1 is the key, group 2 a string value ("" for another value); the last match
    may reach the end (no group). Every match starts and ends outside a string.

    None when a glob has a ``[...]`` class (which can take in a quote) or ``ruled_key`` is not
    the form :func:`proxy.jsonfast.fast_patterns` builds: then :func:`_rule_edits` searches.
    """
    pattern = ruled_key.pattern
    if not (pattern.startswith(_RULED_HEAD) and pattern.endswith(_RULED_TAIL)):
        return None
    alternatives = pattern[len(_RULED_HEAD) : -len(_RULED_TAIL)]
    rest = alternatives.replace(b'[^"]', b"")
    if b"[" in rest or b'"' in rest:  # (a glob holding a quote could span strings too)
        return None
    key = rb'"(?i:' + alternatives + rb')"'
    value = _WS.pattern + b":" + _WS.pattern + rb'("[^"]*+"|)'
    if b"[" not in alternatives and b"," not in alternatives and b":" not in alternatives:
        # Literal globs (no * ? [...]): text between two strings always holds a "," or ":",
        # so a match can only start at a key's opening quote. A plain search (C jumps from
        # quote to quote) then finds the keys, and resuming after one never lands in a string.
        return re.compile(b"(" + key + b")" + value, ruled_key.flags)
    return re.compile(rb'(?:[^"]*+"(?!' + key[1:] + _WS.pattern + rb':)[^"]*+")*+[^"]*+(?:(' + key + b")"
                      + value + rb"|\Z)", ruled_key.flags)


@functools.lru_cache(maxsize=64)
def _with_space(ruled_key: re.Pattern[bytes]) -> re.Pattern[bytes]:
    """``ruled_key`` and the whitespace after it: its match ends where the value starts."""
    return re.compile(ruled_key.pattern + _WS.pattern, ruled_key.flags)


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


def _hit_edits(masker: Masker, doc: bytes, shape: bytes, hits: list[Hit], escaped: dict[int, int],
               edits: Edits) -> bool:
    """Mask each hit in place when every hit lies inside one string; False (nothing done) otherwise.

    Masking a string whose hits all lie inside it is replacing each hit in place, as
    :meth:`Masker.replace` does: no need to find and rebuild the string. A hit in a string a
    rule replaced, or in one holding escapes (masked as decoded text), is dropped, as in
    :func:`_detector_edits`, which takes the rare documents where a hit crosses a quote.
    """
    count, rfind = shape.count, shape.rfind
    strategy = masker.strategy
    found: Edits = {}
    pos = quotes = 0  # quotes in shape[:pos]
    for hs, he, det in hits:
        quotes += count(b'"', pos, hs)
        if not quotes & 1 or count(b'"', hs, he):
            return False
        pos = he
        a = rfind(b'"', 0, hs)  # the string's opening quote
        if a not in edits and a not in escaped:
            found[hs] = (he, REDACT_MARKERS[det] if strategy == "redact" else masker.apply_bytes(doc[hs:he], strategy))
    edits.update(found)
    return True


_NUMBER_CHARS = frozenset(b"-+.0123456789eE")
_NUMBER_TOKEN = re.compile(rb"-?[0-9][-+.0-9eE]*")


def _number_edits(masker: Masker, doc: bytes, shape: bytes, hits: list[Hit], edits: Edits) -> None:
    """Mask each number a hit touches on its own, as a JSON string of its masked text (what the
    tokenizer does with every number); a number a rule replaced is left to the rule.

    Runs only when some hit is not inside one string, which is where a hit in a number ends up.
    """
    parity = _Parity(shape)
    done = 0
    for hs, he, _ in hits:
        lo = max(hs, done)
        while lo > done and doc[lo - 1] in _NUMBER_CHARS:  # the number the hit starts in
            lo -= 1
        for m in _NUMBER_TOKEN.finditer(shape, lo, he):
            ns, ne = m.span()
            ne = _NUMBER_END.match(doc, ns).end()  # type: ignore[union-attr]
            done = max(done, ne)
            if parity.inside(ns) or ns in edits or (ns > 0 and doc[ns - 1] in _NUMBER_CHARS):
                continue  # digits in a string, a ruled value, or the middle of a token
            masked = masker.mask_bytes(doc[ns:ne])
            if masked is not None:
                edits[ns] = (ne, encode_string(masked.decode("ascii")))


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
