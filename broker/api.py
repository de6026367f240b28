"""The REST API under ``/api/v1``: requests, approvals, grants, revocation and delegation.

How this works: :data:`ROUTES` is a table of routes (method, path, handler, models). One
generic wrapper authenticates the caller (OIDC bearer token -> :class:`Identity`), validates
the query and body with the route's pydantic models, runs the handler against the
:class:`Service` (the same use cases and policy as Slack) and serialises the handler's model.
The OpenAPI document is generated from the same table and models.

Errors are JSON (:class:`~broker.api_models.ErrorOut`): a :class:`HoopError` becomes its
``http_status`` with ``{"error": code, "message"}``; a pydantic validation error becomes 422
with ``fields`` giving each ``loc`` (``["body", "resources", 0]``). A missing or bad token is
401 with ``WWW-Authenticate: Bearer``. Nothing the API returns carries an upstream secret; a
grant secret appears only in a :class:`CredentialOut`, to its requester or delegator, once.

Delegation: ``POST /grants/{id}/delegate`` needs both the caller's OIDC token and proof of
possession of the parent grant: its secret, in the ``X-Hoop-Grant`` header (or the body's
``parent_secret``). A token alone cannot delegate someone else's grant, and a leaked grant
secret alone cannot mint children.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from broker import policy
from broker.api_inbox import SecretInbox
from broker.api_models import (
    ApproveOut,
    CredentialOut,
    Decision,
    DelegateBody,
    ErrorOut,
    FieldError,
    GrantList,
    GrantOut,
    GrantsQuery,
    RequestCreate,
    RequestList,
    RequestOut,
    RequestsQuery,
    WhoAmI,
)
from broker.api_openapi import Doc, openapi
from broker.clock import Clock
from broker.config import HoopConfig
from broker.delegation import delegate, parent_by_secret
from broker.errors import Conflict, Denied, HoopError, NotFound
from broker.events import Broadcast
from broker.hints import connection_hints
from broker.identity import TokenVerifier, Unauthenticated
from broker.model import AccessRequest, Grant, Identity, RequestStatus
from broker.service import Service
from broker.store import Tx

log = logging.getLogger(__name__)
GRANT_HEADER = "X-Hoop-Grant"
#: which input field an error code from the service is about
FIELD_OF = {"unknown_resource": "resource", "too_long": "duration", "reason": "reason", "label": "label",
            "resources": "resources", "duration": "duration", "wider": "resources", "longer": "duration",
            "no_grant_secret": GRANT_HEADER, "bad_credentials": GRANT_HEADER}
#: list endpoints filter by visibility and then limit: rows read per query, and at most in all
_SCAN_PAGE = 500
_SCAN_MAX = 20_000
#: a request body larger than this is refused with 413 (the app hosting the API allows more, for Slack)
MAX_BODY = 256 * 1024
#: what a path id can be (``new_id``: a letter and eight more); anything else names nothing, and
#: PostgreSQL would refuse some of it (a NUL) with an error rather than find no row
_ID = re.compile(r"[A-Za-z0-9_-]{1,32}")


class _Row(Protocol):
    @property
    def id(self) -> str: ...


T = TypeVar("T", bound=_Row)


@dataclass(frozen=True)
class Ctx:
    """What a handler gets: the validated inputs and the caller."""

    request: web.Request
    who: Identity
    body: Any
    query: Any
    api: Api

    def param(self, name: str) -> str:
        return self.request.match_info[name]


@dataclass
class Api:
    service: Service
    config: HoopConfig
    verifier: TokenVerifier
    clock: Clock
    inbox: SecretInbox


API_KEY = web.AppKey("hoop_api", Api)
Handler = Callable[[Ctx], Awaitable[BaseModel]]


# -- handlers ---------------------------------------------------------------------------------
async def whoami(c: Ctx) -> BaseModel:
    w = c.who
    return WhoAmI(email=w.email, name=w.name, kind=w.kind, acts_for=w.acts_for, groups=sorted(w.groups),
                  chain=list(w.chain))


async def create_request(c: Ctx) -> BaseModel:
    b: RequestCreate = c.body
    # the pickup key is stored with the request, so a grant issued at once (no approval steps) is sealed
    req = await c.api.service.request(c.who, b.resource, b.duration, b.reason, pickup_key=b.pickup_key)
    return RequestOut.of(req)


def _mine(who: Identity, requester: str, chain: tuple[str, ...]) -> bool:
    email = who.email.lower()
    return email == requester.lower() or email in (x.lower() for x in chain)


def _may_see_request(config: HoopConfig, who: Identity, r: AccessRequest) -> bool:
    """The rule for grants (:func:`_may_see`): a request's reason and people are not for every token holder."""
    return (_mine(who, r.requester, r.chain) or policy.is_admin(config, who)
            or policy.is_approver_of(config, who, r.resource))


async def _visible(c: Ctx, read: Callable[[Tx, int], Awaitable[list[T]]], keep: Callable[[T], bool],
                   limit: int) -> list[T]:
    """The newest ``limit`` rows the caller may see: filtered first, then limited, reading the
    store a page at a time. At most :data:`_SCAN_MAX` rows are read, so a caller who may see
    few rows cannot make one listing read a whole table; older rows are then left out."""
    out: dict[str, T] = {}  # by id: a row inserted meanwhile shifts the pages, and one may repeat
    async with c.api.service.store.tx() as tx:
        for offset in range(0, _SCAN_MAX, _SCAN_PAGE):
            page = await read(tx, offset)
            out.update((x.id, x) for x in page if keep(x))
            if len(out) >= limit or len(page) < _SCAN_PAGE:
                break
    return list(out.values())[:limit]


async def list_requests(c: Ctx) -> BaseModel:
    q: RequestsQuery = c.query

    def keep(r: AccessRequest) -> bool:
        return _mine(c.who, r.requester, r.chain) if q.mine else _may_see_request(c.api.config, c.who, r)

    async def read(tx: Tx, offset: int) -> list[AccessRequest]:
        return await tx.list_requests(status=q.status, resource=q.resource, limit=_SCAN_PAGE, offset=offset)

    rows = await _visible(c, read, keep, q.limit)
    return RequestList(requests=[RequestOut.of(r) for r in rows])


async def get_request(c: Ctx) -> BaseModel:
    async with c.api.service.store.tx() as tx:
        req = await tx.get_request(c.param("id"))
    if req is None or not _may_see_request(c.api.config, c.who, req):
        raise NotFound(f"no request {c.param('id')!r}", code="no_request")
    return RequestOut.of(req)


async def approve(c: Ctx) -> BaseModel:
    result = await c.api.service.approve(c.param("id"), c.who, via="api")
    if result.grant is not None and result.secret is not None:
        # the approver never sees the secret; the requester collects it from the inbox
        await c.api.inbox.offer(result.request, result.grant, result.secret,
                                connection_hints(c.api.config, result.grant, result.secret))
    granted = result.request.status is RequestStatus.APPROVED
    grant = GrantOut.of(result.grant, c.api.clock.now()) if result.grant is not None else None
    return ApproveOut(request=RequestOut.of(result.request), granted=granted, grant=grant)


async def deny(c: Ctx) -> BaseModel:
    b: Decision = c.body
    return RequestOut.of(await c.api.service.deny(c.param("id"), c.who, b.reason))


async def cancel(c: Ctx) -> BaseModel:
    return RequestOut.of(await c.api.service.cancel(c.param("id"), c.who))


async def collect(c: Ctx) -> BaseModel:
    async with c.api.service.store.tx() as tx:
        req = await tx.get_request(c.param("id"))
        grant = await tx.get_grant(req.grant_id) if req is not None and req.grant_id else None
    if req is None:
        raise NotFound(f"no request {c.param('id')!r}", code="no_request")
    if c.who.email.lower() != req.requester.lower():
        raise Denied("only the requester can collect this request's credential", code="not_requester")
    if req.status is not RequestStatus.APPROVED or grant is None:
        raise Conflict(f"request {req.id} is {req.status.value}; there is no credential yet", code=req.status.value)
    state, held = await c.api.inbox.collect(req.id)
    if held is None:
        why = {"collected": "was already collected", "expired": "expired before it was collected"}.get(
            state, "is not held by this broker (request with a pickup_key to collect from any replica)")
        raise Conflict(f"the credential of request {req.id} {why}; it is shown once", code="collected")
    return CredentialOut(grant=GrantOut.of(grant, c.api.clock.now()), login=grant.login, secret=held.secret,
                         hints=held.hints, sealed=held.sealed)


def _may_see(config: HoopConfig, who: Identity, g: Grant) -> bool:
    return (_mine(who, g.identity, g.chain) or policy.is_admin(config, who)
            or any(policy.is_approver_of(config, who, r) for r in g.resources))


async def list_grants(c: Ctx) -> BaseModel:
    q: GrantsQuery = c.query

    def keep(g: Grant) -> bool:
        return _mine(c.who, g.identity, g.chain) if q.mine else _may_see(c.api.config, c.who, g)

    async def read(tx: Tx, offset: int) -> list[Grant]:
        return await tx.list_grants(status=q.status, limit=_SCAN_PAGE, offset=offset)

    rows = await _visible(c, read, keep, q.limit)
    now = c.api.clock.now()
    return GrantList(grants=[GrantOut.of(g, now) for g in rows])


async def get_grant(c: Ctx) -> BaseModel:
    async with c.api.service.store.tx() as tx:
        g = await tx.get_grant(c.param("id"))
    if g is None or not _may_see(c.api.config, c.who, g):
        raise NotFound(f"no grant {c.param('id')!r}", code="no_grant")
    return GrantOut.of(g, c.api.clock.now())


async def revoke(c: Ctx) -> BaseModel:
    b: Decision = c.body
    g = await c.api.service.revoke(c.param("id"), c.who, b.reason)
    return GrantOut.of(g, c.api.clock.now())


async def delegate_grant(c: Ctx) -> BaseModel:
    b: DelegateBody = c.body
    secret = c.request.headers.get(GRANT_HEADER) or b.parent_secret or ""
    parent = await parent_by_secret(c.api.service, c.param("id"), secret)
    child, child_secret = await delegate(c.api.service, parent, c.who, b.resources, b.duration, b.label)
    return CredentialOut(grant=GrantOut.of(child, c.api.clock.now()), login=child.login, secret=child_secret,
                         hints=connection_hints(c.api.config, child, child_secret))


@dataclass(frozen=True)
class Route:
    doc: Doc
    handler: Handler


def _r(method: str, path: str, handler: Handler, summary: str, response: type[BaseModel], **kw: Any) -> Route:
    return Route(Doc(method=method, path=path, operation_id=handler.__name__, summary=summary, response=response,
                     **kw), handler)


ROUTES: tuple[Route, ...] = (
    _r("GET", "/me", whoami, "Who the bearer token says I am", WhoAmI, errors=(401,)),
    _r("POST", "/requests", create_request, "Ask for access", RequestOut, status=201, body=RequestCreate,
       errors=(401, 403, 422)),
    _r("GET", "/requests", list_requests, "List requests I may see (mine, or as approver or admin)", RequestList,
       query=RequestsQuery, errors=(401, 422)),
    _r("GET", "/requests/{id}", get_request, "Read a request I may see", RequestOut, errors=(401, 404)),
    _r("POST", "/requests/{id}/approve", approve, "Approve (members of a step's group; same rules as Slack)",
       ApproveOut),
    _r("POST", "/requests/{id}/deny", deny, "Deny", RequestOut, body=Decision),
    _r("POST", "/requests/{id}/cancel", cancel, "Cancel my request", RequestOut),
    _r("POST", "/requests/{id}/credential", collect, "Collect the granted credential (requester, once)",
       CredentialOut),
    _r("GET", "/grants", list_grants, "List grants I may see (mine, or as approver or admin)", GrantList,
       query=GrantsQuery, errors=(401, 422)),
    _r("GET", "/grants/{id}", get_grant, "Read a grant (never its secret)", GrantOut, errors=(401, 404)),
    _r("POST", "/grants/{id}/revoke", revoke, "Revoke a grant and every grant delegated from it", GrantOut,
       body=Decision),
    _r("POST", "/grants/{id}/delegate", delegate_grant, "Delegate a narrower credential to a sub-agent",
       CredentialOut, status=201, body=DelegateBody,
       headers=((GRANT_HEADER, "the parent grant's secret: proof of possession"),)),
)


# -- the generic wrapper, errors and the app ---------------------------------------------------
def _fields(exc: ValidationError, where: str) -> list[FieldError]:
    return [FieldError(loc=[where, *e["loc"]], message=e["msg"].removeprefix("Value error, "), type=e["type"])
            for e in exc.errors()]


def _error(status: int, body: ErrorOut, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(body.model_dump(mode="json"), status=status, headers=headers)


class _BadInput(Exception):
    def __init__(self, fields: list[FieldError]) -> None:
        super().__init__("invalid input")
        self.fields = fields


def _endpoint(route: Route) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    doc = route.doc

    async def handle(request: web.Request) -> web.StreamResponse:
        api = request.app[API_KEY]
        auth = request.headers.get("Authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("send Authorization: Bearer <OIDC token>", code="no_token")
        who = await api.verifier.verify(token.strip())
        for value in request.match_info.values():
            if not _ID.fullmatch(value):
                kind = doc.path.split("/")[1].removesuffix("s")  # /requests/{id} -> request
                raise NotFound(f"no {kind} {value[:40]!r}", code=f"no_{kind}")
        query = body = None
        if doc.query is not None:
            try:
                query = doc.query.model_validate(dict(request.query))
            except ValidationError as exc:
                raise _BadInput(_fields(exc, "query")) from None
        if doc.body is not None:
            # the request's own limit is the hosting app's, not this sub-application's
            raw = await request.clone(client_max_size=MAX_BODY).read()
            try:
                body = doc.body.model_validate_json(raw) if raw.strip() else doc.body.model_validate({})
            except ValidationError as exc:
                raise _BadInput(_fields(exc, "body")) from None
        out = await route.handler(Ctx(request=request, who=who, body=body, query=query, api=api))
        return web.json_response(text=out.model_dump_json(), status=doc.status)

    return handle


@web.middleware
async def errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                 ) -> web.StreamResponse:
    try:
        return await handler(request)
    except _BadInput as exc:
        first = exc.fields[0]
        field = ".".join(str(p) for p in first.loc[1:]) or first.loc[0]
        return _error(422, ErrorOut(error="invalid_input", message=f"{field}: {first.message}", field=str(field),
                                    fields=exc.fields))
    except Unauthenticated as exc:
        return _error(401, ErrorOut(error=exc.code, message=exc.message),
                      {"WWW-Authenticate": f'Bearer error="invalid_token", error_description="{exc.code}"'})
    except HoopError as exc:
        return _error(exc.http_status, ErrorOut(error=exc.code, message=exc.message, field=FIELD_OF.get(exc.code)))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = (exc.reason or "error").lower().replace(" ", "_")
        return _error(exc.status, ErrorOut(error=code, message=f"{request.method} {request.path}: {exc.reason}"))
    except Exception:
        log.exception("API %s %s failed", request.method, request.path)
        return _error(500, ErrorOut(error="internal", message="internal error; see the broker's log"))


def build_api(service: Service, config: HoopConfig, verifier: TokenVerifier, clock: Clock, *,
              inbox: SecretInbox | None = None) -> web.Application:
    """The API as an aiohttp sub-application: ``web_app.add_subapp("/api/v1", build_api(...))``.

    ``inbox`` must receive the broker's events (``bus.add(inbox)``) so API requesters can
    collect credentials approved elsewhere. When omitted, one is made and subscribed to
    ``service.notifier`` if that is a :class:`Broadcast`.
    """
    if inbox is None:
        inbox = SecretInbox(clock, service.store)
        if isinstance(service.notifier, Broadcast):
            service.notifier.add(inbox)
        else:
            log.warning("API credential pickup works only for approvals made through the API: "
                        "the service's notifier is not a Broadcast")
    app = web.Application(middlewares=[errors], client_max_size=MAX_BODY)
    app[API_KEY] = Api(service=service, config=config, verifier=verifier, clock=clock, inbox=inbox)
    spec = json.dumps(openapi([r.doc for r in ROUTES]), sort_keys=True)

    async def openapi_json(request: web.Request) -> web.Response:
        return web.Response(text=spec, content_type="application/json")

    app.router.add_get("/openapi.json", openapi_json)
    for route in ROUTES:
        app.router.add_route(route.doc.method, route.doc.path, _endpoint(route))
    return app


def api_of(app: web.Application) -> Api:
    """The API's dependencies (for the composition root and tests)."""
    return app[API_KEY]
