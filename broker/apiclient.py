"""The CLI as an API client: ``hoop request|status|revoke --api URL --token …``.

For terminals and CI jobs that hold an OIDC token instead of a config file and database:
:class:`ApiClient` speaks the REST API (``broker.api``) and turns its JSON errors back into
hoop's own errors (403 -> :class:`Denied`, 422 -> :class:`InvalidInput`, ...), so the CLI
prints the server's message and exits non-zero, never a traceback.

``hoop request --wait`` polls until the request is decided and then collects the credential,
which the API shows once. Each request carries a fresh pickup key (:mod:`broker.sealing`): the
broker stores the credential sealed to it, so any replica can hand it out and only this
client can open it. Without ``--wait`` the private half is kept in a 0600 file under the
pickup directory until ``hoop status ID --collect`` uses it (and deletes it).
:func:`register` adds the commands to the ``hoop`` Typer app.

What the API answers is another party's text (reasons, chains of agent names, error messages):
it is printed one record a line with its controls escaped (:mod:`broker.terminal`); ``--json``
prints it exactly.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Annotated, Any, TypeVar

import aiohttp
import typer
from rich.console import Console

from broker import sealing
from broker.errors import Conflict, Denied, HoopError, InvalidInput, NotFound, UpstreamError
from broker.terminal import one_line, visible

T = TypeVar("T")
_BY_STATUS: dict[int, type[HoopError]] = {401: Denied, 403: Denied, 404: NotFound, 409: Conflict, 422: InvalidInput}


def api_base(url: str) -> str:
    """``https://hoop.example.com`` or ``…/api/v1`` -> ``…/api/v1``."""
    url = url.rstrip("/")
    return url if url.endswith("/api/v1") else url + "/api/v1"


class ApiClient:
    """An async client of ``/api/v1``. Use as ``async with ApiClient(url, token) as api:``."""

    def __init__(self, url: str, token: str, *, timeout: float = 30.0) -> None:
        self.base = api_base(url)
        self._headers = {"Authorization": f"Bearer {token.strip()}", "Accept": "application/json"}
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> ApiClient:
        self._session = aiohttp.ClientSession(timeout=self._timeout, headers=self._headers)
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def call(self, method: str, path: str, body: dict[str, Any] | None = None,
                   headers: dict[str, str] | None = None, params: dict[str, str] | None = None) -> Any:
        assert self._session is not None, "use ApiClient as an async context manager"
        url = self.base + path
        try:
            async with self._session.request(method, url, json=body, headers=headers, params=params) as resp:
                text = await resp.text()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamError(f"cannot reach the hoop API at {self.base}: {type(exc).__name__}",
                                code="unreachable") from None
        try:
            data = json.loads(text) if text else {}
        except ValueError:
            raise UpstreamError(f"the hoop API at {self.base} answered HTTP {status} without JSON",
                                code="bad_response") from None
        if status >= 400:
            message = data.get("message") if isinstance(data, dict) else None
            code = data.get("error") if isinstance(data, dict) else None
            cls = _BY_STATUS.get(status, UpstreamError)
            raise cls(str(message or f"HTTP {status}"), code=str(code) if code else None)
        return data

    async def me(self) -> dict[str, Any]:
        return dict(await self.call("GET", "/me"))

    async def create_request(self, resource: str, duration: str | None, reason: str,
                             pickup_key: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"resource": resource, "reason": reason}
        if duration:
            body["duration"] = duration
        if pickup_key:
            body["pickup_key"] = pickup_key
        return dict(await self.call("POST", "/requests", body))

    async def get_request(self, request_id: str) -> dict[str, Any]:
        return dict(await self.call("GET", f"/requests/{request_id}"))

    async def my_requests(self) -> list[dict[str, Any]]:
        return list((await self.call("GET", "/requests", params={"mine": "true"}))["requests"])

    async def my_grants(self) -> list[dict[str, Any]]:
        return list((await self.call("GET", "/grants", params={"mine": "true", "status": "active"}))["grants"])

    async def collect(self, request_id: str, private_key: str | None = None) -> dict[str, Any]:
        """The credential, opened with ``private_key`` when the broker sealed it."""
        cred = dict(await self.call("POST", f"/requests/{request_id}/credential"))
        box = cred.pop("sealed", None)
        if box:
            if not private_key:
                raise Conflict(f"the credential of request {request_id} is sealed to a pickup key this client "
                               "does not hold (it was requested elsewhere); it cannot be opened here",
                               code="no_pickup_key")
            opened = json.loads(sealing.unseal(private_key, box, request_id))
            cred["secret"], cred["hints"] = opened["secret"], opened["hints"]
        return cred

    async def revoke(self, grant_id: str, reason: str = "") -> dict[str, Any]:
        return dict(await self.call("POST", f"/grants/{grant_id}/revoke", {"reason": reason}))

    async def delegate(self, grant_id: str, parent_secret: str, resources: list[str], label: str,
                       duration: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"resources": resources, "label": label}
        if duration:
            body["duration"] = duration
        return dict(await self.call("POST", f"/grants/{grant_id}/delegate", body,
                                    headers={"X-Hoop-Grant": parent_secret}))

    async def wait(self, request_id: str, *, poll: float, timeout: float) -> dict[str, Any]:
        """Poll until the request is no longer pending (or ``timeout`` seconds pass)."""
        deadline = time.monotonic() + timeout
        while True:
            req = await self.get_request(request_id)
            if req["status"] != "pending":
                return req
            if time.monotonic() >= deadline:
                raise Conflict(f"request {request_id} is still pending after {timeout:g}s", code="pending")
            await asyncio.sleep(poll)


# -- commands ---------------------------------------------------------------------------------
ApiOpt = Annotated[str, typer.Option("--api", envvar="HOOP_API", help="hoop API URL (https://hoop.example.com)")]
#: (a token on the command line shows in other users' ``ps``: the help points to the variable)
_TOKEN_HELP = "OIDC bearer token; prefer HOOP_TOKEN, since a value on the command line shows in ps"
TokenOpt = Annotated[str, typer.Option("--token", envvar="HOOP_TOKEN", help=_TOKEN_HELP)]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON")]
KeysOpt = Annotated[Path | None, typer.Option(
    "--pickup-dir", envvar="HOOP_PICKUP_DIR",
    help="where pickup keys are kept until the credential is collected (default ~/.local/state/hoop/pickup)")]
_out = Console(highlight=False, emoji=False)
_err = Console(stderr=True, highlight=False, emoji=False, soft_wrap=True)


def _go(api: str, token: str, fn: Callable[[ApiClient], Awaitable[T]]) -> T:
    if not api or not token:
        _err.print("error: set --api URL (or HOOP_API) and --token TOKEN (or HOOP_TOKEN)", markup=False)
        raise typer.Exit(2)

    async def runner() -> T:
        async with ApiClient(api, token) as client:
            return await fn(client)

    try:
        return asyncio.run(runner())
    except HoopError as exc:
        _err.print("[bold red]error:[/] ", end="")
        _err.print(one_line(exc.message), markup=False)
        raise typer.Exit(1) from None


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data) + "\n")


def _say(line: str, *, err: bool = False) -> None:
    """One line of what the API answered, as one line with its controls escaped, never folded."""
    (_err if err else _out).print(one_line(line), markup=False, soft_wrap=True)


def _keys_dir(given: Path | None) -> Path:
    if given is not None:
        return given
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "hoop" / "pickup"


def _key_folder(folder: Path) -> Path:
    """Make the pickup folder (0700) before a request is sent, so a folder that cannot be written is
    a message, not a request whose credential nobody can open."""
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise InvalidInput(f"cannot use pickup folder {folder}: {exc.strerror}", code="pickup_dir") from None
    return folder


def _save_key(folder: Path, request_id: str, private: str) -> Path:
    path = folder / f"{request_id}.key"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(private + "\n")
    except OSError as exc:
        raise InvalidInput(f"request {request_id} was made, but its pickup key could not be kept in {path} "
                           f"({exc.strerror}); its credential cannot be collected", code="pickup_dir") from None
    return path


def _load_key(folder: Path, request_id: str) -> str | None:
    path = folder / f"{request_id}.key"
    return path.read_text().strip() if path.is_file() else None


def _show_credential(cred: dict[str, Any]) -> None:
    g = cred["grant"]
    _say(f"granted: {g['id']} for {', '.join(g['resources'])} until {g['expires_at']}")
    # soft_wrap: a secret or a connection command folded at the terminal's width breaks when pasted
    _out.print(visible(f"login:  {cred['login']}\nsecret: {cred['secret']}   (shown once)"), markup=False,
               soft_wrap=True)
    for key, hint in cred["hints"].items():
        if key != "login":
            _say(f"{key}: {hint}")


def request_cmd(
    resource: Annotated[str, typer.Argument(help="resource name")],
    duration: Annotated[str | None, typer.Argument(help="e.g. 30m (default: the resource's default)")] = None,
    reason: Annotated[list[str] | None, typer.Argument(help="why you need access")] = None,
    api: ApiOpt = "",
    token: TokenOpt = "",
    wait: Annotated[bool, typer.Option("--wait", help="wait for the decision, then collect the credential")] = False,
    poll: Annotated[float, typer.Option(help="seconds between checks while waiting")] = 3.0,
    timeout: Annotated[float, typer.Option(help="give up waiting after this many seconds")] = 900.0,
    as_json: JsonOpt = False,
    pickup_dir: KeysOpt = None,
) -> None:
    """Ask for access through the hoop API (for terminals, agents and CI jobs)."""
    private, public = sealing.new_keypair()

    async def go(client: ApiClient) -> dict[str, Any]:
        folder = _key_folder(_keys_dir(pickup_dir))
        req = await client.create_request(resource, duration, " ".join(reason or []), pickup_key=public)
        # kept even with --wait: a wait that times out or is interrupted can still be collected later
        key_file = _save_key(folder, req["id"], private)
        if not wait:
            return {"request": req}
        later = f"hoop status {req['id']} --collect"
        if req["status"] == "pending":
            if not as_json:
                _say(f"request {req['id']} is waiting for approval ({req['chain_text']})", err=True)
            try:
                req = await client.wait(req["id"], poll=poll, timeout=timeout)
            except Conflict as exc:
                raise Conflict(f"{exc.message}; collect the credential once approved: {later}",
                               code=exc.code) from None
            except asyncio.CancelledError:  # Ctrl-C
                _say(f"stopped waiting; collect the credential once approved: {later}", err=True)
                raise
        if req["status"] != "approved":
            key_file.unlink(missing_ok=True)
            raise Denied(f"request {req['id']} was {req['status']}"
                         + (f": {req['decision_reason']}" if req.get("decision_reason") else ""), code=req["status"])
        credential = await client.collect(req["id"], private)
        key_file.unlink(missing_ok=True)  # shown once: the key has no further use
        return {"request": req, "credential": credential}

    data = _go(api, token, go)
    if as_json:
        _print_json(data)
        return
    req = data["request"]
    _say(f"request {req['id']}: {req['resource']} for {req['duration']} ({req['status']}), chain {req['chain_text']}")
    if "credential" in data:
        _show_credential(data["credential"])
    else:
        _say(f"collect the credential once approved: hoop status {req['id']} --collect")


def status_cmd(
    request_id: Annotated[str | None, typer.Argument(help="a request id (default: all of mine)")] = None,
    api: ApiOpt = "",
    token: TokenOpt = "",
    collect: Annotated[bool, typer.Option("--collect", help="collect the credential of an approved request")]
    = False,
    as_json: JsonOpt = False,
    pickup_dir: KeysOpt = None,
) -> None:
    """Show my requests and active grants, or one request, through the hoop API."""
    folder = _keys_dir(pickup_dir)

    async def go(client: ApiClient) -> dict[str, Any]:
        if request_id is None:
            return {"requests": await client.my_requests(), "grants": await client.my_grants()}
        out: dict[str, Any] = {"request": await client.get_request(request_id)}
        if collect:
            out["credential"] = await client.collect(request_id, _load_key(folder, request_id))
            (folder / f"{request_id}.key").unlink(missing_ok=True)  # shown once: the key has no further use
        return out

    data = _go(api, token, go)
    if as_json:
        _print_json(data)
        return
    for req in data.get("requests", [data["request"]] if "request" in data else []):
        steps = "; ".join(f"{s['group']} {len(s['approvers'])}/{s['count']}" for s in req["steps"])
        _say(f"{req['id']}  {req['resource']}  {req['status']}  {req['duration']}  [{steps}]  "
             f"{req['chain_text']}  grant={req['grant_id'] or '-'}")
    for g in data.get("grants", []):
        _say(f"{g['id']}  {g['login']}  {', '.join(g['resources'])}  {g['status']}  "
             f"{g['remaining_seconds']}s left  {g['chain_text']}")
    if "credential" in data:
        _show_credential(data["credential"])


def revoke_via_api(api: str, token: str, grant_id: str, reason: str = "") -> dict[str, Any]:
    """Revoke through the API (for ``hoop revoke GRANT --api URL --token T``)."""
    return _go(api, token, lambda client: client.revoke(grant_id, reason))


def revoke_cmd(
    grant: Annotated[str, typer.Argument(help="grant id")],
    api: ApiOpt = "",
    token: TokenOpt = "",
    reason: Annotated[str, typer.Option(help="why")] = "",
    as_json: JsonOpt = False,
) -> None:
    """Revoke a grant (and every grant delegated from it) through the hoop API."""
    g = revoke_via_api(api, token, grant, reason)
    if as_json:
        _print_json(g)
    else:
        _say(f"grant {g['id']} revoked")


def register(app: typer.Typer, *, revoke_name: str = "revoke") -> None:
    """Add ``request``, ``status`` and the API ``revoke`` to ``app``. A command name already
    taken (the local ``revoke --as``) is skipped: that command can call :func:`revoke_via_api`."""
    taken = {c.name or (c.callback.__name__ if c.callback else "") for c in app.registered_commands}
    for name, fn in (("request", request_cmd), ("status", status_cmd), (revoke_name, revoke_cmd)):
        if name not in taken:
            app.command(name)(fn)
