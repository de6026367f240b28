"""Test-only oracle: :mod:`proxy.detectors` as it was before the scan was sped up (kept verbatim below).

tests/proxy/test_jsondiff.py checks that the current scanner finds exactly the hits this one finds.
"""

# ruff: noqa
from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable

import phonenumbers
from stdnum import iban as _iban
from stdnum import luhn as _luhn
from stdnum.us import ssn as _ssn

from broker.config import Detector

#: A hit: ``(start, end, detector)``, byte offsets into the scanned buffer.
Hit = tuple[int, int, Detector]

#: Minimum Shannon entropy (bits per character) of a generic secret. Random base62/base64
#: strings of 24+ characters score about 4.2 or more; identifiers and words score lower.
ENTROPY_THRESHOLD = 4.0
#: Minimum length of a generic secret.
GENERIC_MIN_LEN = 24


def _table(mapping: dict[int, int], default: int) -> bytes:
    return bytes(mapping.get(i, default) for i in range(256))


_DIGITS = b"0123456789"
_UPPER = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_LOWER = b"abcdefghijklmnopqrstuvwxyz"
_TOKEN = _DIGITS + _UPPER + _LOWER + b"+/=_-"

# digits -> "0", separators " -." -> "s", "()+" kept, everything else "_"
_DIGIT_SHAPE = _table(
    {**{c: ord("0") for c in _DIGITS}, **{c: ord("s") for c in b" -."}, **{c: c for c in b"()+"}}, ord("_")
)
# upper-case -> "A", digits -> "0", everything else "_"
_IBAN_SHAPE = _table({**{c: ord("0") for c in _DIGITS}, **{c: ord("A") for c in _UPPER}}, ord("_"))
# characters of an email's local part -> "x", everything else " "
_LOCAL_SHAPE = _table({c: ord("x") for c in _DIGITS + _UPPER + _LOWER + b"._%+-"}, ord(" "))
# token characters -> "x", everything else " "
_TOKEN_SHAPE = _table({c: ord("x") for c in _TOKEN}, ord(" "))

# Digit shapes worth a closer look (run on the _DIGIT_SHAPE translation).
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

_EMAIL = re.compile(
    rb"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,63}"
)
_EMAIL_AT = re.compile(_EMAIL.pattern.removeprefix(rb"(?<![A-Za-z0-9._%+-])"))
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

# (literal gate, pattern, group to mask: 0 = whole match); these are looked for anywhere.
_SECRETS_ANYWHERE: tuple[tuple[tuple[bytes, ...], re.Pattern[bytes], int], ...] = (
    (
        (b"-----BEGIN",),
        re.compile(
            rb"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|\Z)", re.DOTALL
        ),
        0,
    ),
    ((b"eyJ",), re.compile(rb"eyJ[A-Za-z0-9_-]{4,}\.eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"), 0),
    (
        (b"earer", b"EARER"),
        re.compile(rb"(?:Bearer|bearer|BEARER)[ \t]+([A-Za-z0-9._~+/=-]{8,})"),
        1,
    ),
)
# Secrets that are themselves runs of 20+ token characters: looked for inside such runs only.
_SECRETS_IN_RUNS: tuple[tuple[tuple[bytes, ...], re.Pattern[bytes], int], ...] = (
    ((b"AKIA", b"ASIA"), re.compile(rb"(?<![A-Z0-9])A(?:KIA|SIA)[A-Z0-9]{16}(?![A-Z0-9])"), 0),
    ((b"hoop_",), re.compile(rb"hoop_[A-Za-z0-9_-]{43,}"), 0),
)
# An AWS secret access key after its name; looked for when the buffer has a run of 40+.
_AWS_LITERALS = (b"aws_secret", b"AWS_SECRET", b"secret_access_key", b"SecretAccessKey")
_AWS_SECRET = re.compile(
    rb"(?i:aws_?secret_?access_?key|secret_?access_?key)[\"']?[ \t]*[:=][ \t]*[\"']?"
    rb"([A-Za-z0-9/+=]{40})(?![A-Za-z0-9/+=])"
)
_PEM_BEGIN = b"-----BEGIN"
# might_contain needs only these literals: AWS key ids, AWS secret values and hoop grant
# secrets are all runs of 20+ token characters, which _RUN20 finds on the token shape.
_SECRET_LITERALS = (b"-----BEGIN", b"eyJ", b"earer", b"EARER")
_SECRET_LITERALS_RE = re.compile(b"|".join(re.escape(lit) for lit in _SECRET_LITERALS))
_RUN20 = re.compile(b"x" * 20)
_X20 = b"x" * 20
_SMALL = 1024  # below this, one regex call beats a loop of `in` checks


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


def _runs(tok: bytes) -> list[tuple[int, int]]:
    """Spans of the runs of 20+ ``x`` in a token shape (literal search: ``x{20,}`` is slow in ``re``)."""
    out: list[tuple[int, int]] = []
    pos = tok.find(_X20)
    while pos != -1:
        end = tok.find(b" ", pos + 20)
        if end == -1:
            end = len(tok)
        out.append((pos, end))
        pos = tok.find(_X20, end)
    return out


def _match_at_literal(data: bytes, lit: bytes, pattern: re.Pattern[bytes], group: int, hits: list[Hit]) -> None:
    """Hits of ``pattern`` starting at (or up to 4 bytes before) each occurrence of ``lit``.

    Matching only where the literal occurs: ``finditer`` over the whole buffer would try the
    pattern at every position (a lookbehind or case-insensitive start defeats ``re``'s
    literal-prefix search).
    """
    pos = data.find(lit)
    while pos != -1:
        nxt = pos + 1
        for start in range(max(0, pos - 4), pos + 1):
            m = pattern.match(data, start)
            if m is not None:
                hits.append((m.start(group), m.end(group), "secret"))
                nxt = max(nxt, m.end())
                break
        pos = data.find(lit, nxt)


def luhn_ok(digits: str) -> bool:
    """Luhn checksum of a digit string (``stdnum.luhn``)."""
    return bool(_luhn.is_valid(digits))


def shannon_entropy(token: bytes) -> float:
    """Shannon entropy of ``token`` in bits per byte."""
    n = len(token)
    return -sum(c / n * math.log2(c / n) for c in Counter(token).values())


def _generic_secret(token: bytes) -> bool:
    if len(token.translate(None, _UPPER)) > len(token) - 2:
        return False
    if len(token.translate(None, _LOWER)) > len(token) - 2:
        return False
    if len(token.translate(None, _DIGITS)) > len(token) - 2:
        return False
    return shannon_entropy(token) >= ENTROPY_THRESHOLD


def _phone_ok(candidate: bytes) -> bool:
    try:
        number = phonenumbers.parse(candidate.decode("ascii"), "US")
    except phonenumbers.NumberParseException:
        return False
    return bool(phonenumbers.is_valid_number(number))


def _iban_hit(data: bytes, m: re.Match[bytes]) -> int:
    """Return the end of the longest valid IBAN at ``m.start()``, or -1."""
    start, end = m.span()
    while end - start >= 15:
        if _iban.is_valid(data[start:end].decode("ascii")):
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
                for lit in _SECRET_LITERALS:
                    if lit in data:
                        return True
            if n >= 20 and _RUN20.search(data.translate(_TOKEN_SHAPE)):
                return True
        if self._digits and n >= 8 and _digit_shapes(data.translate(_DIGIT_SHAPE)):
            return True
        return self._iban and n >= 15 and b"AA00" in data.translate(_IBAN_SHAPE)

    def scan(self, data: bytes) -> list[Hit]:
        """All validated hits in ``data``, sorted and non-overlapping."""
        hits: list[Hit] = []
        if len(data) < 8 and b"@" not in data:
            return hits
        if self._secret:
            self._scan_secrets(data, hits)
        if self._email and b"@" in data:
            self._scan_email(data, hits)
        if self._digits:
            self._scan_digits(data, hits)
        if self._iban:
            shape = data.translate(_IBAN_SHAPE)
            pos = shape.find(b"AA00")
            while pos != -1:
                m = _IBAN.match(data, pos)
                end = _iban_hit(data, m) if m else -1
                if end != -1:
                    hits.append((pos, end, "iban"))
                pos = shape.find(b"AA00", max(end, pos + 1))
        return _merge(hits) if hits else hits

    def _scan_secrets(self, data: bytes, hits: list[Hit]) -> None:
        tok = data.translate(_TOKEN_SHAPE)
        runs = _runs(tok)
        for literals, pattern, group in _SECRETS_ANYWHERE:
            for lit in literals:
                _match_at_literal(data, lit, pattern, group, hits)
        if not runs:
            return
        # AWS key ids and hoop secrets are token runs of 20+: look for them only inside runs.
        for lo, hi in runs:
            run = data[lo:hi]
            for literals, pattern, group in _SECRETS_IN_RUNS:
                for lit in literals:
                    pos = run.find(lit)
                    while pos != -1:
                        m = pattern.match(data, lo + pos)
                        if m is not None:
                            hits.append((m.start(group), m.end(group), "secret"))
                            pos = run.find(lit, m.end() - lo)
                        else:
                            pos = run.find(lit, pos + 1)
            if hi - lo >= GENERIC_MIN_LEN and _generic_secret(run):
                hits.append((lo, hi, "secret"))
        if any(hi - lo >= 40 for lo, hi in runs):  # an AWS secret value is a run of 40
            for lit in _AWS_LITERALS:
                _match_at_literal(data, lit, _AWS_SECRET, 1, hits)

    def _scan_email(self, data: bytes, hits: list[Hit]) -> None:
        # An email's local part is the whole run of local-part characters before its "@" (the
        # pattern's lookbehind), so the match is tried at that run's start only, found with
        # rfind on a shape of the buffer, instead of searched for across a window.
        n = len(data)
        shape = data.translate(_LOCAL_SHAPE)
        pos = data.find(b"@")
        done = 0  # end of the last hit: an email never starts inside it
        while pos != -1:
            nxt = pos + 1
            # (since the review fix: the last 64 characters of a longer run, without the lookbehind)
            lo = max(0, pos - 64)
            start = shape.rfind(b" ", lo, pos) + 1 or lo
            if True:
                m = _EMAIL_AT.match(data, start, min(n, pos + 256)) if start >= done and start < pos else None
                if m is not None:
                    done = m.end()
                    hits.append((start, done, "email"))
                    nxt = done
            pos = data.find(b"@", nxt)

    def _scan_digits(self, data: bytes, hits: list[Hit]) -> None:
        shape = data.translate(_DIGIT_SHAPE)
        n = len(data)
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


def pem_open(data: bytes) -> int:
    """Offset of a private-key PEM block that starts in ``data`` but has not ended, or -1.

    Used by the stream masker to hold such a block back until its END line arrives.
    """
    start = data.rfind(_PEM_BEGIN)
    if start == -1:
        return -1
    header_end = data.find(b"-----", start + len(_PEM_BEGIN))
    if header_end == -1:
        return start  # header still arriving
    if b"PRIVATE KEY" not in data[start:header_end]:
        return -1
    end = data.find(b"-----END", header_end)
    if end == -1 or data.find(b"KEY-----", end) == -1:
        return start
    return -1
