"""The C-backed fast path of :mod:`proxy.jsonmask`: what lets most bytes skip the Python tokenizer.

How this works. Two things are done in C. (1) :func:`fast_patterns` builds, per set of
``json_keys`` globs, regexes that consume a *run* of members needing no key rule: keys that are
ASCII, escape-free and match no glob (a negative lookahead), values that are escape-free
strings, scalars or flat containers of those. (2) :class:`proxy.jsonmask.JsonStreamMasker`
hands a whole container that starts and ends in the chunk to the C JSON decoder
(``raw_decode``), which validates it and finds its end; :func:`has_ruled_key` then checks its
decoded keys when escapes make the raw bytes unreliable. A run or container that needs a
change is never rewritten here: the exact tokenizer takes it.
(:mod:`proxy.jsondoc` masks a chunk that is one whole document without the tokenizer.)
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable

from broker.config import Strategy

__all__ = ["STRINGS", "Fast", "decode_string", "encode_string", "fast_patterns", "has_ruled_key", "reject_constant"]

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
