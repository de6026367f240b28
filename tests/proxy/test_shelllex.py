"""The shell guard's lexer and option scanner: words in, tokens and options out."""

from __future__ import annotations

import pytest

from proxy.shelllex import Op, lex, plain
from proxy.shellwords import Opts, Unparsable, getopt, opts

SUDO_LIKE = opts("+Eu:h::", "user=u preserve-env:: login")
PERMUTING = opts("c:l", "command=c login=l")


@pytest.mark.parametrize(("words", "spec", "operands", "found"), [
    (["-Eu", "root", "ls"], SUDO_LIKE, ["ls"], [("-E", ""), ("-u", "root")]),
    (["-uroot", "ls", "-l"], SUDO_LIKE, ["ls", "-l"], [("-u", "root")]),  # "+": the rest is the command's
    (["--us", "root", "ls"], SUDO_LIKE, ["ls"], [("-u", "root")]),  # a unique abbreviation
    (["--user=root", "ls"], SUDO_LIKE, ["ls"], [("-u", "root")]),
    (["-h", "ls"], SUDO_LIKE, ["ls"], [("-h", "")]),  # an optional value is attached or absent
    (["-hhost", "ls"], SUDO_LIKE, ["ls"], [("-h", "host")]),
    (["--preserve-env", "ls"], SUDO_LIKE, ["ls"], [("--preserve-env", "")]),
    (["--", "-E", "ls"], SUDO_LIKE, ["-E", "ls"], []),
    (["root", "-c", "cmd", "-l"], PERMUTING, ["root"], [("-c", "cmd"), ("-l", "")]),  # no "+": permuted
    (["-", "root", "--comm", "x"], PERMUTING, ["-", "root"], [("-c", "x")]),
])
def test_getopt_reads_options_as_glibc_does(words: list[str], spec: Opts, operands: list[str],
                                            found: list[tuple[str, str]]) -> None:
    assert getopt(words, spec) == (operands, found)


@pytest.mark.parametrize("words", [["-X", "ls"], ["--new", "ls"], ["--l", "x"], ["-u"], ["--login=x"]])
def test_getopt_refuses_what_it_cannot_read(words: list[str]) -> None:
    with pytest.raises(Unparsable):
        getopt(words, opts("+u:", "login list user=u"))


def _tokens(line: str) -> list[str]:
    return [f"<{t}>" if isinstance(t, Op) else plain(t) for t in lex(line).tokens]


@pytest.mark.parametrize(("line", "tokens"), [
    ("find . -exec rm {} \\; -delete", ["find", ".", "-exec", "rm", "{}", ";", "-delete"]),
    ("echo ';' a", ["echo", ";", "a"]),
    ("a;b&&c|d", ["a", "<;>", "b", "<&&>", "c", "<|>", "d"]),
    ("ls 2>/dev/null >&2", ["ls", "<2>>", "/dev/null", "<>&>", "2"]),
    ("echo 2 > f", ["echo", "2", "<>>", "f"]),
    ("echo \"a $(b) c\"d", ["echo", "a $(…) cd"]),
    ("cat <(ls) x", ["cat", "/dev/fd/63", "x"]),
    ("echo 'a\nb'", ["echo", "a\nb"]),
    ("echo a\\\nb", ["echo", "ab"]),
    ("x=$((1+2)) y", ["x=$((…))", "y"]),
])
def test_lex_words_and_operators(line: str, tokens: list[str]) -> None:
    assert _tokens(line) == tokens


def test_lex_takes_substitutions_out_and_notes_hidden_code() -> None:
    lexed = lex("echo $(a) `b` \"$(c \")\")\" <(d) ${x:-$(e)} $((f)) ${y@P}")
    assert lexed.subs == ["a", "b", 'c ")"', "d", "e"]
    assert len(lexed.notes) == 2  # arithmetic on f, prompt expansion of y
    assert lex("echo $((echo a); b)").subs == ["(echo a); b"]  # not arithmetic: bash reads a subshell


def test_lex_keeps_quoted_glob_characters_apart() -> None:
    live, quoted = lex("a* 'a*'").tokens
    assert live == "a*" and quoted != "a*" and plain(quoted) == "a*"


@pytest.mark.parametrize("line", ["echo 'a", 'echo "a', "echo `a", "echo $(a", "echo ${a", "x \ue000"])
def test_lex_refuses_unbalanced_quoting(line: str) -> None:
    with pytest.raises(Unparsable):
        lex(line)
