"""PostgreSQL v3 codec: bytes in, messages out. No server."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from broker.errors import PeerProtocolError
from proxy.pg import codec as c
from proxy.pg import messages as m
from proxy.pg.messages import Auth, Backend, Field, Frontend

SASL_MECHS = ("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256")
FIELDS = (
    Field("id", 16384, 1, 23, 4, -1, 0),
    Field("email", 16384, 2, 25, -1, -1, 0),
    Field("?column?", 0, 0, 17, -1, -1, 1),
)
ERROR = {"S": "ERROR", "V": "ERROR", "C": "42P01", "M": 'relation "x" does not exist', "P": "15"}

# (id, whole encoded message, decoder of the body, expected value)
ROUND_TRIPS: list[tuple[str, bytes, Callable[[m.Buf], object], object]] = [
    # frontend
    ("query", c.encode_query("SELECT 1"), m.decode_query, m.Query("SELECT 1")),
    ("query-utf8", c.encode_query("SELECT 'é☃'"), m.decode_query, m.Query("SELECT 'é☃'")),
    ("parse", c.encode_parse("s1", "SELECT $1", [23]), m.decode_parse, m.Parse("s1", "SELECT $1", (23,))),
    ("parse-no-oids", c.encode_parse("", "SELECT 1"), m.decode_parse, m.Parse("", "SELECT 1", ())),
    (
        "bind",
        c.encode_bind("p", "s1", [b"42", None, b""], param_formats=[0], result_formats=[1, 0]),
        m.decode_bind,
        m.Bind("p", "s1", (0,), (b"42", None, b""), (1, 0)),
    ),
    ("bind-empty", c.encode_bind("", ""), m.decode_bind, m.Bind("", "", (), (), ())),
    ("describe-s", c.encode_describe("S", "s1"), m.decode_describe, m.Describe("S", "s1")),
    ("describe-p", c.encode_describe("P"), m.decode_describe, m.Describe("P", "")),
    ("close", c.encode_close("P", "c"), m.decode_close, m.Close("P", "c")),
    ("execute", c.encode_execute("p", 100), m.decode_execute, m.Execute("p", 100)),
    ("copy-fail", c.encode_copy_fail("oops"), m.decode_copy_fail, "oops"),
    ("copy-data", c.encode_copy_data(b"1\tx\n"), bytes, b"1\tx\n"),
    (
        "function-call",
        c.encode_function_call(1598, [b"\0\0\0\1", None], arg_formats=[1], result_format=1),
        m.decode_function_call,
        m.FunctionCall(1598, (1,), (b"\0\0\0\1", None), 1),
    ),
    ("password", c.encode_password("hunter2"), m.decode_password, "hunter2"),
    ("password-md5", c.encode_password(b"md5abc"), m.decode_password, "md5abc"),
    (
        "sasl-initial",
        c.encode_sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=abc"),
        m.decode_sasl_initial_response,
        m.SASLInitialResponse("SCRAM-SHA-256", b"n,,n=,r=abc"),
    ),
    (
        "sasl-initial-none",
        c.encode_sasl_initial_response("SCRAM-SHA-256", None),
        m.decode_sasl_initial_response,
        m.SASLInitialResponse("SCRAM-SHA-256", None),
    ),
    ("sasl-response", c.encode_sasl_response(b"c=biws,r=x,p=y"), m.decode_sasl_response, b"c=biws,r=x,p=y"),
    # backend
    ("auth-ok", c.AUTH_OK, m.decode_authentication, m.Authentication(Auth.OK)),
    (
        "auth-cleartext",
        c.AUTH_CLEARTEXT_PASSWORD,
        m.decode_authentication,
        m.Authentication(Auth.CLEARTEXT_PASSWORD),
    ),
    (
        "auth-md5",
        c.encode_auth_md5(b"\1\2\3\4"),
        m.decode_authentication,
        m.Authentication(Auth.MD5_PASSWORD, salt=b"\1\2\3\4"),
    ),
    (
        "auth-sasl",
        c.encode_auth_sasl(SASL_MECHS),
        m.decode_authentication,
        m.Authentication(Auth.SASL, mechanisms=SASL_MECHS),
    ),
    (
        "auth-sasl-continue",
        c.encode_auth_sasl_continue(b"r=abc,s=c2FsdA==,i=4096"),
        m.decode_authentication,
        m.Authentication(Auth.SASL_CONTINUE, data=b"r=abc,s=c2FsdA==,i=4096"),
    ),
    (
        "auth-sasl-final",
        c.encode_auth_sasl_final(b"v=xyz"),
        m.decode_authentication,
        m.Authentication(Auth.SASL_FINAL, data=b"v=xyz"),
    ),
    ("auth-gss", c.encode_auth(Auth.GSS), m.decode_authentication, m.Authentication(Auth.GSS)),
    (
        "parameter-status",
        c.encode_parameter_status("client_encoding", "UTF8"),
        m.decode_parameter_status,
        ("client_encoding", "UTF8"),
    ),
    (
        "backend-key",
        c.encode_backend_key_data(4242, b"\xde\xad\xbe\xef"),
        m.decode_backend_key_data,
        m.BackendKeyData(4242, b"\xde\xad\xbe\xef"),
    ),
    (
        "backend-key-3.2",
        c.encode_backend_key_data(7, bytes(range(32))),
        m.decode_backend_key_data,
        m.BackendKeyData(7, bytes(range(32))),
    ),
    ("ready-idle", c.encode_ready_for_query(), m.decode_ready_for_query, "I"),
    ("ready-failed", c.encode_ready_for_query("E"), m.decode_ready_for_query, "E"),
    ("row-description", c.encode_row_description(FIELDS), m.decode_row_description, FIELDS),
    ("row-description-empty", c.encode_row_description([]), m.decode_row_description, ()),
    ("data-row", c.encode_data_row([b"1", None, b"", b"x" * 300]), m.decode_data_row, [b"1", None, b"", b"x" * 300]),
    ("data-row-empty", c.encode_data_row([]), m.decode_data_row, []),
    (
        "command-complete",
        c.encode_command_complete("SELECT 3"),
        m.decode_command_complete,
        m.CommandComplete("SELECT 3", "SELECT", 3),
    ),
    ("error", c.encode_fields(ERROR), m.decode_fields, ERROR),
    ("notice", c.encode_fields(ERROR, Backend.NOTICE_RESPONSE), m.decode_fields, ERROR),
    (
        "error-made",
        c.encode_error("28P01", "denied", detail="d", hint="h"),
        m.decode_fields,
        {"S": "ERROR", "V": "ERROR", "C": "28P01", "M": "denied", "D": "d", "H": "h"},
    ),
    (
        "copy-in",
        c.encode_copy_response(Backend.COPY_IN_RESPONSE, 0, [0, 0]),
        m.decode_copy_response,
        m.CopyResponse(0, (0, 0)),
    ),
    (
        "copy-out",
        c.encode_copy_response(Backend.COPY_OUT_RESPONSE, 1, [1]),
        m.decode_copy_response,
        m.CopyResponse(1, (1,)),
    ),
    (
        "copy-both",
        c.encode_copy_response(Backend.COPY_BOTH_RESPONSE, 0, []),
        m.decode_copy_response,
        m.CopyResponse(0, ()),
    ),
    (
        "notification",
        c.encode_notification(99, "revoke", "grant-7"),
        m.decode_notification,
        m.Notification(99, "revoke", "grant-7"),
    ),
    ("parameter-description", c.encode_parameter_description([23, 25]), m.decode_parameter_description, (23, 25)),
    (
        "negotiate",
        c.encode_negotiate_protocol_version(0, ["_pq_.x", "_pq_.y"]),
        m.decode_negotiate_protocol_version,
        m.NegotiateProtocolVersion(0, ("_pq_.x", "_pq_.y")),
    ),
]

# bodies where any byte string is valid (nothing to truncate or pad)
FREE_FORM = {"copy-data", "sasl-response", "auth-sasl-continue", "auth-sasl-final", "backend-key-3.2"}


def one_frame(wire: bytes) -> tuple[int, memoryview]:
    buf, frames = c.Framer(c.SERVER_MAX_MESSAGE).feed(wire)
    assert len(frames) == 1 and frames[0][1:] == (0, len(wire))
    return frames[0][0], memoryview(buf)[5:]


@pytest.mark.parametrize(("wire", "decode", "expected"), [r[1:] for r in ROUND_TRIPS], ids=[r[0] for r in ROUND_TRIPS])
def test_round_trip(wire: bytes, decode: Callable[[m.Buf], object], expected: object) -> None:
    _, body = one_frame(wire)
    got = decode(body)
    if isinstance(got, list):  # DataRow cells are memoryviews
        got = [None if x is None else bytes(x) for x in got]
    assert got == expected
    assert decode(bytes(body)) == got or isinstance(got, list)


STRICT = [r for r in ROUND_TRIPS if r[0] not in FREE_FORM]


@pytest.mark.parametrize(("wire", "decode"), [r[1:3] for r in STRICT], ids=[r[0] for r in STRICT])
def test_truncated_or_padded_body_is_malformed(wire: bytes, decode: Callable[[m.Buf], object]) -> None:
    body = wire[5:]
    for cut in range(len(body)):
        with pytest.raises(m.MalformedMessage):
            decode(memoryview(body)[:cut])
    if wire[0] == Backend.BACKEND_KEY_DATA:
        return
    with pytest.raises(m.MalformedMessage) as err:
        decode(body + b"\0x")
    assert err.value.sqlstate == "08P01"


def test_type_bytes() -> None:
    assert c.encode_query("x")[0] == Frontend.QUERY == ord("Q")
    assert c.encode_data_row([])[0] == Backend.DATA_ROW == ord("D")
    assert c.encode_row_description([])[0] == Backend.ROW_DESCRIPTION == ord("T")
    assert c.encode_fields(ERROR)[0] == ord("E")
    assert c.encode_fields(ERROR, Backend.NOTICE_RESPONSE)[0] == ord("N")
    assert c.encode_password("x")[0] == c.encode_sasl_response(b"")[0] == ord("p")
    assert c.encode_copy_response(Backend.COPY_OUT_RESPONSE, 0, [])[0] == ord("H")


@pytest.mark.parametrize(
    ("wire", "kind"),
    [
        (c.SYNC, Frontend.SYNC),
        (c.FLUSH, Frontend.FLUSH),
        (c.TERMINATE, Frontend.TERMINATE),
        (c.COPY_DONE, Frontend.COPY_DONE),
        (c.NO_DATA, Backend.NO_DATA),
        (c.EMPTY_QUERY_RESPONSE, Backend.EMPTY_QUERY_RESPONSE),
        (c.PARSE_COMPLETE, Backend.PARSE_COMPLETE),
        (c.BIND_COMPLETE, Backend.BIND_COMPLETE),
        (c.CLOSE_COMPLETE, Backend.CLOSE_COMPLETE),
        (c.PORTAL_SUSPENDED, Backend.PORTAL_SUSPENDED),
    ],
)
def test_empty_messages(wire: bytes, kind: int) -> None:
    msg_type, body = one_frame(wire)
    assert msg_type == kind and wire == bytes((kind,)) + b"\0\0\0\4"
    m.expect_empty(body, "x")
    assert kind in m.EMPTY_FRONTEND or kind in m.EMPTY_BACKEND
    with pytest.raises(m.MalformedMessage):
        m.expect_empty(b"x", "Sync")


@pytest.mark.parametrize(
    ("tag", "command", "rows"),
    [
        ("SELECT 5", "SELECT", 5),
        ("INSERT 0 12", "INSERT", 12),
        ("UPDATE 0", "UPDATE", 0),
        ("DELETE 7", "DELETE", 7),
        ("MERGE 2", "MERGE", 2),
        ("FETCH 100", "FETCH", 100),
        ("MOVE 3", "MOVE", 3),
        ("COPY 1000000", "COPY", 1000000),
        ("COPY", "COPY", None),
        ("CREATE TABLE", "CREATE TABLE", None),
        ("BEGIN", "BEGIN", None),
        ("SELECT x", "SELECT x", None),
    ],
)
def test_command_complete_rows(tag: str, command: str, rows: int | None) -> None:
    assert m.decode_command_complete(c.encode_command_complete(tag)[5:]) == m.CommandComplete(tag, command, rows)


def test_decoder_tables() -> None:
    for wire, kind in [(c.encode_query("x"), m.Query("x")), (c.encode_execute(), m.Execute("", 0))]:
        assert m.FRONTEND_DECODERS[wire[0]](wire[5:]) == kind
    assert m.BACKEND_DECODERS[Backend.NOTICE_RESPONSE](c.encode_fields(ERROR)[5:]) == ERROR
    assert m.FRONTEND_DECODERS[Frontend.PASSWORD](b"raw") == b"raw"


def test_data_row_cells_are_zero_copy_and_rewrite() -> None:
    wire = c.encode_data_row([b"alice@example.com", None, b"42"])
    _, body = one_frame(wire)
    cells = m.decode_data_row(body)
    assert isinstance(cells[0], memoryview) and cells[0].obj is body.obj
    masked = [b"a***@example.com", cells[1], cells[2]]
    assert c.encode_data_row(masked) == c.encode_data_row([b"a***@example.com", None, b"42"])
    assert c.encode_data_row(cells) == wire  # unchanged cells round-trip byte for byte


@pytest.mark.parametrize("body", [b"\0\1\xff\xff\xff\xfe", b"\0\1\0\0\0\5ab", b"\xff\xff", b"\0\1\0\0"])
def test_data_row_malformed(body: bytes) -> None:
    with pytest.raises(m.MalformedMessage):
        m.decode_data_row(body)


@pytest.mark.parametrize(
    "decode",
    [
        m.decode_row_description,
        m.decode_parameter_description,
        m.decode_copy_response,
        m.decode_bind,
        m.decode_parse,
        m.decode_negotiate_protocol_version,
    ],
)
def test_negative_counts_are_malformed(decode: Callable[[m.Buf], object]) -> None:
    for prefix in (b"", b"\0", b"\0\0", b"\0\0\0\0", b"\0\0\0\0\0\0\0\0"):
        for pad in (b"", b"\0\0"):
            with pytest.raises(m.MalformedMessage):
                decode(prefix + b"\xff\xff" + pad)


def test_function_call_negative_counts() -> None:
    for body in (b"\0\0\0\1\xff\xff\0\0\0\0", b"\0\0\0\1\0\0\xff\xff\0\0"):
        with pytest.raises(m.MalformedMessage):
            m.decode_function_call(body)


def test_replace_fields_masks_detail_keeps_order() -> None:
    wire = c.encode_fields({**ERROR, "D": "Key (email)=(a@b.c) exists."})
    msg_type, body = one_frame(wire)
    out = c.replace_fields(msg_type, body, {"D": "Key (email)=(***) exists.", "P": None, "H": "hint"})
    _, out_body = one_frame(out)
    fields = m.decode_fields(out_body)
    assert list(fields) == ["S", "V", "C", "M", "D", "H"]
    assert fields["D"] == "Key (email)=(***) exists."
    assert out[0] == Backend.ERROR_RESPONSE
    assert c.replace_fields(Backend.NOTICE_RESPONSE, body, {})[0] == Backend.NOTICE_RESPONSE


def test_strings_round_trip_non_utf8_bytes() -> None:
    wire = c.frame(Frontend.QUERY, b"SELECT '\xe9\xff'\0")
    query = m.decode_query(wire[5:])
    assert c.encode_query(query.sql) == wire


# ---- framing -------------------------------------------------------------------------

STREAM = [
    c.encode_row_description(FIELDS),
    c.encode_data_row([b"1", b"a@b.c", None]),
    c.encode_data_row([b"2", b"x" * 70000, b"\0\1"]),
    c.encode_command_complete("SELECT 2"),
    c.encode_fields(ERROR, Backend.NOTICE_RESPONSE),
    c.encode_ready_for_query("I"),
    c.SYNC,
]
WIRE = b"".join(STREAM)


def run(framer: c.Framer, chunks: list[bytes]) -> tuple[list[bytes], bytes]:
    """Feed chunks; return whole typed messages seen and every byte forwarded, in order."""
    messages, forwarded = [], bytearray()
    for chunk in chunks:
        buf, frames = framer.feed(chunk)
        last = None
        for msg_type, start, end in frames:
            assert last is None or start == last  # contiguous: a run forwards as one slice
            last = end
            if msg_type != c.RAW:
                assert buf[start] == msg_type
                messages.append(buf[start:end])
            forwarded += buf[start:end]
    return messages, bytes(forwarded)


def test_split_whole_buffer() -> None:
    out: list[c.Frame] = []
    consumed, need = c.split(WIRE, 0, c.SERVER_MAX_MESSAGE, out)
    assert consumed == len(WIRE) and need == c.HEADER_SIZE
    assert [WIRE[s:e] for _, s, e in out] == STREAM
    assert [t for t, _, _ in out] == [s[0] for s in STREAM]


def test_coalesced_data_row_runs() -> None:
    """With coalesce_rows a run of DataRows is one frame whose type says how many rows it holds."""
    for cut in range(0, len(WIRE) + 1, 97):
        framer = c.Framer(c.SERVER_MAX_MESSAGE, coalesce_rows=True)
        rows = forwarded = 0
        types = []
        for chunk in (WIRE[:cut], WIRE[cut:]):
            buf, frames = framer.feed(chunk)
            for t, s, e in frames:
                forwarded += e - s
                types.append(t)
                if t <= -2:
                    rows += -1 - t
                    assert buf[s] == Backend.DATA_ROW and c.rows_frame(-1 - t) == t
        assert rows == 2 and forwarded == len(WIRE) and Backend.DATA_ROW not in types, cut
    out: list[c.Frame] = []
    c.split(WIRE, 0, c.SERVER_MAX_MESSAGE, out, coalesce_rows=True)
    assert [t for t, _, _ in out][:3] == [Backend.ROW_DESCRIPTION, c.rows_frame(2), Backend.COMMAND_COMPLETE]


def test_every_split_point() -> None:
    for cut in range(len(WIRE) + 1):
        framer = c.Framer(c.SERVER_MAX_MESSAGE)
        messages, forwarded = run(framer, [WIRE[:cut], WIRE[cut:]])
        assert messages == STREAM and forwarded == WIRE, cut
        assert framer.pending == 0


def test_one_byte_at_a_time() -> None:
    framer = c.Framer(c.SERVER_MAX_MESSAGE)
    messages, forwarded = run(framer, [WIRE[i : i + 1] for i in range(len(WIRE))])
    assert messages == STREAM and forwarded == WIRE


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 1000, 4096, 65536])
def test_fixed_chunk_sizes(size: int) -> None:
    messages, forwarded = run(c.Framer(c.SERVER_MAX_MESSAGE), [WIRE[i : i + size] for i in range(0, len(WIRE), size)])
    assert messages == STREAM and forwarded == WIRE


def test_large_data_row_across_chunks() -> None:
    row = c.encode_data_row([b"k", b"v" * 3_000_000])
    wire = c.encode_ready_for_query() + row + c.encode_command_complete("SELECT 1")
    framer = c.Framer(c.SERVER_MAX_MESSAGE)
    max_pending = 0
    seen: list[bytes] = []
    for i in range(0, len(wire), 65536):
        buf, frames = framer.feed(wire[i : i + 65536])
        max_pending = max(max_pending, framer.pending)
        seen += [buf[s:e] for t, s, e in frames if t != c.RAW]
    assert seen == [c.encode_ready_for_query(), row, c.encode_command_complete("SELECT 1")]
    assert max_pending < len(row)
    cells = m.decode_data_row(memoryview(seen[1])[5:])
    assert bytes(cells[1]) == b"v" * 3_000_000  # type: ignore[arg-type]


def test_streamed_data_row_is_passed_through_raw() -> None:
    row = c.encode_data_row([b"v" * 1_000_000])
    wire = c.encode_row_description(FIELDS[:1]) + row + c.encode_command_complete("SELECT 1")
    framer = c.Framer(c.SERVER_MAX_MESSAGE, stream_types=frozenset({Backend.DATA_ROW}))
    chunks = [wire[i : i + 65536] for i in range(0, len(wire), 65536)]
    messages, forwarded = run(framer, chunks)
    assert forwarded == wire
    assert messages == [c.encode_row_description(FIELDS[:1]), c.encode_command_complete("SELECT 1")]
    assert framer.pending == 0


def test_streaming_waits_when_a_whole_message_came_first() -> None:
    # The RowDescription in the same chunk may make the glue stop streaming DataRows.
    row = c.encode_data_row([b"v" * 200_000])
    wire = c.encode_row_description(FIELDS[:1]) + row
    framer = c.Framer(c.SERVER_MAX_MESSAGE, stream_types=frozenset({Backend.DATA_ROW}))
    _, frames = framer.feed(wire[:1000])
    assert [f[0] for f in frames] == [Backend.ROW_DESCRIPTION]
    framer.stream_types = frozenset()
    messages, forwarded = run(framer, [wire[1000:150_000], wire[150_000:]])
    assert messages == [row] and forwarded == row  # the held head of the row comes out with it


def test_every_split_point_with_streaming() -> None:
    for cut in range(0, len(WIRE) + 1, 97):
        for second in (cut + 1, cut + 5000, cut + 40000):
            framer = c.Framer(c.SERVER_MAX_MESSAGE, stream_types=frozenset({Backend.DATA_ROW}), stream_threshold=10)
            chunks = [WIRE[:cut], WIRE[cut:second], WIRE[second:]]
            messages, forwarded = run(framer, chunks)
            assert forwarded == WIRE
            assert [x for x in STREAM if x[0] != Backend.DATA_ROW] == [x for x in messages if x[0] != Backend.DATA_ROW]


@pytest.mark.parametrize("length", [0, 3, -1, 2**31 - 1, 10001])
def test_bad_lengths_raise(length: int) -> None:
    framer = c.Framer(10000)
    header = bytes((Frontend.QUERY,)) + length.to_bytes(4, "big", signed=True)
    with pytest.raises(c.MessageTooLong) as err:
        framer.feed(c.SYNC + header)  # raised from the header alone
    assert isinstance(err.value, PeerProtocolError) and err.value.sqlstate == "08P01"


def test_max_length_is_adjustable() -> None:
    framer = c.Framer(100)
    with pytest.raises(c.MessageTooLong):
        framer.feed(c.encode_query("x" * 200))
    framer = c.Framer(100)
    framer.max_length = 1000
    _, frames = framer.feed(c.encode_query("x" * 200))
    assert len(frames) == 1


# ---- startup -------------------------------------------------------------------------


def test_ssl_gssenc_cancel() -> None:
    assert c.parse_startup(c.encode_ssl_request()) == (c.SSLRequest(), 8)
    assert c.parse_startup(c.encode_gssenc_request()) == (c.GSSENCRequest(), 8)
    assert c.parse_startup(c.encode_cancel_request(77, b"\1\2\3\4")) == (c.CancelRequest(77, b"\1\2\3\4"), 16)
    long_key = c.encode_cancel_request(77, bytes(32))  # protocol 3.2
    assert c.parse_startup(long_key) == (c.CancelRequest(77, bytes(32)), 44)
    assert c.encode_ssl_request() == b"\0\0\0\x08\x04\xd2\x16\x2f"


def test_startup_message() -> None:
    params = {"user": "alice", "database": "prod", "application_name": "psql", "options": "-c x=1"}
    wire = c.encode_startup(params) + c.encode_query("SELECT 1")
    packet, used = c.parse_startup(wire)  # type: ignore[misc]
    assert packet == c.StartupMessage(3, 0, params)
    assert isinstance(packet, c.StartupMessage)
    assert packet.user == "alice" and not packet.needs_negotiation
    assert used == len(c.encode_startup(params))
    for cut in range(used):
        assert c.parse_startup(wire[:cut]) is None


def test_startup_needs_negotiation() -> None:
    packet, _ = c.parse_startup(c.encode_startup({"user": "a", "_pq_.x": "1"}, minor=2))  # type: ignore[misc]
    assert isinstance(packet, c.StartupMessage)
    assert (packet.major, packet.minor) == (3, 2)
    assert packet.protocol_options == ("_pq_.x",) and packet.needs_negotiation
    reply = c.encode_negotiate_protocol_version(c.SUPPORTED_MINOR, packet.protocol_options)
    assert reply[5:9] == b"\0\3\0\0"  # what PostgreSQL 15 sends: the whole version code 3.0
    assert m.decode_negotiate_protocol_version(reply[5:]) == m.NegotiateProtocolVersion(0, ("_pq_.x",))


@pytest.mark.parametrize(
    ("wire", "error"),
    [
        (b"\0\0\0\4", c.MessageTooLong),
        (b"\0\0\0\7abc", c.MessageTooLong),
        ((10001).to_bytes(4, "big"), c.MessageTooLong),
        (b"\xff\xff\xff\xff", c.MessageTooLong),
        (b"\0\0\0\x09\0\2\0\0\0", c.UnsupportedProtocol),  # protocol 2.0
        (b"\0\0\0\x08\x04\xd2\x16\x31", c.UnsupportedProtocol),  # unknown 1234.5681
        (b"\0\0\0\x0c\x04\xd2\x16\x2f\0\0\0\0", m.MalformedMessage),  # SSLRequest too long
        (b"\0\0\0\x0c\x04\xd2\x16\x2e\0\0\0\0", m.MalformedMessage),  # CancelRequest too short
        (b"\0\0\0\x0d\0\3\0\0user\0", m.MalformedMessage),  # param without value
        (b"\0\0\0\x0f\0\3\0\0user\0al", m.MalformedMessage),  # no terminator
        (b"\0\0\0\x0a\0\3\0\0\0\0", m.MalformedMessage),  # empty name
    ],
)
def test_bad_startup(wire: bytes, error: type[Exception]) -> None:
    with pytest.raises(error) as err:
        c.parse_startup(wire)
    assert isinstance(err.value, PeerProtocolError)


def test_startup_too_long_and_unsupported_sqlstate() -> None:
    with pytest.raises(c.MessageTooLong, match="invalid length"):
        c.parse_startup(c.encode_startup({"user": "a", "x": "y" * 10000}))
    with pytest.raises(c.UnsupportedProtocol) as err:
        c.parse_startup(b"\0\0\0\x08\0\2\0\0")
    assert err.value.sqlstate == "0A000"


def test_empty_startup_params_and_tls_sniff() -> None:
    assert c.parse_startup(b"\0\0\0\x09\0\3\0\0\0") == (c.StartupMessage(3, 0, {}), 9)
    assert c.looks_like_tls(b"\x16\x03\x01") and not c.looks_like_tls(c.encode_ssl_request())
