"""Word-level helpers of the shell guard: option scanning, ANSI-C quotes, programs that read commands.

How this works. :func:`getopt` reads a wrapper's options exactly as glibc's ``getopt_long``
does, from a table (:func:`opts`): bundled short options (``-Eu root``: ``E``, then ``u`` whose
value is the next word, or the rest of the word as in ``-uroot``), optional values (only
attached: ``-d`` never takes the next word), ``--long=value`` and ``--long value``, unique
abbreviations (``--us`` is ``--user``), ``--``, and options after operands unless the optstring
starts with ``+``. An option the table does not know is :class:`Unparsable`: guessing its arity
would let ``X`` in ``--new-option X reboot`` pass for the command. :func:`options` is the lenient
scan used for interpreters, whose unknown options are only flags for the guard's purposes.
:func:`ansi_c` rewrites ``$'...'`` into an ordinary single-quoted word holding the decoded
text, so that :mod:`shlex` sees what bash would pass (``$'/'`` is ``/``). :func:`reads_input`
says whether a command, once unwrapped, reads commands line by line from its standard input
(an interactive shell, ``su``, a REPL, a database client, ``ed``): run by an SSH exec, such a
program would take commands that no line check ever sees.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["SHELLS", "Opts", "Unparsable", "ansi_c", "getopt", "hidden_script", "options", "opts",
           "reads_input"]

SHELLS = frozenset({"sh", "bash", "rbash", "zsh", "dash", "ksh", "mksh", "ash", "fish", "csh", "tcsh",
                    "yash", "posh"})


class Unparsable(Exception):
    """A line the guard cannot take apart; decided with ``on_unparsed``."""


@dataclass(frozen=True, slots=True)
class Opts:
    """A program's options as ``getopt_long`` reads them: arity 0 (flag), 1 (value) or 2 (optional, attached).

    ``long`` maps a long name to its arity and the name it is reported as (``-u`` for ``--user``).
    ``numeric``: ``-5``, ``--5`` and ``-+5`` are options too (``nice``).
    """

    short: dict[str, int]
    long: dict[str, tuple[int, str]]
    permute: bool
    numeric: bool = False


def opts(short: str, long: str = "", *, numeric: bool = False) -> Opts:
    """An :class:`Opts` from a getopt optstring (``"+c:d::"``) and long names (``"command=c fast version"``).

    A long name ``name=x`` is another spelling of ``-x``; ``name:`` takes a value, ``name::`` an optional one.
    """
    table: dict[str, int] = {}
    for found in re.finditer(r"(.)(:{0,2})", short.lstrip("+")):
        table[found.group(1)] = len(found.group(2))
    longs: dict[str, tuple[int, str]] = {}
    for item in long.split():
        m = re.fullmatch(r"([\w-]+)(?:=(.))?(:{0,2})", item)
        if m is None:
            raise ValueError(f"bad long option {item!r}")
        name, alias, colons = m.groups()
        longs[name] = (table[alias], "-" + alias) if alias else (len(colons), "--" + name)
    return Opts(table, longs, not short.startswith("+"), numeric)


_NUMERIC_OPTION = re.compile(r"--?\+?[0-9]+")


def _long(spec: Opts, name: str) -> tuple[int, str]:
    if name in spec.long:
        return spec.long[name]
    found = {spec.long[k] for k in spec.long if k.startswith(name)} if name else set()
    if len(found) != 1:
        raise Unparsable(f"{'ambiguous' if found else 'unknown'} option --{name}")
    return found.pop()


def getopt(words: Sequence[str], spec: Opts) -> tuple[list[str], list[tuple[str, str]]]:
    """``(operands, [(option, value), ...])`` of a program's arguments under ``spec``.

    Raises :class:`Unparsable` for an unknown or ambiguous option, or a value that is missing.
    """
    operands: list[str] = []
    found: list[tuple[str, str]] = []
    i = 0
    while i < len(words):
        w = words[i]
        i += 1
        if w == "--":
            operands += words[i:]
            break
        if spec.numeric and _NUMERIC_OPTION.fullmatch(w):
            found.append(("-n", w.lstrip("-")))
        elif w.startswith("--"):
            name, eq, value = w[2:].partition("=")
            arity, canonical = _long(spec, name)
            if arity == 0 and eq:
                raise Unparsable(f"option --{name} takes no value")
            if arity == 1 and not eq:
                if i >= len(words):
                    raise Unparsable(f"option --{name} needs a value")
                value, i = words[i], i + 1
            found.append((canonical, value))
        elif w.startswith("-") and len(w) > 1:
            for j, ch in enumerate(w[1:], 2):
                if ch not in spec.short:
                    raise Unparsable(f"unknown option -{ch}")
                arity = spec.short[ch]
                if arity == 0:
                    found.append(("-" + ch, ""))
                    continue
                if j < len(w) or arity == 2:
                    found.append(("-" + ch, w[j:]))
                elif i < len(words):
                    found.append(("-" + ch, words[i]))
                    i += 1
                else:
                    raise Unparsable(f"option -{ch} needs a value")
                break
        elif spec.permute:
            operands.append(w)
        else:
            operands += words[i - 1:]
            break
    return operands, found


def options(words: list[str], i: int, takes_value: frozenset[str], plus: bool = False
            ) -> tuple[int, list[tuple[str, str]]]:
    """Scan options from ``words[i]``: the index of the first operand and the ``(option, value)`` pairs.

    ``plus`` also reads ``+o``-style words as options (shells).
    """
    found: list[tuple[str, str]] = []
    while i < len(words):
        w = words[i]
        if w == "--":
            return i + 1, found
        if len(w) < 2 or not (w[0] == "-" or (plus and w[0] == "+")):
            return i, found
        if w.startswith("--"):
            name, eq, value = w.partition("=")
            if name in takes_value and not eq:
                found.append((name, words[i + 1] if i + 1 < len(words) else ""))
                i += 2
            else:
                found.append((name, value))
                i += 1
            continue
        step = 1
        for j, ch in enumerate(w[1:], 2):
            opt = "-" + ch
            if opt in takes_value:
                if j < len(w):
                    found.append((opt, w[j:]))
                else:
                    found.append((opt, words[i + 1] if i + 1 < len(words) else ""))
                    step = 2
                break
            found.append((opt, ""))
        i += step
    return i, found


_ESCAPES = {"a": "\a", "b": "\b", "e": "\x1b", "E": "\x1b", "f": "\f", "n": "\n", "r": "\r", "t": "\t",
            "v": "\v", "\\": "\\", "'": "'", '"': '"', "?": "?"}
_NUMERIC = {"x": (16, 2), "u": (16, 4), "U": (16, 8)}


def _decode(body: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(body):
        c = body[i]
        if c != "\\" or i + 1 >= len(body):
            out.append(c)
            i += 1
            continue
        e = body[i + 1]
        if e in _ESCAPES:
            out.append(_ESCAPES[e])
            i += 2
        elif e in _NUMERIC or e in "01234567":
            base, width = _NUMERIC.get(e, (8, 3))
            start = i + 2 if e in _NUMERIC else i + 1
            m = re.match(f"[0-9a-fA-F]{{1,{width}}}" if base == 16 else "[0-7]{1,3}", body[start:])
            if m is None:
                out.append("\\" + e)
                i += 2
                continue
            code = int(m.group(), base)
            if code == 0 or code > 0x10FFFF:
                raise Unparsable("NUL or invalid character in $'...'")
            out.append(chr(code))
            i = start + len(m.group())
        elif e == "c":
            raise Unparsable("control-character escape in $'...'")
        else:
            out.append("\\" + e)
            i += 2
    return "".join(out)


def ansi_c(line: str) -> str:
    """``line`` with every ``$'...'`` replaced by a single-quoted word of its decoded text, ``$"`` by ``"``."""
    if "$'" not in line and '$"' not in line:
        return line
    out: list[str] = []
    i, n, quote = 0, len(line), ""
    while i < n:
        c = line[i]
        if c == "\\" and quote != "'":
            out.append(line[i:i + 2])
            i += 2
            continue
        if not quote and c == "$" and line.startswith("'", i + 1):
            j = i + 2
            while j < n and line[j] != "'":
                j += 2 if line[j] == "\\" else 1
            if j >= n:
                raise Unparsable("unbalanced $'")
            out.append(shlex.quote(_decode(line[i + 2:j])))
            i = j + 1
            continue
        if not quote and c == "$" and line.startswith('"', i + 1):
            i += 1  # $"..." (locale translation) is "..." for the guard
            continue
        if c == "'" and quote != '"':
            quote = "" if quote == "'" else "'"
        elif c == '"' and quote != "'":
            quote = "" if quote == '"' else '"'
        out.append(c)
        i += 1
    return "".join(out)


@dataclass(frozen=True, slots=True)
class _Reader:
    """How one program is told to run given code instead of reading commands from its input."""

    code: frozenset[str]  # options whose presence means "run this, do not read the input"
    value: frozenset[str] = frozenset()  # other options that take a value
    forces: frozenset[str] = frozenset()  # options that make it read the input anyway (-i, -s)
    operand: bool = True  # an operand (a script file) also means "do not read the input"


def _reader(code: str = "", value: str = "", forces: str = "", operand: bool = True,
            long_code: tuple[str, ...] = (), long_value: tuple[str, ...] = ()) -> _Reader:
    return _Reader(frozenset({"-" + c for c in code} | set(long_code)),
                   frozenset({"-" + c for c in value} | set(long_value)),
                   frozenset({"-" + c for c in forces}), operand)


_SHELL = _reader("c", "oOC", "is", long_code=("--command",), long_value=("--rcfile", "--init-file",
                                                                          "--init-command"))
_READERS: dict[str, _Reader] = {
    **{s: _SHELL for s in SHELLS},
    "su": _reader("c", "sgGw", operand=False, long_code=("--command", "--session-command"),
                  long_value=("--shell", "--group", "--supp-group", "--whitelist-environment")),
    "script": _reader("c", "EIOBT", operand=False, long_code=("--command",)),
    "perl": _reader("eE"), "ruby": _reader("e", "IrCEF"), "irb": _reader(operand=False),
    "node": _reader("ep", "r", "i", long_code=("--eval", "--print"), long_value=("--require",)),
    "php": _reader("rfR", "cdz", "a"), "lua": _reader("e", "l", "i"),
    "tclsh": _reader("c"), "wish": _reader("c"), "expect": _reader("cf", forces="i"),
    "psql": _reader("cf", "hpUdvPTFRoL", operand=False, long_code=("--command", "--file")),
    "mysql": _reader("e", "uhPDS", operand=False, long_code=("--execute",)),
    "ed": _reader(operand=False), "ex": _reader(operand=False), "dc": _reader("ef", operand=False),
    "ftp": _reader(operand=False), "sftp": _reader("b", operand=False), "gdb": _reader(operand=False),
    # schedulers read the commands they will run later from their input
    "at": _reader("f", "qt", operand=False), "batch": _reader("f", "q", operand=False),
    "crontab": _reader("lre", "uisc"), "newgrp": _reader(operand=False),
}
_ALIASES = {"nodejs": "node", "mariadb": "mysql", "luajit": "lua", "red": "ed", "runuser": "su"}
_PYTHON = re.compile(r"(python|pypy)[0-9.]*")
_PYTHON_READER = _reader("cm", "WXQ", "i")


def reads_input(program: str, args: tuple[str, ...]) -> str | None:
    """Why ``program args`` reads commands from its standard input, or None when it runs given code."""
    reader = _PYTHON_READER if _PYTHON.fullmatch(program) else _READERS.get(_ALIASES.get(program, program))
    if reader is None:
        return None
    words, takes_value = list(args), reader.code | reader.value
    first, found = options(words, 0, takes_value, plus=program in SHELLS)
    i = first
    while not reader.operand and i < len(words):  # su, psql, mysql: options may follow operands
        i, more = options(words, i + 1, takes_value)
        found += more
    names = {name for name, _ in found}
    if names & reader.code and (program in SHELLS or not names & reader.forces):
        return None  # a shell's -c wins over -i/-s; python -i -c still ends in a REPL
    if names & reader.forces:
        return f"{program} {sorted(names & reader.forces)[0]} reads commands from its input"
    operands = words[first:]
    if reader.operand and operands and operands[0] != "-":
        return None
    return f"{program} reads commands from its input"


_READ_FROM_INPUT = re.compile(r"/dev/(stdin|tty|fd/\d+|pts/\d+|tcp/.*|udp/.*)|/proc/[^/]+/(task/[^/]+/)?fd/\d+")
_SCRIPT_RUNNERS = frozenset({"source", ".", "awk", "gawk", "mawk", "nawk", "sed"})
_SCRIPT_OPTIONS = frozenset({"-f", "--file", "-b", "--rcfile", "--init-file", "-x"})  # "-" is standard input


def hidden_script(program: str, args: tuple[str, ...]) -> str | None:
    """Why the code ``program args`` runs is read where the guard cannot see it, or None.

    A script named ``/dev/stdin``, ``/dev/fd/N`` (what bash passes for ``<(curl ...)``),
    ``/proc/self/fd/N`` or ``/dev/tty`` is read from a pipe, a descriptor or the terminal:
    ``bash <(curl ...)``, ``sh /dev/stdin``, ``source /proc/self/fd/0``.
    """
    if not (program in _SCRIPT_RUNNERS or _PYTHON.fullmatch(program)
            or _ALIASES.get(program, program) in _READERS):
        return None
    for i, a in enumerate(args):
        value = a.partition("=")[2] if a.startswith("--") else a
        if _READ_FROM_INPUT.fullmatch(value) or (
                (a in _SCRIPT_OPTIONS and args[i + 1:i + 2] == ("-",)) or a in {f"{o}=-" for o in _SCRIPT_OPTIONS}):
            return f"{program} runs code read from {value or '-'}, which hoop does not see"
    return None
