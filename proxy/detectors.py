"""Finding sensitive values in bytes: cheap candidates first, validation only on candidates.

How this works. Python's ``re`` is slow when a pattern starts with a character class,
because it must try the pattern at every position. So each detector is gated by a check
that runs in C at memory speed before any regex runs over the buffer:

* ``email``: ``b"@" in data``; then, for each ``@``, the run of local-part characters before
  it is found on a translated copy (``rfind``) and the domain regex is matched after it.
* ``card``, ``ssn``, ``phone``: the buffer is translated so every digit becomes ``0`` and the
  separators `` -.`` become ``s`` (``bytes.translate``; a buffer under 128 bytes with fewer
  than 7 digits holds none of these shapes and stops there); four literal searches (13 digits,
  ``00s0000``, ``(000)``, ``+0``) find windows where a gate regex looks for digit *shapes*
  (13+ digits, ``000-00-0000``, ``000-000-0000``, ``+0…``). Only around those shapes do the
  real regexes run, and only their matches reach Luhn (``stdnum.luhn``), ``stdnum.us.ssn``
  and ``phonenumbers``.
* ``iban``: on the same translated copy upper-case letters are ``A``; ``AA00`` starts a
  candidate, which ``stdnum.iban`` validates.
* ``secret``: PEM blocks, JWTs, ``Bearer`` tokens, AWS keys, hoop secrets and generic
  high-entropy tokens: :mod:`proxy.secretscan`, which holds that detector.

Hits that overlap are merged into one span, labelled by the hit that starts first (hits of
the email scan alone, or of the IBAN scan alone, are already ordered and apart). All
patterns are ASCII, so a hit never splits a multi-byte UTF-8 character.
tests/proxy/test_jsondiff.py holds :class:`Scanner` to the hits of the previous
implementation (tests/proxy/oracle_detectors.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import phonenumbers
from stdnum import iban as _iban
from stdnum import luhn as _luhn
from stdnum.us import ssn as _ssn

from broker.config import Detector
from proxy.secretscan import (
    _BIG,
    _DIGITS,
    _LOWER,
    _RUN20,
    _SECRET_GATES,
    _SECRET_LITERALS_RE,
    _SMALL,
    _TOKEN_SHAPE,
    _UPPER,
    ENTROPY_THRESHOLD,
    GENERIC_MIN_LEN,
    _table,
    pem_open,
    scan_secrets,
    shannon_entropy,
)

try:
    from proxy.pg import _wire
except ImportError:  # pragma: no cover - built by pip install -e . (pyproject.toml)
    _wire = None  # type: ignore[assignment]

#: A hit: ``(start, end, detector)``, byte offsets into the scanned buffer.
Hit = tuple[int, int, Detector]

__all__ = ["ENTROPY_THRESHOLD", "GENERIC_MIN_LEN", "Hit", "Scanner", "luhn_ok", "pem_open", "py_email_hits",
           "shannon_entropy"]

# digits -> "0", separators " -." -> "s", "()+" kept, upper-case -> "A", everything else "_":
# digit shapes (card, SSN, phone) and IBAN starts ("AA00") are both looked for on it
_SHAPE = _table(
    {**{c: ord("0") for c in _DIGITS}, **{c: ord("s") for c in b" -."}, **{c: c for c in b"()+"},
     **{c: ord("A") for c in _UPPER}},
    ord("_"),
)
# characters of an email's local part -> "x", everything else " "
_LOCAL_SHAPE = _table({c: ord("x") for c in _DIGITS + _UPPER + _LOWER + b"._%+-"}, ord(" "))

# Digit shapes worth a closer look (run on the _SHAPE translation).
_DIGIT_GATE = re.compile(
    rb"0(?:000000000000"  # 13+ digits in a row (card)
    rb"|000s0000s0000"  # card in groups of four
    rb"|000s000000s0000"  # 4-6-5 / 4-6-4 (Amex, Diners)
    rb"|00s00s0000"  # SSN
    rb"|00s000s0000)"  # 000-000-0000 phone
    rb"|\(000\)s?000s0000"  # (000) 000-0000 phone
    rb"|\+0(?:[s()]{0,2}0){6}"  # +international phone
)
# Literals at least one of which every _DIGIT_GATE match contains: `in` runs at GB/s,
# the regex at about 120 MB/s, so the regex runs only around these.
_DIGIT_LITERALS = (b"0000000000000", b"00s0000", b"(000)", b"+0")

# An email is (?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]{1,64}@ and this domain (or the last 64
# characters of a longer run, see py_email_hits); the local part is found on a shape of the
# buffer, the domain with this regex.
_DOMAIN = re.compile(rb"[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,63}")
_AT_DOMAIN = re.compile(b"@" + _DOMAIN.pattern)
_CARD = re.compile(
    rb"(?<![0-9])(?:[2-6][0-9]{12,18}"
    rb"|[2-6][0-9]{3}([ -])[0-9]{4}\1[0-9]{4}\1[0-9]{1,4}(?:\1[0-9]{1,3})?"
    rb"|3[0-9]{3}([ -])[0-9]{6}\2[0-9]{4,5})(?![0-9])"
)
_SSN = re.compile(rb"(?<![0-9-])[0-9]{3}-[0-9]{2}-[0-9]{4}(?![0-9-])")
_PHONE = re.compile(
    rb"(?<![0-9A-Za-z+])\+[1-9](?:[ ().-]{0,2}[0-9]){6,14}(?![0-9])"
    rb"|(?<![0-9])(?:\([0-9]{3}\) ?[0-9]{3}[-. ]|[0-9]{3}([-. ])[0-9]{3}\1)[0-9]{4}(?![0-9])"
)
_IBAN = re.compile(rb"(?<![A-Za-z0-9])[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]){11,30}(?![A-Za-z0-9])")

# Every digit shape of _DIGIT_GATE has at least this many digits; on a small buffer counting
# them (in C) is cheaper than the literal searches of _digit_windows.
_MIN_DIGITS = 7


def _digit_windows(shape: bytes) -> list[tuple[int, int]]:
    """Merged windows of ``shape`` around the digit literals; the gate regex runs only there."""
    starts: list[int] = []
    for lit in _DIGIT_LITERALS:
        if lit[0] != 0x30 and lit[:1] not in shape:  # "(" and "+": memchr first, they are rare
            continue
        pos = shape.find(lit)
        while pos != -1:
            starts.append(pos)
            pos = shape.find(lit, pos + len(lit))
    if not starts:
        return []
    starts.sort()
    windows = [(max(0, starts[0] - 8), starts[0] + 40)]
    for pos in starts[1:]:
        lo, hi = windows[-1]
        if pos - 8 <= hi:
            windows[-1] = (lo, pos + 40)
        else:
            windows.append((pos - 8, pos + 40))
    return windows


def _digit_shapes(shape: bytes) -> bool:
    return any(_DIGIT_GATE.search(shape, lo, hi) for lo, hi in _digit_windows(shape))


def luhn_ok(digits: str) -> bool:
    """Luhn checksum of a digit string (``stdnum.luhn``)."""
    return bool(_luhn.is_valid(digits))


def _phone_ok(candidate: bytes) -> bool:
    try:
        number = phonenumbers.parse(candidate.decode("ascii"), "US")
    except phonenumbers.NumberParseException:
        return False
    return bool(phonenumbers.is_valid_number(number))


# letters -> their IBAN check values (A=10 ... Z=35), for the mod-97 check in C
_IBAN_NUMBERS = str.maketrans({c: str(int(c, 36)) for c in _UPPER.decode()})


def _iban_checksum_ok(candidate: str) -> bool:
    """The ISO 13616 mod-97 check, which every valid IBAN passes: a cheap filter before
    ``stdnum.iban`` (whose own check is a Python loop per character), so that text full of
    IBAN starts (``DE89 DE89 …``) is not a few microseconds per byte."""
    compact = candidate.replace(" ", "")
    return int((compact[4:] + compact[:4]).translate(_IBAN_NUMBERS)) % 97 == 1


def _iban_hit(data: bytes, m: re.Match[bytes]) -> int:
    """Return the end of the longest valid IBAN at ``m.start()``, or -1."""
    start, end = m.span()
    while end - start >= 15:
        candidate = data[start:end].decode("ascii")
        if _iban_checksum_ok(candidate) and _iban.is_valid(candidate):
            return end
        cut = data.rfind(b" ", start, end)
        if cut == -1:
            return -1
        end = cut
    return -1


class Scanner:
    """Finds sensitive values in bytes with the enabled detectors. Immutable, thread-safe."""

    __slots__ = ("_card", "_digits", "_email", "_iban", "_phone", "_secret", "_ssn")

    def __init__(self, detectors: Iterable[Detector]) -> None:
        enabled = frozenset(detectors)
        self._email = "email" in enabled
        self._card = "card" in enabled
        self._ssn = "ssn" in enabled
        self._phone = "phone" in enabled
        self._iban = "iban" in enabled
        self._secret = "secret" in enabled
        self._digits = self._card or self._ssn or self._phone

    def might_contain(self, data: bytes | memoryview) -> bool:
        """Cheap check: False means :meth:`scan` would certainly find nothing in ``data``."""
        if isinstance(data, memoryview):
            data = data.tobytes()
        n = len(data)
        if self._email and b"@" in data:
            return True
        if n < 8:  # shorter than anything but an email
            return False
        if self._secret:
            if n < _SMALL:
                if _SECRET_LITERALS_RE.search(data):
                    return True
            else:
                for lit, rare in _SECRET_GATES:
                    if (n < _BIG or rare is None or rare in data) and lit in data:
                        return True
            if n >= 20 and _RUN20.search(data.translate(_TOKEN_SHAPE)):
                return True
        if not (self._digits or self._iban):
            return False
        shape = data.translate(_SHAPE)
        if self._digits and not (n < _SMALL and shape.count(b"0") < _MIN_DIGITS) and _digit_shapes(shape):
            return True
        return self._iban and n >= 15 and b"AA00" in shape

    def scan(self, data: bytes) -> list[Hit]:
        """All validated hits in ``data``, sorted and non-overlapping."""
        hits: list[Hit] = []
        if len(data) < 8 and b"@" not in data:
            return hits
        if self._secret:
            scan_secrets(data, hits)
        mixed = bool(hits)  # hits of more than one scan below need sorting and merging
        if self._email and b"@" in data:
            self._scan_email(data, hits)  # sorted, non-overlapping
        shape = data.translate(_SHAPE) if self._digits or self._iban else b""
        if self._digits:
            k = len(hits)
            self._scan_digits(data, shape, hits)
            if len(hits) > k and (k > 0 or len(hits) > k + 1):  # card, ssn and phone hits may interleave
                mixed = True
        if self._iban:
            k = len(hits)
            pos = shape.find(b"AA00")
            while pos != -1:
                m = _IBAN.match(data, pos)
                end = _iban_hit(data, m) if m else -1
                if end != -1:
                    hits.append((pos, end, "iban"))
                pos = shape.find(b"AA00", max(end, pos + 1))
            if k > 0 and len(hits) > k:
                mixed = True
        return _merge(hits) if mixed else hits

    def _scan_email(self, data: bytes, hits: list[Hit]) -> None:
        _email_hits(data, hits, "email")

    def _scan_digits(self, data: bytes, shape: bytes, hits: list[Hit]) -> None:
        n = len(data)
        if n < _SMALL and shape.count(b"0") < _MIN_DIGITS:
            return
        done = 0
        gates = (g for lo, hi in _digit_windows(shape) for g in _DIGIT_GATE.finditer(shape, lo, hi))
        for gate in gates:
            if gate.end() <= done:
                continue
            lo, hi = max(done, gate.start() - 4), min(n, gate.end() + 24)
            if self._card:
                for m in _CARD.finditer(data, lo, hi):
                    if luhn_ok(m.group().replace(b" ", b"").replace(b"-", b"").decode("ascii")):
                        hits.append((m.start(), m.end(), "card"))
                        done = max(done, m.end())
            if self._ssn:
                for m in _SSN.finditer(data, lo, hi):
                    if _ssn.is_valid(m.group().decode("ascii")):
                        hits.append((m.start(), m.end(), "ssn"))
                        done = max(done, m.end())
            if self._phone:
                for m in _PHONE.finditer(data, lo, hi):
                    if _phone_ok(m.group()):
                        hits.append((m.start(), m.end(), "phone"))
                        done = max(done, m.end())


def py_email_hits(data: bytes, hits: list[Hit], label: Detector = "email") -> None:
    """Append ``(start, end, label)`` for each email in ``data``, in order, non-overlapping.

    An email's local part is the whole run of local-part characters before its "@" (no such
    character may precede it), found with rfind on a shape of the buffer instead of a regex
    searching across a window. "@" is not a local-part character, so an email starts at the
    run's start when the run is 1 to 64 long and a domain follows. A longer run (a URL-encoded
    query string: "%", ".", "-" and "+" are local-part characters) fails closed: its last 64
    characters are taken as the local part, so the address in it is masked. The C twin
    (``proxy.pg._wire.email_hits``) runs when built; tests/proxy/test_mask.py checks both agree.
    """
    rfind = data.translate(_LOCAL_SHAPE).rfind
    done = 0  # end of the last hit: an email never starts inside it
    for m in _AT_DOMAIN.finditer(data):  # (a domain holds no "@": no "@" is skipped)
        pos, end = m.span()
        lo = pos - 64 if pos > 64 else 0
        start = rfind(b" ", lo, pos) + 1 or lo
        if done <= start < pos:
            if end > pos + 256:  # a domain is looked for in the 255 bytes after the "@" only
                short = _DOMAIN.match(data, pos + 1, pos + 256)
                if short is None:
                    continue
                end = short.end()
            done = end
            hits.append((start, end, label))


_email_hits: Callable[[bytes, list[Hit], Detector], None] = \
    _wire.email_hits if _wire is not None else py_email_hits


def _merge(hits: list[Hit]) -> list[Hit]:
    hits.sort(key=lambda h: (h[0], -h[1]))
    out: list[Hit] = [hits[0]]
    for start, end, det in hits[1:]:
        last_start, last_end, last_det = out[-1]
        if start < last_end:
            if end > last_end:
                out[-1] = (last_start, end, last_det)
        else:
            out.append((start, end, det))
    return out

