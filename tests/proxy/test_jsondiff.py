"""Differential tests: the sped-up scanner and one-pass JSON masker against the previous code.

The oracles (tests/proxy/oracle_*.py) are the implementations as they were before the speed-up.
Generated inputs mix values every detector fires on, near misses, escapes, Unicode, numbers
and keys that look like structure; every output must be the oracle's, byte for byte, so a
speed-up can never silently stop masking something.
"""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from broker.config import ALL_DETECTORS, Masking
from proxy.detectors import Scanner
from proxy.jsondoc import mask_document
from proxy.jsonfast import fast_patterns
from proxy.jsonmask import JsonStreamMasker
from proxy.mask import Masker
from proxy.streammask import _cut
from tests.proxy import oracle_cut, oracle_detectors, oracle_jsondoc

KEY = b"k" * 32
PEM = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA0Z3VS5JJcds\n-----END RSA PRIVATE KEY-----"
# what each detector fires on, near misses, and text that merely looks busy
FRAGMENTS = [
    "alice@example.com", "a.b+tag@sub.example.co.uk", "x" * 70 + "@example.com", "@handle", "foo@", "user@host",
    "x@" + "d" * 250 + ".example.com", "y@" + "s." * 140 + "io",  # domains past the 255 bytes looked at
    "4111 1111 1111 1111", "4111-1111-1111-1111", "4242424242424242", "3782 822463 10005", "4111 1111 1111 1112",
    "1700000000000", "536-90-4399", "000-12-3456", "2024-01-15 10:22:33+00", "DE89 3704 0044 0532 0130 00",
    "GB82WEST12345698765432", "GB82WEST12345698765433", "+1 650-253-0000", "(212) 555-0100", "650.253.0000",
    "555-555-5555", "+44 20 7946 0958", "AKIAIOSFODNN7EXAMPLE", "ASIAY34FZKBOKMUTVV7A", "AKIAshort",
    "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "Bearer abcdefghijkl", "bearer  x", "BEARER tok_12345678", "eyJhbGciOi.eyJzdWIiOi.sig",
    "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
    "hoop_" + "Xy3_-aB9" * 6, "x9Kq2LmN7pR4sT8vW3yZ6bC1dF5gH0jJ", "0123456789abcdef0123456789abcdef",
    "123e4567-e89b-12d3-a456-426614174000", PEM, "-----BEGIN RSA PRIVATE KEY-----\nMIIE", "-----BEGIN CERTIFICATE-----",
    "plain", "the quick brown fox", "Zoë ☃ 😀", "2030-01-01T12:00:00Z", "10:22:33", "-", "(", "+", "0", ":", ",",
    '"', "\\", "\t", "\n", "GET /api/v1/users 200",
]
KEYS = ["a", "email", "a.b", 'x", "y', "password", "db_password", "PassWord", "card", "ids", "token", "tokens", "ünï",
        "x@y.com", "aws_secret_access_key", "Bearer", ", ", ": x", "", "pass\"word", "back\\slash", "k\nx@y.com",
        "4111111111111111"]
RULE_SETS: list[list[dict[str, str]]] = [
    [],
    [{"match": "password"}],
    [{"match": "token"}, {"match": "a.b", "strategy": "hash"}, {"match": "back\\slash", "strategy": "partial"},
     {"match": "x@y.com"}],  # literal globs: the keys are searched for, not walked to
    [{"match": ", "}, {"match": "token"}],  # literal, but "," occurs between strings: walked to
    [{"match": "*password*"}, {"match": "card", "strategy": "partial"}, {"match": "ids", "strategy": "hash"},
     {"match": "tok?n"}],
    [{"match": "*"}],  # every key: structure between strings matches the glob too
    [{"match": "[ab]*"}, {"match": "*word", "strategy": "hash"}],  # a class: the search path
    [{"match": "email", "strategy": "partial"}, {"match": "*@*", "strategy": "hash"}],
    [{"match": '*", "*'}, {"match": "back\\*", "strategy": "partial"}, {"match": "*.*"}],  # a quote, a backslash
]


def _text(rng: random.Random) -> str:
    seps = [" ", "", ", ", "\n", "=", ": ", "/", "-", "."]
    return "".join(rng.choice(FRAGMENTS) + rng.choice(seps) for _ in range(rng.randint(0, 4)))


def _value(rng: random.Random, depth: int) -> Any:
    t = rng.random()
    if depth > 4 or t < 0.45:
        u = rng.random()
        if u < 0.6:
            return _text(rng)
        if u < 0.8:
            return rng.choice([0, -1, 2.5, 3e-7, 4111111111111111, 5105105105105100, 6505551234, 10**20])
        return rng.choice([True, False, None])
    if t < 0.75:
        return {rng.choice([*KEYS, _text(rng)]): _value(rng, depth + 1) for _ in range(rng.randint(0, 6))}
    return [_value(rng, depth + 1) for _ in range(rng.randint(0, 5))]


def _dump(rng: random.Random, doc: Any) -> bytes:
    style = rng.randrange(5)
    if style == 0:
        data = json.dumps(doc, ensure_ascii=False).encode()
    elif style == 1:
        data = json.dumps(doc).encode()  # \uXXXX escapes for all non-ASCII
    elif style == 2:
        data = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
    elif style == 3:
        data = json.dumps(doc, indent=2, ensure_ascii=False).encode()
    else:
        data = b" \r\n" + json.dumps(doc, indent="\t", ensure_ascii=False).encode() + b"\n"
    if rng.random() < 0.2:  # escapes that hide a value from a byte scan
        data = data.replace(b"@", b"\\u0040").replace(b"password", b"pass\\u0077ord")
    return data


def _maskers(rules: list[dict[str, str]], **kw: Any) -> tuple[Masker, oracle_jsondoc.OracleMasker]:
    config = Masking.model_validate({"json_keys": rules, **kw})
    return Masker(config, KEY), oracle_jsondoc.OracleMasker(config, KEY)


@pytest.mark.parametrize("rules", RULE_SETS, ids=[f"rules{i}" for i in range(len(RULE_SETS))])
@pytest.mark.parametrize("strategy", ["redact", "partial", "hash"])
def test_mask_document_matches_the_oracle(rules: list[dict[str, str]], strategy: str) -> None:
    new, old = _maskers(rules, strategy=strategy)
    fast = fast_patterns(tuple(r["match"] for r in rules), 1 << 20)
    assert fast is not None
    changed = 0
    for seed in range(150):
        rng = random.Random(seed)
        data = _dump(rng, _value(rng, 0) if seed % 3 else {"items": [_value(rng, 1) for _ in range(4)]})
        want = oracle_jsondoc.mask_document(old, data, fast[2], 512)
        assert mask_document(new, data, fast[2], 512) == want, data
        j = JsonStreamMasker(new)
        assert j.feed(data) + j.flush() == (data if want is None and not data.strip() else j_ref(old, data)), data
        changed += want is not None and want != data
    assert changed > 60  # the sample really exercises masking


def j_ref(old: Masker, data: bytes) -> bytes:
    """The stream masker's output for a whole body, computed with the oracle (one pass or tokenizer)."""
    fast = fast_patterns(tuple(r.match for r in old.config.json_keys), 1 << 20)
    assert fast is not None
    if data.rstrip(b" \t\r\n")[-1:] in (b"}", b"]", b'"'):
        whole = oracle_jsondoc.mask_document(old, data, fast[2], 512)
        if whole is not None:
            return whole
    j = JsonStreamMasker(old, whole=False)
    return j.feed(data) + j.flush()


def test_records_like_the_http_bench_body() -> None:
    """Many records with the same keys (the strategy cache per key), emails, ruled values."""
    new, old = _maskers([{"match": "password"}, {"match": "created", "strategy": "hash"}])
    fast = fast_patterns(("password", "created"), 1 << 20)
    assert fast is not None
    rng = random.Random(7)
    for n in (0, 1, 10, 200):
        doc = {"items": [{"name": f"user {i}", "email": f"user{i}@example.com", "password": f"pw-{i}-secret",
                          "role": rng.choice(["viewer", "4111 1111 1111 1111", "Bearer abcdefghijkl"]),
                          "created": rng.choice(["2030-01-01T12:00:00Z", 5, [1, "x", {"password": 2}]]), "id": i}
                         for i in range(n)]}
        for data in (json.dumps(doc).encode(), json.dumps(doc, indent=1).encode()):
            want = oracle_jsondoc.mask_document(old, data, fast[2], 512)
            assert want is not None
            assert mask_document(new, data, fast[2], 512) == want


@pytest.mark.parametrize("detectors", [list(ALL_DETECTORS), ["email"], ["card", "ssn", "phone"], ["iban"],
                                       ["secret"], ["email", "iban"], []])
def test_scanner_matches_the_oracle(detectors: list[str]) -> None:
    new = Scanner(detectors)  # type: ignore[arg-type]
    old = oracle_detectors.Scanner(detectors)  # type: ignore[arg-type]
    fired = 0
    for seed in range(3000):
        rng = random.Random(seed)
        data = _text(rng).encode()
        if seed % 5 == 0:  # a JSON rendering: quotes and escapes around the values
            data = json.dumps([_text(rng), {_text(rng): _text(rng)}]).encode()
        hits = old.scan(data)
        assert new.scan(data) == hits, data
        assert new.might_contain(data) == old.might_contain(data), data
        fired += bool(hits)
    assert fired > (100 if detectors else -1)


@pytest.mark.parametrize("strategy", ["redact", "partial", "hash"])
def test_text_masking_matches_the_oracle(strategy: str) -> None:
    new, old = _maskers([], strategy=strategy)
    for seed in range(1000):
        rng = random.Random(seed)
        text = " ".join(_text(rng) for _ in range(3))
        assert new.mask_text(text) == old.mask_text(text)
        data = text.encode()
        assert new.mask_bytes(data) == old.mask_bytes(data)
        cut = rng.randrange(len(data) + 1)
        s, o = new.stream(), old.stream()
        got = s.feed(data[:cut]) + s.feed(data[cut:]) + s.flush()
        assert got == o.feed(data[:cut]) + o.feed(data[cut:]) + o.flush()


def test_stream_cut_matches_the_oracle() -> None:
    """Where the stream masker cuts a buffer (what it sends now, what it holds) is unchanged."""
    ends = [b"", b"\n", b"\r\n", b" ", b"\x1b[0m", b"\xe2\x82", b"user@", b"4111 ", b"Bearer ",
            b"aws_secret_access_key=", b"\x1b[m\x1b[K", b"\x1b[01;31m\x1b[K", b"\x1b[3", b"\x1b",
            b"\x1b[H", b"\x1b]0;t\x07", b"\x1b]0;t\x1b"]
    for seed in range(4000):
        rng = random.Random(seed)
        buf = _text(rng).encode() + rng.choice(ends) + rng.choice([b"", b"\n"])
        if not buf:
            continue
        for max_hold in (8, 4096):
            for continuing in (False, True):
                want = oracle_cut._cut(buf, max_hold, continuing=continuing)
                assert _cut(buf, max_hold, continuing=continuing) == want, buf
