"""The shell guard: decide SSH exec command lines and interactive lines.

How this works: a line is lexed (:mod:`proxy.shelllex`: quotes, operators, substitutions; a
quoted operator such as find's ``\\;`` stays a word) and cut into *simple commands* at ``;``,
``&&``, ``||``, ``|``, ``&``, newlines and parentheses. Command substitutions (``$(...)``,
backticks, ``<(...)``) are checked as lines of their own; ``$'...'`` is decoded first
(:func:`proxy.shellwords.ansi_c`). Words are brace-expanded where bash would (``{rm,-rf,/}``).
Each simple command is unwrapped: leading ``VAR=value`` words, redirections (``2>/dev/null``),
shell keywords (``{``, ``!``, ``if``, ``then``, ``do``, ``coproc`` ...) and ``function NAME`` are
dropped, the program is reduced to its basename (``/bin/rm`` is ``rm``), and wrappers are peeled
off by :mod:`proxy.shellwrap`, which knows each wrapper's options and where its command is
(``sudo -Eu root CMD``, ``timeout 5 CMD``, ``xargs CMD``, ``su -c STRING``, ``find -exec CMD ;``).
Shell strings (``sh -c``, ``su -c``, ``flock -c``, ``trap``, ``watch``) are checked recursively
(depth 4, deeper is unparsed), so are ``env -S`` (also unparsed: its own splitting rules) and
:mod:`proxy.shellcode`'s findings. :meth:`ShellGuard.resolve` lists every command a line would
run, each marked when it reads commands from its input (``bash``, ``sudo -i``). ``psql -c SQL``
is checked with :class:`~proxy.sqlguard.SqlGuard` against the same guardrails when they contain
SQL selectors, and ``psql -c '\\! cmd'`` as a shell line. Every unit is decided with
:func:`proxy.guard.decide`; the strictest wins.

Patterns (``Rule.commands``) are shell words. The first is a glob on the program basename
(``mkfs*``). Each further word must match *some* argument, in any order; a lone ``*`` is
ignored (so ``dd * of=/dev/*`` reads "dd with an argument ``of=/dev/*``"). A short-flag word
(``-rf``) matches when every letter is present among the command's short flags, bundled or
not (``-r -f``, ``-fr``); per-program aliases map ``rm -R`` and ``--recursive`` to ``r``,
``--force`` to ``f`` (and ``-R``/``--recursive`` for chmod, chown, chgrp, cp). An absolute
path word also matches arguments that normalise to it: ``//``, ``/.``, ``/tmp/..``, ``/*`` and
other trailing globs (``/[a-z]*``) all match ``/``. ``find PATH -delete`` is also checked as
``rm -rf PATH``.

Fails closed (``on_unparsed``): unbalanced quotes or substitutions, nesting deeper than 4,
``eval``, ``alias NAME=...``, ``hash -p``, a program name that is computed (``$X``, ``$(...)``),
a glob (``/sbin/reb??t``) or filled in from input (``find -exec {} ;``, ``xargs sudo``), a
wrapper option hoop does not know, a program reading commands from a pipe or redirect
(``curl x | sh``, ``bash < f``, ``python3 <<< CODE``) or its script from stdin, a descriptor or
a process substitution (``bash <(curl x)``, ``sh /dev/stdin``), variables whose value the shell
runs later (``PROMPT_COMMAND``, ``PS0``-``PS4`` with expansions, ``BASH_ENV``, ``ENV``,
``BASH_FUNC_*``), arithmetic on variables and ``${x@P}``/``${!x}`` (bash runs code hidden in a
value there), key bindings that run commands (``bind -x``), ``fc``, and, in an interactive
terminal, history expansion (``!!``, ``^a^b``). A line containing a NUL byte is always blocked:
shells drop NUL from their input and a server may cut the line there, so what would run is not
what was read.

Limits, by design: variables in arguments (``rm -rf $DIR``, also through function parameters),
relative paths and ``~``, scripts run from files (``bash x.sh``, ``source x``), programs renamed
on the host (a symlink or copy of ``reboot``, ``PATH``), interpreters with inline code
(``python -c``, ``perl -e``), programs that run commands given in their own options
(``ssh -o ProxyCommand=``, ``tar --to-command``, ``git -c core.pager=``, ``awk 'BEGIN{system()}'``),
remote commands (``ssh host cmd``), subcommand aliases (``kubectl delete ns``). ``#`` comments
and here-document bodies are checked as if they were commands: this can only make the guard stricter.
A comment holding a quote, backquote, backslash or ``$`` goes to ``on_unparsed``: the shell reads them
as text there, and read as quotes they would hide the next line from the guard (``echo #'⏎rm …#'``).
"""

from __future__ import annotations

import fnmatch
import posixpath
import re
import shlex
from dataclasses import dataclass, field
from functools import lru_cache, partial

from broker.config import Guardrails, Rule
from proxy.guard import Decision, decide, strictest, unparsed
from proxy.shellcode import builtin_notes, dash_c, expand_braces, psql_commands, test_notes
from proxy.shelllex import Op, history_note, lex, plain
from proxy.shellwords import SHELLS as _SHELLS
from proxy.shellwords import Unparsable as _Unparsable
from proxy.shellwords import ansi_c, hidden_script, reads_input
from proxy.shellwrap import WRAPPERS, Nested, assignment_note
from proxy.sqlguard import SqlGuard

__all__ = ["Command", "ShellGuard"]

_MAX_DEPTH = 4
#: commands decided for one line, nested ones included; past it the line is unparsed
_MAX_UNITS = 16384
_KEYWORDS = frozenset({"{", "}", "!", "if", "then", "else", "elif", "fi", "do", "done", "while",
                       "until", "[[", "]]"})
_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\[[^]]*\])?\+?=.*", re.DOTALL)
_FLAG_ALIASES: dict[str, dict[str, str]] = {
    "rm": {"R": "r", "--recursive": "r", "--force": "f"},
    **{p: {"r": "R", "--recursive": "R"} for p in ("chmod", "chown", "chgrp")},
    "cp": {"R": "r", "--recursive": "r", "--force": "f"},
}
_SHORT = re.compile(r"-[A-Za-z0-9]+")
_GLOB = re.compile(r"[*?]|\[.*\]|[@!+]\(")
_REDIRECT = re.compile(r"([0-9]+|\{\w+\})?(?:[<>]|&>).*")


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


def _basename(word: str) -> str:
    return word.rsplit("/", 1)[-1] if "/" in word.rstrip("/") else word


@dataclass(slots=True)
class _Unwrapped:
    words: list[str]
    nested: list[Nested] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    reads: str | None = None  # a wrapper without a command starts a shell (sudo -i, chroot DIR)
    fill: tuple[str, ...] = ()
    wrappers: list[str] = field(default_factory=list)


def _unwrap(words: list[str]) -> _Unwrapped:
    """Drop assignments, keywords, function headers and wrappers with their options."""
    out = _Unwrapped(words)
    while words:
        head = words[0]
        if head in _KEYWORDS or _ASSIGNMENT.fullmatch(head):
            note = assignment_note(head) if head not in _KEYWORDS else None
            if note:
                out.notes.append(note)
            words = words[1:]
            continue
        if head == "function":  # function NAME { body; }: the body follows as its own words
            words = words[2:]
            continue
        if head == "coproc":  # coproc NAME { body; }, or coproc COMMAND
            words = words[2:] if len(words) > 2 and words[2] == "{" else words[1:]
            continue
        name = _basename(plain(head))
        resolver = WRAPPERS.get(name)
        if resolver is None:
            break
        inner = resolver(name, words[1:])
        out.wrappers.append(name)
        out.nested += inner.nested
        out.notes += inner.notes
        out.fill += inner.fill
        out.reads = out.reads or inner.reads
        if inner.argv is None:  # the wrapper is the command; what it runs is nested
            break
        words = inner.argv
    out.words = words
    return out


class ShellGuard:
    """Decides shell command lines for one resource's :class:`Guardrails`."""

    def __init__(self, guardrails: Guardrails) -> None:
        self.guardrails = guardrails
        self._sql = SqlGuard(guardrails)
        self._has_sql_rules = any(r.statements or r.tables or r.functions for r in guardrails.rules)

    def check(self, line: str, *, history: bool = False) -> Decision:
        """The decision for one command line (strictest simple command wins).

        ``history``: the line is typed at an interactive shell, which expands ``!`` history references.
        """
        if "\0" in line:  # a shell drops NUL bytes, a server may cut the line there: not what was checked
            return Decision("block", "nul-byte", "the command line contains a NUL byte", line[:80].replace("\0", "\\0"))
        try:
            decisions = self._line(line, 0, [0])
            note = history_note(line) if history else None
            if note:
                decisions.append(unparsed(self.guardrails, note, line[:80]))
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
            return tuple(cmd for cmd, _ in self._split(lex(ansi_c(line)).tokens))
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

    def _line(self, line: str, depth: int, counter: list[int], seen: list[Command] | None = None,
              fill: tuple[str, ...] = ()) -> list[Decision]:
        if depth > _MAX_DEPTH:
            raise _Unparsable("commands nested too deeply")
        lexed = lex(ansi_c(line))
        out: list[Decision] = []
        for inner in lexed.subs:
            out.extend(self._line(inner, depth + 1, counter, seen))
        out.extend(unparsed(self.guardrails, note, line[:80], counter[0]) for note in dict.fromkeys(lexed.notes))
        for cmd, nested in self._split(lexed.tokens, fill):
            out.extend(self._decide(cmd, nested, depth, counter, seen))
        return out

    def _decide(self, cmd: Command, nested: list[Nested], depth: int, counter: list[int],
                seen: list[Command] | None) -> list[Decision]:
        if seen is not None:
            seen.append(cmd)
        index = counter[0]
        counter[0] += 1
        if counter[0] > _MAX_UNITS:
            raise _Unparsable("too many commands to check")
        d = decide(self.guardrails, partial(_rule_matches, cmd=cmd), cmd.text, index=index,
                   kinds=frozenset({cmd.program}))
        if cmd.dynamic:
            d = strictest([d, unparsed(self.guardrails, cmd.dynamic, cmd.text, index)])
        out = [d]
        for item in nested:
            if item.kind == "shell":
                out.extend(self._line(plain(item.text), depth + 1, counter, seen, item.fill))
            elif item.kind == "argv":
                if depth + 1 > _MAX_DEPTH:
                    raise _Unparsable("commands nested too deeply")
                inner, more = self._command(list(item.words), False, False, item.fill)
                out.extend(self._decide(inner, more, depth + 1, counter, seen))
            elif self._has_sql_rules:
                out.append(self._sql.check(item.text))
        return out

    def _split(self, tokens: list[str], fill: tuple[str, ...] = ()) -> list[tuple[Command, list[Nested]]]:
        out: list[tuple[Command, list[Nested]]] = []
        words: list[str] = []
        redirected_in = after_pipe = drop_target = False
        for tok in [*tokens, Op(";")]:
            if not isinstance(tok, Op):
                if drop_target:  # a redirection's target is not an argument
                    drop_target = False
                else:
                    words.append(tok)
            elif m := _REDIRECT.fullmatch(tok):
                redirected_in = redirected_in or ("<" in tok and m.group(1) in (None, "0"))  # standard input
                drop_target = True
            else:
                if words:
                    out.append(self._command(words, after_pipe, redirected_in, fill))
                after_pipe = tok in ("|", "|&")
                words, redirected_in, drop_target = [], False, False
        return out

    def _command(self, words: list[str], after_pipe: bool, redirected_in: bool, fill: tuple[str, ...] = ()
                 ) -> tuple[Command, list[Nested]]:
        words = expand_braces(words)
        unwrapped = _unwrap(words)
        real, nested, notes = unwrapped.words, unwrapped.nested, unwrapped.notes + test_notes(words)
        fill += unwrapped.fill
        if not real:
            if unwrapped.wrappers[-1:] == ["exec"] and redirected_in:
                notes.append("exec < FILE makes the shell read its next commands from FILE")
            if unwrapped.reads and (after_pipe or redirected_in):
                notes.append(f"{unwrapped.reads}, here from a pipe or redirection hoop does not see")
            args = tuple(plain(w) for w in words[1:])
            return Command(_basename(plain(words[0])) if words else "", args, notes[0] if notes else None,
                           unwrapped.reads), nested
        head = plain(real[0])
        program, args = _basename(head), tuple(plain(a) for a in real[1:])
        if "$" in head:
            notes.append("program name is computed")
        elif _GLOB.search(real[0]):
            notes.append("program name is a glob pattern")
        elif fill and any(f in head for f in fill):
            notes.append("program name is filled in from the input")
        elif head.startswith(("/dev/", "/proc/")):
            notes.append("program is read from a descriptor")
        notes += builtin_notes(program, args, nested)
        if program in _SHELLS:
            text = dash_c(args)
            if text is not None:
                nested.append(Nested("shell", text))
        elif program == "psql":
            for text in psql_commands(args):
                if text.lstrip().startswith("\\!"):
                    nested.append(Nested("shell", text.lstrip()[2:]))
                elif not text.lstrip().startswith("\\"):
                    nested.append(Nested("sql", text))
        if fill and any(n.kind == "shell" and any(f in plain(n.text) for f in fill) for n in nested):
            notes.append("the command text is filled in from the input")
        hidden = hidden_script(program, args)
        if hidden:
            notes.append(hidden)
        reads = reads_input(program, args) or unwrapped.reads
        if reads and (after_pipe or redirected_in):
            notes.append(f"{reads}, here from a pipe or redirection hoop does not see")
        return Command(program, args, notes[0] if notes else None, reads), nested


def _norm_path(word: str) -> str:
    """An absolute path as a rule sees it: what a trailing glob or ``.`` would reach is the directory itself."""
    path = re.sub("/+", "/", word)
    while path.startswith("/") and path != "/" and (path.endswith("/.") or _GLOB.search(path.rsplit("/", 1)[1])):
        path = path.rsplit("/", 1)[0] or "/"
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


@lru_cache(maxsize=1024)
def _pattern_words(pattern: str) -> tuple[str, ...]:
    try:
        return tuple(shlex.split(pattern))
    except ValueError:
        return tuple(pattern.split())


def _pattern_matches(pattern: str, cmd: Command) -> bool:
    words = _pattern_words(pattern)
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
