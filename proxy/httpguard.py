"""The HTTP guard: decide a request by method and normalised path.

How this works: the path is normalised first, so that spellings the upstream treats as the
same resource look the same to the rules: the query and fragment are cut off, percent-escapes
of unreserved characters are decoded (``%2e`` is ``.``, ``%70rod`` is ``prod``) and other
escapes are upper-cased, runs of ``/`` collapse, ``.`` and ``..`` segments are resolved and a
trailing ``/`` is dropped. Spellings whose meaning depends on the upstream cannot be normalised
safely and are *unparsed* (``on_unparsed``, block by default): an encoded ``/`` (``%2F``), a
backslash or ``%5C``, NUL, ``%25`` (double encoding), ``;`` path parameters, malformed escapes, ``..`` above the root,
``..`` after an empty segment (``/a//../b``: a server that merges slashes serves ``/b``, one that
resolves RFC 3986 or WHATWG style serves ``/a/b``), and anything not starting with ``/`` (``*``,
absolute-form URLs). The HTTP proxy refuses dot segments and encoded ``/``, ``.`` and ``\\`` before the guard
(:func:`proxy.http.headers.ambiguous_path`); the rules here keep the guard safe on its own.

Rules match with :func:`compile_path_glob`: ``*`` matches within one path segment, ``**``
across any number of segments (``/api/**`` also matches ``/api``), ``?`` one character, other
characters literally. Paths match case-insensitively (stricter for block rules on
case-insensitive upstreams). ``methods`` are globs on the upper-cased method. A rule needs
``methods`` or ``paths`` to match at all; ``HEAD`` is not ``GET`` and method-override headers
are not seen (limits: write rules for them explicitly).
"""

from __future__ import annotations

import fnmatch
import re
from functools import lru_cache, partial

from broker.config import Guardrails, Rule
from proxy.guard import Decision, decide, unparsed

__all__ = ["HttpGuard", "Unnormalisable", "compile_path_glob", "normalise_path"]

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_ESCAPE = re.compile(r"%(..)?", re.DOTALL)
_GLOB_TOKEN = re.compile(r"/\*\*(?=/|$)|\*\*|\*|\?")


class Unnormalisable(ValueError):
    """A path whose meaning depends on the upstream; the guard treats it as unparsed."""


def _decode(m: re.Match[str]) -> str:
    hexpair = m.group(1)
    if hexpair is None or not all(c in "0123456789abcdefABCDEF" for c in hexpair):
        raise Unnormalisable("malformed percent-escape")
    char = chr(int(hexpair, 16))
    if char in _UNRESERVED:
        return char
    if char in "/\\;%\x00":
        raise Unnormalisable(f"encoded {char!r} in path")
    return "%" + hexpair.upper()


def normalise_path(target: str) -> str:
    """The canonical form of a request target's path; raises :class:`Unnormalisable`."""
    path = target.split("#", 1)[0].split("?", 1)[0]
    if not path.startswith("/"):
        raise Unnormalisable("path does not start with /")
    if any(c in path for c in "\\;\x00") or any(ord(c) < 0x20 or ord(c) == 0x7F for c in path):
        raise Unnormalisable("backslash, ';' or control character in path")
    path = _ESCAPE.sub(_decode, path)
    out: list[str] = []
    empty = False  # an empty segment came before (the first split piece is the empty root)
    for seg in path.split("/")[1:]:
        if seg in ("", "."):
            empty = empty or not seg
            continue
        if seg == "..":
            if empty:
                raise Unnormalisable("'..' after an empty segment ('//')")
            if not out:
                raise Unnormalisable("'..' above the root")
            out.pop()
            continue
        out.append(seg)
    return "/" + "/".join(out)


@lru_cache(maxsize=1024)
def compile_path_glob(pattern: str) -> re.Pattern[str]:
    """Compile a path glob: ``*`` one segment, ``**`` any segments, ``?`` one character."""
    pattern = pattern.rstrip("/") or "/"
    parts: list[str] = []
    pos = 0
    for m in _GLOB_TOKEN.finditer(pattern):
        parts.append(re.escape(pattern[pos:m.start()]))
        token = m.group()
        parts.append({"/**": "(?:/.*)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}[token])
        pos = m.end()
    parts.append(re.escape(pattern[pos:]))
    return re.compile("".join(parts), re.IGNORECASE | re.DOTALL)


def _rule_matches(rule: Rule, method: str, path: str) -> bool:
    if not (rule.methods or rule.paths) or rule.statements or rule.tables or rule.functions or rule.commands:
        return False
    if rule.methods and not any(fnmatch.fnmatchcase(method, m) for m in rule.methods):
        return False
    return not rule.paths or any(compile_path_glob(p).fullmatch(path) is not None for p in rule.paths)


class HttpGuard:
    """Decides HTTP requests for one resource's :class:`Guardrails`."""

    def __init__(self, guardrails: Guardrails) -> None:
        self.guardrails = guardrails

    def check(self, method: str, path: str) -> Decision:
        """The decision for ``method`` on the request target ``path`` (query is ignored)."""
        method = method.upper()
        try:
            norm = normalise_path(path)
        except Unnormalisable as exc:
            return unparsed(self.guardrails, str(exc), f"{method} {path[:200]}")
        return decide(self.guardrails, partial(_rule_matches, method=method, path=norm), f"{method} {norm}",
                      kinds=frozenset({method}))
