"""The masking engine shared by the PostgreSQL, SSH and HTTP proxies. Pure code, no I/O.

How this works. :class:`Masker` is built once per resource from its :class:`Masking`
config and the deployment's hash key. Free text (cells, error messages, statements,
terminal output) goes through the detectors of :mod:`proxy.detectors`; whole values
(masked columns, JSON keys) go through :meth:`Masker.apply`. The bytes entry points
(:meth:`Masker.might_contain`, :meth:`Masker.mask_bytes`) exist for the hot paths: when
nothing can match they cost a few passes of C code over the buffer and allocate nothing
the caller has to forward.

Replacement scheme, one per strategy:

* ``redact``: ``[email]``, ``[card]``, ``[ssn]``, ``[iban]``, ``[phone]`` or ``[secret]``
  names the detector that fired; a whole value masked by a column or JSON-key rule becomes
  ``[masked]``.
* ``partial``: every character but the last four becomes ``*`` (``************4242``);
  values of four characters or fewer become all ``*``.
* ``hash``: ``h:`` and the first 16 hex digits of HMAC-SHA256(key, UTF-8 value). Equal
  values give equal output under one key, so joins and grouping still work; another key
  gives unrelated output.

Terminal escapes. ``grep --color`` and prompts put CSI (``ESC [ ... final``) and OSC
(``ESC ] ... BEL`` or ``ESC ] ... ESC \\``) sequences inside values. When the data holds ESC,
:meth:`Masker.mask_bytes` scans a copy with those sequences removed and replaces each hit's
original span (the escapes inside it are written again after the marker, so colours still
reset); OSC payloads (window titles) are masked on their own. Data without ESC takes the old
path unchanged.

:class:`StreamMasker` (:mod:`proxy.streammask`, re-exported here) masks a byte stream chunk by
chunk, holding back only a trailing piece that could still grow into a detectable value.
"""

from __future__ import annotations

import fnmatch
import hmac
import re
from collections.abc import Sequence

from broker.config import Detector, Masking, MaskRule, Strategy
from proxy.detectors import Hit, Scanner
from proxy.streammask import _ESC_SEQ, _OSC, StreamMasker, _raw_offsets

__all__ = ["PARTIAL_KEEP", "REDACT_MARKERS", "RULE_MARKER", "Masker", "StreamMasker", "partial"]


#: The marker ``redact`` puts in place of a whole value masked by a column or JSON-key rule.
RULE_MARKER = "[masked]"
#: Characters kept in clear by ``partial``.
PARTIAL_KEEP = 4
_HASH_CACHE_MAX = 65_536
# only values up to this size are cached (repeated emails, ids: what the cache is for), so the
# cache holds at most about 65,536 x 256 bytes; a big cell (a document hashed by a column rule)
# would otherwise be kept whole
_HASH_CACHE_VALUE_MAX = 256
#: What ``redact`` puts in place of a detector hit.
REDACT_MARKERS: dict[Detector, bytes] = {
    d: f"[{d}]".encode() for d in ("email", "card", "ssn", "iban", "phone", "secret")
}


def _compile_rules(rules: list[MaskRule]) -> tuple[tuple[re.Pattern[str], Strategy], ...]:
    return tuple((re.compile(fnmatch.translate(r.match), re.IGNORECASE), r.strategy) for r in rules)


def partial(value: str) -> str:
    """Keep the last :data:`PARTIAL_KEEP` characters of ``value``; star the rest."""
    if len(value) <= PARTIAL_KEEP:
        return "*" * len(value)
    return "*" * (len(value) - PARTIAL_KEEP) + value[-PARTIAL_KEEP:]


class Masker:
    """Masks text and values for one resource, following its :class:`Masking` config.

    ``hash_key`` keys the ``hash`` strategy. With ``config.enabled`` false every method
    returns its input unchanged (and the bytes methods return None / False).
    """

    def __init__(self, config: Masking, hash_key: bytes) -> None:
        self.config = config
        self.enabled = config.enabled
        self.strategy: Strategy = config.strategy
        self._key = hash_key
        self._scanner = Scanner(config.detectors if config.enabled else ())
        self._columns = _compile_rules(config.columns)
        self._json_keys = _compile_rules(config.json_keys)
        self._hashes: dict[bytes, bytes] = {}
        self._column_cache: dict[tuple[str, str | None], Strategy | None] = {}
        self._key_cache: dict[str, Strategy | None] = {}

    # -- free text ---------------------------------------------------------------------

    def might_contain(self, data: bytes | memoryview) -> bool:
        """False when no detector can fire anywhere in ``data``: forward it untouched."""
        return self.enabled and self._scanner.might_contain(data)

    def scan(self, data: bytes) -> list[Hit]:
        """Validated detector hits in ``data``: sorted, non-overlapping ``(start, end, detector)``."""
        return self._scanner.scan(data) if self.enabled else []

    def mask_bytes(self, data: bytes | memoryview) -> bytes | None:
        """Mask UTF-8 ``data`` with the detectors; None when nothing matched (send the original)."""
        if not self.enabled:
            return None
        raw = data.tobytes() if isinstance(data, memoryview) else data
        if b"\x1b" in raw:
            return self._mask_escaped(raw)
        hits = self._scanner.scan(raw)  # gated per detector: as cheap as might_contain
        if not hits:
            return None
        return self.replace(raw, hits, self.strategy)

    def _mask_escaped(self, raw: bytes) -> bytes | None:
        """:meth:`mask_bytes` for data holding terminal escapes: scan it with them removed."""
        plain = _ESC_SEQ.sub(b"", raw)
        hits = self._scanner.scan(plain)
        osc = b"\x1b]" in raw
        if not hits and not osc:
            return None
        ends = [p for start, end, _ in hits for p in (start, end - 1)]
        spans = _raw_offsets(raw, ends)
        parts: list[bytes] = []
        last = 0
        for k, (start, end, detector) in enumerate(hits):
            o_start, o_end = spans[2 * k], spans[2 * k + 1] + 1
            parts.append(raw[last:o_start])
            if self.strategy == "redact":
                parts.append(REDACT_MARKERS[detector])
            else:
                parts.append(self.apply_bytes(plain[start:end], self.strategy))
            # the escapes inside the value follow the marker: a colour opened before it still ends
            parts.extend(m.group() for m in _ESC_SEQ.finditer(raw, o_start, o_end))
            last = o_end
        parts.append(raw[last:])
        out = b"".join(parts)
        if osc:  # a title is scanned on its own: it is not part of the text around it
            out = _OSC.sub(self._mask_osc, out)
        return None if out == raw else out

    def _mask_osc(self, m: re.Match[bytes]) -> bytes:
        payload = self.mask_bytes(m[2])
        return m[0] if payload is None else m[1] + payload + m[3]

    def mask_text(self, s: str) -> str:
        """Mask ``s`` with the enabled detectors and the resource's default strategy."""
        if not self.enabled:
            return s
        out = self.mask_bytes(s.encode("utf-8", "surrogatepass"))
        return s if out is None else out.decode("utf-8", "surrogatepass")

    def replace(self, data: bytes, hits: list[Hit], strategy: Strategy) -> bytes:
        """Replace each hit in ``data`` by its masked form under ``strategy``."""
        parts: list[bytes] = []
        last = 0
        for start, end, detector in hits:
            parts.append(data[last:start])
            if strategy == "redact":
                parts.append(REDACT_MARKERS[detector])
            else:
                parts.append(self.apply_bytes(data[start:end], strategy))
            last = end
        parts.append(data[last:])
        return b"".join(parts)

    def mask_row(
        self, cells: Sequence[bytes | None], strategies: Sequence[Strategy | None]
    ) -> list[bytes | None] | None:
        """Mask one result row of UTF-8 text cells (None is SQL NULL); None when nothing changed.

        ``strategies[i]`` is cell i's column rule (:meth:`column_strategy`, computed once per
        result) or None for detectors. Prefer :meth:`mask_rows` for a batch of rows.
        """
        return self.mask_rows([cells], strategies)[0]

    def mask_rows(
        self, rows: Sequence[Sequence[bytes | None]], strategies: Sequence[Strategy | None]
    ) -> list[list[bytes | None] | None]:
        """:meth:`mask_row` for a batch (e.g. the DataRows of one network chunk).

        The detector cells of the whole batch are prefiltered with one :meth:`might_contain`
        call, so rows need per-cell scanning only when something may be there.
        """
        if not self.enabled:
            return [None] * len(rows)
        plain = [i for i, s in enumerate(strategies) if s is None]
        ruled = [(i, s) for i, s in enumerate(strategies) if s is not None]
        scan = bool(plain) and self._scanner.might_contain(
            b"\x00".join(c for row in rows for i in plain if (c := row[i]) is not None)
        )
        apply_bytes, mask_bytes = self.apply_bytes, self.mask_bytes
        out: list[list[bytes | None] | None] = []
        for row in rows:
            new: list[bytes | None] | None = None
            for i, strategy in ruled:
                cell = row[i]
                if cell is not None:
                    if new is None:
                        new = list(row)
                    new[i] = apply_bytes(cell, strategy)
            if scan:
                for i in plain:
                    cell = row[i]
                    masked = None if cell is None else mask_bytes(cell)
                    if masked is not None:
                        if new is None:
                            new = list(row)
                        new[i] = masked
            out.append(new)
        return out

    # -- whole values ------------------------------------------------------------------

    def apply(self, value: str, strategy: Strategy) -> str:
        """Mask the whole of ``value`` (a masked column or JSON key) under ``strategy``."""
        if not self.enabled:
            return value
        if strategy == "redact":
            return RULE_MARKER
        if strategy == "partial":
            return partial(value)
        return self._hash(value.encode("utf-8", "surrogatepass")).decode("ascii")

    def apply_bytes(self, value: bytes, strategy: Strategy) -> bytes:
        """:meth:`apply` for a UTF-8 encoded value (a PostgreSQL text cell); returns UTF-8."""
        if not self.enabled:
            return value
        if strategy == "redact":
            return b"[masked]"
        if strategy == "hash":
            return self._hash(value)
        if value.isascii():
            if len(value) <= PARTIAL_KEEP:
                return b"*" * len(value)
            return b"*" * (len(value) - PARTIAL_KEEP) + value[-PARTIAL_KEEP:]
        return partial(value.decode("utf-8", "replace")).encode("utf-8")

    def _hash(self, value: bytes) -> bytes:
        out = self._hashes.get(value)
        if out is None:
            out = b"h:" + hmac.digest(self._key, value, "sha256")[:8].hex().encode("ascii")
            if len(value) <= _HASH_CACHE_VALUE_MAX:
                if len(self._hashes) >= _HASH_CACHE_MAX:
                    self._hashes.clear()
                self._hashes[value] = out
        return out

    # -- rules -------------------------------------------------------------------------

    def column_strategy(self, column: str, table: str | None = None) -> Strategy | None:
        """Strategy of the first column rule matching ``column`` or ``table.column``.

        Globs match case-insensitively. ``table`` may be schema-qualified: for
        ``public.users`` the names tried are ``email``, ``public.users.email`` and
        ``users.email``, so a rule ``users.email`` matches in any schema.
        """
        if not self.enabled or not self._columns:
            return None
        cache_key = (column, table)
        if cache_key in self._column_cache:
            return self._column_cache[cache_key]
        names = [column]
        if table:
            names.append(f"{table}.{column}")
            if "." in table:
                names.append(f"{table.rsplit('.', 1)[1]}.{column}")
        found: Strategy | None = None
        for pattern, strategy in self._columns:
            if any(pattern.match(name) for name in names):
                found = strategy
                break
        if len(self._column_cache) < 4096:
            self._column_cache[cache_key] = found
        return found

    def json_key_strategy(self, key: str) -> Strategy | None:
        """Strategy of the first ``json_keys`` rule whose glob matches ``key`` (case-insensitive)."""
        if not self.enabled or not self._json_keys:
            return None
        try:
            return self._key_cache[key]
        except KeyError:
            pass
        found: Strategy | None = None
        for pattern, strategy in self._json_keys:
            if pattern.match(key):
                found = strategy
                break
        if len(self._key_cache) >= 4096:
            self._key_cache.clear()
        self._key_cache[key] = found
        return found

    def stream(self) -> StreamMasker:
        """A new :class:`StreamMasker` over this masker."""
        return StreamMasker(self)
