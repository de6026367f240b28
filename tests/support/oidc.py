"""A local OIDC issuer for tests: EC keys made with joserfc, the discovery document and the
JWKS served by aiohttp on 127.0.0.1:0, and tokens minted with whatever claims a test wants."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from aiohttp import web
from joserfc import jwt
from joserfc.jwk import ECKey

from broker.clock import Clock

AUDIENCE = "hoop-api"


class LocalIssuer:
    def __init__(self, clock: Clock, *, audience: str = AUDIENCE) -> None:
        self.clock = clock
        self.audience = audience
        self.keys: list[ECKey] = []
        self._n = 0
        self.jwks_hits = 0
        self.discovery_hits = 0
        #: while set, the discovery document and the JWKS answer HTTP 503 (an outage)
        self.down = False
        self._runner: web.AppRunner | None = None
        self.url = ""
        self.rotate()

    def rotate(self, *, keep_old: bool = False) -> str:
        """Make a new signing key; the JWKS then publishes it (and the old one if ``keep_old``)."""
        self._n += 1
        key = ECKey.generate_key("P-256", parameters={"kid": f"key-{self._n}", "alg": "ES256", "use": "sig"})
        self.keys = [*self.keys, key] if keep_old else [key]
        return str(key.kid)

    @property
    def kid(self) -> str:
        return str(self.keys[-1].kid)

    async def start(self) -> LocalIssuer:
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self._discovery)
        app.router.add_get("/jwks", self._jwks)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _discovery(self, request: web.Request) -> web.Response:
        self.discovery_hits += 1
        if self.down:
            return web.Response(status=503)
        return web.json_response({"issuer": self.url, "jwks_uri": f"{self.url}/jwks",
                                  "id_token_signing_alg_values_supported": ["ES256"]})

    async def _jwks(self, request: web.Request) -> web.Response:
        self.jwks_hits += 1
        if self.down:
            return web.Response(status=503)
        return web.json_response({"keys": [k.as_dict(private=False) for k in self.keys]})

    def mint(self, sub: str, *, email: str | None = None, groups: list[str] | None = None,
             audience: str | None = None, expires_in: timedelta = timedelta(minutes=10),
             issuer: str | None = None, key: ECKey | None = None, kid: str | None = None,
             email_verified: bool | None = True, **extra: Any) -> str:
        """A signed token. ``key`` signs (default: the newest); ``kid`` overrides the header's kid.
        With an ``email``, the token says ``email_verified`` as given (``None`` leaves the claim out)."""
        now = int(self.clock.now().timestamp())
        claims: dict[str, Any] = {"iss": issuer or self.url, "sub": sub, "aud": audience or self.audience,
                                  "iat": now, "exp": now + int(expires_in.total_seconds()), **extra}
        if email is not None:
            claims["email"] = email
            if email_verified is not None:
                claims["email_verified"] = email_verified
        if groups is not None:
            claims["groups"] = groups
        signer = key or self.keys[-1]
        return jwt.encode({"alg": "ES256", "kid": kid or str(signer.kid)}, claims, signer)

    @staticmethod
    def stranger_key() -> ECKey:
        """A key the issuer never published."""
        return ECKey.generate_key("P-256", parameters={"kid": "stranger", "alg": "ES256"})
