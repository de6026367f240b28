"""Nested agents: a grant holder hands a sub-agent a credential that can only narrow.

A child grant's resources are a subset of its parent's, it expires no later than its parent,
its depth stays within ``delegation.max_depth``, and no grant has more than
``delegation.max_children`` live children at once. Its chain is the parent's chain plus the
child's label (``alice → ci-runner → migration-script``), so every audit entry and session of
the child names every hop behind it. An attempt to widen, lengthen, deepen or fan out too far
is refused with :class:`Denied` (HTTP 403) *and* leaves a ``grant.delegation_refused`` audit
entry.

The child gets its own login and secret and is an ordinary grant to the proxies: the Gate
checks any grant. Revoking or expiring a parent ends all its descendants (``Service._end``
walks them), and a child's own expiry is scheduled from the :class:`GrantIssued` event.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from datetime import timedelta

from broker import credentials
from broker.duration import format_duration, parse_duration
from broker.errors import Denied, InvalidInput, NotFound
from broker.events import GrantIssued
from broker.hints import connection_hints
from broker.model import Grant, GrantStatus, Identity
from broker.service import Service, new_id

log = logging.getLogger(__name__)
LABEL = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")


async def parent_by_secret(service: Service, grant_id: str, secret: str) -> Grant:
    """Proof of possession: the grant whose secret this is, which must be ``grant_id``."""
    if not secret:
        raise Denied("delegating needs the parent grant's secret (header X-Hoop-Grant)", code="no_grant_secret")
    async with service.store.tx() as tx:
        grant = await tx.grant_by_digest(credentials.digest(secret))
    if grant is None or grant.id != grant_id:
        raise Denied(f"the presented secret is not the credential of grant {grant_id}", code="bad_credentials")
    return grant


def _holds(who: Identity, parent: Grant) -> bool:
    email = who.email.lower()
    return email == parent.identity.lower() or email in (c.lower() for c in parent.chain)


async def _refuse(service: Service, parent: Grant, who: Identity, label: str, code: str, message: str,
                  detail: dict[str, object]) -> Denied:
    async with service.store.tx() as tx:
        req = await service.request_for(tx, parent)
        await tx.append_audit(at=service.clock.now(), actor=who.email, chain=(*parent.chain, label),
                              action="grant.delegation_refused", grant_id=parent.id,
                              request_id=req.id if req else None,
                              detail={"parent": parent.id, "code": code, "reason": message, **detail})
    return Denied(message, code=code)


async def delegate(service: Service, parent: Grant, who: Identity, resources: Sequence[str],
                   duration: timedelta | str | None, label: str) -> tuple[Grant, str]:
    """Issue a child of ``parent`` for ``who`` (who holds the parent's secret). Returns the child
    grant and its secret, shown once. ``duration`` ``None`` means the parent's remaining time."""
    label = label.strip().lower()
    if not LABEL.match(label):
        raise InvalidInput("label must be 1-63 characters of a-z, 0-9, '.', '_' or '-'", code="label")
    if not resources:
        raise InvalidInput("delegate at least one resource", code="resources")
    wanted = tuple(dict.fromkeys(resources))
    length = parse_duration(duration) if isinstance(duration, str) else duration
    if length is not None and length <= timedelta(0):
        raise InvalidInput("duration must be positive", code="duration")
    asked: dict[str, object] = {"resources": list(wanted), "label": label,
                                "duration": format_duration(length) if length else None}
    now = service.clock.now()
    max_depth = service.config.delegation.max_depth
    max_children = service.config.delegation.max_children

    async with service.store.tx() as tx:
        fresh = await tx.get_grant(parent.id, lock=True)
        if fresh is None:
            raise NotFound(f"no grant {parent.id!r}", code="no_grant")
        parent = fresh
        refusal: tuple[str, str] | None = None
        if not _holds(who, parent):
            refusal = ("not_holder", f"{who.email} is not the holder of grant {parent.id} nor in its chain")
        elif parent.status is not GrantStatus.ACTIVE or parent.expires_at <= now:
            state = parent.status.value if parent.status is not GrantStatus.ACTIVE else "expired"
            refusal = (state, f"grant {parent.id} is {state}; it cannot delegate")
        elif wider := [r for r in wanted if r not in parent.resources]:
            refusal = ("wider", f"a delegated grant cannot be wider than its parent: {', '.join(wider)} "
                                f"not in {', '.join(parent.resources)}")
        elif length is not None and now + length > parent.expires_at:
            refusal = ("longer", f"a delegated grant cannot outlive its parent: {format_duration(length)} asked, "
                                 f"{format_duration(parent.remaining(now))} left")
        elif parent.depth + 1 > max_depth:
            refusal = ("too_deep", f"delegation depth is limited to {max_depth}; grant {parent.id} is at depth "
                                   f"{parent.depth}")
        elif await tx.live_children(parent.id, now) >= max_children:  # counted under the parent's row lock
            refusal = ("too_many_children", f"grant {parent.id} already has {max_children} live delegated grants, "
                                            "the most delegation.max_children allows; revoke one first")
        if refusal is None:
            req = await service.request_for(tx, parent)
            secret = credentials.mint_secret()
            child = Grant(id=new_id("g"), login=credentials.mint_login(label), identity=label,
                          chain=(*parent.chain, label), resources=wanted, status=GrantStatus.ACTIVE,
                          created_at=now, expires_at=now + length if length is not None else parent.expires_at,
                          parent_id=parent.id, depth=parent.depth + 1, label=label)
            await tx.insert_grant(child, secret_digest=credentials.digest(secret),
                                  scram_verifier=credentials.scram_verifier(secret))
            await tx.append_audit(at=now, actor=who.email, chain=child.chain, action="grant.delegated",
                                  request_id=req.id if req else None, grant_id=child.id,
                                  detail={"parent": parent.id, "login": child.login, "label": label,
                                          "resources": list(wanted), "depth": child.depth,
                                          "expires_at": child.expires_at.isoformat(), "chain": list(child.chain)})
    if refusal is not None:
        raise await _refuse(service, parent, who, label, refusal[0], refusal[1], asked)

    # (as for every grant: a database error on its ephemeral role is logged, and the child still handed out,
    # rather than a 502 that leaves a live child nobody holds the secret of)
    child = await service._after_issue(child)
    try:
        await service.notifier.publish(GrantIssued(grant=child, request=req, secret=secret,
                                                   hints=connection_hints(service.config, child, secret)))
    except Exception:
        log.exception("publishing the delegation of %s failed", child.id)
    return child, secret
