"""The shell guard: decide SSH exec command lines and interactive lines.

How this works: a line is tokenised with :mod:`shlex` (POSIX rules, ``punctuation_chars``,
newline as an operator, no comment stripping) and cut into *simple commands* at ``;``,
``&&``, ``||``, ``|``, ``&``, newlines and parentheses. Command substitutions (``$(...)``,
backticks, ``<(...)``) are found in a pre-pass over the raw line and checked as lines of
their own; ``$'...'`` is decoded first (:func:`proxy.shellwords.ansi_c`). Each simple command
is unwrapped: leading ``VAR=value`` words, redirections (``2>/dev/null``), shell keywords
(``{``, ``!``, ``if``, ``then``, ``do`` ...) and ``function NAME`` are dropped, the program is
reduced to its basename (``/bin/rm`` is ``rm``), and wrappers (``sudo``, ``env``, ``nohup``,
``time``, ``exec``, ``command``, ``busybox``, ``xargs``, ``timeout N``, ``nice``, ``chroot DIR``
...) are peeled off with their options, bundled or not (``sudo -Eu root``).
``bash|sh|zsh|dash|ksh -c STRING``, ``su -c STRING`` and ``script -c STRING`` are checked
recursively (depth 4, deeper is unparsed); ``env -S STRING`` too, and it is also unparsed,
since ``-S`` has its own splitting rules. :meth:`ShellGuard.resolve` lists every command a
line would run, each marked when it reads commands from its input (``bash``, ``sudo -i``). ``psql -c SQL`` is checked
with :class:`~proxy.sqlguard.SqlGuard` against the same guardrails when they contain SQL
selectors, and ``psql -c '\\! cmd'`` as a shell line. Every unit is decided with
:func:`proxy.guard.decide`; the strictest wins.

Patterns (``Rule.commands``) are shell words. The first is a glob on the program basename
(``mkfs*``). Each further word must match *some* argument, in any order; a lone ``*`` is
ignored (so ``dd * of=/dev/*`` reads "dd with an argument ``of=/dev/*``"). A short-flag word
(``-rf``) matches when every letter is present among the command's short flags, bundled or
not (``-r -f``, ``-fr``); per-program aliases map ``rm -R`` and ``--recursive`` to ``r``,
``--force`` to ``f`` (and ``-R``/``--recursive`` for chmod, chown, chgrp, cp). An absolute
path word also matches arguments that normalise to it: ``//``, ``/.``, ``/tmp/..`` and
``/*`` all match ``/``.

Fails closed (``on_unparsed``): unbalanced quotes or substitutions, nesting deeper than 4,
``eval``, a program name built from ``$`` or backticks, a shell reading commands from a pipe
or redirect (``curl x | sh``, ``base64 -d | bash``, ``bash < f``). A line containing a NUL byte
is always blocked: shells drop NUL from their input and a server may cut the line there, so
what would run is not what was read.

Limits, by design: aliases and shell functions defined earlier, variables in arguments
(``rm -rf $DIR``), relative paths and ``~``, brace and glob expansion, scripts run from
files (``bash x.sh``, ``source x``), interpreters with inline code (``python -c``, ``perl
-e``), remote commands (``ssh host cmd``), subcommand aliases (``kubectl delete ns``).
Quoted operators (``echo ';'``) and ``#`` comments are treated as if live: this can only
make the guard stricter, never looser.
"""

from __future__ import annotations

import fnmatch
import posixpath
import re
import shlex
from dataclasses import dataclass
from functools import partial

from broker.config import Guardrails, Rule
from proxy.guard import Decision, decide, strictest, unparsed
from proxy.shellwords import SHELLS as _SHELLS
from proxy.shellwords import Unparsable as _Unparsable
from proxy.shellwords import ansi_c, options, reads_input
from proxy.sqlguard import SqlGuard

__all__ = ["Command", "ShellGuard"]

_MAX_DEPTH = 4
_KEYWORDS = frozenset({"{", "}", "!", "if", "then", "else", "elif", "fi", "do", "done", "while",
                       "until", "coproc", "[[", "]]"})
_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=.*", re.DOTALL)
# wrapper -> (options that take a value, positional words before the wrapped command)
_WRAPPERS: dict[str, tuple[frozenset[str], int]] = {
    "sudo": (frozenset({"-u", "-g", "-h", "-p", "-C", "-D", "-r", "-t", "-U", "-T", "--user", "--group",
                        "--host", "--prompt", "--close-from", "--chdir", "--role", "--type", "--other-user",
                        "--command-timeout"}), 0),
    "doas": (frozenset({"-u", "-C"}), 0),
    "env": (frozenset({"-u", "-C", "-S", "--unset", "--chdir", "--split-string"}), 0),
    "nohup": (frozenset(), 0), "builtin": (frozenset(), 0), "busybox": (frozenset(), 0),
    "time": (frozenset({"-f", "-o", "--format", "--output"}), 0),
    "exec": (frozenset({"-a"}), 0), "command": (frozenset(), 0), "setsid": (frozenset(), 0),
    "nice": (frozenset({"-n", "--adjustment"}), 0), "ionice": (frozenset({"-c", "-n", "-p"}), 0),
    "timeout": (frozenset({"-s", "-k", "--signal", "--kill-after"}), 1),
    "xargs": (frozenset({"-I", "-n", "-P", "-d", "-E", "-L", "-s", "-a", "--max-args", "--delimiter",
                         "--max-procs", "--arg-file"}), 0),
    "stdbuf": (frozenset({"-i", "-o", "-e"}), 0), "chroot": (frozenset(), 1), "flock": (frozenset(), 1),
    "unbuffer": (frozenset(), 0), "watch": (frozenset({"-n", "-d"}), 0),
}
_FLAG_ALIASES: dict[str, dict[str, str]] = {
    "rm": {"R": "r", "--recursive": "r", "--force": "f"},
    **{p: {"r": "R", "--recursive": "R"} for p in ("chmod", "chown", "chgrp")},
    "cp": {"R": "r", "--recursive": "r", "--force": "f"},
}
_SHORT = re.compile(r"-[A-Za-z0-9]+")
_OPERATOR_CHARS = frozenset(";&|()<>\n")
_SEPARATOR_CHARS = frozenset(";|()\n")


@dataclass(frozen=True, slots=True)
class Command:
    """One unwrapped simple command: ``program`` is the basename, ``args`` the rest.

    ``dynamic`` says why the command cannot be known from the line (decided with
    ``on_unparsed``); ``reads_input`` why it would read commands from its standard input.
    """

    program: str
    args: tuple[str, ...]
    dynamic: str | None = None
    reads_input: str | None = None

    @property
    def text(self) -> str:
        return shlex.join((self.program, *self.args))


def _substitutions(line: str) -> list[str]:
    """Bodies of ``$(...)``, ``<(...)``, ``>(...)`` and backticks outside single quotes."""
    out: list[str] = []
    i, n, quote = 0, len(line), ""
    while i < n:
        c = line[i]
        if c == "\\" and quote != "'":
            i += 2
            continue
        if c == "'" and quote != '"':
            quote = "" if quote == "'" else "'"
        elif c == '"' and quote != "'":
            quote = "" if quote == '"' else '"'
        elif quote != "'" and c == "`":
            end = line.find("`", i + 1)
            if end < 0:
                raise _Unparsable("unbalanced backtick")
            out.append(line[i + 1:end])
            i = end
        elif quote != "'" and c in "$<>" and line.startswith("(", i + 1) and not line.startswith("((", i + 1):
            depth, j = 1, i + 2
            while j < n and depth:
                depth += {"(": 1, ")": -1}.get(line[j], 0)
                j += 1
            if depth:
                raise _Unparsable("unbalanced $(")
            out.append(line[i + 2:j - 1])
        i += 1
    return out


def _tokens(line: str) -> list[str]:
    lex = shlex.shlex(ansi_c(line.replace("\\\n", "")), posix=True, punctuation_chars=";&|()<>\n")
    lex.whitespace = " \t\r"
    lex.whitespace_split = True
    lex.commenters = ""
    try:
        return list(lex)
    except ValueError as exc:
        raise _Unparsable(str(exc)) from None


def _basename(word: str) -> str:
    return word.rsplit("/", 1)[-1] if "/" in word.rstrip("/") else word


@dataclass(slots=True)
class _Unwrapped:
    words: list[str]
    split_string: str | None = None  # the argument of ``env -S``
    note: str | None = None  # why the command line is unparsed, or reads its input


def _unwrap(words: list[str]) -> _Unwrapped:
    """Drop assignments, keywords, function headers and wrappers with their options."""
    out = _Unwrapped(words)
    while words:
        head = words[0]
        if head in _KEYWORDS or _ASSIGNMENT.fullmatch(head):
            words = words[1:]
            continue
        if head == "function":  # function NAME { body; }: the body follows as its own words
            words = words[2:]
            continue
        name = _basename(head)
        spec = _WRAPPERS.get(name)
        if spec is None:
            break
        takes_value, positional = spec
        i, found = 1, []
        while True:
            i, more = options(words, i, takes_value)
            found += more
            if name == "env" and i < len(words) and (words[i] == "-" or _ASSIGNMENT.fullmatch(words[i])):
                i += 1  # "env -" is "env -i"; NAME=value words come before the command
                continue
            break
        for opt, value in found:
            if name == "env" and opt in ("-S", "--split-string"):
                out.split_string = value
                out.note = "env -S splits its argument into words"
        words = words[i + positional:]
        if not words and name in ("sudo", "doas") and {o for o, _ in found} & {"-i", "-s", "--login", "--shell"}:
            out.note = f"{name} -i/-s starts a shell that reads commands from its input"
    out.words = words
    return out


class ShellGuard:
    """Decides shell command lines for one resource's :class:`Guardrails`."""

    def __init__(self, guardrails: Guardrails) -> None:
        self.guardrails = guardrails
        self._sql = SqlGuard(guardrails)
        self._has_sql_rules = any(r.statements or r.tables or r.functions for r in guardrails.rules)

    def check(self, line: str) -> Decision:
        """The decision for one command line (strictest simple command wins)."""
        if "\0" in line:  # a shell drops NUL bytes, a server may cut the line there: not what was checked
            return Decision("block", "nul-byte", "the command line contains a NUL byte", line[:80].replace("\0", "\\0"))
        try:
            decisions = self._line(line, 0, [0])
        except _Unparsable as exc:
            return unparsed(self.guardrails, str(exc), line[:80])
        except Exception as exc:  # fail closed
            return unparsed(self.guardrails, f"{type(exc).__name__} while classifying", line[:80])
        if not decisions:
            return Decision("allow", None, "empty command line", "")
        return strictest(decisions)

    def commands(self, line: str) -> tuple[Command, ...]:
        """The simple commands of a line after unwrapping (not recursing into ``-c``); for recording."""
        try:
            return tuple(cmd for cmd, _ in self._split(_tokens(line)))
        except _Unparsable:
            return ()

    def resolve(self, line: str) -> tuple[Command, ...] | None:
        """Every simple command the line would run, also inside ``sh -c``, ``$(...)`` and ``env -S``.

        None when the line cannot be taken apart (:meth:`check` then gives ``on_unparsed``).
        """
        seen: list[Command] = []
        try:
            self._line(line, 0, [0], seen)
        except Exception:  # fail closed, as check() does
            return None
        return tuple(seen)

    def _line(self, line: str, depth: int, counter: list[int], seen: list[Command] | None = None
              ) -> list[Decision]:
        if depth > _MAX_DEPTH:
            raise _Unparsable("commands nested too deeply")
        out: list[Decision] = []
        for inner in _substitutions(ansi_c(line)):
            out.extend(self._line(inner, depth + 1, counter, seen))
        for cmd, nested in self._split(_tokens(line)):
            if seen is not None:
                seen.append(cmd)
            index = counter[0]
            counter[0] += 1
            d = decide(self.guardrails, partial(_rule_matches, cmd=cmd), cmd.text, index=index,
                       kinds=frozenset({cmd.program}))
            if cmd.dynamic:
                d = strictest([d, unparsed(self.guardrails, cmd.dynamic, cmd.text, index)])
            out.append(d)
            for kind, text in nested:
                if kind == "shell":
                    out.extend(self._line(text, depth + 1, counter, seen))
                elif self._has_sql_rules:
                    out.append(self._sql.check(text))
        return out

    def _split(self, tokens: list[str]) -> list[tuple[Command, list[tuple[str, str]]]]:
        out: list[tuple[Command, list[tuple[str, str]]]] = []
        words: list[str] = []
        redirected_in = after_pipe = drop_target = False
        for tok in [*tokens, ";"]:
            if drop_target and not (tok and set(tok) <= _OPERATOR_CHARS):
                drop_target = False  # a redirection's target is not an argument
                continue
            if tok and set(tok) <= _OPERATOR_CHARS:
                if set(tok) & _SEPARATOR_CHARS or tok in ("&", "&&"):
                    if words:
                        out.append(self._command(words, after_pipe, redirected_in))
                    after_pipe = tok in ("|", "|&")
                    words, redirected_in = [], False
                else:
                    redirected_in = redirected_in or "<" in tok
                    drop_target = True
                    if words and words[-1].isdigit() and not _unwrap(words[:-1]).words:
                        words.pop()  # "2>/dev/null reboot": 2 is the redirection's file descriptor
                continue
            words.append(tok)
        return out

    def _command(self, words: list[str], after_pipe: bool, redirected_in: bool
                 ) -> tuple[Command, list[tuple[str, str]]]:
        unwrapped = _unwrap(words)
        real, note = unwrapped.words, unwrapped.note
        nested: list[tuple[str, str]] = []
        if unwrapped.split_string is not None:
            nested.append(("shell", unwrapped.split_string))
            return Command("env", tuple(words[1:]), note), nested
        if not real:
            return Command(_basename(words[0]) if words else "", tuple(words[1:]), reads_input=note), nested
        program, args = _basename(real[0]), real[1:]
        dynamic: str | None = None
        reads = reads_input(program, tuple(args))
        if "$" in real[0] or "`" in real[0]:
            dynamic = "program name is computed"
        elif program == "eval":
            dynamic = "eval of computed text"
        elif program in _SHELLS or program in ("su", "script"):
            text = _dash_c(args)
            if text is not None:
                nested.append(("shell", text))
            elif program in _SHELLS and (after_pipe or redirected_in) and not any(
                    not a.startswith("-") for a in args):
                dynamic = f"{program} reads commands from its input"
        elif program == "psql":
            for text in _psql_commands(args):
                if text.lstrip().startswith("\\!"):
                    nested.append(("shell", text.lstrip()[2:]))
                elif not text.lstrip().startswith("\\"):
                    nested.append(("sql", text))
        elif program == "watch" and args:
            nested.append(("shell", " ".join(args)))
        return Command(program, tuple(args), dynamic, reads), nested


def _dash_c(args: list[str]) -> str | None:
    """The command string of ``sh -c STRING`` (also ``-lc``, ``-ec``, ``--login -c``)."""
    seen_c = False
    for a in args:
        if a.startswith("-") and not a.startswith("--") and "c" in a[1:]:
            seen_c = True
        elif a.startswith("-"):
            continue
        elif seen_c:
            return a
    return None


def _psql_commands(args: list[str]) -> list[str]:
    out: list[str] = []
    for i, a in enumerate(args):
        if a in ("-c", "--command") and i + 1 < len(args):
            out.append(args[i + 1])
        elif a.startswith("--command="):
            out.append(a.split("=", 1)[1])
        elif a.startswith("-c") and len(a) > 2:
            out.append(a[2:])
    return out


def _norm_path(word: str) -> str:
    path = re.sub("/+", "/", word)
    while path.endswith(("/*", "/.")):
        path = path[:-2] or "/"
    return posixpath.normpath(path) if path.startswith("/") else path


def _flags(cmd: Command) -> set[str]:
    aliases = _FLAG_ALIASES.get(cmd.program, {})
    flags: set[str] = set()
    for a in cmd.args:
        if a == "--":
            break
        if _SHORT.fullmatch(a):
            flags.update(aliases.get(ch, ch) for ch in a[1:])
        elif a in aliases:
            flags.add(aliases[a])
    return flags


def _pattern_matches(pattern: str, cmd: Command) -> bool:
    try:
        words = shlex.split(pattern)
    except ValueError:
        words = pattern.split()
    if not words or not fnmatch.fnmatchcase(cmd.program, _basename(words[0])):
        return False
    flags: set[str] | None = None
    aliases = _FLAG_ALIASES.get(cmd.program, {})
    for pw in words[1:]:
        if pw == "*" or any(fnmatch.fnmatchcase(a, pw) for a in cmd.args):
            continue
        if _SHORT.fullmatch(pw) or pw in aliases:
            flags = _flags(cmd) if flags is None else flags
            wanted = {aliases.get(pw, pw)} if pw in aliases else {aliases.get(ch, ch) for ch in pw[1:]}
            if wanted <= flags:
                continue
        if pw.startswith("/") and any(fnmatch.fnmatchcase(_norm_path(a), pw) for a in cmd.args):
            continue
        return False
    return True


def _rule_matches(rule: Rule, cmd: Command) -> bool:
    if not rule.commands or rule.statements or rule.tables or rule.functions or rule.methods or rule.paths:
        return False
    return any(_pattern_matches(p, cmd) for p in rule.commands)
