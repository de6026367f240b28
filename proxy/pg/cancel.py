"""The cancel keys of this replica's PostgreSQL sessions, found by the key or by its digest.

How this works. hoop gives every client session its own BackendKeyData (a random pid and a
4-byte key) and keeps, per session, what a CancelRequest bearing them stands for upstream.
A CancelRequest opens a new TCP connection, so behind a load balancer it usually reaches
another replica. That replica does not know the key; it passes on only a digest, an
HMAC-SHA256 of (pid, key) under a key that every replica derives from the shared masking key,
and the replica holding the session finds the session by that digest. The digest goes with
:attr:`CancelKeys.key_id`, so a replica with another masking key (not made by one ``hoop state
init``) is logged rather than silently never matching. So the key never
leaves the replica it came to, and a listener on the store's PostgreSQL, which sees the
fan-out's notifications, learns nothing it could brute-force offline.

Lookups cost one dict probe either way. The local one is keyed by (pid, key), as before. The
one by digest is keyed by the digest's first 8 bytes, a bucket id that says nothing about the
key; the whole digest is then compared with :func:`hmac.compare_digest`.

No I/O here: the server sends the upstream cancel, the fan-out carries the digest.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from typing import Generic, Protocol, TypeVar

T = TypeVar("T")

_PID = struct.Struct("!I")
#: hoop's BackendKeyData: a pid in 1..2**31-1 and a 4-byte key (protocol 3.0's size)
KEY_LENGTH = 4
DIGEST_LENGTH = 32
_BUCKET = 8


class CancelPeers(Protocol):
    """The other replicas, as the PostgreSQL proxy sees them (:class:`broker.fanout.Replicas`)."""

    async def ask_cancel(self, digest: bytes, key_id: str) -> bool:
        """Hand a cancel digest (made under the key ``key_id`` names) to the other replicas;
        ``False`` if it was not sent (no fan-out, no connection, or over the rate bound)."""
        ...


def could_be_ours(pid: int, key: bytes) -> bool:
    """Whether some hoop replica could have issued this (pid, key): others are never passed on."""
    return len(key) == KEY_LENGTH and 0 < pid < 2**31


class CancelKeys(Generic[T]):
    """The live sessions' cancel keys and what each stands for (``T``: the upstream target)."""

    def __init__(self, secret: bytes) -> None:
        # a key of its own, so a digest is never a masking hash of the same bytes
        self._mac = hmac.new(secret, b"hoop pg cancel v1", hashlib.sha256).digest()
        #: names the digest key without revealing it, so a replica whose key differs is noticed
        self.key_id = hmac.new(self._mac, b"key id", hashlib.sha256).hexdigest()[:8]
        self._local: dict[tuple[int, bytes], tuple[bytes, T]] = {}
        self._buckets: dict[bytes, list[tuple[bytes, T]]] = {}

    def __len__(self) -> int:
        return len(self._local)

    def digest(self, pid: int, key: bytes) -> bytes:
        """What the other replicas are told instead of (pid, key)."""
        return hmac.new(self._mac, _PID.pack(pid & 0xFFFFFFFF) + key, hashlib.sha256).digest()

    def add(self, pid: int, key: bytes, target: T) -> None:
        digest = self.digest(pid, key)
        self._local[(pid, key)] = (digest, target)
        self._buckets.setdefault(digest[:_BUCKET], []).append((digest, target))

    def remove(self, pid: int, key: bytes) -> None:
        found = self._local.pop((pid, key), None)
        if found is None:
            return
        digest, _target = found
        bucket = self._buckets.get(digest[:_BUCKET], [])
        bucket[:] = [entry for entry in bucket if entry[0] != digest]
        if not bucket:
            self._buckets.pop(digest[:_BUCKET], None)

    def get(self, pid: int, key: bytes) -> T | None:
        """The session a CancelRequest that reached this replica stands for."""
        found = self._local.get((pid, key))
        return None if found is None else found[1]

    def by_digest(self, digest: bytes) -> T | None:
        """The session that another replica's digest stands for, if this replica holds it."""
        if len(digest) != DIGEST_LENGTH:
            return None
        hit: T | None = None
        for known, target in self._buckets.get(digest[:_BUCKET], ()):
            if hmac.compare_digest(known, digest):
                hit = target
        return hit
