"""The fast paths of :class:`proxy.jsonmask.JsonStreamMasker`: what lets most bytes of a chunk
skip its per-token loop (see "Speed" in :mod:`proxy.jsonmask` and :mod:`proxy.jsonfast`).

:class:`_FastPaths` is the masker's base class. Its methods consume a run of members that no
key rule applies to (:meth:`~_FastPaths._skip`), a container whole in the chunk that needs no
change (:meth:`~_FastPaths._skip_container`), and mask the detector hits of a skipped run
(:meth:`~_FastPaths._detect_run`), the chunk being scanned once (:meth:`~_FastPaths._hit_in`).
They read and move the tokenizer's state, which :class:`~proxy.jsonmask.JsonStreamMasker`
owns and sets up.
"""

from __future__ import annotations

import json
import re
from bisect import bisect_right

from broker.config import Strategy
from proxy.detectors import Hit
from proxy.jsonfast import STRINGS, Fast, encode_string, has_ruled_key, reject_constant
from proxy.jsontokens import _AFTER, _KEY, _KEY_OR_END, _QUOTE, _VALUE, _VALUE_OR_END
from proxy.mask import Masker

# a number shorter than this holds no detector's value (the shortest, a phone number, has 7 digits
# and a separator or "+", which a JSON number cannot have): not worth a scan
_NUMBER_MIN = 8
# in a run of members: the strings (escape-free, see jsonfast.STRINGS) and the numbers
_RUN_TOKENS = re.compile(STRINGS.pattern + rb"|-?[0-9][-+.0-9eE]*")
_DECODER = json.JSONDecoder(parse_constant=reject_constant)  # stateless: one for all maskers


class _FastPaths:
    """The fast-path methods of :class:`~proxy.jsonmask.JsonStreamMasker`; see the module docstring."""

    # the masker's state these methods read and move (set by JsonStreamMasker.__init__)
    _m: Masker
    _max_depth: int
    _stack: list[tuple[bool, Strategy | None]]
    _expect: int
    _key_strategy: Strategy | None
    _ruled: re.Pattern[bytes] | None
    _hits: list[Hit] | None
    _hit_ends: list[int]

    def _skip(self, fast: Fast, chunk: bytes, i: int) -> int:
        """Consume a run of members that no key rule applies to (validated by the regex, in C).

        Returns the end of the run (``i`` when there is none) and updates the state as the
        exact path would have: after ``member,`` a key (or value) is expected; after the
        closing bracket the container is popped.
        """
        is_object, strategy = self._stack[-1]
        if len(self._stack) >= self._max_depth - 1:
            return i
        if is_object:
            if self._expect not in (_KEY, _KEY_OR_END):
                return i
            m = fast[0].match(chunk, i)
        else:
            if strategy is not None or self._expect not in (_VALUE, _VALUE_OR_END):
                return i
            m = fast[1].match(chunk, i)
        if m is None:
            return i
        end = m.end()
        if is_object and m.group("open") is not None:  # a key (no rule) whose value is a container
            self._key_strategy = None
            self._expect = _VALUE
            return end
        if m.group("close") is not None:
            self._stack.pop()
            self._expect = _AFTER
        elif chunk.rfind(b",", i, end) != -1:
            self._expect = _KEY if is_object else _VALUE
        else:
            return i  # only whitespace: let the exact path take the next token
        return end

    def _skip_container(self, chunk: bytes, text: str, i: int) -> int:
        """End of the container starting at ``i`` when it is whole in this chunk and needs no
        change (no key rule inside, no detector hit); -1 otherwise (the exact path takes it).

        The C JSON decoder validates it and finds its end; its keys are checked against the
        rules on the decoded value, its raw bytes against the detectors.
        """
        try:
            value, end = _DECODER.raw_decode(text, i)
        except (ValueError, RecursionError):
            return -1
        raw = chunk[i:end]
        if b"\\" in raw:
            # escapes could hide a value from a scan of the raw bytes: only the coarse check,
            # and the keys are checked decoded. "\/" is the one short escape that can: its
            # backslash splits a run of token characters ("/" is one) that decoded is a single
            # secret; the other escapes are letters after the backslash, or not token characters
            # either way.
            if b"\\u" in raw or self._m.might_contain(raw.replace(b"\\/", b"/")):
                return -1
            if self._ruled is not None and has_ruled_key(value, self._m.json_key_strategy):
                return -1
            return end
        if self._hit_in(chunk, i, end):
            return -1
        if self._ruled is not None and self._ruled.search(chunk, i, end):
            return -1  # without escapes every quote delimits a string: this finds exactly the ruled keys
        return end

    def _hit_in(self, chunk: bytes, start: int, end: int) -> bool:
        """True when a detector hit of the chunk (scanned once) overlaps ``chunk[start:end]``."""
        if self._hits is None:
            self._hits = self._m.scan(chunk)
            self._hit_ends = [h[1] for h in self._hits]
        k = bisect_right(self._hit_ends, start)
        return k < len(self._hits) and self._hits[k][0] < end

    def _detect_run(self, chunk: bytes, start: int, end: int, out: list[bytes], emit: int) -> int:
        """Mask detector hits in the strings and numbers of a run (every quote in a run delimits a string)."""
        if not self._hit_in(chunk, start, end):
            return emit
        assert self._hits is not None
        hits, k = self._hits, bisect_right(self._hit_ends, start)
        for m in _RUN_TOKENS.finditer(chunk, start, end):
            a, b = m.span()
            k = bisect_right(self._hit_ends, a, k)
            if k == len(hits) or hits[k][0] >= end:
                break
            if hits[k][0] >= b:
                continue
            if chunk[a] != _QUOTE:  # a number: masked on its own, as the exact path does
                number = _mask_number(self._m, chunk[a:b])
                if number is not None:
                    out.append(chunk[emit:a])
                    out.append(number)
                    emit = b
                continue
            inside = []
            for h in hits[k:]:
                if h[0] >= b:
                    break
                inside.append((h[0] - a - 1, h[1] - a - 1, h[2]))
            if inside[0][0] >= 0 and inside[-1][1] <= b - a - 2:  # the chunk's hits, no rescan
                masked: bytes | None = self._m.replace(chunk[a + 1 : b - 1], inside, self._m.strategy)
            else:
                masked = self._m.mask_bytes(chunk[a + 1 : b - 1])
            if masked is not None:
                out.append(chunk[emit:a])
                out.append(b'"' + masked + b'"')
                emit = b
        return emit


def _mask_number(masker: Masker, raw: bytes) -> bytes | None:
    """A number (outside ruled keys) the detectors fire on, as a JSON string of its masked text
    (``4111111111111111`` -> ``"[card]"``); None to keep it. Every path masks a number this way,
    on its own, so that a card number is masked whether it was written as a string or not."""
    if len(raw) < _NUMBER_MIN:
        return None
    masked = masker.mask_bytes(raw)
    return None if masked is None else encode_string(masked.decode("ascii"))
