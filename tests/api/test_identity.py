"""OIDC bearer tokens against a local issuer served over HTTP: good, expired, wrong audience,
wrong issuer, unknown key, rotated key, discovery, and garbage."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest

from broker.clock import FakeClock
from broker.errors import UpstreamError
from broker.identity import HttpFetcher, TokenVerifier, Unauthenticated
from tests.api.conftest import AGENTS, api_config
from tests.support.oidc import AUDIENCE, LocalIssuer


@pytest.fixture
async def issuer(clock: FakeClock) -> AsyncIterator[LocalIssuer]:
    iss = await LocalIssuer(clock).start()
    try:
        yield iss
    finally:
        await iss.close()


@pytest.fixture
async def verifier(issuer: LocalIssuer, clock: FakeClock) -> AsyncIterator[TokenVerifier]:
    fetcher = HttpFetcher()
    try:
        yield TokenVerifier(api_config(issuer.url), fetcher, clock)
    finally:
        await fetcher.close()


async def refused(verifier: TokenVerifier, token: str) -> str:
    with pytest.raises(Unauthenticated) as exc:
        await verifier.verify(token)
    assert exc.value.http_status == 401
    return exc.value.code


async def test_person_token_maps_email_and_groups(issuer: LocalIssuer, verifier: TokenVerifier) -> None:
    who = await verifier.verify(issuer.mint("u1", email="Alice@Example.com", groups=["security", "not-a-hoop-group"],
                                            name="Alice"))
    assert who.email == "alice@example.com" and who.kind == "human" and who.name == "Alice"
    assert who.groups == {"eng", "security"}  # eng from config membership, security from the groups claim
    assert who.chain == ("alice@example.com",)
    assert issuer.discovery_hits == 1 and issuer.jwks_hits == 1  # found through the discovery document


async def test_configured_agent_acts_for_a_human(issuer: LocalIssuer, verifier: TokenVerifier) -> None:
    who = await verifier.verify(issuer.mint("client-ci-runner"))
    assert (who.kind, who.email, who.acts_for) == ("agent", "ci-runner", "alice@example.com")
    assert who.chain == ("alice@example.com", "ci-runner") and who.groups == {"eng"}


async def test_unknown_subject_without_email_is_refused(issuer: LocalIssuer, verifier: TokenVerifier) -> None:
    assert await refused(verifier, issuer.mint("client-unknown")) == "no_email"


@pytest.mark.parametrize("verified", [False, None, "true", 1], ids=["false", "missing", "string", "one"])
async def test_unverified_email_is_refused(issuer: LocalIssuer, verifier: TokenVerifier, verified: object) -> None:
    # an IdP with self sign-up: anyone may claim root@example.com (a hoop admin) without owning it
    token = issuer.mint("attacker", email="root@example.com", email_verified=verified)  # type: ignore[arg-type]
    with pytest.raises(Unauthenticated) as exc:
        await verifier.verify(token)
    assert exc.value.code == "email_unverified" and exc.value.http_status == 401
    assert "email_verified" in exc.value.message and "oidc.require_email_verified: false" in exc.value.message


async def test_unverified_email_is_accepted_when_the_check_is_off(issuer: LocalIssuer, clock: FakeClock) -> None:
    config = api_config(issuer.url, oidc={"issuer": issuer.url, "audience": AUDIENCE, "agents": AGENTS,
                                          "require_email_verified": False})
    default = api_config(issuer.url).oidc
    assert default is not None and default.require_email_verified is True
    fetcher = HttpFetcher()
    try:
        verifier = TokenVerifier(config, fetcher, clock)
        for verified in (False, None):
            who = await verifier.verify(issuer.mint("u1", email="bob@example.com", email_verified=verified))
            assert who.email == "bob@example.com" and who.kind == "human"
    finally:
        await fetcher.close()


async def test_groups_and_email_claims_are_configurable(issuer: LocalIssuer, clock: FakeClock) -> None:
    """Keycloak puts roles in ``roles``, Azure AD the address in ``upn`` (and sends no ``email_verified``):
    ``oidc.groups_claim`` and ``oidc.email_claim`` name them; the default ``groups`` claim then counts for
    nothing."""
    config = api_config(issuer.url, oidc={"issuer": issuer.url, "audience": AUDIENCE, "agents": AGENTS,
                                          "groups_claim": "roles", "email_claim": "upn",
                                          "require_email_verified": False})
    fetcher = HttpFetcher()
    try:
        verifier = TokenVerifier(config, fetcher, clock)
        token = issuer.mint("u1", upn="Frank@Example.com", roles=["security", "not-a-hoop-group"], groups=["admins"])
        who = await verifier.verify(token)
        assert who.email == "frank@example.com" and who.groups == {"security"}
        token = issuer.mint("u2", upn="gina@example.com", roles="security eng")
        assert (await verifier.verify(token)).groups == {"security", "eng"}  # a space-separated string too
        # dba is a team an agent acts for (dba-team-bot): its members are the config's, whatever a token says,
        # since every approval check compares them (a member by token alone could be approved for by the bot)
        token = issuer.mint("u3", upn="zoe@example.com", roles=["dba", "security"])
        assert (await verifier.verify(token)).groups == {"security"}
        assert await refused(verifier, issuer.mint("u4", email="root@example.com")) == "no_email"
    finally:
        await fetcher.close()


async def test_agents_need_no_email_verified(issuer: LocalIssuer, verifier: TokenVerifier) -> None:
    # a client-credentials token has no email at all; an agent is named by its configured subject
    for email, verified in ((None, None), ("root@example.com", False)):
        who = await verifier.verify(issuer.mint("client-ci-runner", email=email, email_verified=verified))
        assert (who.kind, who.email) == ("agent", "ci-runner")


async def test_expired_token(issuer: LocalIssuer, verifier: TokenVerifier, clock: FakeClock) -> None:
    token = issuer.mint("u1", email="bob@example.com", expires_in=timedelta(minutes=5))
    assert (await verifier.verify(token)).email == "bob@example.com"
    clock.advance(timedelta(minutes=5, seconds=31))  # past exp and the 30 s leeway
    assert await refused(verifier, token) == "expired_token"


async def test_wrong_audience_and_wrong_issuer(issuer: LocalIssuer, verifier: TokenVerifier) -> None:
    assert await refused(verifier, issuer.mint("u1", email="bob@example.com", audience="another-app")) == "bad_aud"
    assert await refused(verifier, issuer.mint("u1", email="bob@example.com",
                                               issuer="https://evil.example")) == "bad_iss"


async def test_unknown_key_is_refused_and_refetching_is_rate_limited(
        issuer: LocalIssuer, verifier: TokenVerifier, clock: FakeClock) -> None:
    await verifier.verify(issuer.mint("u1", email="bob@example.com"))
    assert verifier.fetches == 1
    forged = issuer.mint("u1", email="bob@example.com", key=LocalIssuer.stranger_key())
    for _ in range(5):
        assert await refused(verifier, forged) == "unknown_key"
    assert verifier.fetches == 1 and issuer.jwks_hits == 1  # a stream of unknown kids cannot hammer the issuer
    clock.advance(timedelta(seconds=31))
    assert await refused(verifier, forged) == "unknown_key"
    assert verifier.fetches == 2  # one refresh once the interval passed, still no such key


async def test_an_unreachable_issuer_leaves_the_cached_keys_in_use_and_is_retried_with_back_off(
        issuer: LocalIssuer, verifier: TokenVerifier, clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    """A failed fetch used to count as no fetch: after max_age every token failed while the
    issuer was down, and every request (and every unknown kid) fetched again."""
    await verifier.verify(issuer.mint("u1", email="bob@example.com"))
    issuer.down = True
    clock.advance(timedelta(hours=1, seconds=1))  # past max_age: a refresh is due, and fails
    for _ in range(5):
        assert (await verifier.verify(issuer.mint("u1", email="bob@example.com"))).email == "bob@example.com"
    forged = issuer.mint("u1", email="bob@example.com", key=LocalIssuer.stranger_key())
    with pytest.raises(UpstreamError):  # maybe a rotation hoop could not fetch: not the caller's fault
        await verifier.verify(forged)
    assert issuer.discovery_hits == 2  # the first fetch, then one try for all of these
    assert "HTTP 503 (1 failure(s) in a row); keeping the keys fetched at" in caplog.text
    clock.advance(timedelta(seconds=31))
    await verifier.verify(issuer.mint("u1", email="bob@example.com"))
    assert issuer.discovery_hits == 3
    clock.advance(timedelta(seconds=31))  # after two failures the next try waits 60s
    await verifier.verify(issuer.mint("u1", email="bob@example.com"))
    assert issuer.discovery_hits == 3
    clock.advance(timedelta(hours=6))  # past max_age and the grace: the cached keys are not used any more
    with pytest.raises(UpstreamError) as exc:
        await verifier.verify(issuer.mint("u1", email="bob@example.com"))
    assert exc.value.code == "idp" and issuer.discovery_hits == 4
    issuer.down = False
    clock.advance(timedelta(minutes=5))
    assert (await verifier.verify(issuer.mint("u1", email="bob@example.com"))).email == "bob@example.com"
    assert verifier.fetches == 2 and issuer.discovery_hits == 5


async def test_known_kid_with_a_foreign_signature(issuer: LocalIssuer, verifier: TokenVerifier) -> None:
    token = issuer.mint("u1", email="bob@example.com", key=LocalIssuer.stranger_key(), kid=issuer.kid)
    assert await refused(verifier, token) == "bad_signature"


async def test_rotated_key_refreshes_the_jwks(issuer: LocalIssuer, verifier: TokenVerifier,
                                              clock: FakeClock) -> None:
    old = issuer.mint("u1", email="bob@example.com")
    await verifier.verify(old)
    issuer.rotate()  # the old key is withdrawn, a new kid signs from now on
    clock.advance(timedelta(seconds=31))
    new = issuer.mint("u1", email="bob@example.com")
    assert (await verifier.verify(new)).email == "bob@example.com"
    assert verifier.fetches == 2 and issuer.jwks_hits == 2
    assert await refused(verifier, old) == "unknown_key"


async def test_cached_keys_are_reused(issuer: LocalIssuer, verifier: TokenVerifier) -> None:
    for n in range(5):
        await verifier.verify(issuer.mint(f"u{n}", email="bob@example.com"))
    assert issuer.jwks_hits == 1


def _b64(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


async def test_garbage_and_unsigned_tokens(issuer: LocalIssuer, verifier: TokenVerifier) -> None:
    assert await refused(verifier, "not-a-jwt") == "bad_token"
    assert await refused(verifier, "") == "no_token"
    unsigned = f"{_b64({'alg': 'none'})}.{_b64({'sub': 'x', 'email': 'bob@example.com'})}."
    assert await refused(verifier, unsigned) == "bad_token"
    hmac_alg = f"{_b64({'alg': 'HS256', 'kid': issuer.kid})}.{_b64({'sub': 'x'})}.c2ln"
    assert await refused(verifier, hmac_alg) == "bad_token"
