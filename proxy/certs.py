"""The dates of the certificates hoop presents or trusts.

A certificate past its ``notAfter`` (or before its ``notBefore``) loads into an ``ssl`` context
without complaint and fails only in the peer's handshake, so hoop reads the dates itself:
``hoop check`` reports them, and ``hoop serve`` logs them at start.
"""

from __future__ import annotations

import datetime as dt
import ssl
from pathlib import Path

from cryptography import x509

#: a certificate that ends sooner than this is worth a warning
SOON = dt.timedelta(days=14)


def read_pem_certs(path: Path) -> list[x509.Certificate]:
    """Every certificate in a PEM file. Raises OSError (unreadable) or ValueError (no PEM certificate)."""
    return x509.load_pem_x509_certificates(path.read_bytes())


def _when(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def validity(cert: x509.Certificate, now: dt.datetime, *, soon: dt.timedelta = SOON) -> tuple[str, str] | None:
    """``("error", "expired on …")``, ``("error", "is not valid before …")``, ``("warning", "expires on …
    (in N days)")`` for ``cert`` at ``now``, or None when it is good for longer than ``soon``."""
    before, after = cert.not_valid_before_utc, cert.not_valid_after_utc
    if now >= after:
        return "error", f"expired on {_when(after)}"
    if now < before:
        return "error", f"is not valid before {_when(before)}"
    if after - now <= soon:
        days = (after - now).days
        return "warning", f"expires on {_when(after)} (in {days} day{'' if days == 1 else 's'})"
    return None


#: OpenSSL's reasons for a file it would not load, in words
_SSL_REASONS = {"KEY_VALUES_MISMATCH": "the key is not the certificate's",
                "NO_CERTIFICATE_OR_CRL_FOUND": "no PEM certificate in it"}


def file_error(exc: BaseException) -> str:
    """Why a certificate or key file did not load, in words (never the file's content)."""
    if isinstance(exc, ssl.SSLError):
        if exc.reason is None:  # "[SSL] PEM lib"
            return "not PEM (or a key with a passphrase)"
        return _SSL_REASONS.get(exc.reason, exc.reason.replace("_", " ").lower())
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__
