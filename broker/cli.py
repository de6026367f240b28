"""The ``hoop`` command, and the composition root: the one place that builds and wires things.

Every command loads config and environment once, builds what it needs, and turns hoop's
own errors into a clear message and a non-zero exit, never a traceback. A message is one line
on stderr (never folded at the terminal's width; a problem per line for a config), with what
users or other parties wrote in it escaped (:mod:`broker.terminal`). A reader that goes away
(``hoop transcript ID | head``) ends the command quietly, with exit status 1.

This module holds the app, the commands that issue, revoke or set things up, and :func:`main`;
the plumbing they share, the read-only listings and the audit commands are in :mod:`broker.commands`.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from broker import __version__
from broker.apiclient import register as register_api_commands
from broker.apiclient import revoke_via_api
from broker.commands import lists
from broker.commands.audit import audit_app
from broker.commands.base import ConfigOpt, JsonOpt, _load, _run, _say, _with_runtime, err, out
from broker.errors import ConfigError, HoopError
from broker.model import Identity
from broker.runtime import Runtime, open_store, serve_forever
from broker.terminal import one_line, visible
from proxy.ssh.replay import replay_command


class _Escaped(TyperGroup):
    """The root command group: a usage error (an unknown option or command, a bad value, extra arguments)
    quotes what was typed, and click prints it as it is; so its message has its control and bidi
    characters escaped first (:func:`broker.terminal.visible`), as hoop's own messages do, and it is
    printed as one line (``error: …``), as they are. Parsing and
    running every subcommand go through these two methods, so one group catches them all. (``Any``: the
    contexts are click's, which typer vendors privately.)"""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # (typer has built every subcommand by now)
        _bare_flags(self)

    def make_context(self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any) -> Any:
        with _escaped():
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: Any) -> Any:
        with _escaped():
            return super().invoke(ctx)


def _bare_flags(command: Any) -> None:
    """Flags (``--json``, ``--help``) take no value, so their help shows no placeholder for one: typer's rich help
    gave them their type (``--help <bool>``), as if they took one (its plain help leaves them bare). A metavar is
    shown as it is, so theirs is set empty, in ``command`` and every subcommand; the help option too, which
    typer makes on first use (so here). Options that take a value keep their ``<str>`` or ``<path>``."""
    for param in [*command.params, command.get_help_option(typer.Context(command))]:
        if param is not None and (getattr(param, "is_flag", False) or getattr(param, "count", False)):
            param.metavar = ""
    for sub in getattr(command, "commands", {}).values():
        _bare_flags(sub)


@contextlib.contextmanager
def _escaped() -> Iterator[None]:
    try:
        yield
    except typer.TyperException as exc:  # click's errors (typer's own click), whose message click prints
        exc.message = visible(exc.message)
        ctx = getattr(exc, "ctx", None)
        if getattr(exc, "exit_code", 1) != 2 or type(exc).__name__ == "NoArgsIsHelpError":
            raise  # (not a usage error, or `hoop` alone, which shows the help)
        # a usage error is one line on stderr, as hoop's own errors are (click drew a box, folded at the
        # terminal's width), with the command's usage in it
        where = (f" (usage: {one_line(ctx.get_usage()).removeprefix('Usage: ')}; see '{ctx.command_path} --help')"
                 if ctx is not None else "")
        err.print("[bold red]error:[/] ", end="")
        err.print(one_line(exc.format_message()) + where, markup=False)
        raise SystemExit(2) from None


app = typer.Typer(name="hoop", help="hoop: a ChatOps access broker.", no_args_is_help=True, cls=_Escaped,
                  pretty_exceptions_enable=False, add_completion=False)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
state_app = typer.Typer(help="Keys kept in state_dir.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(audit_app, name="audit")
app.add_typer(state_app, name="state")


def _actor(rt: Runtime, email: str) -> Identity:
    from broker.policy import groups_of

    return Identity(email=email.lower(), groups=groups_of(rt.config, email))


def _version(value: bool) -> None:
    if value:
        out.print(f"hoop {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="print the version and exit")] = False) -> None:
    level = os.environ.get("HOOP_LOG_LEVEL", "INFO").upper()
    if level not in logging.getLevelNamesMapping():
        raise ConfigError(f"HOOP_LOG_LEVEL: unknown level {level!r}; use DEBUG, INFO, WARNING, ERROR or CRITICAL")
    logging.basicConfig(level=level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # asyncssh logs every exec command line at INFO, in clear: hoop records them masked instead.
    for noisy in ("alembic", "apscheduler", "asyncssh"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@app.command()
def serve(config: ConfigOpt = None) -> None:
    """Run the broker: HTTP server (health, metrics, Slack, API), proxies and scheduler."""
    cfg, settings = _load(config)
    _run(lambda: serve_forever(cfg, settings, _say))


@app.command()
def check(config: ConfigOpt = None) -> None:
    """Validate the config and show who can request and approve what; warn about foot-guns;
    load, as `hoop serve` would at start, every file and secret the config names (nothing is started or written)."""
    from broker.checks import render_check
    from proxy.preflight import proxy_findings

    cfg, settings = _load(config)
    errors = render_check(cfg, settings, out, probes=(proxy_findings,))
    if errors:
        raise typer.Exit(1)


@state_app.command("init")
def state_init(config: ConfigOpt = None,
               directory: Annotated[Path | None, typer.Option("--dir", help="where (default: state_dir)")] = None,
               ) -> None:
    """Make, once, the keys all replicas must share: ephemeral-role key, masking key, SSH host key and
    the PostgreSQL proxy's TLS pair. Existing files are kept. Put the folder in a Secret mounted by
    every replica (manifests/kubernetes/)."""
    from broker.roles import load_key as load_role_key
    from broker.runtime import load_masking_key
    from proxy.pg.tls import server_tls
    from proxy.ssh.hostkey import KEY_FILE, ensure_host_key

    cfg, settings = _load(config)
    folder = directory or cfg.state_dir
    names = ["roles.key", "masking.key", KEY_FILE, "pg-tls.crt", "pg-tls.key"]
    before = {n for n in names if (folder / n).exists()}
    # what the loaders log at INFO ("generated …", the fingerprint) is what this command prints below: once
    quiet = [logging.getLogger(name)
             for name in ("broker.roles", "broker.runtime", "proxy.pg.tls", "proxy.ssh.hostkey")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        load_role_key(folder)
        if cfg.masking_key is None:
            load_masking_key(cfg.model_copy(update={"state_dir": folder}), settings.environ)
        ssh_key = ensure_host_key(folder)
        tls = server_tls(cfg.tls.model_copy(update={"cert": None, "key": None}) if cfg.tls.cert is None else cfg.tls,
                         folder)
    except (OSError, ValueError) as exc:  # a folder that cannot be written, a key file that is not one
        raise ConfigError(f"{folder}: cannot make or read the keys there: {exc}") from None
    finally:
        for logger, level in zip(quiet, levels, strict=True):
            logger.setLevel(level)
    for name in names:
        if (folder / name).exists():
            _say(f"{'kept   ' if name in before else 'created'} {folder / name}")
    if cfg.masking_key is not None:
        _say("masking key: from the config (masking_key), not a file")
    _say(f"SSH host key {ssh_key.get_fingerprint()}")
    _say(f"PostgreSQL TLS certificate {tls.fingerprint}")
    _say(f"several replicas: kubectl -n hoop create secret generic hoop-state --from-file={folder} "
         "(the namespace of manifests/kubernetes/; then see its kustomization.yaml)")


@db_app.command("upgrade")
def db_upgrade(config: ConfigOpt = None) -> None:
    """Apply database migrations (also done automatically by `hoop serve`) to the store at HOOP_DATABASE_URL.
    Like every command, it reads and checks the config first (--config, $HOOP_CONFIG, hoop.yaml)."""
    _, settings = _load(config)

    async def go() -> tuple[str | None, str | None]:
        from broker.store.migrate import current

        store = open_store(settings)
        try:
            await store.reachable()
            was = await current(store.engine)
            await store.migrate()
            return was, await current(store.engine)
        finally:
            await store.close()

    was, now = _run(go)
    if was == now:
        _say(f"database schema is up to date (already at {now})")
    else:
        _say(f"database schema upgraded: {was or 'empty'} -> {now}")


@app.command()
def breakglass(
    resource: Annotated[str, typer.Option(help="resource name")],
    identity: Annotated[str, typer.Option(help="email of the admin taking emergency access")],
    duration: Annotated[str, typer.Option(help="e.g. 30m, 1h")],
    reason: Annotated[str, typer.Option(help="why approval is skipped")],
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Issue a grant without approval (admins only). Audited and announced as break-glass."""

    async def go(rt: Runtime) -> dict[str, Any]:
        grant, secret = await rt.service.breakglass(_actor(rt, identity), resource, identity, duration, reason)
        from broker.hints import connection_hints

        return {"grant": grant.id, "login": grant.login, "secret": secret, "resource": resource,
                "expires_at": grant.expires_at.isoformat(), "hints": connection_hints(rt.config, grant, secret)}

    data = _run(lambda: _with_runtime(config, go, slack=True))
    if as_json:
        sys.stdout.write(json.dumps(data) + "\n")
        return
    out.print("[bold red]BREAK-GLASS[/] ", end="")
    _say(one_line(f"grant {data['grant']} for {identity} on {resource} until {data['expires_at']}"))
    # soft_wrap: a secret or a connection command folded at the terminal's width breaks when pasted
    out.print(f"login:  {data['login']}\nsecret: {data['secret']}   (shown once)", markup=False, soft_wrap=True)
    for key, hint in data["hints"].items():
        if key != "login":
            out.print(f"{key}: {hint}", markup=False, soft_wrap=True)


@app.command()
def revoke(
    grant: Annotated[str, typer.Argument(help="grant id")],
    as_: Annotated[str, typer.Option("--as", help="your email (requester, approver or admin), for local use")] = "",
    reason: Annotated[str, typer.Option(help="why")] = "",
    api: Annotated[str, typer.Option("--api", envvar="HOOP_API", help="revoke through the API at URL")] = "",
    token: Annotated[str, typer.Option("--token", envvar="HOOP_TOKEN",
                                       help="bearer token for --api; prefer HOOP_TOKEN, since a value on the "
                                            "command line shows in ps")] = "",
    config: ConfigOpt = None,
) -> None:
    """Revoke a grant now; its live sessions are closed. Locally with --as, or through --api."""
    if api:
        _say(one_line(f"grant {revoke_via_api(api, token, grant, reason)['id']} revoked"))
        return
    if not as_:  # a usage error (exit 2), as 'hoop status' without --api is: nobody is assumed to be revoking
        err.print("error: say who you are with --as EMAIL (revoking locally), or revoke through the API with "
                  "--api URL (or HOOP_API) and HOOP_TOKEN", markup=False)
        raise typer.Exit(2)

    async def go(rt: Runtime) -> str:
        g = await rt.service.revoke(grant, _actor(rt, as_), reason)
        return f"grant {g.id} revoked"

    _say(_run(lambda: _with_runtime(config, go, slack=True)))


lists.register(app)  # requests, grants, sessions, transcript
register_api_commands(app)  # request and status through the API; the local revoke above also takes --api
app.command("replay")(replay_command)


def main() -> None:
    """Entry point: hoop's own errors become a message and an exit code, not a traceback."""
    _whole_writes()
    try:
        app(prog_name="hoop")  # (usage lines say hoop, however it was started; argv[0] is not printed raw)
        status: int | str | None = 0
    except SystemExit as exc:  # (typer ends every command so)
        status = exc.code
    except ConfigError as exc:
        err.print("[bold red]configuration error[/]")
        for problem in exc.message.splitlines():
            err.print(one_line(problem), markup=False)
        status = 2
    except HoopError as exc:
        err.print("[bold red]error:[/] ", end="")
        err.print(one_line(exc.message), markup=False)
        status = 1
    except KeyboardInterrupt:
        status = 130
    except BrokenPipeError:
        status = 1
    sys.exit(_flushed(status))


def _whole_writes() -> None:
    """Under PYTHONUNBUFFERED (the container image sets it) stdout writes straight to its file descriptor,
    and the part of a write a pipe did not take (its reader went away) is dropped without an error: hoop
    went on and exited 0. A buffered writer writes all of it or raises BrokenPipeError; flushing at each
    line keeps the output as prompt as before."""
    if isinstance(getattr(sys.stdout, "buffer", None), io.FileIO):
        sys.stdout = io.TextIOWrapper(io.BufferedWriter(sys.stdout.buffer), encoding=sys.stdout.encoding,
                                      errors=sys.stdout.errors, line_buffering=True)


def _flushed(status: int | str | None) -> int | str | None:
    """``status``, or 1 when stdout's reader has gone (``| head``): then stdout is pointed at /dev/null, so
    the interpreter's own last flush does not fail too and print "Exception ignored ... BrokenPipeError"."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        pass
    else:
        return status
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 1


if __name__ == "__main__":
    main()
