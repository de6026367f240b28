"""The single access check the proxies and the API call: credential, then state and resource."""

from __future__ import annotations

from broker import credentials
from broker.errors import Denied
from broker.model import Grant, GrantStatus
from broker.service.core import ServiceCore


class AccessCheck(ServiceCore):
    """Who a credential belongs to and whether it opens a resource now; it changes no state."""

    async def authenticate(self, login: str, secret: str, resource: str) -> Grant:
        """Secret + login + resource + now -> the grant, or :class:`Denied` with a reason code:
        ``bad_credentials`` (unknown login or wrong secret: indistinguishable), ``expired``,
        ``revoked``, ``wrong_resource``."""
        return self.authorize(await self.identify(login, secret), resource)

    async def identify(self, login: str, secret: str) -> Grant:
        """The credential check alone: the grant whose login and secret these are, whatever its state.

        Raises :class:`Denied` ``bad_credentials``. An unknown login costs the same lookup and digest
        comparison as a wrong secret; :meth:`authorize` then decides state and resource without I/O.
        """
        async with self.store.tx() as tx:
            found = await tx.grant_by_login(login)
        ok = credentials.matches(secret, found[1] if found else credentials.digest(""))
        if found is None or not ok:
            raise Denied(f"authentication failed for {login!r}", code="bad_credentials")
        return found[0]

    async def authenticate_secret(self, secret: str, resource: str) -> Grant:
        """For bearer credentials (HTTP proxy, API): the secret alone identifies the grant."""
        async with self.store.tx() as tx:
            grant = await tx.grant_by_digest(credentials.digest(secret))
        if grant is None:
            raise Denied("authentication failed: unknown credential", code="bad_credentials")
        return self.authorize(grant, resource)

    async def scram_lookup(self, login: str) -> tuple[Grant | None, str | None]:
        """For SCRAM: the grant and its stored verifier, or ``(None, None)`` for an unknown login."""
        async with self.store.tx() as tx:
            found = await tx.grant_by_login(login)
        return (found[0], found[2]) if found else (None, None)

    def authorize(self, grant: Grant, resource: str) -> Grant:
        now = self.clock.now()
        if grant.status is GrantStatus.REVOKED:
            raise Denied(f"access for {grant.login} was revoked", code="revoked")
        if grant.status is GrantStatus.EXPIRED or now >= grant.expires_at:
            raise Denied(f"access for {grant.login} has expired", code="expired")
        if resource not in grant.resources:
            raise Denied(f"{grant.login} has no access to {resource!r}", code="wrong_resource")
        return grant
