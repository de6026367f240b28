"""proxy.http.channels without a network: frames in, frames out."""

from __future__ import annotations

import base64

from broker.config import Masking
from proxy.http.channels import Channels, is_base64_channel, is_channel, mask_binary
from proxy.mask import Masker

MASKER = Masker(Masking(), b"k" * 32)
LINE = b"mail alice@example.com, card 4111 1111 1111 1111, ssn 536-22-1234 ok\n"
MASKED = b"mail [email], card [card], ssn [ssn] ok\n"


def stdout(ch: Channels, frames: list[bytes]) -> bytes:
    out = [ch.feed(b"\x01" + f) for f in frames]
    out += ch.flush()
    return b"".join(o[1:] for o in out if o is not None)


def test_a_value_split_between_two_frames_at_every_byte_is_masked() -> None:
    for k in range(len(LINE) + 1):
        assert stdout(Channels(MASKER), [LINE[:k], LINE[k:]]) == MASKED, k


def test_streams_are_independent_and_other_frames_pass() -> None:
    ch = Channels(MASKER)
    assert ch.feed(b"\x01mail bob@exa") == b"\x01mail "  # the tail is held
    assert ch.feed(b"\x02to carol@example.com\n") == b"\x02to [email]\n"
    assert ch.pending
    assert ch.flush() == [b"\x01bob@exa"]  # what the upstream's silence releases (too short to be an email)
    assert not ch.pending
    assert ch.feed(b"\x00stdin bob@x.com") == b"\x00stdin bob@x.com"  # not an output stream
    assert ch.feed(b"\x01") == b"\x01"  # an empty frame is relayed


def test_a_stream_that_stops_being_utf8_is_relayed_as_is_after_what_it_held() -> None:
    ch = Channels(MASKER)
    assert ch.feed(b"\x01tar of bob@exa") == b"\x01tar of "
    assert ch.feed(b"\x01mple.com\x00\xff\xfe") == b"\x01bob@example.com\x00\xff\xfe"
    assert ch.feed(b"\x01dave@example.com") == b"\x01dave@example.com"
    assert ch.feed(b"\x02dave@example.com\n") == b"\x02[email]\n"


def test_utf8_split_inside_a_character_is_still_text() -> None:
    data = "Zoë writes to zoe@example.com ☃\n".encode()
    for k in range(len(data) + 1):
        assert stdout(Channels(MASKER), [data[:k], data[k:]]) == "Zoë writes to [email] ☃\n".encode(), k


def test_base64_frames() -> None:
    ch = Channels(MASKER, base64_frames=True)
    out = ch.feed_text("1" + base64.b64encode(LINE).decode())
    assert out is not None and out[0] == "1" and base64.b64decode(out[1:]) == MASKED
    assert ch.feed_text("3not base64!") == "3not base64!"
    assert ch.feed_text("1" + base64.b64encode(b"key bob@exa").decode()) == "1" + base64.b64encode(b"key ").decode()
    assert ch.flush_text() == ["1" + base64.b64encode(b"bob@exa").decode()]


def test_protocols_and_plain_binary() -> None:
    assert is_channel("v5.channel.k8s.io") and is_channel("channel.k8s.io")
    assert not is_channel("v4.base64.channel.k8s.io")
    assert is_base64_channel("base64.channel.k8s.io") and is_base64_channel("v4.base64.channel.k8s.io")
    assert not is_channel(None) and not is_channel("graphql-ws")
    assert mask_binary(MASKER, b"to bob@example.com") == b"to [email]"
    assert mask_binary(MASKER, b"\xff to bob@example.com") == b"\xff to bob@example.com"
