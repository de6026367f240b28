"""The HTTP proxy's answer to a client from the upstream's response: masking, recording, framing.

How this works. With masking on, JSON and text bodies go through :mod:`proxy.http.body`'s filters,
and so does an uncompressed body of another type (or none) whose first bytes read as text
(:func:`proxy.http.body.sniff_kind`: the client chooses the type with ``Accept``); a
``gzip``/``deflate`` body of a masked type is decoded first, and another encoding of a masked type
is refused with 502 (fail closed). An uncompressed body of known length up to 256 KiB is read whole
and answered with the ``Content-Length`` of its masked form (a JSON one is then masked in one pass);
a longer, chunked or compressed one is streamed and loses its ``Content-Length`` (the response is
chunked). Other types pass through unchanged with their length. A text stream that holds back a tail
(a value that may continue) sends it after ``_IDLE_FLUSH`` seconds of upstream silence. The held
upstream credential never reaches the client: it is replaced by ``[credential]`` in headers and
masked bodies, and an unmasked body that holds it is withheld (502) or cut; a ``gzip``/``deflate`` body
that passes through compressed is searched in a decoded copy (:class:`~proxy.http.body.EncodedProbe`),
and another coding is refused (502) when a credential is held. The recorded bodies are
masked, then capped (a request body is capped first, so the value the cap cuts in two is left out,
never recorded in part); an answer cut short (grant ended, upstream broke off) closes the client
connection, so it never looks whole.
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from typing import Any, Protocol
from urllib.parse import unquote, unquote_plus

from broker.config import HttpResource
from proxy.http.body import (
    BodyFilter,
    Capture,
    EncodedProbe,
    Inflate,
    Secrets,
    body_filter,
    body_kind,
    form_decoded,
    response_filter,
    sniff_kind,
)
from proxy.http.call import Call
from proxy.http.pool import Response, UpstreamFailed
from proxy.mask import Masker, StreamMasker

log = logging.getLogger(__name__)

__all__ = ["Flight", "recorded", "respond", "shown_target"]

_IDLE_FLUSH = 0.2  # seconds a held text tail may wait for more bytes before it is sent
# A body of known length up to this is read whole and relayed in one write; a JSON body that
# arrives whole is then masked in one pass (proxy.jsondoc.mask_document), not token by token.
_SMALL_BODY = 256 * 1024


class Flight(Protocol):
    """What answering needs of the request in flight: why it was cut, if it was."""

    reason: str | None


async def respond(call: Call, masker: Masker, resource: HttpResource, resp: Response, flight: Flight,
                  record: dict[str, Any], secrets: Secrets | None = None) -> None:
    """Answer ``call`` with the upstream's response ``resp``: masked by type, recorded (masked and
    capped), streamed or, for a small body of known length, in one write. ``secrets``: the held
    credential, replaced in headers and masked bodies; a body passed through unmasked that holds it is
    withheld (502, or the connection cut once the answer has begun)."""
    record["status"] = resp.status
    has_body = call.method != "HEAD" and resp.status not in (204, 304) and resp.status >= 200
    ctype = resp.headers.get("Content-Type")
    filt = response_filter(masker, ctype) if has_body else None
    inflate: Inflate | None = None
    encoding = resp.headers.get("Content-Encoding", "identity").strip().lower()
    # a type that is not masked (or none): its first bytes say whether it is text (a compressed one passes)
    sniff = filt is None and has_body and masker.enabled and encoding in ("", "identity")
    if filt is not None and encoding not in ("", "identity"):
        if not Inflate.supports(encoding):
            record["status"] = 502
            return await call.refuse(502, "unmaskable_encoding",
                                     f"the upstream sent {encoding!r}-encoded {ctype}, which the proxy cannot mask")
        inflate = Inflate(encoding)
    # passed through compressed: a decoded copy is searched for the credential (so the encoding must be one
    # hoop reads; the upstream was offered no other: proxy.http.headers.readable_encodings) and recorded
    encoded = has_body and filt is None and encoding not in ("", "identity")
    if encoded and secrets is not None and not Inflate.supports(encoding):
        record["status"] = 502
        return await call.refuse(502, "unreadable_encoding",
                                 f"the upstream sent a {encoding!r}-encoded answer, which the proxy cannot decode to "
                                 "check it for the credential it holds; the answer is withheld")
    reason = secrets.scrub_text(resp.reason) if secrets is not None and resp.reason else resp.reason
    length = resp.content_length
    if length is not None and length <= _SMALL_BODY and has_body and inflate is None and flight.reason is None:
        # (a compressed body streams: 256 KiB of gzip may inflate to 256 MB)
        return await _respond_small(call, masker, resource, resp, filt, ctype, record, flight, secrets, reason,
                                    sniff, encoding if encoded else None)
    kept = filt is not None or not masker.enabled  # the body is recorded (when it is text)
    kind = body_kind(ctype)
    first = b""
    if sniff:
        try:
            first = await resp.readany()
        except UpstreamFailed as exc:
            return await _broke_off(call, resource, record, flight, exc)
        kind = sniff_kind(first)
        filt = body_filter(masker, kind)
    await call.start(resp.status, reason, resp.client_headers(body_changes=filt is not None,
                                                              decoded=inflate is not None, secrets=secrets))
    cap = Capture(resource.max_body_record)
    text = filt if isinstance(filt, StreamMasker) else None
    probe = _probe(secrets, encoding, resource, masker, ctype) if encoded else None
    lit = secrets.stream() if secrets is not None and has_body and probe is None else None
    enc_held: list[bytes] = []  # encoded bytes whose decoded tail may be the start of the credential

    async def send(data: bytes) -> None:
        if data:
            cap.feed(data)
            await call.write(data)

    async def forward(data: bytes) -> None:
        """Upstream bytes (decoded) to the client: the credential replaced first, then the masking filter;
        an unmasked body has nowhere to replace it, so finding it there ends the answer."""
        if lit is not None:
            data = lit.feed(data)
            if lit.hits and filt is None:
                raise _Withheld
        await send(filt.feed(data) if filt is not None else data)

    async def probed(chunk: bytes) -> bytes:
        """An encoded chunk decoded (searched for the credential, kept for the recording): what may be sent now.
        A corrupt stream cuts the answer when a credential is searched for; else it passes as it came."""
        nonlocal probe
        assert probe is not None
        try:
            await _search(probe, chunk)
        except zlib.error:
            if secrets is not None:
                raise
            probe = None  # recorded without its body
            return chunk
        enc_held.append(chunk)
        if probe.pending:
            return b""
        out = b"".join(enc_held)
        enc_held.clear()
        return out

    async def release_held() -> None:
        if enc_held:
            out = b"".join(enc_held)
            enc_held.clear()
            await send(out)
        if lit is not None:
            held = lit.flush()
            await send(filt.feed(held) if filt is not None else held)

    try:
        if first and flight.reason is None:
            await forward(first)
        while True:
            if (text is not None and text.pending) or (lit is not None and lit.pending) or enc_held:
                try:
                    async with asyncio.timeout(_IDLE_FLUSH):
                        chunk = await resp.readany()
                except TimeoutError:
                    await release_held()
                    if text is not None:
                        await send(text.flush())
                    continue
            else:
                chunk = await resp.readany()
            if not chunk or flight.reason is not None:
                break
            if probe is not None:
                await send(await probed(chunk))
                continue
            if encoded:
                await send(chunk)
                continue
            for piece in inflate.feed(chunk) if inflate is not None else (chunk,):
                await forward(piece)
        if flight.reason is None:
            if probe is not None and _finished(probe, secrets is not None):
                raise _Withheld
            if inflate is not None:
                tail = inflate.flush()
                if tail:
                    await forward(tail)
            await release_held()
            if filt is not None:
                await send(filt.flush())
    except _Withheld:
        log.warning("http resource=%s the upstream's answer held the credential hoop holds for it; cut",
                    resource.name)
        flight.reason = flight.reason or "the upstream's answer held the proxy's credential"
    except (UpstreamFailed, ConnectionError, OSError) as exc:
        if flight.reason is None:
            log.info("http resource=%s stream ended early: %s", resource.name, type(exc).__name__)
        flight.reason = flight.reason or "stream error"
    except Exception as exc:  # zlib.error from a corrupt body
        log.warning("http resource=%s body could not be decoded: %s", resource.name, type(exc).__name__)
        flight.reason = "undecodable body"
    finally:
        record["resp_bytes"] = cap.size
        if kept and not (encoded and (probe is None or probe.capture is None)):  # (compressed bytes are not kept)
            shown = probe.capture if probe is not None and probe.capture is not None else cap
            record["resp_body"] = recorded(masker, ctype, shown, masked=True, kind=kind)
    if flight.reason is not None:
        call.cut()  # never end an incomplete body as if it were complete
        return
    await call.end()


class _Withheld(Exception):
    """An unmasked body holds the credential: the rest of the answer is not sent."""


async def _respond_small(call: Call, masker: Masker, resource: HttpResource, resp: Response,
                         filt: BodyFilter | None, ctype: str | None, record: dict[str, Any], flight: Flight,
                         secrets: Secrets | None, reason: str, sniff: bool, encoding: str | None) -> None:
    """A body of known length up to 256 KiB that is not decoded: read it whole (bounded) and answer in
    one write, with a correct ``Content-Length`` even when masking changed the body. ``encoding``: the body
    passes through compressed (unmasked), so a decoded copy is what is searched for the credential."""
    try:
        raw = await resp.read()
    except UpstreamFailed as exc:
        return await _broke_off(call, resource, record, flight, exc)
    kind = body_kind(ctype)
    if sniff:
        kind = sniff_kind(raw)
        filt = body_filter(masker, kind)
    found = False
    probe = _probe(secrets, encoding, resource, masker, ctype) if encoding is not None else None
    if probe is not None:
        try:
            found = await _decoded(probe, raw)
        except zlib.error:
            if secrets is not None:
                record["status"] = 502
                return await call.refuse(502, "undecodable_body", f"the upstream's {encoding}-encoded answer is "
                                         "corrupt, so the proxy cannot check it for the credential it holds; it is "
                                         "withheld")
            probe = None  # (nothing to search: passed as it came, not recorded)
    elif secrets is not None and encoding is None:
        found = secrets.found(raw)
    if found and secrets is not None:
        if filt is None:  # passed through unmasked: there is no form of it the client may have
            log.warning("http resource=%s the upstream's answer held the credential hoop holds for it; withheld",
                        resource.name)
            record["status"] = 502
            return await call.refuse(502, "credential_in_answer", f"the upstream of {resource.name} answered "
                                     "with the credential hoop holds for it; the answer is withheld")
        raw = secrets.scrub(raw)
    body = filt.feed(raw) + filt.flush() if filt is not None else raw
    cap = Capture(resource.max_body_record)
    cap.feed(body)
    record["resp_bytes"] = cap.size
    if (filt is not None or not masker.enabled) and (encoding is None or (probe is not None and probe.capture)):
        shown = probe.capture if probe is not None and probe.capture is not None else cap
        record["resp_body"] = recorded(masker, ctype, shown, masked=True, kind=kind)
    await call.send(resp.status, reason, resp.client_headers(body_changes=True, decoded=False, secrets=secrets),
                    body)


async def _search(probe: EncodedProbe, chunk: bytes) -> None:
    """Search an encoded chunk, letting other work run between its decoded pieces; ``_Withheld`` when the
    credential is in it."""
    first = True
    for _ in probe.feed(chunk):
        if probe.found:
            raise _Withheld
        if not first:
            await asyncio.sleep(0)
        first = False


async def _decoded(probe: EncodedProbe, raw: bytes) -> bool:
    """Decode a whole compressed body through ``probe``: whether it holds the credential; ``zlib.error``
    when it is corrupt."""
    try:
        await _search(probe, raw)
        return probe.finish()
    except _Withheld:
        return True


def _finished(probe: EncodedProbe, searched: bool) -> bool:
    """The end of a streamed compressed body: whether it held the credential. A stream that ends corrupt
    raises ``zlib.error`` when it was searched; else its recording keeps what was decoded."""
    try:
        return probe.finish()
    except zlib.error:
        if searched:
            raise
        return False


def _probe(secrets: Secrets | None, encoding: str, resource: HttpResource, masker: Masker,
           ctype: str | None) -> EncodedProbe | None:
    """The decoded copy a compressed pass-through body needs: searched when a credential is held, kept when
    the body is recorded (masking off, a text type); None when neither, or for a coding hoop cannot decode."""
    record = not masker.enabled and body_kind(ctype) is not None
    if not Inflate.supports(encoding) or (secrets is None and not record):
        return None
    return EncodedProbe(secrets, encoding, Capture(resource.max_body_record) if record else None)


async def _broke_off(call: Call, resource: HttpResource, record: dict[str, Any], flight: Flight,
                     exc: UpstreamFailed) -> None:
    """The upstream failed before the answer began: 403 when the grant ended meanwhile, else 502."""
    if flight.reason is not None:  # the grant ended while the body was arriving
        record["status"] = 403
        return await call.refuse(403, "revoked", flight.reason)
    record["status"] = 502
    return await call.refuse(502, "upstream_error", f"the upstream of {resource.name} broke off its answer ({exc})")


def recorded(masker: Masker, content_type: str | None, cap: Capture, *, masked: bool,
             kind: str | None = None) -> str | None:
    """A body as the recording keeps it: masked, capped, text only (None for other types). ``masked``:
    ``cap`` holds masked bytes already; else they are masked here, a form body decoded first (the
    detectors do not read ``%40``), and a capped body loses what the masker holds back at the cut (a value
    the cap cut in two: neither rules nor detectors can tell what it was). ``kind``: the body's kind when
    its first bytes decided it (:func:`proxy.http.body.sniff_kind`), else taken from ``content_type``."""
    kind = kind or body_kind(content_type)
    raw = cap.data()
    if not raw or kind is None:
        return None
    if not masked and masker.enabled:
        if content_type is not None and "x-www-form-urlencoded" in content_type.lower():
            raw = form_decoded(raw)
        filt = body_filter(masker, kind)
        assert filt is not None
        raw = filt.feed(raw) if cap.truncated else filt.feed(raw) + filt.flush()
    text = raw.decode("utf-8", "replace")
    return text + "…" if cap.truncated else text


def shown_target(masker: Masker, target: str) -> str:
    """A request target as the recording and a review message show it: masked by the detectors, which also
    read it percent-decoded (a query's ``+`` as a space: ``?email=alice%40example.com``); shown decoded when
    only that finds something. What is forwarded is the target as sent."""
    masked = masker.mask_text(target)
    if not masker.enabled or ("%" not in target and "+" not in target):
        return masked
    path, sep, query = target.partition("?")
    decoded = unquote(path) + sep + unquote_plus(query)
    shown = masker.mask_text(decoded)
    return masked if shown == decoded else shown
