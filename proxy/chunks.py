"""A session's recorded events as the store keeps them: runs of JSON lines (``session_event_chunks``
rows), built by the hub's flush and by crash recovery (:mod:`proxy.recovery`)."""

from __future__ import annotations

#: a session's events not stored yet: (seq, its JSON line)
Pending = tuple[int, str]
#: a chunk (one store row) holds about this many characters of lines (SQLite writes 1 MiB values
#: ~10% slower per byte than 64 KiB ones)
CHUNK_CHARS = 1 << 16


def as_chunks(session_id: str, items: list[Pending]) -> list[tuple[str, int, int, str]]:
    """A session's pending events as store chunks (session id, first seq, last seq, lines): runs of
    lines up to ``CHUNK_CHARS``, each line copied once; a line that long is a chunk of its own,
    not copied at all (an SSH session records a megabyte of output per event)."""
    texts = [t for _, t in items]
    if sum(map(len, texts)) <= CHUNK_CHARS:
        return [(session_id, items[0][0], items[-1][0], "".join(texts))]
    out: list[tuple[str, int, int, str]] = []
    start, size = 0, 0
    for i, text in enumerate(texts):
        if len(text) >= CHUNK_CHARS:
            if start < i:
                out.append((session_id, items[start][0], items[i - 1][0], "".join(texts[start:i])))
            out.append((session_id, items[i][0], items[i][0], text))
            start, size = i + 1, 0
            continue
        size += len(text)
        if size >= CHUNK_CHARS or i == len(texts) - 1:
            out.append((session_id, items[start][0], items[i][0], "".join(texts[start:i + 1])))
            start, size = i + 1, 0
    return out
