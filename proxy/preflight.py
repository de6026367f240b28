"""The proxies' part of ``hoop check``: the files and keys each proxy loads at start, loaded by the
very functions ``hoop serve`` uses, without listening, connecting or writing anything.

- the listeners' TLS pair (:func:`proxy.pg.tls.load_server_tls`; PostgreSQL, and the HTTP proxy with
  ``tls.http_proxy``), or the self-signed pair serve would generate;
- an https upstream's CA bundle and client pair (:func:`proxy.http.pool.upstream_tls`), a PostgreSQL
  upstream's ``sslrootcert`` (:func:`proxy.pg.upstream.client_tls`);
- the SSH proxy's host key, each ssh resource's pinned host key and its private key.

A certificate hoop presents that has expired, or is not yet valid, is an error; one ending within
:data:`proxy.certs.SOON` is a warning. A CA certificate in a bundle that has expired is a warning (the
bundle may hold others that still verify).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from pathlib import Path

from cryptography.x509.oid import NameOID

from broker.config import HoopConfig, HttpResource, PostgresResource, SshResource
from broker.errors import ConfigError
from broker.keyfiles import unwritable
from broker.preflight import Finding
from proxy.certs import read_pem_certs, validity
from proxy.http.pool import upstream_tls
from proxy.http.server import PLAIN_HTTP
from proxy.pg.tls import load_server_tls, tls_files
from proxy.pg.upstream import client_tls
from proxy.ssh.hostkey import KEY_FILE, read_host_key
from proxy.ssh.upstream import check_pinned, client_key


def proxy_findings(config: HoopConfig, environ: Mapping[str, str], now: dt.datetime) -> list[Finding]:
    """What the proxies ``hoop serve`` would start (one per kind of resource) would load, checked."""
    kinds = {r.kind for r in config.resources}
    out: list[Finding] = []
    if "postgres" in kinds or ("http" in kinds and config.tls.http_proxy) or config.tls.cert is not None:
        out.extend(_server_pair(config, now))
    if "http" in kinds and not config.tls.http_proxy:
        out.append(Finding("warning", "-", PLAIN_HTTP))
    if "ssh" in kinds:
        out.extend(_ssh_host_key(config))
    for res in config.resources:
        try:
            if isinstance(res, PostgresResource):
                out.extend(_pg_upstream(res, now))
            elif isinstance(res, SshResource):
                out.extend(_ssh_upstream(res, environ))
            else:
                out.extend(_http_upstream(res, now))
        except ConfigError as exc:
            out.append(Finding("error", res.name, exc.message))
    return out


def _server_pair(config: HoopConfig, now: dt.datetime) -> list[Finding]:
    cert_path, key_path, generated = tls_files(config.tls, config.state_dir)
    if generated and not (cert_path.exists() and key_path.exists()):
        if unwritable(config.state_dir):
            return []  # (said once, with the rest of state_dir)
        return [Finding("info", "-", f"tls: no cert and key configured: hoop serve generates a self-signed pair "
                                     f"({cert_path.name}, {key_path.name}) in {config.state_dir} and logs its "
                                     "fingerprint")]
    try:
        served = load_server_tls(cert_path, key_path)
    except ConfigError as exc:
        return [Finding("error", "-", exc.message)]
    problem = validity(served.certificate, now)
    if problem is None:
        return []
    level, when = problem
    hint = f"; delete {cert_path.name} and {key_path.name} for hoop serve to make a new pair" if generated else ""
    return [Finding(level, "-", f"tls: the certificate {cert_path} {when}{hint}")]


def _ssh_host_key(config: HoopConfig) -> list[Finding]:
    try:
        if read_host_key(config.state_dir) is None:
            if unwritable(config.state_dir):
                return []
            return [Finding("info", "-", f"state_dir {config.state_dir}: hoop serve makes the SSH proxy's host key "
                                         f"({KEY_FILE}) there (replicas must share it: hoop state init)")]
    except ConfigError as exc:
        return [Finding("error", "-", exc.message)]
    return []


def _pg_upstream(res: PostgresResource, now: dt.datetime) -> list[Finding]:
    if res.sslrootcert is None:
        return []
    if res.sslmode != "verify-full":
        return [Finding("warning", res.name, f"sslrootcert is set but sslmode is {res.sslmode}: the server's "
                                             "certificate is not checked (sslmode: verify-full checks it)")]
    client_tls(res)
    return _trusted(res.name, "sslrootcert", res.sslrootcert, now)


def _http_upstream(res: HttpResource, now: dt.datetime) -> list[Finding]:
    if res.tls is None:
        return []
    t = res.tls
    upstream_tls(res.name, t.ca, t.client_cert, t.client_key)
    out = _trusted(res.name, "tls.ca", t.ca, now) if t.ca is not None else []
    if t.client_cert is not None:
        problem = validity(read_pem_certs(t.client_cert)[0], now)  # (loaded above: it is a certificate)
        if problem is not None:
            out.append(Finding(problem[0], res.name, f"tls.client_cert: the certificate {t.client_cert} {problem[1]}"))
    return out


def _trusted(resource: str, key: str, path: Path, now: dt.datetime) -> list[Finding]:
    """Warnings for the CA certificates in ``path`` (loaded above) that are past or before their dates."""
    try:
        certs = read_pem_certs(path)
    except ValueError:  # (OpenSSL took it; a block cryptography does not read has no dates to show)
        return []
    out = []
    for cert in certs:
        problem = validity(cert, now, soon=dt.timedelta(0))
        if problem is not None:
            names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            name = str(names[0].value) if names else cert.subject.rfc4514_string()
            out.append(Finding("warning", resource, f"{key}: the CA certificate {name!r} in {path} {problem[1]}"))
    return out


def _ssh_upstream(res: SshResource, environ: Mapping[str, str]) -> list[Finding]:
    out = []
    try:
        check_pinned(res)
    except ConfigError as exc:
        out.append(Finding("error", res.name, exc.message))
    if res.credential is not None:
        try:
            res.credential.resolve(environ)
        except ConfigError:
            return out  # (reported with every other secret reference)
        try:
            client_key(res, environ)
        except ConfigError as exc:
            out.append(Finding("error", res.name, exc.message))
    return out
