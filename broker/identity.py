"""Who is calling the API: OIDC bearer tokens checked against the issuer's keys.

How this works: :class:`TokenVerifier` reads the token's header without trusting it, finds
the signing key by ``kid`` in a cached JWKS, and checks the signature (joserfc) and then the
claims: ``iss`` equals the configured issuer, ``aud`` contains the configured audience, and
``exp`` (and ``nbf``/``iat`` when present) hold against the injected :class:`Clock`.

The JWKS comes from ``oidc.jwks_url`` or, when that is unset, from the ``jwks_uri`` of the
issuer's discovery document. It is cached; an unknown ``kid`` (the issuer rotated its keys)
triggers one refresh, at most once per ``refresh_interval`` so a stream of forged ``kid``
values cannot make hoop hammer the issuer. The cache is also refreshed after ``max_age``.
A fetch that fails is not retried before ``refresh_interval``, doubled after each further
failure up to ``max_backoff``; meanwhile the cached keys stay in use, for at most
``stale_grace`` past ``max_age``, and every failure is logged. Without usable keys a token
cannot be checked: :class:`UpstreamError`.

A token whose ``sub`` is a configured agent (``oidc.agents``) becomes an agent identity:
``Identity(kind="agent", email=<agent name>, acts_for=..., chain=(acts_for, name))``. Any other
token is a person, named by the configured email claim, which must be verified
(``email_verified: true``) unless ``oidc.require_email_verified`` is off; their groups are the
config groups they are listed in plus configured group names found in the configured groups claim.

The HTTP fetch sits behind :class:`JsonFetcher`, so tests and other transports can replace it.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta
from typing import Any, Protocol

import aiohttp
from joserfc import jws, jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from joserfc.jwt import JWTClaimsRegistry

from broker import policy
from broker.clock import Clock
from broker.config import HoopConfig, Oidc
from broker.errors import ConfigError, Denied, UpstreamError
from broker.model import Identity

log = logging.getLogger(__name__)
ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
_MAX_TOKEN = 16_384


class Unauthenticated(Denied):
    """No usable credential was presented (HTTP 401, ``WWW-Authenticate: Bearer``)."""

    http_status = 401


class JsonFetcher(Protocol):
    """Fetch a JSON document over HTTP(S). Raises :class:`UpstreamError` on any failure."""

    async def fetch_json(self, url: str) -> dict[str, Any]: ...


class HttpFetcher:
    """:class:`JsonFetcher` over aiohttp. Owns its client session: call :meth:`close`."""

    def __init__(self, *, timeout: float = 5.0) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def fetch_json(self, url: str) -> dict[str, Any]:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        try:
            async with self._session.get(url, headers={"Accept": "application/json"}) as resp:
                if resp.status != 200:
                    raise UpstreamError(f"identity provider: GET {url} returned HTTP {resp.status}", code="idp")
                data = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise UpstreamError(f"identity provider: GET {url} failed: {type(exc).__name__}", code="idp") from None
        if not isinstance(data, dict):
            raise UpstreamError(f"identity provider: {url} did not return a JSON object", code="idp")
        return data

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class TokenVerifier:
    """Bearer token -> :class:`Identity`, or :class:`Unauthenticated` with the reason."""

    def __init__(self, config: HoopConfig, fetcher: JsonFetcher, clock: Clock, *,
                 refresh_interval: timedelta = timedelta(seconds=30), max_age: timedelta = timedelta(hours=1),
                 stale_grace: timedelta = timedelta(hours=6), max_backoff: timedelta = timedelta(minutes=5),
                 leeway: timedelta = timedelta(seconds=30)) -> None:
        if config.oidc is None:
            raise ConfigError("the API needs an oidc: section (issuer, audience) to check bearer tokens")
        self.config = config
        self.oidc: Oidc = config.oidc
        self.fetcher = fetcher
        self.clock = clock
        self.refresh_interval = refresh_interval
        self.max_age = max_age
        self.stale_grace = stale_grace
        self.max_backoff = max_backoff
        self.leeway = leeway
        self._keys: KeySet | None = None
        self._fetched_at: datetime | None = None  # the last fetch that worked
        self._tried_at: datetime | None = None  # the last fetch, whether it worked or not
        self._failures = 0  # fetches that failed since the last one that worked
        self._lock = asyncio.Lock()
        #: how many times the JWKS was fetched (for operators' metrics and for tests)
        self.fetches = 0
        self._agents = {a.subject: a for a in self.oidc.agents}

    async def _jwks_url(self) -> str:
        if self.oidc.jwks_url:
            return self.oidc.jwks_url
        url = self.oidc.issuer.rstrip("/") + "/.well-known/openid-configuration"
        doc = await self.fetcher.fetch_json(url)
        if doc.get("issuer") != self.oidc.issuer:
            raise UpstreamError(f"identity provider: discovery document at {url} names a different issuer",
                                code="idp")
        jwks_uri = doc.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not jwks_uri:
            raise UpstreamError(f"identity provider: discovery document at {url} has no jwks_uri", code="idp")
        return jwks_uri

    def _may_fetch(self, now: datetime) -> bool:
        if self._tried_at is None:
            return True
        wait = self.refresh_interval
        if self._failures:  # back off: the interval, doubled per further failure, up to max_backoff
            wait = max(min(self.refresh_interval * 2 ** min(self._failures - 1, 20), self.max_backoff), wait)
        return now - self._tried_at >= wait

    def _usable(self, now: datetime) -> KeySet | None:
        """The cached keys, unless they are older than ``max_age`` plus ``stale_grace``."""
        if self._keys is None or self._fetched_at is None:
            return None
        return self._keys if now - self._fetched_at < self.max_age + self.stale_grace else None

    async def _refresh(self) -> None:
        """Fetch the JWKS, unless another caller just tried (the rate limit, and the back-off
        after failures). A failure is logged and leaves the cached keys as they are."""
        async with self._lock:
            now = self.clock.now()
            if not self._may_fetch(now):
                return
            self._tried_at = now
            try:
                doc = await self.fetcher.fetch_json(await self._jwks_url())
                try:
                    keys = KeySet.import_key_set(doc)  # type: ignore[arg-type]
                except (JoseError, ValueError, TypeError, KeyError):
                    raise UpstreamError("identity provider: the JWKS document is not a valid key set",
                                        code="idp") from None
            except UpstreamError as exc:
                self._failures += 1
                if self._fetched_at is None:
                    kept = "no keys were ever fetched, so no token can be checked"
                else:
                    kept = (f"keeping the keys fetched at {self._fetched_at.isoformat()} until "
                            f"{(self._fetched_at + self.max_age + self.stale_grace).isoformat()}")
                log.warning("%s (%d failure(s) in a row); %s", exc.message, self._failures, kept)
                return
            self._keys, self._fetched_at, self._failures = keys, now, 0
            self.fetches += 1

    async def _key_for(self, kid: str | None) -> Any:
        if self._fetched_at is None or self.clock.now() - self._fetched_at >= self.max_age:
            await self._refresh()
        keys = self._usable(self.clock.now())
        key = _find(keys, kid) if keys is not None else None
        if key is None:
            await self._refresh()  # a rotation; rate-limited inside
            keys = self._usable(self.clock.now())
            key = _find(keys, kid) if keys is not None else None
        if key is None and (keys is None or self._failures):
            # no keys, or a kid that may be a rotation hoop could not fetch: not the caller's fault
            raise UpstreamError("identity provider: its signing keys could not be fetched, so the token cannot be "
                                "checked; try again later", code="idp")
        if key is None:
            raise Unauthenticated("the token is signed with a key the issuer does not publish", code="unknown_key")
        return key

    async def verify(self, token: str) -> Identity:
        if not token or len(token) > _MAX_TOKEN:
            raise Unauthenticated("a bearer token is required", code="no_token")
        try:
            header = jws.extract_compact(token.encode("ascii")).headers()
        except (JoseError, ValueError, UnicodeEncodeError):
            raise Unauthenticated("the bearer token is not a signed JWT", code="bad_token") from None
        if header.get("alg") not in ALGORITHMS:
            raise Unauthenticated("the token's signing algorithm is not accepted", code="bad_token")
        kid = header.get("kid")
        key = await self._key_for(kid if isinstance(kid, str) else None)
        try:
            decoded = jwt.decode(token, key, algorithms=list(ALGORITHMS))
        except JoseError:
            raise Unauthenticated("the token's signature does not verify", code="bad_signature") from None
        claims = decoded.claims
        self._check_claims(claims)
        return self.identity(claims)

    def _check_claims(self, claims: dict[str, Any]) -> None:
        registry = JWTClaimsRegistry(
            now=lambda: int(self.clock.now().timestamp()), leeway=int(self.leeway.total_seconds()),
            iss={"essential": True, "value": self.oidc.issuer},
            aud={"essential": True, "value": self.oidc.audience},
            exp={"essential": True}, sub={"essential": True},
        )
        try:
            registry.validate(claims)
        except JoseError as exc:
            name = getattr(exc, "claim", None) or "token"
            reason = {"exp": "the token has expired", "aud": "the token is not meant for hoop (audience)",
                      "iss": "the token was issued by another issuer", "nbf": "the token is not valid yet",
                      "iat": "the token was issued in the future"}.get(name, f"the token's {name} claim is invalid")
            code = "expired_token" if name == "exp" else f"bad_{name}"
            raise Unauthenticated(reason, code=code) from None

    def identity(self, claims: dict[str, Any]) -> Identity:
        """Map verified claims to an :class:`Identity` (agent or person)."""
        sub = str(claims["sub"])
        agent = self._agents.get(sub)
        if agent is not None:
            chain = (agent.acts_for, agent.name) if agent.acts_for else (agent.name,)
            groups = frozenset(g for g in agent.groups if g in self.config.groups)
            return Identity(email=agent.name, name=agent.name, groups=groups, kind="agent",
                            acts_for=agent.acts_for, chain=chain)
        email = claims.get(self.oidc.email_claim)
        if not isinstance(email, str) or "@" not in email:
            raise Unauthenticated(f"the token has no {self.oidc.email_claim!r} claim and its subject is not a "
                                  "configured agent", code="no_email")
        if self.oidc.require_email_verified and claims.get("email_verified") is not True:
            raise Unauthenticated("the token's email_verified claim is not true, so its email may not belong to the "
                                  "caller; if your identity provider verifies addresses but never sends this "
                                  "claim, set oidc.require_email_verified: false", code="email_unverified")
        email = email.strip().lower()
        claimed = claims.get(self.oidc.groups_claim) or []
        if isinstance(claimed, str):
            claimed = claimed.split()
        # (not a group an agent acts for: whom such an agent speaks for is the group's members as the config
        # lists them, the one membership every approval check can see; broker.policy.team_members)
        teams = {a.acts_for for a in self.oidc.agents if a.acts_for}
        from_idp = {g for g in claimed if isinstance(g, str) and g in self.config.groups and g not in teams}
        groups = policy.groups_of(self.config, email) | from_idp
        name = claims.get("name")
        return Identity(email=email, name=name if isinstance(name, str) else "", groups=groups)


def _find(keys: KeySet, kid: str | None) -> Any:
    if kid is None:
        return keys.keys[0] if len(keys.keys) == 1 else None
    for key in keys.keys:
        if key.kid == kid:
            return key
    return None
