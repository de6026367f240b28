"""SCRAM-SHA-256 (RFC 5802, RFC 7677) as PostgreSQL speaks it, plus md5 passwords. No I/O.

How this works. :class:`ScramServer` authenticates a client against a stored
:class:`Verifier` (PostgreSQL's ``SCRAM-SHA-256$iter:salt$StoredKey:ServerKey``); it never
sees the password. :class:`ScramClient` authenticates hoop to an upstream PostgreSQL with a
password. Both are pure state machines: the glue passes in the SASL payload of each 'p' or
'R' message and sends back what they return. Legal moves are a table; a message out of order
raises :class:`ScramError`.

An unknown login still gets a full exchange: :func:`mock_verifier` derives a deterministic,
doomed verifier from the login and a server key, so the salt a prober sees is stable and the
exchange fails at the same step (the proof check, :class:`ScramAuthFailed`) as a wrong
password.

Channel binding: ``n`` and ``y`` are supported. ``p=tls-server-end-point`` (the
``SCRAM-SHA-256-PLUS`` mechanism) works when the glue passes the certificate hash (see
:func:`tls_server_end_point`); without it ``p=`` is refused. Any other binding type is refused.

SASLprep: passwords are prepared with RFC 4013 SASLprep (stringprep tables). As in
PostgreSQL, an ASCII password is used as is, and a password that SASLprep rejects is used
unprepared, so verifiers made here match PostgreSQL's for the same password.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import stringprep
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Final

from broker.errors import Denied, InvalidInput, PeerProtocolError

MECHANISM: Final = "SCRAM-SHA-256"
MECHANISM_PLUS: Final = "SCRAM-SHA-256-PLUS"
DEFAULT_ITERATIONS: Final = 4096
SALT_LENGTH: Final = 16
_NONCE_BYTES: Final = 18
_CB_TYPE: Final = "tls-server-end-point"


class ScramError(PeerProtocolError):
    """A malformed or out-of-order SCRAM message, or an unacceptable one (08P01)."""


class ScramAuthFailed(Denied):
    """The client's proof does not match the verifier: wrong password or unknown login."""

    sqlstate = "28P01"


class ServerSignatureMismatch(ScramError):
    """The upstream's final signature is wrong: it does not hold our verifier."""


class BadVerifier(InvalidInput):
    """A stored verifier string that is not ``SCRAM-SHA-256$iter:salt$StoredKey:ServerKey``."""


# ---- primitives ----------------------------------------------------------------------


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


def _h(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str, error: type[Exception], what: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise error(f"invalid base64 in {what}") from None


def _new_nonce() -> str:
    return _b64(secrets.token_bytes(_NONCE_BYTES))


def saslprep(text: str) -> str:
    """RFC 4013 SASLprep for stored strings; raises ``ValueError`` on a prohibited string."""
    mapped = "".join(" " if stringprep.in_table_c12(c) else c for c in text if not stringprep.in_table_b1(c))
    out = unicodedata.normalize("NFKC", mapped)
    prohibited = (
        stringprep.in_table_c12,
        stringprep.in_table_c21_c22,
        stringprep.in_table_c3,
        stringprep.in_table_c4,
        stringprep.in_table_c5,
        stringprep.in_table_c6,
        stringprep.in_table_c7,
        stringprep.in_table_c8,
        stringprep.in_table_c9,
        stringprep.in_table_a1,
    )
    if any(check(c) for c in out for check in prohibited):
        raise ValueError("prohibited character")
    if any(stringprep.in_table_d1(c) for c in out) and (
        any(stringprep.in_table_d2(c) for c in out)
        or not (stringprep.in_table_d1(out[0]) and stringprep.in_table_d1(out[-1]))
    ):
        raise ValueError("bad bidirectional string")
    return out


def prepare_password(password: str) -> bytes:
    """The bytes PostgreSQL feeds to PBKDF2 for ``password``."""
    if password.isascii():
        return password.encode("ascii")
    try:
        return saslprep(password).encode("utf-8")
    except ValueError:
        return password.encode("utf-8", "surrogateescape")


def salted_password(password: str, salt: bytes, iterations: int) -> bytes:
    """PBKDF2-HMAC-SHA-256; the expensive step (it releases the GIL: fine in an executor)."""
    return hashlib.pbkdf2_hmac("sha256", prepare_password(password), salt, iterations)


def tls_server_end_point(certificate_der: bytes, hash_name: str = "sha256") -> bytes:
    """RFC 5929 binding data: the server certificate hashed with its signature's hash.

    ``hash_name`` is that hash; md5 and sha1 are replaced by sha256 as the RFC requires.
    """
    name = "sha256" if hash_name.lower() in ("md5", "sha1") else hash_name
    return hashlib.new(name, certificate_der).digest()


def md5_password(user: str, password: str, salt: bytes) -> bytes:
    """The PasswordMessage payload answering AuthenticationMD5Password (``md5`` + hex)."""
    inner = hashlib.md5(password.encode() + user.encode(), usedforsecurity=False).hexdigest()
    outer = hashlib.md5(inner.encode("ascii") + salt, usedforsecurity=False).hexdigest()
    return b"md5" + outer.encode("ascii")


# ---- verifiers -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Verifier:
    """What the server stores instead of a password. ``doomed`` ones never authenticate."""

    iterations: int
    salt: bytes
    stored_key: bytes = field(repr=False)
    server_key: bytes = field(repr=False)
    doomed: bool = False

    def __str__(self) -> str:
        return f"{MECHANISM}${self.iterations}:{_b64(self.salt)}${_b64(self.stored_key)}:{_b64(self.server_key)}"


def make_verifier(password: str, *, iterations: int = DEFAULT_ITERATIONS, salt: bytes | None = None) -> str:
    """A verifier string in PostgreSQL's ``rolpassword`` format for ``password``."""
    if iterations < 1:
        raise BadVerifier("iterations must be at least 1")
    salt = secrets.token_bytes(SALT_LENGTH) if salt is None else salt
    salted = salted_password(password, salt, iterations)
    stored_key = _h(_hmac(salted, b"Client Key"))
    return str(Verifier(iterations, salt, stored_key, _hmac(salted, b"Server Key")))


def parse_verifier(text: str) -> Verifier:
    """Read a verifier string; raises :class:`BadVerifier`."""
    try:
        mechanism, params, keys = text.split("$")
        iterations_text, salt_text = params.split(":")
        stored_text, server_text = keys.split(":")
    except ValueError:
        raise BadVerifier("not a SCRAM-SHA-256 verifier") from None
    if mechanism != MECHANISM or not iterations_text.isdigit() or int(iterations_text) < 1:
        raise BadVerifier("not a SCRAM-SHA-256 verifier")
    salt = _unb64(salt_text, BadVerifier, "verifier salt")
    stored_key = _unb64(stored_text, BadVerifier, "verifier StoredKey")
    server_key = _unb64(server_text, BadVerifier, "verifier ServerKey")
    if not salt or len(stored_key) != 32 or len(server_key) != 32:
        raise BadVerifier("verifier keys must be 32 bytes and the salt non-empty")
    return Verifier(int(iterations_text), salt, stored_key, server_key)


def mock_verifier(login: str, key: bytes, *, iterations: int = DEFAULT_ITERATIONS) -> Verifier:
    """A doomed verifier for an unknown ``login``, the same every time for the same ``key``."""
    seed = login.encode("utf-8", "surrogateescape")
    return Verifier(
        iterations,
        _hmac(key, b"hoop scram mock salt\0" + seed)[:SALT_LENGTH],
        _hmac(key, b"hoop scram mock stored\0" + seed),
        _hmac(key, b"hoop scram mock server\0" + seed),
        doomed=True,
    )


# ---- message parsing -----------------------------------------------------------------


def _text(data: bytes | None, what: str) -> str:
    if data is None:
        raise ScramError(f"missing {what}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ScramError(f"{what} is not valid UTF-8") from None


def _attributes(text: str, expected: Sequence[str], what: str) -> list[str]:
    """Values of the leading ``k=v`` attributes named by ``expected``; extensions ignored."""
    parts = text.split(",")
    if parts and parts[0].startswith("m="):
        raise ScramError(f"{what}: mandatory extension not supported")
    if len(parts) < len(expected):
        raise ScramError(f"malformed {what}")
    values = []
    for part, name in zip(parts, expected, strict=False):
        if not part.startswith(name + "="):
            raise ScramError(f"malformed {what}: expected attribute {name!r}")
        values.append(part[2:])
    return values


def _check_nonce(nonce: str, what: str) -> None:
    if not nonce or any(not 0x21 <= ord(c) <= 0x7E or c == "," for c in nonce):
        raise ScramError(f"malformed {what}: bad nonce")


class _Machine:
    """A SCRAM exchange's moves: (state, event) -> next state; any failure is final."""

    _table: ClassVar[dict[tuple[str, str], str]] = {}

    def __init__(self) -> None:
        self.state = "start"

    def _step(self, event: str) -> None:
        nxt = self._table.get((self.state, event))
        if nxt is None:
            raise ScramError(f"unexpected SCRAM {event} in state {self.state}")
        self.state = nxt

    @property
    def done(self) -> bool:
        return self.state == "done"


# ---- server --------------------------------------------------------------------------


class ScramServer(_Machine):
    """Server side of one exchange against ``verifier``.

    ``channel_binding`` is the tls-server-end-point data of the certificate the client sees
    (pass it only on TLS connections); with it the server offers SCRAM-SHA-256-PLUS too.
    """

    _table: ClassVar = {("start", "client-first"): "first-sent", ("first-sent", "client-final"): "done"}

    def __init__(self, verifier: Verifier, *, channel_binding: bytes | None = None, nonce: str | None = None) -> None:
        super().__init__()
        self._verifier = verifier
        self._cb_data = channel_binding
        self._server_nonce = nonce or _new_nonce()
        self._nonce = ""
        self._gs2_header = ""
        self._client_first_bare = ""
        self._server_first = ""

    @property
    def mechanisms(self) -> tuple[str, ...]:
        """For AuthenticationSASL, most preferred first."""
        return (MECHANISM_PLUS, MECHANISM) if self._cb_data is not None else (MECHANISM,)

    def handle_client_first(self, mechanism: str, data: bytes | None) -> bytes:
        """Read SASLInitialResponse; return the server-first message (AuthenticationSASLContinue)."""
        self._step("client-first")
        self.state = "failed"
        if mechanism not in self.mechanisms:
            raise ScramError(f"unsupported SASL mechanism {mechanism!r}")
        text = _text(data, "SCRAM client-first message")
        flag, sep, rest = text.partition(",")
        authzid, sep2, bare = rest.partition(",")
        if not (sep and sep2):
            raise ScramError("malformed SCRAM client-first message")
        if authzid:
            raise ScramError("SCRAM authorization identity is not supported")
        if flag in {"n", "y"}:
            if mechanism == MECHANISM_PLUS:
                raise ScramError("SCRAM-SHA-256-PLUS selected without channel binding")
            if flag == "y" and self._cb_data is not None:
                raise ScramError("channel binding downgrade: the server supports channel binding")
        elif flag == f"p={_CB_TYPE}":
            if mechanism != MECHANISM_PLUS:
                raise ScramError("channel binding requested without SCRAM-SHA-256-PLUS")
        else:
            raise ScramError(f"unsupported SCRAM channel binding {flag!r}")
        _user, client_nonce = _attributes(bare, ("n", "r"), "SCRAM client-first message")
        _check_nonce(client_nonce, "SCRAM client-first message")
        self._gs2_header = f"{flag},,"
        self._client_first_bare = bare
        self._nonce = client_nonce + self._server_nonce
        v = self._verifier
        self._server_first = f"r={self._nonce},s={_b64(v.salt)},i={v.iterations}"
        self.state = "first-sent"
        return self._server_first.encode("ascii")

    def handle_client_final(self, data: bytes) -> bytes:
        """Check the client proof; return the server-final message (AuthenticationSASLFinal)."""
        self._step("client-final")
        self.state = "failed"
        text = _text(data, "SCRAM client-final message")
        without_proof, sep, proof_text = text.rpartition(",p=")
        if not sep:
            raise ScramError("malformed SCRAM client-final message: no proof")
        cbind, nonce = _attributes(without_proof, ("c", "r"), "SCRAM client-final message")
        expected_cb = self._gs2_header.encode()
        if self._gs2_header[0] == "p":
            expected_cb += self._cb_data or b""
        if not hmac.compare_digest(_unb64(cbind, ScramError, "channel binding"), expected_cb):
            raise ScramError("SCRAM channel binding check failed")
        if nonce != self._nonce:
            raise ScramError("SCRAM nonce mismatch")
        proof = _unb64(proof_text, ScramError, "client proof")
        if len(proof) != 32:
            raise ScramError("malformed SCRAM client proof")
        auth_message = f"{self._client_first_bare},{self._server_first},{without_proof}".encode()
        v = self._verifier
        client_key = _xor(proof, _hmac(v.stored_key, auth_message))
        if not hmac.compare_digest(_h(client_key), v.stored_key) or v.doomed:
            raise ScramAuthFailed("password authentication failed", code="bad_password")
        self.state = "done"
        return f"v={_b64(_hmac(v.server_key, auth_message))}".encode("ascii")


# ---- client --------------------------------------------------------------------------


class ScramClient(_Machine):
    """Client side of one exchange, for hoop's login to an upstream PostgreSQL.

    ``offered`` is the mechanism list of the server's AuthenticationSASL. Pass
    ``channel_binding`` (see :func:`tls_server_end_point`) on TLS connections to bind to the
    server certificate when the server offers SCRAM-SHA-256-PLUS.
    """

    _table: ClassVar = {
        ("start", "client-first"): "first-sent",
        ("first-sent", "server-first"): "final-sent",
        ("final-sent", "server-final"): "done",
    }

    def __init__(
        self,
        password: str,
        *,
        offered: Sequence[str] = (MECHANISM,),
        username: str = "",
        channel_binding: bytes | None = None,
        nonce: str | None = None,
        min_iterations: int = DEFAULT_ITERATIONS,
        max_iterations: int = 10_000_000,
    ) -> None:
        super().__init__()
        if channel_binding is not None and MECHANISM_PLUS in offered:
            self.mechanism, flag = MECHANISM_PLUS, f"p={_CB_TYPE}"
        elif MECHANISM in offered:
            self.mechanism, flag = MECHANISM, "y" if channel_binding is not None else "n"
        else:
            raise ScramError(f"no supported SASL mechanism in {list(offered)}")
        self._password = password
        self._gs2_header = f"{flag},,"
        self._cb_data = channel_binding if flag[0] == "p" else None
        user = username.replace("=", "=3D").replace(",", "=2C")
        self._client_first_bare = f"n={user},r={nonce or _new_nonce()}"
        self._bounds = (min_iterations, max_iterations)
        self._server_signature = b""

    def client_first(self) -> bytes:
        """The SASLInitialResponse payload; send it with ``self.mechanism``."""
        self._step("client-first")
        return (self._gs2_header + self._client_first_bare).encode()

    def handle_server_first(self, data: bytes) -> bytes:
        """Read AuthenticationSASLContinue; return the SASLResponse payload (client-final)."""
        self._step("server-first")
        self.state = "failed"
        server_first = _text(data, "SCRAM server-first message")
        nonce, salt_text, iter_text = _attributes(server_first, ("r", "s", "i"), "SCRAM server-first message")
        client_nonce = self._client_first_bare.rpartition(",r=")[2]
        if not nonce.startswith(client_nonce) or len(nonce) == len(client_nonce):
            raise ScramError("SCRAM server nonce does not extend the client nonce")
        _check_nonce(nonce, "SCRAM server-first message")
        salt = _unb64(salt_text, ScramError, "salt")
        low, high = self._bounds
        if not iter_text.isdigit() or not low <= int(iter_text) <= high:
            raise ScramError(f"SCRAM iteration count {iter_text!r} outside {low}..{high}")
        salted = salted_password(self._password, salt, int(iter_text))
        cbind = _b64(self._gs2_header.encode() + (self._cb_data or b""))
        without_proof = f"c={cbind},r={nonce}"
        auth_message = f"{self._client_first_bare},{server_first},{without_proof}".encode()
        client_key = _hmac(salted, b"Client Key")
        proof = _xor(client_key, _hmac(_h(client_key), auth_message))
        self._server_signature = _hmac(_hmac(salted, b"Server Key"), auth_message)
        self.state = "final-sent"
        return f"{without_proof},p={_b64(proof)}".encode("ascii")

    def handle_server_final(self, data: bytes) -> None:
        """Read AuthenticationSASLFinal; raise unless the server proved it holds the verifier."""
        self._step("server-final")
        self.state = "failed"
        text = _text(data, "SCRAM server-final message")
        if text.startswith("e="):
            raise ScramError(f"upstream rejected SCRAM authentication: {text[2:]}")
        (signature,) = _attributes(text, ("v",), "SCRAM server-final message")
        if not hmac.compare_digest(_unb64(signature, ScramError, "server signature"), self._server_signature):
            raise ServerSignatureMismatch("upstream SCRAM server signature does not match")
        self.state = "done"
