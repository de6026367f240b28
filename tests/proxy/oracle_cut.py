"""Test-only oracle: the stream masker's cut (proxy.streammask._cut) as it was before the line-end
shortcut (kept verbatim below). tests/proxy/test_jsondiff.py checks the current one against it.

Since the terminal-escape fix, a tail holding ESC is judged with its escapes removed
(``_cut_escaped`` below, written with an explicit index map rather than offset counting).
"""

# ruff: noqa
from __future__ import annotations

import re

from proxy.detectors import pem_open

_TOK = rb"A-Za-z0-9._+/=~-"
# Reversed patterns, matched at offset 0 of the reversed tail.
_REV_CSI = re.compile(rb"[@-~][ -/]*[0-9;?]*\[\x1b")
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


_ECHO_MAX = 3  # (since the review fix: a chunk longer than this may cut a word)


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
    lo = max(0, cut - max_hold)
    if b"\x1b" in buf[lo:cut]:
        return _cut_escaped(buf, lo, cut, continuing), False
    rev = buf[max(0, cut - max_hold) : cut][::-1]
    return cut - _hold(rev, continuing or len(buf) > _ECHO_MAX), False


_ESC = re.compile(rb"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)")
_OPEN = re.compile(rb"\x1b\[[0-?]*[ -/]*|\x1b\][^\x07\x1b]*\x1b?|\x1b")
_CSI_END = re.compile(rb"\x1b\[[0-?]*[ -/]*([@-~])\Z")


def _cut_escaped(buf: bytes, lo: int, cut: int, continuing: bool) -> int:
    window = buf[lo:cut]
    end = cut
    for i in range(len(window)):  # the first ESC from which the rest is an unfinished sequence
        if window[i] == 0x1b and _OPEN.fullmatch(window, i):
            end = lo + i
            break
    if end == cut:
        m = _CSI_END.search(window)
        if m and m[1] not in b"mK":
            return cut
        at_esc = m is not None or window.endswith(b"\x07") or window.endswith(b"\x1b\\")
    else:
        at_esc = True
    idx: list[int] = []  # raw index of each byte left when the escapes are removed
    pos = lo
    for m in _ESC.finditer(buf, lo, end):
        idx.extend(range(pos, m.start()))
        pos = m.end()
    idx.extend(range(pos, end))
    plain = bytes(buf[i] for i in idx)
    size = lo + len(plain) if at_esc else len(buf)
    hold = _hold(plain[::-1], continuing or size > _ECHO_MAX)
    return idx[len(plain) - hold] if hold else end


def _hold(rev: bytes, cut_word: bool) -> int:
    if not rev or _REV_CSI.match(rev) or rev.startswith(b"-----YEK ETAVIRP"):
        return 0
    # a word may go on in the next chunk when a chunk cut it: when other text comes before it,
    # when it continues a held word, or when the chunk is longer than typed echo (1 to 3 bytes a
    # key); output written in pieces ("alice.smith", then "@example.com") is held like that
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
