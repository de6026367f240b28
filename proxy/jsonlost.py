"""The rest of a JSON body once :class:`proxy.jsonmask.JsonStreamMasker` has lost track of the
keys and key rules are in force (see the "Invalid JSON" paragraph of :mod:`proxy.jsonmask`).
"""

from __future__ import annotations

import re

from proxy.jsontokens import _BACKSLASH, _OVERFLOW, _QUOTE, _SCALAR_MAX, _match_end


class _Lost:
    """The rest of a body in which :class:`JsonStreamMasker` lost track of the keys, with key rules in
    force: every string (escapes followed across chunks) and every bare word other than ``true``,
    ``false`` and ``null`` becomes ``"[masked]"``; structure and whitespace pass. Holds at most one
    word of up to 4 KiB (a longer one is masked at once)."""

    __slots__ = ("_in_string", "_odd", "_word")

    def __init__(self) -> None:
        self._in_string = False
        self._odd = False  # the string so far ends in an odd run of backslashes
        self._word = b""  # a bare word that may go on in the next chunk

    def feed(self, chunk: bytes) -> bytes:
        out: list[bytes] = []
        i, n = 0, len(chunk)
        if self._word:
            end = _match_end(_WORD, chunk, 0)
            if end == n and len(self._word) + n <= _SCALAR_MAX:
                self._word += chunk
                return b""
            out.append(self._word_out(self._word + chunk[:end]))
            self._word, i = b"", end
        while i < n:
            if self._in_string:
                q = self._closing_quote(chunk, i)
                if q == -1:
                    return b"".join(out)
                self._in_string = False
                out.append(_OVERFLOW)
                i = q + 1
                continue
            end = _match_end(_PUNCT, chunk, i)
            out.append(chunk[i:end])
            i = end
            if i == n:
                break
            if chunk[i] == _QUOTE:
                self._in_string, self._odd = True, False
                i += 1
                continue
            end = _match_end(_WORD, chunk, i)
            if end == n:
                self._word = chunk[i:]
                break
            out.append(self._word_out(chunk[i:end]))
            i = end
        return b"".join(out)

    def flush(self) -> bytes:
        if self._in_string:
            self._in_string = False
            return _OVERFLOW[:-1]
        word, self._word = self._word, b""
        return self._word_out(word) if word else b""

    def _closing_quote(self, chunk: bytes, i: int) -> int:
        """The unescaped quote ending the string, or -1 (the backslash parity is kept for the next chunk)."""
        odd = self._odd
        for j in range(i, len(chunk)):
            c = chunk[j]
            if c == _QUOTE and not odd:
                return j
            odd = c == _BACKSLASH and not odd
        self._odd = odd
        return -1

    @staticmethod
    def _word_out(word: bytes) -> bytes:
        return word if word in (b"true", b"false", b"null") else _OVERFLOW


_PUNCT = re.compile(rb'[{}\[\]:, \t\r\n]*')
_WORD = re.compile(rb'[^{}\[\]:, \t\r\n"]*')
