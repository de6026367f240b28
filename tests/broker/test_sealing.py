"""Credentials sealed to a requester's X25519 key: round trip, and every way a box must not open."""

from __future__ import annotations

import base64

import pytest

from broker import sealing
from broker.errors import InvalidInput


def test_round_trip_and_fresh_boxes() -> None:
    private, public = sealing.new_keypair()
    a = sealing.seal(public, b"hoop_secret", "r-1")
    b = sealing.seal(public, b"hoop_secret", "r-1")
    assert a != b and b"hoop_secret" not in a.encode()  # a fresh ephemeral key and nonce each time
    assert sealing.unseal(private, a, "r-1") == b"hoop_secret"


@pytest.mark.parametrize("case", ["other key", "other request", "altered", "truncated", "not base64",
                                  "low-order ephemeral key", "damaged private key"])
def test_boxes_that_must_not_open(case: str) -> None:
    private, public = sealing.new_keypair()
    box = sealing.seal(public, b"hoop_secret", "r-1")
    key, context = private, "r-1"
    if case == "other key":
        key = sealing.new_keypair()[0]
    elif case == "other request":
        context = "r-2"
    elif case == "altered":
        box = box[:-2] + ("A" if box[-2] != "A" else "B") + box[-1]
    elif case == "truncated":
        box = box[:40]
    elif case == "low-order ephemeral key":  # a box whose key agreement yields no shared secret
        raw = base64.urlsafe_b64decode(box + "=" * (-len(box) % 4))
        box = base64.urlsafe_b64encode(bytes(32) + raw[32:]).rstrip(b"=").decode()
    elif case == "damaged private key":  # a pickup key file cut short
        key = private[:20]
    else:
        box = "***"
    with pytest.raises(InvalidInput) as err:
        sealing.unseal(key, box, context)
    assert "hoop_secret" not in err.value.message


# all zeros and 1 are low-order X25519 points: no shared key comes of them, so sealing would fail later
@pytest.mark.parametrize("key", ["", "abc", "!!!!", "A" * 60, "A" * 43, "AQ" + "A" * 41])
def test_bad_public_keys_are_refused(key: str) -> None:
    with pytest.raises(InvalidInput) as err:
        sealing.public_key(key)
    assert err.value.code == "bad_pickup_key" or "base64url" in err.value.message
