"""Code hidden in one command's words: shell strings, builtins that run or keep code, brace expansion.

How this works. :func:`dash_c` finds the string a shell runs (``sh -c STRING``, ``fish
--command=STRING``) and :func:`psql_commands` the ``-c`` texts of psql. :func:`builtin_notes`
says why a builtin makes what runs unknowable from the line, and adds the shell strings a
builtin runs later to ``nested`` (``complete -C CMD``). A builtin is flagged when it:

* runs text (``eval``), or makes a name run other text (``alias x=...``, ``hash -p``, ``fc``
  reruns history, ``bind -x`` and bindings make a key type or run text);
* evaluates a value as arithmetic, where bash runs ``$(...)`` hidden in a variable's value
  (``let``, ``declare -i``, ``[[ x -eq y ]]``, ``NAME[i]`` subscripts of ``read``, ``unset``,
  ``printf -v`` ...), or makes a name stand for another variable (``declare -n``);
* runs a string later (``complete -C CMD``, ``mapfile -C CMD``): checked as a line;
* sets a variable the shell runs as code later (``read PS1``, ``printf -v PROMPT_COMMAND``,
  ``for PS1 in``; ``declare``/``export`` assignments go through
  :func:`~proxy.shellwrap.assignment_note`).

:func:`expand_braces` is bash's brace expansion (``{rm,-rf,/}``, ``{a..c}``) over live braces
only (quoted ones are kept apart by :mod:`proxy.shelllex`).
"""

from __future__ import annotations

import re
from itertools import pairwise

from proxy.shelllex import arithmetic_note, plain
from proxy.shellwords import Unparsable, getopt, options, opts
from proxy.shellwrap import CODE_VARIABLE, Nested, assignment_note, code_variable_note

__all__ = ["builtin_notes", "dash_c", "expand_braces", "psql_commands", "test_notes"]

_BRACES_MAX = 256
_ARITHMETIC_TESTS = frozenset({"-eq", "-ne", "-lt", "-le", "-gt", "-ge"})
_NAMES = frozenset({"read", "mapfile", "readarray", "printf", "unset", "declare", "typeset", "local", "export",
                    "readonly", "for", "select", "getopts", "wait"})
_SETS = frozenset({"read", "mapfile", "readarray", "printf", "for", "select"})
_VARIABLE = re.compile(r"(?:-v)?([A-Za-z_]\w*)(?:\[(.*)\])?", re.DOTALL)
_INTEGER = re.compile(r"\s*[+-]?[0-9]*\s*|[@*]")
_SEQUENCE = re.compile(r"(-?[0-9]+|[A-Za-z])\.\.(-?[0-9]+|[A-Za-z])(?:\.\.(-?[0-9]+))?")
_BIND = opts("lpsvPSVXm:f:q:u:r:x:")
_COMPLETE = frozenset({"-o", "-A", "-G", "-W", "-P", "-S", "-X", "-F", "-C"})
_MAPFILE = frozenset({"-d", "-n", "-O", "-s", "-u", "-C", "-c"})
_SUBSCRIPT_WHY = "an array subscript is evaluated as arithmetic, which runs code hidden in variables"


def dash_c(args: tuple[str, ...]) -> str | None:
    """The command string of ``sh -c STRING`` (also ``-lc``, ``-o x -c``, ``--login -c``, ``--command=``)."""
    seen_c = False
    for i, a in enumerate(args):
        if a.startswith("--command="):
            return a.partition("=")[2]
        if a == "--command":
            return args[i + 1] if i + 1 < len(args) else None
        if a.startswith("-") and not a.startswith("--") and "c" in a[1:]:
            seen_c = True
        elif a.startswith(("-", "+")):
            continue
        elif seen_c:
            return a
    return None


def psql_commands(args: tuple[str, ...]) -> list[str]:
    """The texts psql runs from ``-c``/``--command``."""
    out: list[str] = []
    for i, a in enumerate(args):
        if a in ("-c", "--command") and i + 1 < len(args):
            out.append(args[i + 1])
        elif a.startswith("--command="):
            out.append(a.split("=", 1)[1])
        elif a.startswith("-c") and len(a) > 2:
            out.append(a[2:])
    return out


def test_notes(words: list[str]) -> list[str]:
    """``[[ x -eq y ]]`` evaluates both sides as arithmetic; ``-v a[i]`` evaluates the subscript."""
    if not words or words[0] not in ("[[", "[", "test"):
        return []
    words = [plain(w) for w in words]
    notes: list[str] = []
    for k, w in enumerate(words):
        if w == "-v" and k + 1 < len(words) and "[" in words[k + 1]:
            notes.append(_SUBSCRIPT_WHY)
        elif words[0] == "[[" and w in _ARITHMETIC_TESTS:
            for operand in (words[k - 1], words[k + 1] if k + 1 < len(words) else ""):
                note = arithmetic_note(operand)
                if note:
                    notes.append(note)
    return notes


def builtin_notes(program: str, args: tuple[str, ...], nested: list[Nested]) -> list[str]:
    """Why ``program args`` makes what runs unknowable from the line; shell strings it runs go to ``nested``."""
    notes: list[str] = []
    if program == "eval":
        notes.append("eval runs computed text")
    elif program == "alias" and any("=" in a for a in args):
        notes.append("an alias makes a command name run other text")
    elif program == "hash" and any(a.startswith("-") and "p" in a for a in args):
        notes.append("hash -p makes a command name run another program")
    elif program == "fc" and not any(a.startswith("-") and "l" in a for a in args):
        notes.append("fc reruns earlier command lines")
    elif program == "bind":
        operands, found = getopt(args, _BIND)
        if operands or {o for o, _ in found} & {"-x", "-f"}:
            notes.append("bind makes keys run commands or type text that hoop does not see")
    elif program in ("complete", "compgen"):  # -C CMD runs at completion time
        nested += [Nested("shell", v) for o, v in options(list(args), 0, _COMPLETE)[1] if o == "-C"]
    elif program in ("mapfile", "readarray"):  # -C CMD is evaluated every -c lines
        nested += [Nested("shell", v) for o, v in options(list(args), 0, _MAPFILE)[1] if o == "-C"]
    elif program == "let":
        note = arithmetic_note(" ".join(args))
        if note:
            notes.append(note)
    elif program in ("declare", "typeset", "local") and any(
            len(a) > 1 and a[0] in "-+" and set(a[1:]) & {"i", "n"} for a in args):
        notes.append(f"{program} -i/-n evaluates values as arithmetic or makes a name stand for another variable")
    if program in _NAMES:
        for a in args:
            note = assignment_note(a) if "=" in a else None
            m = _VARIABLE.fullmatch(a) if note is None else None
            if m and m.group(2) is not None and not _INTEGER.fullmatch(m.group(2)):
                note = _SUBSCRIPT_WHY
            elif m and program in _SETS and CODE_VARIABLE.fullmatch(m.group(1)):
                note = f"{program} sets {code_variable_note(m.group(1))}"
            if note:
                notes.append(note)
    return notes


def _sequence(body: str) -> list[str] | None:
    m = _SEQUENCE.fullmatch(body)
    if m is None:
        return None
    first, last, step = m.group(1), m.group(2), abs(int(m.group(3) or 1)) or 1
    if first.isalpha() != last.isalpha():
        return None
    a, b = (ord(first), ord(last)) if first.isalpha() else (int(first), int(last))
    if abs(b - a) // step >= _BRACES_MAX:
        raise Unparsable("brace expansion too large")
    values = range(a, b + 1, step) if a <= b else range(a, b - 1, -step)
    if first.isalpha():
        return [chr(v) for v in values]
    width = max(len(first), len(last)) if first.lstrip("-").startswith("0") or last.lstrip("-").startswith("0") else 0
    return [str(v).zfill(width) for v in values]


def _braces(word: str) -> list[str]:
    """Bash brace expansion of one word: the leftmost complete ``{a,b}`` or ``{x..y}``, then the rest."""
    for i, c in enumerate(word):
        if c != "{" or word[i - 1:i] == "$":
            continue
        depth, commas = 0, []
        for j in range(i, len(word)):
            if word[j] == "{":
                depth += 1
            elif word[j] == "}":
                depth -= 1
                if depth == 0:
                    break
            elif word[j] == "," and depth == 1:
                commas.append(j)
        else:
            continue
        if commas:
            bounds = [i, *commas, j]
            parts: list[str] | None = [word[s + 1:e] for s, e in pairwise(bounds)]
        else:
            parts = _sequence(word[i + 1:j])
        if parts is None:
            continue
        out: list[str] = []
        for part in parts:
            out += _braces(word[:i] + part + word[j + 1:])
            if len(out) > _BRACES_MAX:
                raise Unparsable("brace expansion too large")
        return out
    return [word]


def expand_braces(words: list[str]) -> list[str]:
    """``words`` after brace expansion; words the expansion leaves empty are dropped, as bash does."""
    out: list[str] = []
    grown = 0
    for w in words:
        if "{" in w and ("," in w or ".." in w):
            expanded = [x for x in _braces(w) if x]
            grown += len(expanded)
            if grown > _BRACES_MAX * 4:
                raise Unparsable("brace expansion too large")
            out += expanded
        else:
            out.append(w)
    return out
