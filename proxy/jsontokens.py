"""The vocabulary of the JSON masking tokenizer, shared by :mod:`proxy.jsonmask`,
:mod:`proxy.jsonskip` and :mod:`proxy.jsonlost`: the structural bytes, what the tokenizer
expects next and what it is inside of, the replacement of a masked value and the longest
scalar held. Private to those three modules.
"""

from __future__ import annotations

import re

from proxy.mask import RULE_MARKER

_SCALAR_MAX = 4096
_QUOTE, _BACKSLASH = 0x22, 0x5C
_LBRACE, _RBRACE, _LBRACKET, _RBRACKET, _COLON, _COMMA = b"{}[]:,"

# what the tokenizer expects next
_VALUE, _KEY, _KEY_OR_END, _VALUE_OR_END, _COLON_NEXT, _AFTER = range(6)
# what it is inside of
_STRUCT, _STRING, _SCALAR_TOK = range(3)
_OVERFLOW = ('"' + RULE_MARKER + '"').encode()


def _match_end(pattern: re.Pattern[bytes], data: bytes, pos: int) -> int:
    m = pattern.match(data, pos)
    return pos if m is None else m.end()
