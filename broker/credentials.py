"""Grant secrets and upstream secret references.

A grant secret is ``hoop_`` + 256 random bits (url-safe base64). It is shown once and
stored only as:

- a SHA-256 digest, for password-style checks (SSH, HTTP bearer, PostgreSQL cleartext in
  TLS). With 256 bits of entropy a fast hash is enough: there is nothing to brute-force.
- a SCRAM-SHA-256 verifier in PostgreSQL's own format, so the PostgreSQL proxy can run
  SCRAM and the secret never crosses the wire.

Comparisons use :func:`hmac.compare_digest`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets

SECRET_PREFIX = "hoop_"
SCRAM_ITERATIONS = 4096
_LOGIN_SAFE = re.compile(r"[^a-z0-9]+")
_ALPHABET = "abcdefghijkmnpqrstuvwxyz23456789"


def mint_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def mint_login(email: str) -> str:
    """``alice@example.com`` -> ``alice.k3f9q`` (the suffix makes logins unguessable-ish and unique)."""
    local = _LOGIN_SAFE.sub("", email.split("@", 1)[0].lower())[:24] or "user"
    return f"{local}.{''.join(secrets.choice(_ALPHABET) for _ in range(5))}"


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def matches(secret: str, stored_digest: str) -> bool:
    """Constant-time check of a presented secret against its stored digest."""
    return hmac.compare_digest(digest(secret).encode(), stored_digest.encode())


def scram_verifier(secret: str, *, salt: bytes | None = None, iterations: int = SCRAM_ITERATIONS) -> str:
    """PostgreSQL's ``SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>`` for ``secret``."""
    salt = salt or secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", secret.encode("utf-8"), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()

    def b64(b: bytes) -> str:
        return base64.b64encode(b).decode()

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def random_password(nbytes: int = 24) -> str:
    """A password for an upstream role that only hoop knows (ephemeral database roles)."""
    return secrets.token_urlsafe(nbytes)
