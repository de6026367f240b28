"""mask_document: a whole JSON document masked without the tokenizer gives the tokenizer's bytes."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from broker.config import Masking
from proxy.jsondoc import mask_document
from proxy.jsonfast import fast_patterns
from proxy.jsonmask import JsonStreamMasker
from proxy.mask import Masker

RULES = [{"match": "*password*"}, {"match": "card", "strategy": "partial"}, {"match": "ids", "strategy": "hash"},
         {"match": "tok?n"}]
MASKER = Masker(Masking.model_validate({"json_keys": RULES}), b"k" * 32)
NO_RULES = Masker(Masking(), b"k" * 32)

VALUES: list[Any] = [
    "alice@example.com", "mail carol@example.org today", "4111 1111 1111 1111", "4111111111111111", "plain",
    "Zoë ☃ 😀", "", "+1 650-253-0000", "078-05-1120", "536-22-1234", "GB82 WEST 1234 5698 7654 32",
    "AKIAIOSFODNN7EXAMPLE",
    "Bearer abcdefghijkl", "x9Kq2LmN7pR4sT8vW3yZ6bC1dF5gH0jJ", "eyJhbGciOi.eyJzdWIiOi.sig", 1, -2.5, 3e-7, 0, True,
    False, None, 4111111111111111, 5105105105105100, 'say "hi" to bob@x.com', "a\\b\\", 'end\\"', "tab\tnew\nline",
    '{"email": "in@json.org", "password": 1}',
]
KEYS = ["a", "email", "password", "db_password", "card", "Card", "ids", "token", "TOKEN", "ünï", "x@y.com",
        "PASSWORD", "4111111111111111", "nested", 'my "password"', "back\\slash", "k\nx@y.com"]


def exact(masker: Masker, data: bytes) -> bytes:
    j = JsonStreamMasker(masker, fast=False)
    return j.feed(data) + j.flush()


def whole(masker: Masker, data: bytes) -> bytes | None:
    fast = fast_patterns(tuple(r.match for r in masker.config.json_keys), 1 << 20)
    assert fast is not None
    return mask_document(masker, data, fast[2], 512)


def _random_doc(rng: random.Random, depth: int = 0) -> Any:
    t = rng.random()
    if depth > 4 or t < 0.35:
        return rng.choice(VALUES)
    if t < 0.7:
        return {rng.choice(KEYS): _random_doc(rng, depth + 1) for _ in range(rng.randint(0, 6))}
    return [_random_doc(rng, depth + 1) for _ in range(rng.randint(0, 5))]


def _dump(rng: random.Random, doc: Any) -> bytes:
    data = _format(rng, doc)
    if rng.random() < 0.2:  # escapes that hide a value from a byte scan (@ and ruled keys only occur in strings)
        data = data.replace(b"@", b"\\u0040").replace(b"password", b"pass\\u0077ord")
    return data


def _format(rng: random.Random, doc: Any) -> bytes:
    style = rng.randrange(5)
    if style == 0:
        return json.dumps(doc, ensure_ascii=False).encode()
    if style == 4:
        return json.dumps(doc).encode()  # \uXXXX escapes for all non-ASCII
    if style == 1:
        return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
    if style == 2:
        return json.dumps(doc, indent=2, ensure_ascii=False).encode()
    return b" \r\n" + json.dumps(doc, indent="\t", ensure_ascii=False).encode() + b"\n"


@pytest.mark.parametrize("masker", [MASKER, NO_RULES], ids=["rules", "detectors-only"])
def test_random_documents_match_the_tokenizer(masker: Masker) -> None:
    changed = 0
    for seed in range(400):
        rng = random.Random(seed)
        data = _dump(rng, {"items": [_random_doc(rng) for _ in range(rng.randint(1, 6))]})
        out = whole(masker, data)
        assert out is not None, data
        assert out == exact(masker, data), data
        json.loads(out)
        changed += out != data
    assert changed > 300  # the sample really exercises masking


def test_known_document() -> None:
    src = json.dumps({
        "user": {"email": "alice@example.com", "db_password": "hunter2", "card": 4111111111111111,
                 "ids": [1, "two", {"x": "bob@x.com", "password": 7}, True, None, [3, ["four"]]],
                 "bob@x.com": {"card": {"number": "4111 1111 1111 1111"}}},
        "list": ["4111 1111 1111 1111", "plain", 0, 1e-7], "token": None, "tokens": "kept"}).encode()
    out = whole(MASKER, src)
    assert out is not None
    h = MASKER.apply
    assert json.loads(out) == {
        "user": {"email": "[email]", "db_password": "[masked]", "card": "************1111",
                 "ids": [h("1", "hash"), h("two", "hash"), {"x": "[email]", "password": "[masked]"}, True, None,
                         [h("3", "hash"), [h("four", "hash")]]],
                 "[email]": {"card": {"number": "[card]"}}},
        "list": ["[card]", "plain", 0, 1e-7], "token": None, "tokens": "kept"}
    assert out == exact(MASKER, src)


def test_a_quote_pair_that_looks_like_a_key_is_not_one() -> None:
    """With a ``*`` rule, ``", ":`` between two strings matches the key regex; only real keys count."""
    m = Masker(Masking.model_validate({"json_keys": [{"match": "*"}]}), b"k")
    src = b'{"a": "b", ":": "v", "c": [":", {": ": 1}]}'
    out = whole(m, src)
    assert out is not None
    assert json.loads(out) == {"a": "[masked]", ":": "[masked]", "c": ["[masked]", {": ": "[masked]"}]}
    assert out == exact(m, src)


def test_escapes_are_decoded_before_keys_and_detectors_see_them() -> None:
    src = (b'{"pass\\u0077ord": "x", "a\\"b": "mail bob\\u0040x.com", "q": "say \\"hi\\" \\\\", '
           b'"k": {"my \\"password\\"": [1, "t\\u00e9"]}, "ok": "a\\\\"}')
    out = whole(MASKER, src)
    assert out is not None
    assert json.loads(out) == {"password": "[masked]", 'a"b': "mail [email]", "q": 'say "hi" \\',
                               "k": {'my "password"': ["[masked]", "[masked]"]}, "ok": "a\\"}
    assert out == exact(MASKER, src)
    assert b'"q": "say \\"hi\\" \\\\"' in out  # an unchanged escaped string keeps its bytes


def test_unchanged_document_is_returned_as_is() -> None:
    src = b'{"a": [1, 2.5, true, null], "b": {"c": "plain text"}}'
    assert whole(MASKER, src) is src


@pytest.mark.parametrize("src", [
    b'{"a": 1} {"b": 2}',  # several values
    b'{"a": [1, 2}',  # invalid
    b'{"a": NaN}',
    b"[" * 600 + b"]" * 600,  # deeper than max_depth
    b'{"pa\xc5\xbfsword": "x"}',  # Unicode case folding could match a glob
    b"",
    b"  ",
])
def test_what_it_leaves_to_the_tokenizer(src: bytes) -> None:
    assert whole(MASKER, src) is None


def test_stream_masker_takes_it_for_a_whole_chunk_and_stays_consistent() -> None:
    """A chunk that is one whole value goes through mask_document; the stream then continues
    (JSON lines) and every split of the same bytes gives the same output."""
    doc = b'{"email": "bob@x.com", "password": "p", "ids": [1, {"card": 4242424242424242}]}'
    j = JsonStreamMasker(MASKER)
    first = j.feed(doc)
    assert first == whole(MASKER, doc)
    rest = j.feed(b'\n{"token": "abc"}\n') + j.flush()
    assert not j.fallback
    assert [json.loads(x) for x in (first + rest).splitlines()] == [
        {"email": "[email]", "password": "[masked]", "ids": [MASKER.apply("1", "hash"),
                                                             {"card": "************4242"}]},
        {"token": "[masked]"}]
    for k in range(len(doc) + 1):
        j = JsonStreamMasker(MASKER)
        assert j.feed(doc[:k]) + j.feed(doc[k:]) + j.flush() == first, k


@pytest.mark.parametrize(("src", "handled"), [
    (b'[{"a": [1, {"b": [2, [3]]}]}, [[[]]], {"x": "[[[[{{{{"}]', True),  # 6 deep, many brackets
    (b'[[[[[[{"a": 1}]]]]]]', False),  # 7 deep
    (b'["[[[[[[[[", [[[[["bob@x.com"]]]]], "]]]"]', True),  # brackets in a string do not count
    (b'[[[[[[["]]]]]]]"]]]]]]]', False),
])
def test_depth_is_checked_on_the_real_nesting(src: bytes, handled: bool) -> None:
    fast = fast_patterns(("*password*",), 1 << 20)
    assert fast is not None
    out = mask_document(MASKER, src, fast[2], 6)
    assert (out is not None) == handled
    j = JsonStreamMasker(MASKER, max_depth=6, fast=False)
    ref = j.feed(src) + j.flush()
    assert j.fallback == (not handled)
    if out is not None:
        assert out == ref


def test_a_top_level_number_cut_by_a_chunk_is_not_taken_for_a_whole_value() -> None:
    j = JsonStreamMasker(MASKER)
    assert j.feed(b"1") + j.feed(b"e5 ") + j.flush() == b"1e5 "
    assert not j.fallback
