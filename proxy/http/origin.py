"""Where the HTTP proxy's upstream requests go, and their head: pure values, no I/O.

:class:`Origin` is a resource's base URL parsed once (and, for https, the TLS context that checks
the upstream, built by :func:`upstream_tls` from the resource's files); its ``key`` is what pooled
connections are shared by. :class:`Fields` renders a request's header fields once, refusing a line
break inside one, and :func:`request_head` adds the request line and ``Host`` so that the head goes
out in one ``transport.write``. :class:`UpstreamFailed` is the one error of the upstream side: the
connection (:mod:`proxy.http.upstream`) and the pool (:mod:`proxy.http.pool`) raise it too.
"""

from __future__ import annotations

import functools
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from multidict import CIMultiDict

from broker.errors import ConfigError, UpstreamError
from proxy.certs import file_error

__all__ = ["Fields", "Origin", "UpstreamFailed", "request_head", "upstream_tls"]


class UpstreamFailed(UpstreamError):
    """The upstream could not be reached, closed early or answered with malformed HTTP."""


_Key = tuple[str, str, int, str | None, int]  # scheme, host, port, TLS server name, TLS context


@dataclass(frozen=True)
class Origin:
    """Where a resource's requests go: ``http(s)://host[:port][/prefix]``, parsed once, and for https the
    TLS context that checks the upstream (None: the system's CAs) and the name its certificate must hold
    (None: ``host``)."""

    scheme: str
    host: str
    port: int
    prefix: str
    host_header: str
    tls: ssl.SSLContext | None = field(default=None, compare=False)
    server_name: str | None = None

    @classmethod
    def parse(cls, base: str, *, tls: ssl.SSLContext | None = None, server_name: str | None = None) -> Origin:
        parts = urlsplit(base)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base!r}")
        default = 443 if parts.scheme == "https" else 80
        port = parts.port or default
        host = parts.hostname
        shown = f"[{host}]" if ":" in host else host
        return cls(parts.scheme, host, port, parts.path.rstrip("/"),
                   shown if port == default else f"{shown}:{port}", tls, server_name)

    @functools.cached_property
    def key(self) -> _Key:
        """What pooled connections are shared by: the same place, checked the same way."""
        return self.scheme, self.host, self.port, self.server_name, id(self.tls) if self.tls is not None else 0


def upstream_tls(resource: str, ca: Path | None, client_cert: Path | None, client_key: Path | None) -> ssl.SSLContext:
    """The client TLS context for an https upstream: certificates checked against ``ca`` (else the
    system's CAs), hostnames checked, and ``client_cert``/``client_key`` presented when given. Raises
    :class:`ConfigError` naming the resource and the file (never a key's content)."""
    try:
        context = ssl.create_default_context(cafile=str(ca) if ca is not None else None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"resources.{resource}.tls.ca: cannot load {ca}: {file_error(exc)}") from None
    if client_cert is not None and client_key is not None:
        try:
            context.load_cert_chain(str(client_cert), str(client_key))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"resources.{resource}.tls: cannot load client_cert {client_cert} with client_key "
                              f"{client_key}: {file_error(exc)}") from None
    context.set_alpn_protocols(["http/1.1"])
    return context


class Fields:
    """Request header fields rendered and checked once: ``Name: value`` lines without the request line
    and ``Host``. A client repeats its headers on a keep-alive connection, so the proxy keeps these per
    connection and renders them again only when they change. Refuses a line break inside a field."""

    __slots__ = ("block", "has_length")

    def __init__(self, headers: CIMultiDict[str]) -> None:
        lines = [f"{name}: {value}\r\n" for name, value in headers.items()]
        block = "".join(lines)
        # each line holds exactly one CR LF, its end: any other is a line break inside a field (two C scans)
        if block.count("\n") != len(lines) or block.count("\r") != len(lines):
            bad = next((n for n, v in headers.items() if "\n" in n + v or "\r" in n + v), "?")
            raise UpstreamFailed(f"header {bad!r} contains a line break")
        self.block = block
        self.has_length = "Content-Length" in headers


def request_head(method: str, target: str, host: str, headers: CIMultiDict[str] | Fields, *, chunked: bool) -> bytes:
    """The request line and headers, ready to write (no I/O). Refuses CR/LF inside a field."""
    if "\n" in target or "\r" in target or " " in target or "\n" in host or "\r" in host:
        raise UpstreamFailed("request target contains whitespace")
    block = (headers if isinstance(headers, Fields) else Fields(headers)).block
    framing = "Transfer-Encoding: chunked\r\n" if chunked else ""
    return f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n{block}{framing}\r\n".encode("utf-8", "surrogateescape")
