"""The stream side of the masking engine: :class:`StreamMasker` and where it cuts a stream. Pure code, no I/O.

How this works. :class:`StreamMasker` masks a byte stream (SSH output) chunk by chunk with a
:class:`proxy.mask.Masker`. It holds back only a trailing piece that could still grow into a
detectable value. It finds that piece by matching *reversed* patterns at the start of the
reversed tail of the buffer, so the cost is proportional to the piece, not to the chunk. A
piece counts when it could still become an email (has ``@``), a card/phone/SSN (3+ digits with
separators), an IBAN, a keyword secret (``eyJ``, ``AKIA``, ``hoop_``, ``Bearer …``,
``aws_secret_access_key=…``), a long token (16+ characters), or a private-key PEM block. Any
other trailing word is held only when the chunk may have cut it (there is other text before it
in the buffer, or the chunk is longer than the echo of one typed key), so a chunk ending in
mid-word of bulk output, or output written a field at a time, is held, but typed characters,
echoed one per chunk, are not.

Terminal escapes. The cut looks through SGR/EL sequences (which do not move the cursor, so the
word goes on after them) and holds an escape sequence the chunk cut in two. The escape patterns
and :func:`_raw_offsets` live here and are shared with :meth:`proxy.mask.Masker.mask_bytes`,
which scans data holding ESC with its sequences removed. Data without ESC takes the old path
unchanged.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from proxy.secretscan import pem_open

if TYPE_CHECKING:
    from proxy.mask import Masker

__all__ = ["StreamMasker"]


class StreamMasker:
    """Masks a UTF-8 byte stream (SSH output) whose sensitive values may span chunks.

    :meth:`feed` returns what can be sent now: everything except a trailing piece that
    could still become a detectable value (bounded by ``max_hold`` bytes, or ``max_block``
    for a private-key PEM block, which is redacted whole past that size) and an incomplete
    trailing UTF-8 sequence. Ordinary text, including single typed characters, passes at
    once. Call :meth:`flush` at the end of the stream, or after the stream has been idle
    briefly while :attr:`pending` is non-zero.
    """

    def __init__(self, masker: Masker, *, max_hold: int = 4096, max_block: int = 16_384) -> None:
        self._masker = masker
        self._max_hold = max_hold
        self._max_block = max_block
        self._held = b""

    @property
    def pending(self) -> int:
        """Bytes held back, waiting for more input or :meth:`flush`."""
        return len(self._held)

    def feed(self, chunk: bytes) -> bytes:
        """Take the next chunk; return the masked bytes that may be sent now."""
        if not self._masker.enabled:
            return chunk
        buf = self._held + chunk if self._held else chunk
        if not buf:
            return b""
        cut, block = _cut(buf, self._max_hold, continuing=bool(self._held))
        if block and len(buf) - cut > self._max_block:
            # A private key that never ends (or is huge): redact what we hold and move on.
            self._held = b""
            return self._mask(buf[:cut]) + b"[secret]"
        self._held = buf[cut:]
        return self._mask(buf[:cut]) if cut else b""

    def flush(self) -> bytes:
        """Return the rest of the stream, masked."""
        held, self._held = self._held, b""
        return self._mask(held)

    def _mask(self, data: bytes) -> bytes:
        out = self._masker.mask_bytes(data)
        return data if out is None else out

# CSI: ESC [ parameters intermediates final; OSC: ESC ] payload, ended by BEL or ESC \\
_ESC_SEQ = re.compile(rb"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)")
_OSC = re.compile(rb"(\x1b\])([^\x07\x1b]*)(\x07|\x1b\\)")
# the start of an escape sequence a chunk cut in two (an OSC may stop between ESC and \\)
_ESC_OPEN = re.compile(rb"\x1b(?:\[[0-?]*[ -/]*|\][^\x07\x1b]*\x1b?)?")
# a CSI ending the buffer, reversed; group 1 is its final byte
_REV_CSI_END = re.compile(rb"([@-~])[ -/]*[0-?]*\[\x1b")
_SAME_LINE = b"mK"  # SGR and EL finals: they do not move the cursor, so a word goes on after them
_TOK = rb"A-Za-z0-9._+/=~-"
# Reversed patterns, matched at offset 0 of the reversed tail.
_REV_EMAIL = re.compile(rb"[A-Za-z0-9.-]*@[A-Za-z0-9._%+-]*")
_REV_DIGITS = re.compile(rb"[0-9 ().-]*[0-9(+]")
_REV_IBAN = re.compile(rb"[A-Z0-9 ]*[0-9]{2}[A-Z]{2}")
_REV_CONTEXT = re.compile(
    rb"[" + _TOK + rb"]*[ \t]+(?:reraeB|reraeb|RERAEB)"
    rb"|[A-Za-z0-9/+=]*[\"']?[ \t]*[:=]?[ \t]*[\"']?(?i:yek_?ssecca_?terces(?:_?swa)?)"
)
_REV_TOKEN = re.compile(rb"[" + _TOK + rb"]+")
_STRONG_WORDS = (b"Jye", b"AIKA", b"AISA", b"_pooh")
_STRONG_TOKEN = 16
_LINE_END = b"\r\n"
_ECHO_MAX = 3  # bytes of terminal echo for one key (a UTF-8 character, or the CR LF of Enter)


def _utf8_incomplete(buf: bytes) -> int:
    """Length of an incomplete UTF-8 sequence at the end of ``buf`` (0 to 3)."""
    for i in range(1, min(3, len(buf)) + 1):
        b = buf[-i]
        if b & 0xC0 == 0x80:
            continue
        if b < 0xC0:
            return 0
        need = 2 if b < 0xE0 else 3 if b < 0xF0 else 4
        return i if need > i else 0
    return 0


def _raw_offsets(raw: bytes, plain: list[int]) -> list[int]:
    """Map ascending indexes into ``raw`` with :data:`_ESC_SEQ` removed to indexes into ``raw``."""
    out: list[int] = []
    removed = 0
    seqs = _ESC_SEQ.finditer(raw)
    m = next(seqs, None)
    for p in plain:
        while m is not None and m.start() - removed <= p:  # a sequence before character p
            removed += m.end() - m.start()
            m = next(seqs, None)
        out.append(p + removed)
    return out


def _esc_open(buf: bytes, lo: int, end: int) -> int:
    """Start of an escape sequence cut off at ``end`` (searched from ``lo``), or ``end``."""
    i = buf.rfind(b"\x1b", lo, end)
    if i == -1:
        return end
    if i + 1 == end:  # a lone ESC may be the first half of an OSC's ESC \\
        j = buf.rfind(b"\x1b", lo, i)
        if j != -1 and _ESC_OPEN.fullmatch(buf, j, end):
            return j
    return i if _ESC_OPEN.fullmatch(buf, i, end) else end


def _cut(buf: bytes, max_hold: int, *, continuing: bool) -> tuple[int, bool]:
    """Where to cut ``buf``: before the cut may be sent, after it is held.

    ``continuing`` says ``buf`` starts with bytes held last time: a word held because a
    chunk cut it stays held while further small chunks extend it. The flag returned is
    True when the held part is a private-key PEM block in progress.
    """
    cut = len(buf) - _utf8_incomplete(buf)
    pem = pem_open(buf)
    if pem != -1:
        return min(pem, cut), True
    if buf[-1] in _LINE_END:  # no reversed pattern can start there: nothing to hold (the common case)
        return cut, False
    lo = max(0, cut - max_hold)
    if buf.find(b"\x1b", lo, cut) != -1:
        return _cut_escaped(buf, lo, cut, continuing), False
    # a word may go on in the next chunk when a chunk cut it: when other text comes before it,
    # when it continues a held word, or when the chunk is longer than typed echo (1 to 3 bytes a
    # key); output written in pieces ("alice.smith", then "@example.com") is held like that
    return cut - _hold(buf[lo:cut][::-1], continuing or len(buf) > _ECHO_MAX), False


def _cut_escaped(buf: bytes, lo: int, cut: int, continuing: bool) -> int:
    """:func:`_cut` when ``buf[lo:cut]`` holds ESC: judge the tail with the escapes removed."""
    end = _esc_open(buf, lo, cut)
    at_esc = end < cut
    if not at_esc:
        m = _REV_CSI_END.match(buf[lo:cut][::-1])
        if m and m[1] not in _SAME_LINE:  # the cursor moved (or a query): the word is over
            return cut
        at_esc = m is not None or buf[cut - 1] == 0x07 or buf.endswith(b"\x1b\\", lo, cut)
    plain = _ESC_SEQ.sub(b"", buf[lo:end])
    # a typed key echoed in colour ("ESC[1m" l "ESC[0m") ends in an escape: count its text only;
    # a chunk ending in text after escapes was cut like any long chunk
    size = lo + len(plain) if at_esc else len(buf)
    hold = _hold(plain[::-1], continuing or size > _ECHO_MAX)
    if not hold:
        return end
    return lo + _raw_offsets(buf[lo:end], [len(plain) - hold])[0]


def _hold(rev: bytes, cut_word: bool) -> int:
    """How many bytes at the start of ``rev`` (a reversed tail) could still become a value."""
    if not rev or rev.startswith(b"-----YEK ETAVIRP"):
        return 0
    hold = 0
    m = _REV_EMAIL.match(rev)
    if m:
        hold = m.end()
    m = _REV_DIGITS.match(rev)
    if m:
        digits = len(m.group()) - len(m.group().translate(None, b"0123456789"))
        if digits >= 3 or m.end() < len(rev) or cut_word:
            hold = max(hold, m.end())
    for pattern in (_REV_IBAN, _REV_CONTEXT):
        m = pattern.match(rev)
        if m:
            hold = max(hold, m.end())
    m = _REV_TOKEN.match(rev)
    if m:
        token = m.group()
        weak = m.end() < len(rev) or cut_word
        if weak or len(token) >= _STRONG_TOKEN or any(w in token for w in _STRONG_WORDS):
            hold = max(hold, m.end())
    if 0 < hold < len(rev):  # never cut a word in two: hold from its start
        m = _REV_TOKEN.match(rev, hold)
        if m:
            hold = m.end()
    return hold
