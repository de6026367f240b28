"""Credentials sealed to their requester: what lets any broker replica hand an API requester
the secret of a grant approved later, elsewhere, without the store ever holding it readable.

How this works. The API client makes an X25519 key pair and sends the public half with its
request (``pickup_key``). When the grant is issued, the broker that issues it makes a fresh
ephemeral key pair, derives an AES-256-GCM key from the X25519 agreement with HKDF-SHA256,
and encrypts the credential with the request id as associated data. It stores only that
sealed box. The broker never has the private key, so the store (and its backups) hold a
ciphertext that only the requester can open; a box moved to another request fails to open.
Format (base64url, no padding): ephemeral public key (32) || nonce (12) || ciphertext+tag.
"""

from __future__ import annotations

import base64
import binascii
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from broker.errors import InvalidInput

_INFO = b"hoop credential pickup v1"
_RAW = serialization.Encoding.Raw


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str, what: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise InvalidInput(f"{what} is not base64url", code="bad_" + what.replace(" ", "_")) from None


def public_key(text: str) -> bytes:
    """Check a ``pickup_key`` (base64url of a raw 32-byte X25519 public key); returns its bytes."""
    raw = _unb64(text, "pickup key")
    if len(raw) != 32:
        raise InvalidInput("pickup key must be a raw X25519 public key (32 bytes, base64url)", code="bad_pickup_key")
    try:  # a low-order point (all zeros, ...) gives no shared key: refuse it now, not when the grant is sealed
        X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(raw))
    except ValueError:
        raise InvalidInput("pickup key is not a usable X25519 public key", code="bad_pickup_key") from None
    return raw


def new_keypair() -> tuple[str, str]:
    """``(private, public)``, both base64url; the private half never leaves the client."""
    private = X25519PrivateKey.generate()
    priv = private.private_bytes(_RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    return _b64(priv), _b64(private.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw))


def _key(shared: bytes, eph_pub: bytes, recipient_pub: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=eph_pub + recipient_pub, info=_INFO).derive(shared)


def seal(recipient: str, plaintext: bytes, context: str) -> str:
    """Encrypt ``plaintext`` to the holder of ``recipient``'s private key, bound to ``context``."""
    recipient_pub = public_key(recipient)
    eph = X25519PrivateKey.generate()
    eph_pub = eph.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)
    shared = eph.exchange(X25519PublicKey.from_public_bytes(recipient_pub))
    nonce = os.urandom(12)
    box = AESGCM(_key(shared, eph_pub, recipient_pub)).encrypt(nonce, plaintext, context.encode())
    return _b64(eph_pub + nonce + box)


def unseal(private: str, sealed: str, context: str) -> bytes:
    """Open a box made by :func:`seal`; raises :class:`InvalidInput` when it is not for this key
    and this context, or was altered."""
    priv_raw = _unb64(private, "pickup private key")
    if len(priv_raw) != 32:
        raise InvalidInput("pickup private key must be 32 bytes (base64url); the key file is damaged",
                           code="bad_pickup_private_key")
    priv = X25519PrivateKey.from_private_bytes(priv_raw)
    raw = _unb64(sealed, "sealed credential")
    if len(raw) < 32 + 12 + 16:
        raise InvalidInput("sealed credential is truncated", code="bad_sealed")
    eph_pub, nonce, box = raw[:32], raw[32:44], raw[44:]
    recipient_pub = priv.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)
    try:
        shared = priv.exchange(X25519PublicKey.from_public_bytes(eph_pub))  # ValueError: a low-order point
        return AESGCM(_key(shared, eph_pub, recipient_pub)).decrypt(nonce, box, context.encode())
    except (InvalidTag, ValueError):
        raise InvalidInput("sealed credential does not open with this key (wrong key, request or altered)",
                           code="bad_sealed") from None
