"""TLS for the PostgreSQL listener: the configured certificate, or a self-signed pair made at start.

A generated pair is kept in ``state_dir`` (``pg-tls.crt`` / ``pg-tls.key``) so clients that
pin it keep working across restarts; its SHA-256 fingerprint is logged so it can be pinned.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from broker.config import Tls
from broker.errors import ConfigError
from proxy.certs import validity
from proxy.pg.scram import tls_server_end_point

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerTls:
    """A server context plus what SCRAM channel binding and operators need."""

    context: ssl.SSLContext
    fingerprint: str  # "SHA256:ab:cd:..."
    end_point: bytes  # tls-server-end-point channel-binding data
    certificate: x509.Certificate


def _generate(cert_path: Path, key_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hoop postgres proxy")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=825))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_path.parent.mkdir(parents=True, exist_ok=True)
    key_path.touch(mode=0o600)
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _why(exc: Exception) -> str:
    """What went wrong with a file, in words (OpenSSL's own reason when it gives one)."""
    if isinstance(exc, ssl.SSLError):
        if exc.reason == "KEY_VALUES_MISMATCH":
            return "it is not this certificate's key"
        return str(exc.reason) if exc.reason else "no PEM private key in it"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return "not a PEM certificate"


def tls_files(config: Tls, state_dir: Path) -> tuple[Path, Path, bool]:
    """The certificate and key the listener serves, and whether they are the pair hoop generates in
    ``state_dir`` (no ``tls.cert``/``tls.key`` configured)."""
    if config.cert is not None and config.key is not None:
        return config.cert, config.key, False
    return state_dir / "pg-tls.crt", state_dir / "pg-tls.key", True


def server_tls(config: Tls, state_dir: Path) -> ServerTls:
    """Load ``config.cert``/``config.key``, or generate (once) a self-signed pair in ``state_dir``. A pair that
    cannot be loaded is a :class:`ConfigError` naming both files (never a key's content), so ``hoop serve``
    stops at start with a message, not a traceback."""
    cert_path, key_path, generated = tls_files(config, state_dir)
    if generated and not (cert_path.exists() and key_path.exists()):
        try:
            _generate(cert_path, key_path)
        except OSError as exc:
            raise ConfigError(f"state_dir {state_dir}: cannot keep {cert_path.name} there "
                              f"({exc.strerror or exc})") from None
        log.info("generated a self-signed certificate for the PostgreSQL proxy: %s", cert_path)
    served = load_server_tls(cert_path, key_path)
    problem = validity(served.certificate, datetime.datetime.now(datetime.UTC))
    if problem is not None:  # served all the same: hoop check reports it, as an error when it is one
        log.warning("tls: the certificate %s %s", cert_path, problem[1])
    log.info("PostgreSQL proxy TLS certificate fingerprint %s", served.fingerprint)
    return served


def load_server_tls(cert_path: Path, key_path: Path) -> ServerTls:
    """A server context for the pair; :class:`ConfigError` naming the file that cannot be loaded (missing,
    unreadable, not PEM, or a key that is not the certificate's)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError) as exc:  # missing, unreadable, not PEM
        raise ConfigError(f"tls: cannot load the certificate {cert_path}: {_why(exc)}") from None
    try:
        ctx.load_cert_chain(cert_path, key_path)
    except OSError as exc:  # (ssl.SSLError too) missing, unreadable, no key, another certificate's key
        raise ConfigError(f"tls: cannot load the key {key_path} of the certificate {cert_path}: {_why(exc)}") \
            from None
    der = cert.public_bytes(serialization.Encoding.DER)
    digest = hashlib.sha256(der).hexdigest()
    fingerprint = "SHA256:" + ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))
    algo = cert.signature_hash_algorithm
    return ServerTls(ctx, fingerprint, tls_server_end_point(der, algo.name if algo else "sha256"), cert)
