"""The SFTP request stream read for the record: bytes in, operations out, however the bytes are split."""

from __future__ import annotations

import itertools
import struct
from typing import Any

import pytest

from proxy.ssh.sftplog import MAX_HELD, SftpLog


def _s(value: bytes) -> bytes:
    return struct.pack(">I", len(value)) + value


_IDS = itertools.count(1000)


def packet(kind: int, body: bytes, request_id: int | None = None) -> bytes:
    """One SFTP packet: length, type, request id (a fresh one unless given), then ``body``."""
    payload = bytes([kind]) + struct.pack(">I", next(_IDS) if request_id is None else request_id) + body
    return struct.pack(">I", len(payload)) + payload


NO_ATTRS = struct.pack(">I", 0)
INIT = struct.pack(">IBI", 5, 1, 3)  # SSH_FXP_INIT, version 3: no request id
STREAM = b"".join([
    INIT,
    packet(3, _s(b"/srv/report.csv") + struct.pack(">I", 1) + NO_ATTRS),  # open for reading
    packet(5, _s(b"h1") + struct.pack(">QI", 0, 32768)),  # read: skipped
    packet(3, _s(b"/tmp/up.bin") + struct.pack(">I", 0x1A) + NO_ATTRS),  # write, create, truncate
    packet(6, _s(b"h2") + struct.pack(">Q", 0) + _s(b"x" * 100_000)),  # a write: skipped, never held
    packet(4, _s(b"h2")),  # close
    packet(11, _s(b"/srv")),
    packet(13, _s(b"/tmp/old.log")),
    packet(14, _s(b"/tmp/new") + NO_ATTRS),
    packet(15, _s(b"/tmp/gone")),
    packet(9, _s(b"/tmp/up.bin") + NO_ATTRS),
    packet(18, _s(b"/tmp/a") + _s(b"/tmp/b")),
    packet(20, _s(b"/tmp/target") + _s(b"/tmp/link")),
    packet(200, _s(b"posix-rename@openssh.com") + _s(b"/tmp/c") + _s(b"/tmp/d")),
    packet(200, _s(b"statvfs@openssh.com") + _s(b"/")),  # names no change: not an operation
    packet(17, _s("/srv/caf\u00e9".encode())),  # stat: skipped
])
EXPECTED: list[dict[str, Any]] = [
    {"op": "open", "path": "/srv/report.csv", "mode": "read"},
    {"op": "open", "path": "/tmp/up.bin", "mode": "write,create,truncate"},
    {"op": "list", "path": "/srv"},
    {"op": "remove", "path": "/tmp/old.log"},
    {"op": "mkdir", "path": "/tmp/new"},
    {"op": "rmdir", "path": "/tmp/gone"},
    {"op": "setstat", "path": "/tmp/up.bin"},
    {"op": "rename", "path": "/tmp/a", "to": "/tmp/b"},
    {"op": "symlink", "path": "/tmp/target", "to": "/tmp/link"},
    {"op": "rename", "path": "/tmp/c", "to": "/tmp/d"},
]


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 64, 4096, len(STREAM)])
def test_operations_whatever_the_chunks(size: int) -> None:
    reader = SftpLog()
    ops = [op for i in range(0, len(STREAM), size) for op in reader.from_client(STREAM[i : i + size])]
    assert ops == EXPECTED


def test_a_stream_that_is_not_sftp_stops_the_reading_once() -> None:
    reader = SftpLog()
    ops = reader.from_client(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert [op["op"] for op in ops] == ["unreadable"] and "not SFTP" in ops[0]["why"]
    assert reader.from_client(packet(13, _s(b"/tmp/x"))) == []


def test_a_path_longer_than_hoop_holds_is_said_and_the_stream_goes_on() -> None:
    reader = SftpLog()
    long_open = packet(3, _s(b"/" + b"a" * MAX_HELD) + struct.pack(">I", 1) + NO_ATTRS)
    ops = reader.from_client(long_open + packet(13, _s(b"/tmp/x")))
    assert [op["op"] for op in ops] == ["unreadable", "remove"] and ops[1]["path"] == "/tmp/x"


@pytest.mark.parametrize("size", [1, 4096, 100_000])
def test_padding_after_the_paths_does_not_hide_them(size: int) -> None:
    """sftp-server ignores what trails a request's fields: a client padding its requests past what hoop
    holds must not turn them into unreadable ones."""
    padded = packet(3, _s(b"/srv/customers.csv") + struct.pack(">I", 1) + NO_ATTRS + b"\0" * 70_000)
    renamed = packet(18, _s(b"/srv/a") + _s(b"/srv/b") + b"\0" * 70_000)
    stream = padded + renamed
    reader = SftpLog()
    ops = [op for i in range(0, len(stream), size) for op in reader.from_client(stream[i : i + size])]
    assert ops == [{"op": "open", "path": "/srv/customers.csv", "mode": "read"},
                   {"op": "rename", "path": "/srv/a", "to": "/srv/b"}]


def test_a_field_past_its_packet_is_unreadable_not_an_error() -> None:
    reader = SftpLog()
    bad = packet(13, struct.pack(">I", 50) + b"/short")  # the string claims 50 bytes
    ops = reader.from_client(bad + packet(15, _s(b"/tmp/d")))
    assert [op["op"] for op in ops] == ["unreadable", "rmdir"]


def test_undecodable_path_bytes_are_shown_escaped() -> None:
    ops = SftpLog().from_client(packet(13, _s(b"/tmp/\xff.bin")))
    assert ops == [{"op": "remove", "path": "/tmp/\\xff.bin"}]


def _split(log_feed: object, data: bytes, size: int) -> list[dict[str, Any]]:
    feed = log_feed  # (a bound from_client or from_server)
    return [op for i in range(0, len(data), size) for op in feed(data[i : i + size])]  # type: ignore[operator]


@pytest.mark.parametrize("size", [1, 3, 9, 1 << 20])
def test_bytes_read_and_written_are_added_up_per_file_and_recorded_at_its_close(size: int) -> None:
    log = SftpLog()
    opens = [packet(3, _s(b"/srv/report.csv") + struct.pack(">I", 1) + NO_ATTRS, 1),  # open, read
             packet(3, _s(b"/srv/missing") + struct.pack(">I", 1) + NO_ATTRS, 2)]  # fails: a status answers it
    assert _split(log.from_client, b"".join(opens), size) == [
        {"op": "open", "path": "/srv/report.csv", "mode": "read"},
        {"op": "open", "path": "/srv/missing", "mode": "read"}]
    handles = [packet(102, _s(b"H1"), 1), packet(101, struct.pack(">I", 2) + _s(b"no such file") + _s(b""), 2)]
    assert _split(log.from_server, b"".join(handles), size) == []
    reads = [packet(5, _s(b"H1") + struct.pack(">QI", 0, 32768), 3),  # pipelined, as OpenSSH's sftp does
             packet(5, _s(b"H1") + struct.pack(">QI", 32768, 32768), 4)]
    assert _split(log.from_client, b"".join(reads), size) == []
    data = [packet(103, _s(b"r" * 32768), 3), packet(103, _s(b"r" * 1000), 4)]
    assert _split(log.from_server, b"".join(data), size) == []
    written = [packet(3, _s(b"/tmp/up.bin") + struct.pack(">I", 0x1A) + NO_ATTRS, 5)]
    assert _split(log.from_client, written[0], size)[0]["op"] == "open"
    assert _split(log.from_server, packet(102, _s(b"H2"), 5), size) == []
    stream = packet(6, _s(b"H2") + struct.pack(">Q", 0) + _s(b"w" * 70_000), 6) + packet(4, _s(b"H2"), 7)
    assert _split(log.from_client, stream, size) == []
    assert _split(log.from_server, _ok(6) + _ok(7), size) == [  # at the close's answer
        {"op": "transferred", "path": "/tmp/up.bin", "mode": "write,create,truncate", "read": 0, "written": 70_000}]
    assert _split(log.from_client, packet(4, _s(b"H1"), 8), size) == []
    assert _split(log.from_server, _ok(8), size) == [
        {"op": "transferred", "path": "/srv/report.csv", "mode": "read", "read": 33_768, "written": 0}]


def _ok(request_id: int) -> bytes:
    return packet(101, struct.pack(">I", 0) + _s(b"") + _s(b""), request_id)


def test_reads_sent_with_their_close_are_still_counted() -> None:
    """A client may send its reads and the close in one write, before any answer: the close is reported at
    its own answer, which comes after those of the reads."""
    log = SftpLog()
    log.from_client(packet(3, _s(b"/srv/a") + struct.pack(">I", 1) + NO_ATTRS, 1))
    log.from_server(packet(102, _s(b"H1"), 1))
    burst = b"".join(packet(5, _s(b"H1") + struct.pack(">QI", i * 100, 100), 10 + i) for i in range(3))
    assert log.from_client(burst + packet(4, _s(b"H1"), 20)) == []
    answers = b"".join(packet(103, _s(b"d" * 100), 10 + i) for i in range(3)) + _ok(20)
    assert log.from_server(answers) == [{"op": "transferred", "path": "/srv/a", "mode": "read", "read": 300,
                                         "written": 0}]
    assert log.finish() == []


def test_a_close_never_answered_is_reported_at_the_end() -> None:
    log = SftpLog()
    log.from_client(packet(3, _s(b"/srv/a") + struct.pack(">I", 1) + NO_ATTRS, 1))
    log.from_server(packet(102, _s(b"H1"), 1))
    log.from_client(packet(6, _s(b"H1") + struct.pack(">Q", 0) + _s(b"w" * 5), 2) + packet(4, _s(b"H1"), 3))
    assert log.finish() == [{"op": "transferred", "path": "/srv/a", "mode": "read", "read": 0, "written": 5}]


def test_requests_piling_up_unanswered_are_said_once() -> None:
    """A client that stops reading pauses hoop's reading from the host while its own requests keep coming: an
    open whose answer is pushed out of what hoop follows makes the counts inexact, and the record says so."""
    log = SftpLog()
    ops = log.from_client(packet(3, _s(b"/srv/a") + struct.pack(">I", 1) + NO_ATTRS, 1)
                          + b"".join(packet(17, _s(b"/x"), 100 + i) for i in range(4096)))
    assert [op["op"] for op in ops] == ["open", "unreadable"] and "requests in flight" in ops[1]["why"]


def test_a_file_closed_without_moving_a_byte_is_not_a_transfer() -> None:
    log = SftpLog()
    log.from_client(packet(3, _s(b"/srv/a") + struct.pack(">I", 1) + NO_ATTRS, 1))
    log.from_server(packet(102, _s(b"H1"), 1))
    assert log.from_client(packet(4, _s(b"H1"), 2)) == []
    assert log.from_client(packet(4, _s(b"unknown"), 3)) == []  # a handle hoop never saw opened


def test_a_reused_request_id_is_said_since_it_could_hide_what_a_read_returned() -> None:
    """A read on a bogus handle sharing a real read's id: its failure status would be taken for the real
    read's answer, and the real data go uncounted. Counting is not exact then, and the record says so."""
    log = SftpLog()
    log.from_client(packet(3, _s(b"/srv/a") + struct.pack(">I", 1) + NO_ATTRS, 1))
    log.from_server(packet(102, _s(b"H1"), 1))
    ops = log.from_client(packet(5, _s(b"bogus") + struct.pack(">QI", 0, 10), 2)
                          + packet(5, _s(b"H1") + struct.pack(">QI", 0, 10), 2))
    assert [op["op"] for op in ops] == ["unreadable"] and "reused a request id" in ops[0]["why"]
    assert log.from_client(packet(5, _s(b"H1") + struct.pack(">QI", 0, 10), 2) + packet(13, _s(b"/x"), 3)) == [
        {"op": "remove", "path": "/x"}]  # (said once)


def test_files_left_open_are_reported_when_the_session_ends_and_lengths_are_not_believed_past_the_packet() -> None:
    log = SftpLog()
    log.from_client(packet(3, _s(b"/srv/a") + struct.pack(">I", 1) + NO_ATTRS, 1))
    log.from_server(packet(102, _s(b"H1"), 1))
    log.from_client(packet(5, _s(b"H1") + struct.pack(">QI", 0, 10), 2))
    lying = packet(103, struct.pack(">I", 0xFFFFFFFF) + b"x" * 10, 2)  # claims 4 GiB, carries 10 bytes
    assert log.from_server(lying) == []
    assert log.finish() == [{"op": "transferred", "path": "/srv/a", "mode": "read", "read": 10, "written": 0,
                             "unclosed": True}]
    assert log.finish() == []


def test_a_close_whose_id_is_reused_is_still_reported() -> None:
    log = SftpLog()
    log.from_client(packet(3, _s(b"/srv/secret.db") + struct.pack(">I", 1) + NO_ATTRS, 1))
    log.from_server(packet(102, _s(b"H1"), 1))
    log.from_client(packet(5, _s(b"H1") + struct.pack(">QI", 0, 4096), 2))
    log.from_server(packet(103, _s(b"d" * 4096), 2))
    ops = log.from_client(packet(4, _s(b"H1"), 10) + packet(17, _s(b"/x"), 10))
    assert [op["op"] for op in ops] == ["unreadable", "transferred"] and ops[1]["read"] == 4096
