"""Programs that run another command given in their arguments, and where that command is.

How this works. :data:`WRAPPERS` maps a program name to a function of its arguments that
returns :class:`Inner`: what the wrapper runs. Most wrappers run the rest of their words as a
command after their options and N positional words (``timeout 5 CMD``, ``chrt -f 10 CMD``); the
guard then unwraps that command in the wrapper's place, so ``sudo rm`` is decided as ``rm``.
Others run a shell string (``su -c STRING``, ``flock F -c STRING``, ``trap STRING SIG``, ``watch
WORDS...``, ``parallel``) or commands inside an expression (``find -exec CMD ;``); those are
:class:`Nested` lines or commands, and the wrapper itself stays the command.

Options are read with :func:`~proxy.shellwords.getopt` from each program's table (glibc rules:
bundles, attached and optional values, abbreviated long options). An unknown option is
unparsable, never guessed. Programs whose options are too many to model (``strace``,
``systemd-run``, ``tmux``, ``firejail`` ...) are :func:`_anywhere` wrappers: every word that could
start the wrapped command is checked as its start, and every word that could be a shell line
as a line, so what they run is checked whichever word it starts at.

``fill`` marks text the wrapper fills in from its input: find's ``{}``, ``xargs -I R``; plain
``xargs`` appends its input, which the guard models as a ``{}`` word at the end. A program
name or a shell string holding fill text is not known from the line (``find -exec sh -c {} ;``,
``xargs sudo``), and is decided with ``on_unparsed``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from proxy.shelllex import plain
from proxy.shellwords import Opts, getopt, opts

__all__ = ["CODE_VARIABLE", "WRAPPERS", "Inner", "Nested", "assignment_note", "code_variable_note"]

#: variables whose value the shell later runs as code (prompts, hooks, startup files, functions, aliases), or
#: that change which text the shell reruns or which keys type text (history characters, readline's bindings)
CODE_VARIABLE = re.compile(r"PROMPT_COMMAND|PS[0-4]|BASH_ENV|ENV|BASH_FUNC_.*|BASH_ALIASES|BASH_CMDS|histchars|INPUTRC")
_CODE_VARIABLE_WHY = (
    (re.compile(r"PROMPT_COMMAND|PS[0-4]"), "is expanded or run at every prompt"),
    (re.compile(r"BASH_ENV|ENV"), "names a file that a new shell runs first"),
    (re.compile(r"BASH_FUNC_.*"), "passes a shell function through the environment"),
    (re.compile(r"BASH_ALIASES|BASH_CMDS"), "makes a command name run other text"),
    (re.compile(r"histchars"), "changes the character that reruns earlier command lines"),
    (re.compile(r"INPUTRC"), "loads key bindings that can type and run lines hoop does not see"),
)
_NAME_VALUE = re.compile(r"([^=\[+]+)(\[[^]]*\])?\+?=(.*)", re.DOTALL)
_PROMPT = re.compile(r"PS[0-4]")
# what runs code in a prompt: $(...), `...`, $((...)), $[...] and ${...} (subscripts, ${x@P}); $NAME does not
_LIVE_PROMPT = re.compile(r"(?<!\\)\$[({\[]|`")
_INTEGER = re.compile(r"[+-]?[0-9]+")


@dataclass(frozen=True, slots=True)
class Nested:
    """A further line (``kind="shell"``) or command (``kind="argv"``) a wrapper runs."""

    kind: str
    text: str = ""
    words: tuple[str, ...] = ()
    fill: tuple[str, ...] = ()


@dataclass(slots=True)
class Inner:
    """What one wrapper runs. ``argv`` None: the wrapper is the command (with ``nested`` runs)."""

    argv: list[str] | None = None
    nested: list[Nested] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # why what it runs is not known from the line
    reads: str | None = None  # it starts a shell that reads commands from its input
    fill: tuple[str, ...] = ()


Resolver = Callable[[str, list[str]], Inner]


def assignment_note(word: str) -> str | None:
    """Why the assignment ``word`` (``NAME=value``, ``NAME[i]=v``) makes the shell run hidden code later."""
    m = _NAME_VALUE.fullmatch(plain(word))
    if m is None:
        return None
    name, subscript, value = m.groups()
    if subscript and not _INTEGER.fullmatch(subscript[1:-1].strip() or "0"):
        return f"the subscript of {name}[...] is evaluated as arithmetic, which runs code hidden in variables"
    if not CODE_VARIABLE.fullmatch(name) or (_PROMPT.fullmatch(name) and not _LIVE_PROMPT.search(value)):
        return None
    return code_variable_note(name)


def code_variable_note(name: str) -> str:
    """Why setting ``name`` (one of :data:`CODE_VARIABLE`) is decided with ``on_unparsed``."""
    why = next((why for pattern, why in _CODE_VARIABLE_WHY if pattern.fullmatch(name)), "holds code run later")
    return f"{name} {why}"


def _starts_shell(name: str) -> str:
    return f"{name} starts a shell that reads commands from its input"


def _runs(spec: Opts, *, skip: int = 0, empty_shell: bool = False, assignments: bool = False,
          no_command: frozenset[str] = frozenset()) -> Resolver:
    """A wrapper that runs its operands after ``skip`` positional words as a command.

    ``empty_shell``: with no command it starts a shell; ``assignments``: ``NAME=value`` operands come
    first (env, sudo); ``no_command``: options that make it act on something else (``-p PID``).
    """
    def resolve(name: str, args: list[str]) -> Inner:
        operands, found = getopt(args, spec)
        if {o for o, _ in found} & no_command:
            return Inner()
        inner = Inner(argv=[])
        i = skip
        while assignments and i < len(operands) and (operands[i] == "-" or "=" in operands[i][1:]):
            note = assignment_note(operands[i])
            if note or operands[i].startswith("BASH_FUNC_"):
                inner.notes.append(note or code_variable_note("BASH_FUNC_"))
            i += 1
        inner.argv = operands[i:]
        if not inner.argv and empty_shell:
            inner.reads = _starts_shell(f"{name} without a command")
        return inner
    return resolve


def _shell_option(spec: Opts, shell: frozenset[str], assignments: bool = False) -> Resolver:
    """sudo and doas: like :func:`_runs`, and ``-s``/``-i`` without a command start a shell."""
    def resolve(name: str, args: list[str]) -> Inner:
        inner = _runs(spec, assignments=assignments)(name, args)
        options = sorted({o for o, _ in getopt(args, spec)[1]} & shell)
        if not inner.argv and options:
            inner.reads = _starts_shell(f"{name} {options[0]}")
        return inner
    return resolve


def _env(name: str, args: list[str]) -> Inner:
    inner = _runs(_ENV, assignments=True)(name, args)
    for option, value in getopt(args, _ENV)[1]:
        if option == "-S":
            inner.nested.append(Nested("shell", value))
            inner.notes.append("env -S splits its argument into words by its own rules")
    return inner


def _chrt(name: str, args: list[str]) -> Inner:
    """chrt [options] [priority] command: newer versions let the priority out for some policies."""
    operands, found = getopt(args, _CHRT)
    if {o for o, _ in found} & {"-p", "-m", "-h", "-V"}:
        return Inner()
    return Inner(argv=operands[1:] if operands and _INTEGER.fullmatch(operands[0]) else operands)


def _su(runuser: bool) -> Resolver:
    """su and runuser: ``-c STRING`` for the user's shell, extra operands to that shell, or ``-u USER CMD``."""
    def resolve(name: str, args: list[str]) -> Inner:
        operands, found = getopt(args, _SU)
        if runuser and any(o == "-u" for o, _ in found):
            return Inner(argv=operands)
        inner = Inner(nested=[Nested("shell", v) for o, v in found if o in ("-c", "--session-command")])
        if operands[:1] == ["-"]:
            operands = operands[1:]
        if len(operands) > 1:  # su USER ARGS...: ARGS go to the shell (su root -- -c CMD is sh -c CMD)
            inner.nested.append(Nested("argv", words=("sh", *operands[1:])))
        return inner
    return resolve


def _script(name: str, args: list[str]) -> Inner:
    operands, found = getopt(args, _SCRIPT)
    inner = Inner(nested=[Nested("shell", v) for o, v in found if o == "-c"])
    if len(operands) > 1:  # newer script: script [options] [file] -- command [argument...]
        inner.nested.append(Nested("argv", words=tuple(operands[1:])))
    return inner


def _flock(name: str, args: list[str]) -> Inner:
    operands, _ = getopt(args, _FLOCK)
    if len(operands) > 1 and operands[1] in ("-c", "--command"):
        return Inner(nested=[Nested("shell", " ".join(operands[2:]))])
    return Inner(argv=operands[1:])


def _watch(name: str, args: list[str]) -> Inner:
    operands, found = getopt(args, _WATCH)
    if any(o == "-x" for o, _ in found):
        return Inner(argv=operands)
    return Inner(nested=[Nested("shell", " ".join(operands))] if operands else [])


def _trap(name: str, args: list[str]) -> Inner:
    operands, _ = getopt(args, opts("+lp"))
    if len(operands) < 2 or operands[0] == "-":
        return Inner()
    return Inner(nested=[Nested("shell", operands[0])])


def _xargs(name: str, args: list[str]) -> Inner:
    operands, found = getopt(args, _XARGS)
    replace = [v or "{}" for o, v in found if o in ("-I", "-i")]
    command = operands or ["echo"]
    if replace:
        return Inner(argv=command, fill=(replace[-1],))
    return Inner(argv=[*command, "{}"], fill=("{}",))


def _parallel(name: str, args: list[str]) -> Inner:
    operands, _ = getopt(args, _PARALLEL)
    end = next((i for i, w in enumerate(operands) if w in (":::", "::::", ":::+", "::::+")), len(operands))
    text = " ".join(plain(w) for w in operands[:end])
    if not text or "{=" in text:
        return Inner(notes=[f"{name} runs commands read from its arguments or input"])
    return Inner(nested=[Nested("shell", text, fill=("{",))])


_FIND_EXEC = frozenset({"-exec", "-execdir", "-ok", "-okdir"})


def _find(name: str, args: list[str]) -> Inner:
    """``-exec`` and friends run a command per file (``{}`` is the file); ``-delete`` removes like ``rm -rf``."""
    i = 0
    while i < len(args) and (args[i] in ("-H", "-L", "-P", "-D") or args[i].startswith("-O")):
        i += 2 if args[i] == "-D" else 1
    start = i
    while i < len(args) and not (args[i].startswith("-") or args[i] in ("(", "!", ")", ",")):
        i += 1
    paths = args[start:i] or ["."]
    inner = Inner()
    while i < len(args):
        word = args[i]
        i += 1
        if word == "-delete":
            inner.nested.append(Nested("argv", words=("rm", "-rf", *paths)))
        elif word in _FIND_EXEC:
            end = i
            while end < len(args) and not (args[end] == ";" or (args[end] == "+" and plain(args[end - 1]) == "{}")):
                end += 1
            command = args[i:end]
            i = end + 1
            inner.nested.append(Nested("argv", words=tuple(command), fill=("{}",)))
            for path in paths:  # the first file each start path gives is the path itself
                inner.nested.append(Nested("argv", words=tuple(plain(w).replace("{}", path) for w in command)))
    return inner


def _capsh(name: str, args: list[str]) -> Inner:
    """capsh's options are ``--name[=value]``; what follows ``--`` goes to bash."""
    if "--" not in args:
        return Inner()
    return Inner(argv=["bash", *args[args.index("--") + 1:]])


def _busybox(name: str, args: list[str]) -> Inner:
    if args and args[0].startswith("-"):
        getopt(args[:1], opts("+", "list list-full install help show:"))
        return Inner()
    return Inner(argv=args)


def _anywhere(*, empty_shell: bool = False) -> Resolver:
    """A wrapper whose options are not modelled: each word that could start its command is checked."""
    def resolve(name: str, args: list[str]) -> Inner:
        inner = Inner(nested=[Nested("argv", words=tuple(args[i:])) for i, w in enumerate(args)
                              if not w.startswith(("-", "+"))])
        inner.nested += [Nested("shell", w) for w in args if re.search(r"[\s;&|<>()`$]", w)]
        if empty_shell and not any(not w.startswith("-") for w in args):
            inner.reads = _starts_shell(f"{name} without a command")
        return inner
    return resolve


_SUDO = opts("+Aa:BbC:c:D:Eeg:Hh:iKklNnPp:R:r:SsT:t:U:u:Vv",
             "askpass=A auth-type=a background=b bell=B close-from=C login-class=c chdir=D preserve-env:: "
             "edit=e group=g set-home=H help host: login=i remove-timestamp=K reset-timestamp=k list=l "
             "no-update=N non-interactive=n preserve-groups=P prompt=p chroot=R role=r stdin=S shell=s type=t "
             "command-timeout=T other-user=U user=u version=V validate=v")
_ENV = opts("+0C:iS:u:v", "ignore-environment=i null=0 unset=u chdir=C split-string=S block-signal:: "
                          "default-signal:: ignore-signal:: list-signal-handling debug=v help version")
_SU = opts("c:fg:G:lmpPs:u:hVw:", "command=c session-command: fast=f group=g supp-group=G login=l "
                                  "preserve-environment=m pty=P shell=s user=u help=h version=V "
                                  "whitelist-environment=w")
_SCRIPT = opts("aB:c:eE:fI:O:o:qm:T:t::Vh", "append=a log-io=B command=c return=e echo=E flush=f force "
                                            "log-in=I log-out=O output-limit=o quiet=q logging-format=m "
                                            "log-timing=T timing=t version=V help=h")
_FLOCK = opts("+sexnoFuw:E:hV", "shared=s exclusive=x unlock=u nonblock=n nb=n timeout=w wait=w "
                                 "conflict-exit-code=E close=o no-fork=F verbose help=h version=V")
_WATCH = opts("+bcCd::eghn:pq:rtwxv", "beep=b color=c no-color=C differences=d errexit=e chgexit=g "
                                      "equexit=q interval=n precise=p no-rerun=r no-title=t no-wrap=w "
                                      "exec=x help=h version=v")
_XARGS = opts("+0a:d:E:e::i::I:l::L:n:oprs:tP:x", "null=0 arg-file=a delimiter=d eof=e replace=i "
                                                  "max-lines=l max-args=n open-tty=o interactive=p "
                                                  "no-run-if-empty=r max-chars=s verbose=t exit=x max-procs=P "
                                                  "process-slot-var: show-limits help version")
_PARALLEL = opts("+0a:C:d:E:e::gI:i::j:J:kL:l::mn:N:P:pqrs:S:tTuvVW:X",
                 "null=0 arg-file=a colsep=C delimiter=d eof=E replace=I jobs=j max-procs=P profile=J "
                 "keep-order=k max-lines=L max-args=n max-replace-args=N interactive=p quote=q no-run-if-empty=r "
                 "max-chars=s sshlogin=S verbose=t tty=T ungroup=u version=V workdir=W xargs=X group "
                 "line-buffer bar progress eta dry-run halt: joblog: results: tag will-cite no-notice pipe "
                 "block: retries: timeout: delay: memfree: load: noswap nice: tmpdir: shebang")
_NSENTER = opts("+ahVt:m::u::i::n::p::C::U::T::S:G:r::w::W:eFZc",
                "all=a target=t mount=m uts=u ipc=i net=n pid=p cgroup=C user=U time=T setuid=S setgid=G "
                "preserve-credentials keep-caps root=r wd=w wdns=W env=e no-fork=F follow-context=Z "
                "join-cgroup=c user-parent help=h version=V")
_UNSHARE = opts("+fhVm::u::i::n::p::C::T::U::rR:w:S:G:cl:",
                "fork=f help=h version=V mount=m uts=u ipc=i net=n pid=p cgroup=C time=T user=U "
                "map-root-user=r map-current-user=c root=R wd=w setuid=S setgid=G load-interp=l kill-child:: "
                "mount-proc:: map-user: map-group: map-auto map-users: map-groups: propagation: setgroups: "
                "keep-caps monotonic: boottime: mount-binfmt::")
_SETPRIV = opts("+dhV", "dump=d nnp no-new-privs inh-caps: ambient-caps: bounding-set: ruid: euid: rgid: "
                        "egid: reuid: regid: clear-groups keep-groups init-groups groups: securebits: pdeathsig: "
                        "selinux-label: apparmor-profile: landlock-access: landlock-rule: reset-env help=h "
                        "version=V")
_PRLIMIT = opts("+c::d::e::f::i::l::m::n::q::r::s::t::u::v::x::y::o:p:hV",
                "core=c data=d nice=e fsize=f sigpending=i memlock=l rss=m nofile=n msgqueue=q rtprio=r "
                "stack=s cpu=t nproc=u as=v locks=x rttime=y output=o pid=p noheadings raw verbose help=h "
                "version=V")


_CHRT = opts("+abdD:efiphmoP:T:rRvV", "all-tasks=a batch=b deadline=d ext=e fifo=f idle=i help=h max=m other=o "
                                     "pid=p rr=r reset-on-fork=R sched-runtime=T sched-period=P sched-deadline=D "
                                     "verbose=v version=V")


WRAPPERS: dict[str, Resolver] = {
    "sudo": _shell_option(_SUDO, frozenset({"-i", "-s"}), assignments=True),
    "doas": _shell_option(opts("+a:C:Lnsu:"), frozenset({"-s"})),
    "env": _env, "su": _su(False), "runuser": _su(True), "script": _script,
    "flock": _flock, "watch": _watch, "trap": _trap, "xargs": _xargs, "parallel": _parallel,
    "sem": _parallel, "find": _find, "capsh": _capsh, "busybox": _busybox,
    "nohup": _runs(opts("+", "help version")),
    "builtin": _runs(opts("+")),
    "command": _runs(opts("+pvV")),
    "exec": _runs(opts("+cla:")),
    "time": _runs(opts("+ao:f:pqvV", "append=a output=o format=f portability=p quiet=q verbose=v help version")),
    "nice": _runs(opts("+n:", "adjustment=n help version", numeric=True)),
    "timeout": _runs(opts("+fk:ps:v", "foreground=f kill-after=k preserve-status=p signal=s verbose=v help "
                                      "version"), skip=1),
    "stdbuf": _runs(opts("+i:o:e:", "input=i output=o error=e help version")),
    "chroot": _runs(opts("+", "groups: userspec: skip-chdir help version"), skip=1, empty_shell=True),
    "setsid": _runs(opts("+cfwhV", "ctty=c fork=f wait=w help=h version=V")),
    "taskset": _runs(opts("+acphV", "all-tasks=a cpu-list=c pid=p help=h version=V"), skip=1,
                     no_command=frozenset({"-p", "-h", "-V"})),
    "chrt": _chrt,
    "ionice": _runs(opts("+c:hn:p:P:tu:V", "class=c classdata=n pid=p pgid=P ignore=t uid=u help=h version=V"),
                    no_command=frozenset({"-p", "-P", "-u", "-h", "-V"})),
    "unbuffer": _runs(opts("+p")),
    "pkexec": _runs(opts("+", "user: disable-internal-agent keep-cwd help version"), empty_shell=True),
    "nsenter": _runs(_NSENTER, empty_shell=True, no_command=frozenset({"-h", "-V"})),
    "unshare": _runs(_UNSHARE, empty_shell=True, no_command=frozenset({"-h", "-V"})),
    "setpriv": _runs(_SETPRIV, no_command=frozenset({"-d", "-h", "-V"})),
    "prlimit": _runs(_PRLIMIT, no_command=frozenset({"-p", "-h", "-V"})),
    **{name: _anywhere() for name in (
        "strace", "ltrace", "valgrind", "faketime", "numactl", "torsocks", "proxychains", "proxychains4",
        "cgexec", "chpst", "dbus-launch", "ssh-agent", "catchsegv", "systemd-run", "bwrap", "runcon", "eatmydata",
        "nocache", "trickle", "rlwrap", "chronic", "ifne", "tsp", "daemonize", "start-stop-daemon", "sg",
        "systemd-inhibit", "nq", "dtach", "abduco", "time-limit", "cpulimit", "softlimit", "setuidgid",
        "envdir", "envuidgid", "pgrphack", "setlock")},
    **{name: _anywhere(empty_shell=True) for name in (
        "fakeroot", "firejail", "proot", "tmux", "screen", "dbus-run-session", "machinectl", "toolbox",
        "distrobox-enter", "flatpak-spawn")},
}
