"""SCRAM-SHA-256 and md5: RFC 7677 vector, full exchanges, failures. Bytes in, bytes out."""

from __future__ import annotations

import base64
import hashlib
import re

import pytest

from broker.errors import Denied, PeerProtocolError
from proxy.pg.scram import (
    MECHANISM,
    MECHANISM_PLUS,
    BadVerifier,
    ScramAuthFailed,
    ScramClient,
    ScramError,
    ScramServer,
    ServerSignatureMismatch,
    Verifier,
    make_verifier,
    md5_password,
    mock_verifier,
    parse_verifier,
    prepare_password,
    tls_server_end_point,
)

# RFC 7677 section 3
CLIENT_NONCE = "rOprNGfwEbeRWgbNEkqO"
SERVER_NONCE = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
CLIENT_FIRST = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
SERVER_FIRST = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
CLIENT_FINAL = (
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def exchange(server: ScramServer, client: ScramClient) -> None:
    first = server.handle_client_first(client.mechanism, client.client_first())
    final = server.handle_client_final(client.handle_server_first(first))
    client.handle_server_final(final)


def test_rfc7677_client() -> None:
    client = ScramClient("pencil", username="user", nonce=CLIENT_NONCE)
    assert client.client_first() == CLIENT_FIRST
    assert client.handle_server_first(SERVER_FIRST) == CLIENT_FINAL
    client.handle_server_final(SERVER_FINAL)
    assert client.done


def test_rfc7677_server() -> None:
    verifier = parse_verifier(make_verifier("pencil", salt=SALT))
    server = ScramServer(verifier, nonce=SERVER_NONCE)
    assert server.handle_client_first(MECHANISM, CLIENT_FIRST) == SERVER_FIRST
    assert server.handle_client_final(CLIENT_FINAL) == SERVER_FINAL
    assert server.done


def test_full_exchange_with_random_nonces() -> None:
    server = ScramServer(parse_verifier(make_verifier("s3cret", iterations=4096)))
    client = ScramClient("s3cret", offered=server.mechanisms)
    exchange(server, client)
    assert server.done and client.done


def test_wrong_password_is_denied_28p01() -> None:
    server = ScramServer(parse_verifier(make_verifier("right")))
    client = ScramClient("wrong")
    first = server.handle_client_first(MECHANISM, client.client_first())
    with pytest.raises(ScramAuthFailed) as err:
        server.handle_client_final(client.handle_server_first(first))
    assert isinstance(err.value, Denied)
    assert err.value.sqlstate == "28P01"
    assert not server.done


def test_mock_verifier_fails_like_a_wrong_password() -> None:
    key = b"k" * 32
    mock = mock_verifier("nobody", key)
    assert mock == mock_verifier("nobody", key)  # stable salt: probing twice reveals nothing
    assert mock.salt != mock_verifier("other", key).salt
    real = parse_verifier(make_verifier("pw"))
    assert (mock.iterations, len(mock.salt)) == (real.iterations, len(real.salt))
    for verifier in (real, mock):
        server = ScramServer(verifier)
        client = ScramClient("not-pw")
        first = server.handle_client_first(MECHANISM, client.client_first())  # same step succeeds
        assert re.fullmatch(rb"r=[!-+\--~]+,s=[A-Za-z0-9+/=]{24},i=4096", first)
        with pytest.raises(ScramAuthFailed):
            server.handle_client_final(client.handle_server_first(first))


def test_doomed_verifier_refuses_even_a_matching_proof() -> None:
    real = parse_verifier(make_verifier("pw"))
    doomed = Verifier(real.iterations, real.salt, real.stored_key, real.server_key, doomed=True)
    with pytest.raises(ScramAuthFailed):
        exchange(ScramServer(doomed), ScramClient("pw"))


def test_tampered_server_signature_detected() -> None:
    client = ScramClient("pencil", username="user", nonce=CLIENT_NONCE)
    client.client_first()
    client.handle_server_first(SERVER_FIRST)
    tampered = b"v=" + base64.b64encode(b"\1" * 32)
    with pytest.raises(ServerSignatureMismatch):
        client.handle_server_final(tampered)
    assert not client.done


def test_server_error_attribute() -> None:
    client = ScramClient("pencil", username="user", nonce=CLIENT_NONCE)
    client.client_first()
    client.handle_server_first(SERVER_FIRST)
    with pytest.raises(ScramError, match="invalid-proof"):
        client.handle_server_final(b"e=invalid-proof")


@pytest.mark.parametrize(
    "server_first",
    [
        b"r=someoneelse,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",  # nonce not extending ours
        b"r=rOprNGfwEbeRWgbNEkqO,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",  # nothing added
        b"r=rOprNGfwEbeRWgbNEkqOx,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=1",  # too few iterations
        b"r=rOprNGfwEbeRWgbNEkqOx,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=99999999",  # too many
        b"r=rOprNGfwEbeRWgbNEkqOx,s=!!!,i=4096",  # bad base64
        b"m=ext,r=rOprNGfwEbeRWgbNEkqOx,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
        b"s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
        b"\xff",
    ],
)
def test_client_rejects_bad_server_first(server_first: bytes) -> None:
    client = ScramClient("pencil", nonce=CLIENT_NONCE)
    client.client_first()
    with pytest.raises(ScramError):
        client.handle_server_first(server_first)


@pytest.mark.parametrize(
    ("mechanism", "client_first"),
    [
        ("SCRAM-SHA-1", b"n,,n=,r=abc"),
        (MECHANISM, None),
        (MECHANISM, b"n,a=admin,n=,r=abc"),  # authzid
        (MECHANISM, b"p=tls-server-end-point,,n=,r=abc"),  # no binding data on this server
        (MECHANISM, b"p=tls-unique,,n=,r=abc"),
        (MECHANISM_PLUS, b"n,,n=,r=abc"),  # PLUS not offered
        (MECHANISM, b"x,,n=,r=abc"),
        (MECHANISM, b"n,,m=ext,n=,r=abc"),
        (MECHANISM, b"n,,r=abc"),
        (MECHANISM, b"n,,n=,r="),
        (MECHANISM, b"n,,n=,r=a b"),
        (MECHANISM, b"n"),
        (MECHANISM, b"n,,n=\xff,r=abc"),
    ],
)
def test_server_rejects_bad_client_first(mechanism: str, client_first: bytes | None) -> None:
    server = ScramServer(parse_verifier(make_verifier("pw")))
    with pytest.raises(ScramError) as err:
        server.handle_client_first(mechanism, client_first)
    assert err.value.sqlstate == "08P01"
    with pytest.raises(ScramError):  # a failed exchange stays failed
        server.handle_client_final(b"c=biws,r=abc,p=AAAA")


@pytest.mark.parametrize(
    "mutate",
    [
        lambda f: f.replace(b"c=biws", b"c=eSws"),  # claims y,, after sending n,,
        lambda f: f.replace(b"r=rOpr", b"r=xOpr"),  # nonce mismatch
        lambda f: f.split(b",p=")[0],  # no proof
        lambda f: f.split(b",p=")[0] + b",p=AAAA",  # short proof
        lambda f: f.split(b",p=")[0] + b",p=***",
        lambda f: b"r=x,c=biws,p=AAAA",
    ],
)
def test_server_rejects_bad_client_final(mutate: object) -> None:
    server = ScramServer(parse_verifier(make_verifier("pencil", salt=SALT)), nonce=SERVER_NONCE)
    server.handle_client_first(MECHANISM, CLIENT_FIRST)
    with pytest.raises(ScramError):
        server.handle_client_final(mutate(CLIENT_FINAL))  # type: ignore[operator]


def test_out_of_order_messages() -> None:
    server = ScramServer(parse_verifier(make_verifier("pw")))
    with pytest.raises(ScramError, match="unexpected"):
        server.handle_client_final(CLIENT_FINAL)
    client = ScramClient("pw")
    with pytest.raises(ScramError, match="unexpected"):
        client.handle_server_first(SERVER_FIRST)
    client.client_first()
    with pytest.raises(ScramError, match="unexpected"):
        client.client_first()


def test_channel_binding_plus_exchange() -> None:
    cb = tls_server_end_point(b"certificate-der", "sha256")
    assert cb == hashlib.sha256(b"certificate-der").digest()
    assert tls_server_end_point(b"c", "SHA1") == hashlib.sha256(b"c").digest()
    server = ScramServer(parse_verifier(make_verifier("pw")), channel_binding=cb)
    assert server.mechanisms == (MECHANISM_PLUS, MECHANISM)
    client = ScramClient("pw", offered=server.mechanisms, channel_binding=cb)
    assert client.mechanism == MECHANISM_PLUS
    exchange(server, client)
    assert server.done and client.done


def test_channel_binding_mismatch_and_downgrade_refused() -> None:
    verifier = parse_verifier(make_verifier("pw"))
    server = ScramServer(verifier, channel_binding=b"A" * 32)
    client = ScramClient("pw", offered=server.mechanisms, channel_binding=b"B" * 32)  # a MITM's cert
    first = server.handle_client_first(client.mechanism, client.client_first())
    with pytest.raises(ScramError, match="channel binding"):
        server.handle_client_final(client.handle_server_first(first))
    # a client that can bind but was told the server cannot ("y") is being downgraded
    server = ScramServer(verifier, channel_binding=b"A" * 32)
    client = ScramClient("pw", offered=(MECHANISM,), channel_binding=b"A" * 32)
    assert client.client_first().startswith(b"y,,")
    with pytest.raises(ScramError, match="downgrade"):
        server.handle_client_first(MECHANISM, b"y,,n=,r=abc")
    # without binding data on the server "y" is fine
    server = ScramServer(verifier)
    exchange(server, ScramClient("pw", offered=(MECHANISM,), channel_binding=b"A" * 32))
    assert server.done


def test_client_needs_a_supported_mechanism() -> None:
    with pytest.raises(ScramError, match="no supported"):
        ScramClient("pw", offered=("SCRAM-SHA-512",))


def test_verifier_format_is_postgresql_rolpassword() -> None:
    text = make_verifier("pencil", salt=SALT)
    # PostgreSQL's parse_scram_secret: mechanism$iterations:salt$storedkey:serverkey, base64 keys of 32 bytes
    assert re.fullmatch(r"SCRAM-SHA-256\$4096:[A-Za-z0-9+/]+=*\$[A-Za-z0-9+/]{43}=:[A-Za-z0-9+/]{43}=", text)
    assert text.split("$")[1] == "4096:W22ZaJ0SNY7soEsUEjb6gQ=="
    verifier = parse_verifier(text)
    assert str(verifier) == text
    assert "stored_key" not in repr(verifier)
    fresh = make_verifier("pencil")
    assert len(parse_verifier(fresh).salt) == 16
    assert fresh != make_verifier("pencil")  # random salt


# Checked by hand against PostgreSQL 15.18: `CREATE ROLE alice LOGIN PASSWORD '<this>'` stores it
# verbatim (rolpassword equal) and `psql` then logs in as alice with password "pencil".
PG_ACCEPTED = (
    "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY="
    ":wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU="
)


def test_verifier_matches_one_postgresql_accepted() -> None:
    assert make_verifier("pencil", salt=SALT) == PG_ACCEPTED
    server = ScramServer(parse_verifier(PG_ACCEPTED), nonce=SERVER_NONCE)
    server.handle_client_first(MECHANISM, CLIENT_FIRST)
    assert server.handle_client_final(CLIENT_FINAL) == SERVER_FINAL


@pytest.mark.parametrize(
    "text",
    [
        "",
        "md5abcdef",
        "SCRAM-SHA-1$4096:c2FsdA==$" + "A" * 43 + "=:" + "A" * 43 + "=",
        "SCRAM-SHA-256$0:c2FsdA==$" + "A" * 43 + "=:" + "A" * 43 + "=",
        "SCRAM-SHA-256$x:c2FsdA==$" + "A" * 43 + "=:" + "A" * 43 + "=",
        "SCRAM-SHA-256$4096:$" + "A" * 43 + "=:" + "A" * 43 + "=",
        "SCRAM-SHA-256$4096:c2FsdA==$AAAA:" + "A" * 43 + "=",
        "SCRAM-SHA-256$4096:c2F*dA==$" + "A" * 43 + "=:" + "A" * 43 + "=",
        "SCRAM-SHA-256$4096:c2FsdA==$" + "A" * 43 + "=",
    ],
)
def test_parse_verifier_rejects(text: str) -> None:
    with pytest.raises(BadVerifier):
        parse_verifier(text)


def test_saslprep_like_postgresql() -> None:
    assert prepare_password("pencil") == b"pencil"
    assert prepare_password("a\tb") == b"a\tb"  # ASCII is used as is, controls included
    assert prepare_password("I\u00adX") == b"IX"  # soft hyphen maps to nothing
    assert prepare_password("a\u00a0b") == b"a b"  # non-ASCII space maps to space
    assert prepare_password("\u2168") == b"IX"  # NFKC
    assert prepare_password("a\u0007\u00e9") == "a\u0007\u00e9".encode()  # prohibited: used unprepared
    server = ScramServer(parse_verifier(make_verifier("\u2168")))
    exchange(server, ScramClient("IX"))  # same prepared password


def test_md5_password() -> None:
    inner = hashlib.md5(b"secretalice").hexdigest()
    expected = b"md5" + hashlib.md5(inner.encode() + b"\1\2\3\4").hexdigest().encode()
    assert md5_password("alice", "secret", b"\1\2\3\4") == expected
    assert len(expected) == 35


def test_errors_are_peer_protocol_errors() -> None:
    assert issubclass(ScramError, PeerProtocolError)
    assert issubclass(ServerSignatureMismatch, PeerProtocolError)
