"""A live session's recording spool: append-only segment files, deleted once they are stored.

How this works. :class:`proxy.sessions.SessionHub` writes each loop iteration's events of a
session with one :meth:`Spool.write` (one ``os.write``), so a crash of hoop loses at most the
events of the iteration that was running. A session that lives long (an HTTP session of a busy
client, a PostgreSQL connection held open for days) must not fill the disk, so the spool is a
chain of segments: ``<session>.jsonl``, then ``<session>.1.jsonl``, ``<session>.2.jsonl`` …, a new
one started when the current one passes ``segment_bytes``. When the hub has stored every event up
to some sequence number, :meth:`Spool.stored` deletes the finished segments holding nothing later,
so the disk holds about one segment plus what is not stored yet per live session. At start,
:func:`leftovers` finds what a crash left behind, grouped per session and in order.

Replicas may share one spool directory (one ``state_dir`` for several ``hoop serve`` on a host, or
on a shared volume), so what one finds there at start may be another's live session. A spool
holds an exclusive ``flock`` on the segment it writes, which the kernel lets go when the process
dies, however it dies; :func:`claimed` takes every segment of a session under the same lock
before recovery reads it, and gives up on a session whose newest segment is still held.
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["SEGMENT_BYTES", "Spool", "claimed", "leftovers"]

log = logging.getLogger(__name__)

SEGMENT_BYTES = 8 << 20


def _path(directory: Path, session_id: str, n: int) -> Path:
    return directory / (f"{session_id}.jsonl" if n == 0 else f"{session_id}.{n}.jsonl")


class Spool:
    """One session's spool segments; ``write`` appends, ``stored`` frees, ``remove`` deletes all."""

    def __init__(self, directory: Path, session_id: str, *, segment_bytes: int = SEGMENT_BYTES,
                 lock: Callable[[int], bool] | None = None) -> None:
        self._dir = directory
        self._lock = lock or _lock  # (a test's: to look at the directory while a new segment is locked)
        self._id = session_id
        self._limit = segment_bytes
        self._n = 0
        self._size = 0
        self._last = 0  # last sequence number written to the current segment
        self._done: list[tuple[int, int]] = []  # finished segments: (number, last sequence number)
        self.failed = False  # the disk failed a write: the spool stopped
        self._fd: int | None = self._open(0)

    def _open(self, n: int) -> int:
        # Locked under a name recovery does not read, then renamed: a segment is never seen under its own
        # name unlocked, where a replica's recovery could claim it (and close the live session) before
        # the lock is taken. The lock is held while this process lives: the segment is not a leftover.
        path = _path(self._dir, self._id, n)
        new = path.with_name(path.name + ".new")
        fd = os.open(new, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            self._lock(fd)
            os.rename(new, path)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                new.unlink()
            raise
        return fd

    @property
    def segments(self) -> list[Path]:
        """The segment files that exist now, oldest first."""
        return [_path(self._dir, self._id, n) for n, _ in self._done] + [_path(self._dir, self._id, self._n)]

    def write(self, data: bytes, last_seq: int) -> None:
        """Append ``data`` (whole lines of events up to ``last_seq``) with one ``os.write`` (more only
        after a short write). A failing disk (full, I/O error) stops the spool, logged once: the events
        are still kept in memory until stored, but a crash before then would lose them. Stopping
        (rather than writing on) keeps a torn line at the end of a segment, where recovery skips it."""
        if self._fd is None or self.failed:
            return
        try:
            if self._size >= self._limit:
                fd = self._open(self._n + 1)  # locked before the old one is let go: one is always held
                os.close(self._fd)
                self._fd = fd
                self._done.append((self._n, self._last))
                self._n += 1
                self._size = 0
            view = memoryview(data)
            while view:  # bounded: each pass writes at least one byte or raises
                view = view[os.write(self._fd, view):]
        except OSError as exc:
            log.error("session=%s spool stopped (%s): its events are kept in memory until stored, and a crash "
                      "before that would lose them", self._id, exc.strerror or type(exc).__name__)
            self.failed = True  # (the segment stays open: its lock says the session is live, not a leftover)
            return
        self._size += len(data)
        self._last = last_seq

    def stored(self, seq: int) -> None:
        """Every event up to ``seq`` is in the store: delete the finished segments it covers."""
        while self._done and self._done[0][1] <= seq:
            n, _ = self._done.pop(0)
            with contextlib.suppress(FileNotFoundError):
                _path(self._dir, self._id, n).unlink()

    def close(self) -> None:
        """Stop writing and let go of the lock, keeping every segment: what a crash leaves behind."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def remove(self) -> None:
        """The session is closed and stored: delete every segment, then close (the lock is held until every
        segment is gone, so a replica's recovery never claims one that is being deleted)."""
        for path in self.segments:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self._done.clear()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _lock(fd: int) -> bool:
    """Take ``fd``'s exclusive lock without waiting; False if another open file holds it. A file system
    without locks counts as unlocked: a spool there is recovered as before (do not share it)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        pass
    return True


def _segments(directory: Path, session_id: str) -> list[Path]:
    """The segments of ``session_id`` that exist now, oldest first."""
    found = []
    for path in directory.glob(f"{session_id}.*"):
        rest = path.name[len(session_id) + 1:]
        if rest == "jsonl":
            found.append((0, path))
        elif rest.endswith(".jsonl") and rest[: -len(".jsonl")].isdigit():
            found.append((int(rest[: -len(".jsonl")]), path))
    return [path for _, path in sorted(found)]


@contextlib.contextmanager
def claimed(directory: Path, session_id: str) -> Iterator[list[Path] | None]:
    """Hold every segment of ``session_id`` under its lock, for recovery: yields them oldest first
    (those another recovery removed meanwhile left out), or None when a running hoop still writes the
    session (it holds its newest segment). The locks are let go on leaving."""
    held: dict[Path, int] = {}
    try:
        while True:  # again after locking: a live spool may have started a newer segment meanwhile
            new = [path for path in _segments(directory, session_id) if path not in held]
            if not new:
                break
            for path in new:
                try:
                    fd = os.open(path, os.O_RDONLY)
                except FileNotFoundError:
                    continue
                held[path] = fd
                if not _lock(fd):
                    yield None
                    return
        yield [path for path in _segments(directory, session_id) if path in held]
    finally:
        for fd in held.values():
            os.close(fd)


def leftovers(directory: Path, batch: int = 10_000) -> Iterator[tuple[str, list[Path]]]:
    """The spool segments in ``directory``: ``(session id, its segments oldest first)``, by session id.

    Every segment of every session is found, whatever their number, in bounded memory: each pass
    over the directory keeps only the ``batch`` lowest session ids after the last one given out
    (with their segment numbers), so a directory of S sessions is read about S / ``batch`` times.
    The caller may delete what it was given before it asks for the next session.
    """
    after: str | None = None
    while True:
        ids: list[str] = []  # sorted; at most ``batch``
        found: dict[str, list[tuple[int, str]]] = {}
        with os.scandir(directory) as entries:
            for entry in entries:
                if not entry.name.endswith(".jsonl"):
                    continue
                session_id, _, rest = entry.name[: -len(".jsonl")].partition(".")
                if after is not None and session_id <= after:
                    continue
                segment = (int(rest) if rest.isdigit() else 0, entry.name)
                segments = found.get(session_id)
                if segments is not None:
                    segments.append(segment)
                elif len(ids) < batch or session_id < ids[-1]:
                    bisect.insort(ids, session_id)
                    found[session_id] = [segment]
                    if len(ids) > batch:
                        del found[ids.pop()]
        for session_id in ids:
            yield session_id, [directory / name for _, name in sorted(found[session_id])]
        if len(ids) < batch:
            return
        after = ids[-1]
