"""Lexing a shell line for the guard: words, operators, and the code that expansions hide.

How this works. :func:`lex` reads a line the way bash's tokeniser does, as far as the guard
needs. Blanks separate words. ``;`` ``&`` ``|`` ``(`` ``)`` ``<`` ``>`` and newline, alone or in
bash's combinations (``&&``, ``;;``, ``<<<``, ``>&`` ...), are operators, returned as :class:`Op`.
Quotes and backslashes are removed, and a quoted operator character stays part of its word (so does
an extglob group: ``re@(boot)``):
``find -exec x \\;`` ends in the word ``;``, not in an operator. Quoted ``* ? [ ] { } ,`` are
kept apart from live ones (:data:`QUOTED`; :func:`plain` undoes it), so brace expansion and globs
are seen exactly where bash sees them.

Command substitutions (``$(...)``, backticks, ``<(...)``, ``>(...)``) are taken out and returned
as lines of their own to check (:attr:`Lexed.subs`). In the word they leave ``$(…)`` (a program
name with ``$`` is computed) or ``/dev/fd/63``, which is what bash passes for ``<(...)``.

Arithmetic (``$((...))``, ``$[...]``, ``((...))``) and parameter expansions (``${...}``) are read
for the ways bash runs code hidden in a variable's *value*, which the guard never sees:
arithmetic on a variable (``x='a[$(cmd)]'; echo $((x))`` runs ``cmd``; so do array subscripts
and substring offsets, ``${a[$i]}``, ``${s:$n}``), indirect expansion (``${!x}``) and prompt
expansion (``${x@P}``). Each is a note (:attr:`Lexed.notes`), decided with ``on_unparsed``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from proxy.shellwords import Unparsable

__all__ = ["QUOTED", "Lexed", "Op", "arithmetic_note", "history_note", "lex", "plain"]


class Op(str):
    """An operator token. Only unquoted text makes one."""

    __slots__ = ()


_OPERATORS = (";;&", "<<<", "<<-", "&>>", ";;", ";&", "&&", "||", "|&", "<<", ">>", "<&", ">&", "<>", ">|",
              "&>", ";", "&", "|", "(", ")", "<", ">", "\n")
_OP_START = frozenset(";&|()<>\n")
_OPERATOR = re.compile("|".join(map(re.escape, _OPERATORS)))
#: quoted glob and brace characters, as they stand in words (private-use code points)
QUOTED = {c: chr(0xE000 + i) for i, c in enumerate("*?[]{},")}
_QUOTE = str.maketrans(QUOTED)
_UNQUOTE = str.maketrans({v: k for k, v in QUOTED.items()})
_PRIVATE = re.compile("[\ue000-\ue006]")
_PLAIN = re.compile(r"[^\s\\'\"$`;&|()<>]+")
_DQ_PLAIN = re.compile(r'[^"\\$`]+')
_EXTGLOB = frozenset("@!?*+")  # before "(": an extglob pattern, such as @(a|b) or !(x)
_FD = re.compile(r"[0-9]+|\{[A-Za-z_]\w*\}")
_CASE = re.compile(r"(?:^|[\s;&|(])case\s")
# literals arithmetic may hold without reading a variable: 0x1f, 8#17, 10, $? $# $$ $!
_ARITH_LITERAL = re.compile(r"0[xX][0-9a-fA-F]+|[0-9]+#[0-9A-Za-z@_]+|[0-9]+|\$[?#$!]")
_NAME_OR_EXPANSION = re.compile(r"[A-Za-z_$`]")
_SUBSCRIPT = re.compile(r"#?(?:[A-Za-z_]\w*)\[(.*)\]", re.DOTALL)
_SUBSTRING = re.compile(r"(?:[A-Za-z_]\w*|[0-9]+|[@*])(?:\[[^]]*\])?:(?![-=?+])(.*)", re.DOTALL)
_LISTING = re.compile(r"![A-Za-z_]\w*(?:[*@]|\[[*@]\])")
_ARITH_WHY = "bash evaluates a variable's value as code in arithmetic (x='a[$(cmd)]'; echo $((x)))"


def plain(word: str) -> str:
    """``word`` as bash passes it to the program (quoted glob and brace characters restored)."""
    return word.translate(_UNQUOTE)


def arithmetic_note(text: str) -> str | None:
    """Why arithmetic over ``text`` could run hidden code: it reads a variable or an expansion."""
    rest = _ARITH_LITERAL.sub("", plain(text))
    return _ARITH_WHY if _NAME_OR_EXPANSION.search(rest) else None


@dataclass(slots=True)
class Lexed:
    """A lexed line: ``tokens`` are words (``str``) and operators (:class:`Op`)."""

    tokens: list[str] = field(default_factory=list)
    subs: list[str] = field(default_factory=list)  # command substitution bodies, checked as lines
    notes: list[str] = field(default_factory=list)  # why the line runs code the guard cannot see


def lex(line: str) -> Lexed:
    """Lex one line (``$'...'`` already decoded). Raises :class:`Unparsable` for unbalanced quoting."""
    if _PRIVATE.search(line):
        raise Unparsable("private-use characters in the line")
    return _Lexer(line).run()


def _skip_backticks(s: str, i: int) -> int:
    """The index of the backtick closing the one at ``i``."""
    j = i + 1
    while j < len(s) and s[j] != "`":
        j += 2 if s[j] == "\\" else 1
    if j >= len(s):
        raise Unparsable("unbalanced backtick")
    return j


def _close_double(s: str, i: int) -> int:
    """The index of the ``"`` closing a double-quoted string whose text starts at ``i``."""
    while i < len(s):
        c = s[i]
        if c == "\\":
            i += 2
        elif c == '"':
            return i
        elif c == "`":
            i = _skip_backticks(s, i) + 1
        elif s.startswith("$(", i):
            i = _close(s, i + 2) + 1
        elif s.startswith("${", i):
            i = _close(s, i + 2, "{", "}") + 1
        else:
            i += 1
    raise Unparsable('unbalanced "')


_COMMENT_TRAPS = frozenset("'\"`\\$")  # in a comment, the shell reads these as text; a lexer might not
_WORD_BREAK = frozenset(" \t\r\n;&|()<>")


def _comment_end(s: str, i: int) -> int:
    """``s[i]`` is a ``#`` that starts a word, so the shell reads the rest of the line as a comment: the
    index of the newline that ends it (or the end). A comment holding a quote, backquote, backslash or
    ``$`` is refused: quote processing inside it would read where the line (and what follows the
    newline) ends differently from the shell, which is how a command could hide behind ``#'``."""
    j = s.find("\n", i)
    end = len(s) if j < 0 else j
    if any(c in _COMMENT_TRAPS for c in s[i:end]):
        raise Unparsable("a # comment holds quotes, escapes or expansions: the shell reads it as text")
    return end


def _close(s: str, i: int, opening: str = "(", closing: str = ")") -> int:
    """The index of the bracket closing one opened just before ``i`` (quotes and escapes skipped)."""
    depth = 1
    start = i
    while i < len(s):
        c = s[i]
        if c == "#" and closing == ")" and (i == start or s[i - 1] in _WORD_BREAK):  # (in ${…} it is an operator)
            _comment_end(s, i)  # (refuses one that could move where the shell sees the bracket close)
        if c == "\\":
            i += 2
            continue
        if c == "'":
            j = s.find("'", i + 1)
            if j < 0:
                raise Unparsable("unbalanced '")
            i = j + 1
            continue
        if c == '"':
            i = _close_double(s, i + 1) + 1
            continue
        if c == "`":
            i = _skip_backticks(s, i) + 1
            continue
        if c == opening:
            depth += 1
        elif c == closing:
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise Unparsable(f"unbalanced {opening}")


class _Lexer:
    def __init__(self, line: str) -> None:
        self.s = line
        self.i = 0
        self.out = Lexed()
        self.word: list[str] | None = None

    def run(self) -> Lexed:
        s, n = self.s, len(self.s)
        while self.i < n:
            c = s[self.i]
            if c in " \t\r":
                self._end()
                self.i += 1
            elif c == "#" and self.word is None:
                # a comment: checked as if it were commands (only stricter), once it cannot hide the next line
                _comment_end(s, self.i)
                self._word_part()
            elif c == "(" and self.word and self.word[-1][-1:] in _EXTGLOB:
                j = _close(s, self.i + 1)  # re@(boot): an extglob group is part of its word
                self._add(s[self.i:j + 1], False)
                self.i = j + 1
            elif c in _OP_START and not (c in "<>" and s.startswith("(", self.i + 1)):
                m = _OPERATOR.match(s, self.i)
                assert m is not None  # c starts an operator
                op = m.group()
                self.i += len(op)
                if op[0] in "<>" and self.word is not None and _FD.fullmatch("".join(self.word)):
                    op, self.word = "".join(self.word) + op, None  # 2>, {fd}<: the descriptor, not a word
                self._end()
                if op == "(" and s.startswith("(", self.i):
                    self._arithmetic_command(self.i - 1)
                self.out.tokens.append(Op(op))
            else:
                self._word_part()
        self._end()
        return self.out

    def _end(self) -> None:
        if self.word is not None:
            self.out.tokens.append("".join(self.word))
            self.word = None

    def _add(self, text: str, quoted: bool) -> None:
        if self.word is None:
            self.word = []
        self.word.append(text.translate(_QUOTE) if quoted else text)

    def _word_part(self) -> None:
        s, i = self.s, self.i
        c = s[i]
        if c == "\\":
            if s.startswith("\n", i + 1):  # a line continuation joins, it makes no word
                self.i = i + 2
                return
            self._add(s[i + 1:i + 2] or "\\", True)
            self.i = i + 2
        elif c == "'":
            j = s.find("'", i + 1)
            if j < 0:
                raise Unparsable("unbalanced '")
            self._add(s[i + 1:j], True)
            self.i = j + 1
        elif c == '"':
            self._double()
        elif c in "$`":
            self._expansion()
        elif c in "<>":  # <(...) or >(...): bash passes a /dev/fd path to the command's output
            j = _close(s, i + 2)
            self.out.subs.append(s[i + 2:j])
            self._add("/dev/fd/63", False)
            self.i = j + 1
        else:
            m = _PLAIN.match(s, i)
            chunk = m.group() if m else c
            self._add(chunk, False)
            self.i = i + len(chunk)

    def _double(self) -> None:
        s = self.s
        self._add("", True)
        i = self.i + 1
        while True:
            if i >= len(s):
                raise Unparsable('unbalanced "')
            c = s[i]
            if c == '"':
                self.i = i + 1
                return
            if c == "\\" and i + 1 < len(s) and s[i + 1] in '$`"\\\n':
                if s[i + 1] != "\n":
                    self._add(s[i + 1], True)
                i += 2
            elif c in "$`":
                self.i = i
                self._expansion()
                i = self.i
            else:
                m = _DQ_PLAIN.match(s, i)
                chunk = m.group() if m else c
                self._add(chunk, True)
                i += len(chunk)

    def _expansion(self) -> None:
        s, i = self.s, self.i
        if s[i] == "`":
            j = _skip_backticks(s, i)
            self._substitution(re.sub(r"\\([$`\\])", r"\1", s[i + 1:j]))
            self.i = j + 1
        elif s.startswith("$((", i):
            outer, inner = _close(s, i + 2), _close(s, i + 3)
            if inner + 1 == outer:  # $(( ... )); otherwise bash reads $( (...) ... ), a subshell inside
                self._arithmetic(s[i + 3:inner])
                self._add("$((…))", False)
            else:
                self._substitution(s[i + 2:outer])
            self.i = outer + 1
        elif s.startswith("$(", i):
            j = _close(s, i + 2)
            self._substitution(s[i + 2:j])
            self.i = j + 1
        elif s.startswith("$[", i):
            j = _close(s, i + 2, "[", "]")
            self._arithmetic(s[i + 2:j])
            self._add("$((…))", False)
            self.i = j + 1
        elif s.startswith("${", i):
            j = _close(s, i + 2, "{", "}")
            self._parameter(s[i + 2:j])
            self._add("$" + "{…}".translate(_QUOTE), False)
            self.i = j + 1
        else:
            self._add("$", False)
            self.i = i + 1

    def _substitution(self, body: str) -> None:
        if _CASE.search(body):  # a case pattern's ")" would end $( early: where the body ends is unsure
            raise Unparsable("a case statement inside a command substitution")
        self.out.subs.append(body)
        self._add("$(…)", False)

    def _nested(self, text: str) -> None:
        """Substitutions and notes inside an expansion's text (``${x:-$(cmd)}``, ``$(( $(cmd) ))``)."""
        inner = _Lexer(text).run()
        self.out.subs += inner.subs
        self.out.notes += inner.notes

    def _arithmetic(self, body: str) -> None:
        self._nested(body)
        note = arithmetic_note(body)
        if note:
            self.out.notes.append(note)

    def _arithmetic_command(self, i: int) -> None:
        """``(( ... ))`` at ``i`` (also in ``for ((...))``); its words are lexed as usual afterwards."""
        s = self.s
        outer, inner = _close(s, i + 1), _close(s, i + 2)
        if inner + 1 == outer:
            note = arithmetic_note(s[i + 2:inner])
            if note:
                self.out.notes.append(note)

    def _parameter(self, body: str) -> None:
        self._nested(body)
        if re.search(r"@P\s*$", body):
            self.out.notes.append("${...@P} expands a variable's value as a prompt, running the commands in it")
        if body.startswith("!") and not _LISTING.fullmatch(body):
            self.out.notes.append("${!...} expands a variable named by another variable's value")
        for pattern in (_SUBSCRIPT, _SUBSTRING):
            m = pattern.match(body.lstrip("!"))
            if m and arithmetic_note(m.group(1).replace("@", "").replace("*", "")):
                self.out.notes.append(_ARITH_WHY)
                break


_HISTORY = re.compile(r"![^\s=(\"]")


def history_note(line: str) -> str | None:
    """Why an interactive shell would replace part of ``line`` with earlier history (``!!``, ``!$``, ``^a^b``)."""
    if line.lstrip().startswith("^"):
        return "^old^new history substitution reruns the previous command line"
    quote = ""
    for i, c in enumerate(line):
        if c == "\\" and quote != "'":
            continue
        if c == "'" and quote != '"' and (i == 0 or line[i - 1] != "\\"):
            quote = "" if quote else "'"
        elif c == '"' and quote != "'" and (i == 0 or line[i - 1] != "\\"):
            quote = "" if quote else '"'
        elif (c == "!" and quote != "'" and _HISTORY.match(line, i) and not line.startswith("${", i - 2)
              and (i == 0 or line[i - 1] not in "$\\")):
            return "! history expansion reruns text from earlier command lines"
    return None
