"""The ``secret`` detector of :class:`proxy.detectors.Scanner`: keys, tokens and high-entropy strings.

How this works. PEM blocks, JWTs and ``Bearer`` tokens start with a literal (``-----BEGIN``,
``eyJ``, ``earer``), found with ``bytes.find`` (after a ``memchr`` for a rare byte of it, such
as ``J``; under 128 bytes one regex looks for all of them); the pattern is then matched only
there. AWS key ids (``AKIA``/``ASIA``) and hoop secrets (``hoop_``) are runs of 20+ token
characters, so they are looked for only inside such runs (found by a literal search on a
translated copy); ``aws_secret_access_key``-style names only when a run of 40+ exists. Generic
secrets are runs of 24+ token characters (found on a translated copy with a literal search)
holding at least two upper-case letters, two lower-case letters and two digits, with Shannon
entropy of at least :data:`ENTROPY_THRESHOLD` bits per character. Hex strings (hashes, git
SHAs) and UUIDs never qualify: they lack one of the three classes. That is deliberate: they are
identifiers far more often than secrets.

:func:`scan_secrets` is the detector's scan; :class:`~proxy.detectors.Scanner` calls it and
merges its hits with the others'. Its cheap gate (the literals, and a run of 20+ token
characters on the token shape) stays inline in :meth:`~proxy.detectors.Scanner.might_contain`,
which imports the tables below. :func:`pem_open` tells the stream masker
(:mod:`proxy.streammask`) that a private key has begun and not ended. The byte classes and
:func:`_table` that every detector's shapes are built from are defined here too: this module
imports nothing of :mod:`proxy.detectors` at run time, which imports it.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.detectors import Hit

__all__ = ["ENTROPY_THRESHOLD", "GENERIC_MIN_LEN", "pem_open", "scan_secrets", "shannon_entropy"]

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
# token characters -> "x", everything else " "
_TOKEN_SHAPE = _table({c: ord("x") for c in _TOKEN}, ord(" "))

_BEARER = re.compile(rb"(?:Bearer|bearer|BEARER)[ \t]+([A-Za-z0-9._~+/=-]{8,})")
# (literal gate, a byte of it, pattern, group to mask: 0 = whole match); these are looked for
# anywhere. The byte is one ordinary text seldom holds: looking for it (memchr) is several times
# cheaper than looking for the literal, which it rules out when absent.
_SECRETS_ANYWHERE: tuple[tuple[bytes, bytes | None, re.Pattern[bytes], int], ...] = (
    (
        b"-----BEGIN",
        b"G",
        re.compile(
            rb"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|\Z)", re.DOTALL
        ),
        0,
    ),
    # possessive: no segment can give back a character to the "." after it, so a failed
    # attempt costs one pass over the run (and _match_at_literal then skips the run)
    (b"eyJ", b"J", re.compile(rb"eyJ[A-Za-z0-9_-]{4,}+\.eyJ[A-Za-z0-9_-]{4,}+\.[A-Za-z0-9_-]*+"), 0),
    (b"earer", None, _BEARER, 1),
    (b"EARER", b"R", _BEARER, 1),
)
# Secrets that are themselves runs of 20+ token characters: looked for inside such runs only.
_SECRETS_IN_RUNS: tuple[tuple[tuple[bytes, ...], re.Pattern[bytes], int], ...] = (
    ((b"AKIA", b"ASIA"), re.compile(rb"(?<![A-Z0-9])A(?:KIA|SIA)[A-Z0-9]{16}(?![A-Z0-9])"), 0),
    ((b"hoop_",), re.compile(rb"hoop_[A-Za-z0-9_-]{43,}"), 0),
)
_IN_RUNS = tuple((lit, pattern, group) for literals, pattern, group in _SECRETS_IN_RUNS for lit in literals)
# An AWS secret access key after its name; looked for when the buffer has a run of 40+.
_AWS_LITERALS = ((b"aws_secret", b"_"), (b"AWS_SECRET", b"W"), (b"secret_access_key", b"_"), (b"SecretAccessKey", b"K"))
_AWS_SECRET = re.compile(
    rb"(?i:aws_?secret_?access_?key|secret_?access_?key)[\"']?[ \t]*[:=][ \t]*[\"']?"
    rb"([A-Za-z0-9/+=]{40})(?![A-Za-z0-9/+=])"
)
_PEM_BEGIN = b"-----BEGIN"
# might_contain needs only these literals: AWS key ids, AWS secret values and hoop grant
# secrets are all runs of 20+ token characters, which _RUN20 finds on the token shape.
# A failed JWT match at an "eyJ" fails at every later "eyJ" of the same run of these characters
# (each reaches the same end of the run): the search resumes past the run, which keeps a run
# full of "eyJ" and no "." linear (trying each one would rescan the rest of the run).
_JWT_RUN = re.compile(rb"[A-Za-z0-9_-]*+")
_SKIP_ON_FAIL = {b"eyJ": _JWT_RUN}
_SECRET_GATES = tuple((lit, rare) for lit, rare, _, _ in _SECRETS_ANYWHERE)
_SECRET_LITERALS_RE = re.compile(b"|".join(re.escape(lit) for lit, _ in _SECRET_GATES))
_RUN20 = re.compile(b"x" * 20)
_X20 = b"x" * 20
_SMALL = 128  # below this, one regex call beats a loop of `in` checks
_BIG = 512  # from this size on, a rare byte's absence (memchr) is worth checking before a literal search


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
    skip = _SKIP_ON_FAIL.get(lit)
    pos = data.find(lit)
    while pos != -1:
        nxt = pos + 1
        for start in range(max(0, pos - 4), pos + 1):
            m = pattern.match(data, start)
            if m is not None:
                hits.append((m.start(group), m.end(group), "secret"))
                nxt = max(nxt, m.end())
                break
        else:
            if skip is not None:
                nxt = skip.match(data, pos).end()  # type: ignore[union-attr]
        pos = data.find(lit, nxt)

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


def scan_secrets(data: bytes, hits: list[Hit]) -> None:
    """Append the ``secret`` hits in ``data`` to ``hits`` (unsorted: :class:`proxy.detectors.Scanner` merges)."""
    tok = data.translate(_TOKEN_SHAPE)
    runs = _runs(tok)
    big = len(data) >= _BIG
    if big or len(data) >= _SMALL or _SECRET_LITERALS_RE.search(data):
        for lit, rare, pattern, group in _SECRETS_ANYWHERE:
            if not big or rare is None or rare in data:
                _match_at_literal(data, lit, pattern, group, hits)
    if not runs:
        return
    # AWS key ids and hoop secrets are token runs of 20+: look for them only inside runs.
    for lo, hi in runs:
        for lit, pattern, group in _IN_RUNS:
            pos = data.find(lit, lo, hi)
            while pos != -1:
                m = pattern.match(data, pos)
                if m is not None:
                    hits.append((m.start(group), m.end(group), "secret"))
                    pos = data.find(lit, m.end(), hi)
                else:
                    pos = data.find(lit, pos + 1, hi)
        if hi - lo >= GENERIC_MIN_LEN and _generic_secret(data[lo:hi]):
            hits.append((lo, hi, "secret"))
    if any(hi - lo >= 40 for lo, hi in runs):  # an AWS secret value is a run of 40
        for lit, rare in _AWS_LITERALS:
            if not big or rare in data:
                _match_at_literal(data, lit, _AWS_SECRET, 1, hits)


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
