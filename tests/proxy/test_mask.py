"""Masker and StreamMasker: table-driven, bytes/str in -> out, no servers."""

from __future__ import annotations

import re
import time

import pytest

from broker.config import Detector, Masking, MaskRule, Strategy
from proxy.detectors import ENTROPY_THRESHOLD, shannon_entropy
from proxy.mask import Masker, StreamMasker

KEY = b"k" * 32
JWT = (
    "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0."
    "dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"
)
PEM = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA0Z3VS5JJcds\nQ2x5Zm9yZXN0\n-----END RSA PRIVATE KEY-----"
CERT = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----"
GRANT = "hoop_" + "Xy3_-aB9" * 6


def masker(**kw: object) -> Masker:
    return Masker(Masking.model_validate(kw), KEY)


DETECTOR_CASES: list[tuple[Detector, str, str]] = [
    # (detector, input, expected output with redact)
    ("email", "mail alice@example.com now", "mail [email] now"),
    ("email", "Key (email)=(bob@x.com) already exists", "Key (email)=([email]) already exists"),
    ("email", "a.b+tag@sub.example.co.uk,", "[email],"),
    ("email", "user@host:~$ ls", "user@host:~$ ls"),
    ("email", "@handle and foo@ and @bar", "@handle and foo@ and @bar"),
    ("card", "card 4111 1111 1111 1111 ok", "card [card] ok"),
    ("card", "card 4111-1111-1111-1111", "card [card]"),
    ("card", "4242424242424242", "[card]"),
    ("card", "amex 3782 822463 10005.", "amex [card]."),
    ("card", "bad 4111 1111 1111 1112", "bad 4111 1111 1111 1112"),
    ("card", "epoch ms 1700000000000", "epoch ms 1700000000000"),
    ("card", "ts 2024-01-15 10:22:33+00", "ts 2024-01-15 10:22:33+00"),
    ("ssn", "ssn 536-90-4399.", "ssn [ssn]."),
    ("ssn", "area 000-12-3456", "area 000-12-3456"),
    ("ssn", "area 666-12-3456", "area 666-12-3456"),
    ("ssn", "area 900-12-3456", "area 900-12-3456"),
    ("ssn", "group 536-00-4399", "group 536-00-4399"),
    ("ssn", "serial 536-90-0000", "serial 536-90-0000"),
    ("ssn", "date 2024-01-1500", "date 2024-01-1500"),
    ("iban", "iban DE89 3704 0044 0532 0130 00 ok", "iban [iban] ok"),
    ("iban", "GB82WEST12345698765432", "[iban]"),
    ("iban", "GB82WEST12345698765433", "GB82WEST12345698765433"),
    ("iban", "DE89 3704 0044 0532 0130 00 AND MORE", "[iban] AND MORE"),
    ("phone", "call +1 650-253-0000 today", "call [phone] today"),
    ("phone", "uk +44 20 7946 0958", "uk [phone]"),
    ("phone", "(212) 555-0100 or 650.253.0000", "[phone] or [phone]"),
    ("phone", "fake 555-555-5555", "fake 555-555-5555"),
    ("phone", "tz 10:22:33+00:00 and +1", "tz 10:22:33+00:00 and +1"),
    ("secret", "key AKIAIOSFODNN7EXAMPLE", "key [secret]"),
    ("secret", "sts ASIAY34FZKBOKMUTVV7A,", "sts [secret],"),
    ("secret", "not AKIAshort", "not AKIAshort"),
    ("secret", "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "aws_secret_access_key = [secret]"),
    ("secret", f"token {JWT} end", "token [secret] end"),
    ("secret", f"x\n{PEM}\nafter", "x\n[secret]\nafter"),
    ("secret", CERT, CERT),
    ("secret", "Authorization: Bearer abc.DEF-123_xyz", "Authorization: Bearer [secret]"),
    ("secret", f"grant {GRANT}!", "grant [secret]!"),
    ("secret", "hoop_short", "hoop_short"),
    ("secret", "AUTH BEARER abcdef123456xyz", "AUTH BEARER [secret]"),
    ("email", "a@b.com c@d.com, x@y.org", "[email] [email], [email]"),
    ("secret", "x=AKIAIOSFODNN7EXAMPLE_more and AKIAIOSFODNN7EXAMPLE", "x=[secret]_more and [secret]"),
    ("secret", '"SecretAccessKey": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"', '"SecretAccessKey": "[secret]"'),
    ("secret", "AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "AWS_SECRET_ACCESS_KEY=[secret]"),
    ("phone", "+1 (650) 253-0000", "[phone]"),
    ("card", "x 4111-1111-1111-1111 y 4111111111111111", "x [card] y [card]"),
    ("secret", "x 9fK2mQ7vLp3ZrT8wXy4BnC6dEe y", "x [secret] y"),
    ("secret", "uuid 550e8400-e29b-41d4-a716-446655440000", "uuid 550e8400-e29b-41d4-a716-446655440000"),
    ("secret", "sha1 da39a3ee5e6b4b0d3255bfef95601890afd80709", "sha1 da39a3ee5e6b4b0d3255bfef95601890afd80709"),
    ("secret", "AbstractSingletonProxyFactoryBean", "AbstractSingletonProxyFactoryBean"),
    ("secret", "/usr/lib/x86_64-linux-gnu/libstdc++.so.6", "/usr/lib/x86_64-linux-gnu/libstdc++.so.6"),
]


@pytest.mark.parametrize(("detector", "text", "expected"), DETECTOR_CASES)
def test_detector(detector: Detector, text: str, expected: str) -> None:
    assert masker(detectors=[detector]).mask_text(text) == expected
    assert masker().mask_text(text) == expected  # all detectors on: no interference


@pytest.mark.parametrize(("detector", "text", "_"), [c for c in DETECTOR_CASES if c[1] != c[2]])
def test_detector_off(detector: Detector, text: str, _: str) -> None:
    others = [d for d in ("email", "card", "ssn", "iban", "phone", "secret") if d != detector]
    assert f"[{detector}]" not in masker(detectors=others).mask_text(text)


def test_generic_threshold_is_documented() -> None:
    assert shannon_entropy(b"9fK2mQ7vLp3ZrT8wXy4BnC6dEe") >= ENTROPY_THRESHOLD
    assert shannon_entropy(b"aaaaaaaaaaaaaaaaaaaaaaaaaaaaa") == 0


@pytest.mark.parametrize(
    ("strategy", "text", "expected"),
    [
        ("redact", "pay 4242424242424242", "pay [card]"),
        ("partial", "pay 4242424242424242", "pay ************4242"),
        ("partial", "mail bob@x.com", "mail *****.com"),
    ],
)
def test_default_strategy(strategy: Strategy, text: str, expected: str) -> None:
    assert masker(strategy=strategy).mask_text(text) == expected


def test_hash_is_stable_and_keyed() -> None:
    a, b = Masker(Masking(), b"a" * 32), Masker(Masking(), b"b" * 32)
    h1 = a.apply("alice@example.com", "hash")
    assert re.fullmatch(r"h:[0-9a-f]{16}", h1)
    assert a.apply("alice@example.com", "hash") == h1
    assert Masker(Masking(), b"a" * 32).apply("alice@example.com", "hash") == h1
    assert b.apply("alice@example.com", "hash") != h1
    assert a.apply("bob@example.com", "hash") != h1
    # detector path and whole-value path agree, so joins across them still work
    assert Masker(Masking(strategy="hash"), b"a" * 32).mask_text("to alice@example.com") == f"to {h1}"
    assert a.apply_bytes(b"alice@example.com", "hash") == h1.encode()


@pytest.mark.parametrize(
    ("value", "strategy", "expected"),
    [
        ("bob@x.com", "redact", "[masked]"),
        ("4242424242424242", "partial", "************4242"),
        ("abcd", "partial", "****"),
        ("ab", "partial", "**"),
        ("zoë-ünïcode", "partial", "*******code"),
        ("", "partial", ""),
    ],
)
def test_apply(value: str, strategy: Strategy, expected: str) -> None:
    m = masker()
    assert m.apply(value, strategy) == expected
    assert m.apply_bytes(value.encode(), strategy) == expected.encode()


RULES = [
    MaskRule(match="users.email", strategy="hash"),
    MaskRule(match="*.ssn"),
    MaskRule(match="card_*", strategy="partial"),
    MaskRule(match="public.orders.note"),
]


@pytest.mark.parametrize(
    ("column", "table", "expected"),
    [
        ("email", "users", "hash"),
        ("EMAIL", "public.users", "hash"),
        ("email", "Public.Users", "hash"),
        ("email", "orders", None),
        ("email", None, None),
        ("ssn", "people", "redact"),
        ("ssn", None, None),
        ("card_number", None, "partial"),
        ("Card_Last", "x.y", "partial"),
        ("note", "public.orders", "redact"),
        ("note", "orders", None),
        ("name", "users", None),
    ],
)
def test_column_strategy(column: str, table: str | None, expected: Strategy | None) -> None:
    m = masker(columns=[r.model_dump() for r in RULES])
    assert m.column_strategy(column, table) == expected
    assert m.column_strategy(column, table) == expected  # cached answer is the same


@pytest.mark.parametrize(
    ("key", "expected"),
    [("password", "redact"), ("Password", "redact"), ("db_password", "redact"), ("token", "hash"), ("name", None)],
)
def test_json_key_strategy(key: str, expected: Strategy | None) -> None:
    m = masker(json_keys=[{"match": "*password"}, {"match": "token", "strategy": "hash"}])
    assert m.json_key_strategy(key) == expected


def test_disabled_passes_everything() -> None:
    m = masker(enabled=False, columns=[{"match": "*"}], json_keys=[{"match": "*"}])
    text = "alice@example.com 4111 1111 1111 1111 AKIAIOSFODNN7EXAMPLE"
    assert m.mask_text(text) == text
    assert m.mask_bytes(text.encode()) is None
    assert not m.might_contain(text.encode())
    assert m.apply("x", "redact") == "x"
    assert m.column_strategy("email", "users") is None
    assert m.json_key_strategy("password") is None
    assert m.stream().feed(text.encode()) == text.encode()


@pytest.mark.parametrize(
    ("data", "hit"),
    [
        (b"1|alice|2024-01-15 10:22:33+00|42.50|t", False),
        (b"plain words and ids 12345 67890", False),
        (b"x alice@example.com", True),
        (memoryview(b"pay 4111111111111111"), True),
    ],
)
def test_bytes_fast_path(data: bytes | memoryview, hit: bool) -> None:
    m = masker()
    assert m.might_contain(data) is hit
    out = m.mask_bytes(data)
    assert (out is not None) is hit


def test_mask_bytes_returns_none_for_near_misses() -> None:
    m = masker()
    assert m.might_contain(b"bad card 4111 1111 1111 1112")
    assert m.mask_bytes(b"bad card 4111 1111 1111 1112") is None


# -- streams -----------------------------------------------------------------------------

STREAM_TEXTS = [
    "contact: alice@example.com, thanks\n",
    "pay 4111 1111 1111 1111 now\n",
    "ssn 536-90-4399.\n",
    "iban DE89 3704 0044 0532 0130 00 ok\n",
    "call +1 650-253-0000 today\n",
    "call (212) 555-0100 today\n",
    "key AKIAIOSFODNN7EXAMPLE\n",
    "> aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\n",
    f"t {JWT} x\n",
    "Authorization: Bearer abcdef123456xyz\n",
    f"g {GRANT} end\n",
    "x 9fK2mQ7vLp3ZrT8wXy4BnC6dEe y\n",
    f"$ cat id_rsa\n{PEM}\nafter\n",
    "café ünï bob@x.com ✓ ok\n",
]


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_stream_split_at_every_byte(text: str) -> None:
    m = masker()
    src = text.encode()
    expected = m.mask_bytes(src)
    assert expected is not None and expected != src
    for k in range(len(src) + 1):
        s = m.stream()
        out = s.feed(src[:k]) + s.feed(src[k:]) + s.flush()
        assert out == expected, k
        assert s.pending == 0


@pytest.mark.parametrize("text", STREAM_TEXTS[:6])
def test_stream_one_byte_at_a_time_after_context(text: str) -> None:
    m = masker()
    src = b"output follows: " + text.encode()
    s = m.stream()
    out = s.feed(src[:20]) + b"".join(s.feed(src[i : i + 3]) for i in range(20, len(src), 3)) + s.flush()
    assert out == m.mask_bytes(src)


def test_stream_utf8_split_is_held_until_complete() -> None:
    s = masker().stream()
    snowman = "☃".encode()
    assert s.feed(b"a " + snowman[:1]) == b"a "
    assert s.feed(snowman[1:2]) == b""
    assert s.feed(snowman[2:] + b" ") == snowman + b" "
    assert s.flush() == b""


@pytest.mark.parametrize(
    "keys",
    [
        [b"l", b"s", b" ", b"-", b"l", b"a", b"\r\n"],
        [b"$ ", b"e", b"c", b"h", b"o", b" ", b"h", b"i"],
        [b"\x1b[1ml\x1b[0m", b"\x1b[1ms\x1b[0m"],
        [b"Password: "],
        [b"Continue? [y/N]"],
        [b"done.\r\n$ "],
    ],
)
def test_stream_interactive_passes_at_once(keys: list[bytes]) -> None:
    s = masker().stream()
    for key in keys:
        assert s.feed(key) == key
    assert s.pending == 0


@pytest.mark.parametrize(
    ("chunk", "held"),
    [
        (b"see alice@exa", b"alice@exa"),
        (b"card 4111 1111 ", b"4111 1111 "),
        (b"tok eyJhbG", b"eyJhbG"),
        (b"key AKIA", b"AKIA"),
        (b"g hoop_", b"hoop_"),
        (b"Authorization: Bearer ", b"Bearer "),
        (b"out -----BEGIN RSA PRI", b"-----BEGIN RSA PRI"),
        (b"the quick brown fo", b"fo"),
        (b"the quick brown fox ", b""),
        (b"line\n", b""),
    ],
)
def test_stream_holds_only_what_could_grow(chunk: bytes, held: bytes) -> None:
    m = masker()
    s = m.stream()
    assert s.feed(chunk) == chunk[: len(chunk) - len(held)]
    assert s.pending == len(held)
    assert s.flush() == (m.mask_bytes(held) or held)
    assert s.pending == 0


def test_stream_hold_is_bounded() -> None:
    s = StreamMasker(masker(), max_hold=64)
    out = s.feed(b"x " + b"ab" * 10_000)
    assert s.pending <= 64
    assert len(out) >= 20_000 - 64


def test_stream_unterminated_pem_is_redacted_past_the_bound() -> None:
    s = StreamMasker(masker(), max_block=1024)
    assert s.feed(b"$ cat key\n-----BEGIN PRIVATE KEY-----\n") == b"$ cat key\n"
    out = b""
    for _ in range(40):
        out += s.feed(b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo=\n")
    assert b"[secret]" in out
    assert b"QUJDREVG" not in out.split(b"[secret]", 1)[0]
    assert s.pending <= 1024


def test_mask_row() -> None:
    m = masker(columns=[{"match": "users.email", "strategy": "hash"}, {"match": "card", "strategy": "partial"}])
    strategies = [m.column_strategy(c, "public.users") for c in ("id", "email", "card", "note")]
    assert strategies == [None, "hash", "partial", None]
    assert m.mask_row([b"1", None, None, b"plain"], strategies) is None
    out = m.mask_row([b"1", b"a@x.io", b"4242424242424242", b"mail b@y.io"], strategies)
    assert out == [b"1", m.apply("a@x.io", "hash").encode(), b"************4242", b"mail [email]"]
    assert m.mask_row([b"1", None, None, b"card 4111 1111 1111 1111"], strategies) == [
        b"1", None, None, b"card [card]"
    ]


def test_mask_rows_batch_matches_single_rows() -> None:
    m = masker(columns=[{"match": "email", "strategy": "redact"}])
    strategies = [m.column_strategy(c) for c in ("id", "email", "note")]
    rows: list[list[bytes | None]] = [
        [b"1", b"a@x.io", b"plain"],
        [b"2", None, b"ssn 536-90-4399"],
        [b"3", b"b@y.io", None],
    ]
    assert m.mask_rows(rows, strategies) == [m.mask_row(r, strategies) for r in rows]
    assert m.mask_rows(rows, strategies)[1] == [b"2", None, b"ssn [ssn]"]
    assert m.mask_rows([[b"1", None, b"x"]], strategies) == [None]


# About 1 MB each, shaped to make a detector retry: a linear scan takes well under 0.1 s, a
# quadratic one minutes (the bound is loose so that only that fails, not a busy machine).
HOSTILE = [
    b"x " + b"eyJ" * 333_334,  # JWT starts, no "."
    b"eyJabcd.eyJ" * 90_000,
    b"bearer " * 140_000,
    b"-----BEGIN " + b"A " * 500_000,
    b"aws_secret_access_key " * 45_000 + b"x" * 45,
    b"@" + b"a" * 1_000_000,
    b"a@" * 500_000,
    (b"a" * 70 + b"@") * 14_000,
    b"hoop_" * 200_000,
    b"4" * 1_000_000,
]


@pytest.mark.parametrize("data", HOSTILE, ids=[repr(d[:12]) for d in HOSTILE])
def test_scan_is_linear_on_hostile_input(data: bytes) -> None:
    m = masker()
    t = time.perf_counter()
    m.mask_bytes(data)
    assert time.perf_counter() - t < 2.0


def test_hash_cache_does_not_keep_big_values() -> None:
    m = masker(strategy="hash")
    outs = {m.apply_bytes(bytes([i]) + b"x" * 100_000, "hash") for i in range(50)}
    assert len(outs) == 50
    assert m.apply_bytes(b"\0" + b"x" * 100_000, "hash") in outs  # the same value, the same hash, uncached
    assert sum(map(len, m._hashes)) < 1_000_000
    assert m.apply_bytes(b"a@x.io", "hash") == m.apply_bytes(b"a@x.io", "hash") and b"a@x.io" in m._hashes


@pytest.mark.parametrize("text", [
    "q=" + "%2F" * 30 + "alice@example.com",
    "GET /login?next=%2Faccount%2Fsettings%2Fnotifications%3Ftab%3Demail%26user%3Dalice.smith@example.com HTTP/1.1",
    "a" * 65 + "@ex.com",
])
def test_email_after_a_long_local_run_is_masked(text: str) -> None:
    """A run of local-part characters longer than 64 (a URL-encoded query) fails closed: its last
    64 characters and the domain are masked."""
    out = masker().mask_text(text)
    assert "example.com" not in out and "ex.com" not in out and "alice" not in out, out
    assert "[email]" in out


@pytest.mark.parametrize("chunks", [
    [b"id\r\n", b"alice.smith", b"@example.com\r\n"],
    [b"id\r\n", b"Bearer", b" abcdefghijkl\r\n"],
    [b"alice", b".smith@example.com\r\n"],
])
def test_stream_holds_a_word_written_in_pieces(chunks: list[bytes]) -> None:
    """Output written a field at a time (printf, echo -n): a chunk that is only the start of a
    word is held, even right after a line end, so the value it begins is still masked."""
    m = masker()
    s = m.stream()
    out = b"".join(s.feed(c) for c in chunks) + s.flush()
    assert out == m.mask_bytes(b"".join(chunks))
    assert b"alice" not in out and b"abcdefghijkl" not in out


GREP_LINES = [  # grep --color=auto wraps the matched part of a value in SGR and EL sequences
    b"\x1b[01;31m\x1b[K4111\x1b[m\x1b[K 1111 1111 1111\r\n",
    b"\x1b[01;31m\x1b[K123-45\x1b[m\x1b[K-6789\r\n",
    b"7,alice\x1b[01;31m\x1b[K@example\x1b[m\x1b[K.com,x\r\n",
    b"x 4111\x1b]0;title\x07 1111 1111 1111\r\n",  # an OSC (window title) inside a value
]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (GREP_LINES[0], b"\x1b[01;31m\x1b[K[card]\x1b[m\x1b[K\r\n"),
        (GREP_LINES[1], b"\x1b[01;31m\x1b[K[ssn]\x1b[m\x1b[K\r\n"),
        (GREP_LINES[2], b"7,[email]\x1b[01;31m\x1b[K\x1b[m\x1b[K,x\r\n"),
        (GREP_LINES[3], b"x [card]\x1b]0;title\x07\r\n"),
        (b"\x1b]0;bob@example.com\x1b\\$ ", b"\x1b]0;[email]\x1b\\$ "),
    ],
)
def test_value_split_by_terminal_escapes_is_masked(data: bytes, expected: bytes) -> None:
    assert masker().mask_bytes(data) == expected


@pytest.mark.parametrize("data", GREP_LINES)
def test_stream_escape_split_value_at_every_byte(data: bytes) -> None:
    m = masker()
    expected = m.mask_bytes(data)
    for k in range(len(data) + 1):
        s = m.stream()
        assert s.feed(data[:k]) + s.feed(data[k:]) + s.flush() == expected, k


def test_stream_holds_an_escape_cut_in_two() -> None:
    s = masker().stream()
    assert s.feed(b"ok \x1b[01;3") == b"ok "
    assert s.feed(b"1m\x1b[Kdone\x1b[m\r\n") == b"\x1b[01;31m\x1b[Kdone\x1b[m\r\n"
    assert s.pending == 0


@pytest.mark.parametrize(
    "data",
    [
        b"\x1b[0m\x1b[01;34mdir\x1b[0m  \x1b[01;32mrun.sh\x1b[0m  notes.txt\r\n",
        b"\x1b]0;user@host: ~\x07\x1b[01;32muser@host\x1b[00m:\x1b[01;34m~\x1b[00m$ ",
        b"\x1b[?1049h\x1b[1;1H\x1b[7m  GNU nano 7.2  \x1b[27m\x1b[24;1H",
    ],
)
def test_clean_coloured_text_is_unchanged(data: bytes) -> None:
    m = masker()
    assert m.mask_bytes(data) is None
    s = m.stream()
    assert s.feed(data) + s.flush() == data
