"""Masking WebSocket messages from the upstream, Kubernetes channel protocols included (no I/O).

How this works. A plain text message is complete, so it is masked whole. A binary message
is masked whole too when its payload is valid UTF-8 text; any other binary payload (images,
protobuf, compressed data) passes through untouched, since detectors cannot tell values
from data there.

``kubectl exec``/``attach``/``cp`` speak a channel protocol (``v4.channel.k8s.io``,
``v5.channel.k8s.io`` and older): each binary message is one byte of stream id, then that
stream's data. A value written to stdout may be split over several messages, so
:class:`Channels` keeps one :class:`proxy.mask.StreamMasker` per stream (stdout, stderr,
the error stream), which holds back a trailing piece that could still grow into a value;
the caller sends :meth:`Channels.flush` frames when the upstream goes quiet. A stream whose
data stops being valid UTF-8 (``kubectl cp`` moves tar archives over stdout) is relayed
unchanged from then on, after what it held. The ``base64.channel.k8s.io`` variants carry
the same frames as text (an ASCII stream digit, then base64): they are decoded, masked the
same way and re-encoded, never masked as text (a base64 run looks like a secret).
"""

from __future__ import annotations

import base64
import binascii
import codecs

from proxy.mask import Masker, StreamMasker

__all__ = ["Channels", "is_base64_channel", "is_channel", "mask_binary"]

#: streams from the server that carry output: stdout, stderr, and the error/status stream
_OUTPUT_STREAMS = frozenset({1, 2, 3})


def is_channel(protocol: str | None) -> bool:
    """True for the binary Kubernetes channel protocols (``channel.k8s.io``, ``v2``...``v5``)."""
    return protocol is not None and (protocol == "channel.k8s.io" or
                                     (protocol.endswith(".channel.k8s.io") and "base64" not in protocol))


def is_base64_channel(protocol: str | None) -> bool:
    """True for ``base64.channel.k8s.io`` and its versioned forms."""
    return protocol is not None and protocol.endswith("base64.channel.k8s.io")


def mask_binary(masker: Masker, payload: bytes) -> bytes:
    """A binary message that is UTF-8 text, masked; any other payload unchanged."""
    if not masker.enabled:
        return payload
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        return payload
    masked = masker.mask_bytes(payload)
    return payload if masked is None else masked


class _Stream:
    def __init__(self, masker: Masker) -> None:
        self.text: StreamMasker | None = masker.stream()
        self.utf8 = codecs.getincrementaldecoder("utf-8")()

    def feed(self, data: bytes) -> bytes:
        if self.text is None:
            return data
        try:
            self.utf8.decode(data)
        except UnicodeDecodeError:  # binary from here on: send what was held, then the data as is
            held, self.text = self.text.flush(), None
            return held + data
        return self.text.feed(data)


class Channels:
    """Per-stream masking of a Kubernetes channel protocol, server to client."""

    def __init__(self, masker: Masker, *, base64_frames: bool = False) -> None:
        self._masker = masker
        self._b64 = base64_frames
        self._streams: dict[int, _Stream] = {}

    @property
    def pending(self) -> bool:
        """True when a stream holds bytes back (send :meth:`flush` if the upstream goes quiet)."""
        return any(s.text is not None and s.text.pending for s in self._streams.values())

    def feed(self, payload: bytes) -> bytes | None:
        """The frame to send for this binary frame, or None when everything in it is held back."""
        if len(payload) < 2 or payload[0] not in _OUTPUT_STREAMS:
            return payload  # (an empty frame may signal something: relayed as is)
        stream = self._streams.get(payload[0])
        if stream is None:
            stream = self._streams[payload[0]] = _Stream(self._masker)
        out = stream.feed(payload[1:])
        return payload[:1] + out if out else None

    def feed_text(self, frame: str) -> str | None:
        """:meth:`feed` for a base64 channel frame (``"1"`` + base64 of the data)."""
        if len(frame) < 2 or frame[0] not in "0123456789":
            return frame
        try:
            data = base64.b64decode(frame[1:], validate=True)
        except (binascii.Error, ValueError):
            return frame  # not ours to judge: relay it
        out = self.feed(bytes([int(frame[0])]) + data)
        return None if out is None else frame[0] + base64.b64encode(out[1:]).decode("ascii")

    def flush(self) -> list[bytes]:
        """Frames carrying what every stream held back, masked."""
        frames = []
        for sid, stream in self._streams.items():
            if stream.text is not None and stream.text.pending:
                frames.append(bytes([sid]) + stream.text.flush())
        return frames

    def flush_text(self) -> list[str]:
        """:meth:`flush` as base64 channel frames."""
        return [str(f[0]) + base64.b64encode(f[1:]).decode("ascii") for f in self.flush()]
