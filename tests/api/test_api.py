"""The REST API over real HTTP against a real Service: requests by agents, approval rules,
credential pickup, grants, errors that name the field, and the generated OpenAPI document."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest

from broker.api import ROUTES
from broker.api_models import RequestCreate
from broker.errors import Denied
from broker.model import AccessRequest, Grant, GrantStatus, RequestStatus, StepSpec
from tests.api.conftest import Harness, harness, store_url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def hh(request: pytest.FixtureRequest, tmp_path: Any) -> AsyncIterator[Harness]:
    async with harness(store_url(request, tmp_path, "api")) as h:
        yield h


async def test_agent_request_chain_approval_rules_and_pickup(hh: Harness) -> None:
    h = hh
    status, req = await h.call("POST", "/requests", "ci-runner",
                               json={"resource": "reports-db", "duration": "30m", "reason": "nightly migration"})
    assert status == 201, req
    assert req["requester"] == "ci-runner" and req["chain"] == ["alice@example.com", "ci-runner"]
    assert req["chain_text"] == "alice@example.com → ci-runner" and req["status"] == "pending"
    rid = req["id"]

    status, body = await h.call("POST", f"/requests/{rid}/approve", "alice@example.com")
    assert (status, body["error"]) == (403, "in_chain")  # the human the agent acts for cannot approve
    status, body = await h.call("POST", f"/requests/{rid}/approve", "dana@example.com")
    assert (status, body["error"]) == (403, "not_approver")  # not in the step's group
    status, body = await h.call("POST", f"/requests/{rid}/approve", "ci-runner")
    assert (status, body["error"]) == (403, "self_approval")

    status, body = await h.call("POST", f"/requests/{rid}/approve", "bob@example.com")
    assert status == 200 and body["granted"] is True
    assert body["request"]["approvals"][0]["via"] == "api"
    assert "hoop_" not in json.dumps(body)  # the approver never sees the secret
    grant_id = body["grant"]["id"]

    status, body = await h.call("POST", f"/requests/{rid}/credential", "bob@example.com")
    assert (status, body["error"]) == (403, "not_requester")
    status, cred = await h.call("POST", f"/requests/{rid}/credential", "ci-runner")
    assert status == 200 and cred["secret"].startswith("hoop_") and cred["grant"]["id"] == grant_id
    grant = await h.service.authenticate(cred["login"], cred["secret"], "reports-db")
    assert grant.chain == ("alice@example.com", "ci-runner")
    status, body = await h.call("POST", f"/requests/{rid}/credential", "ci-runner")
    assert (status, body["error"]) == (409, "collected")  # shown once

    status, body = await h.call("GET", f"/requests/{rid}", "carol@example.com")
    assert status == 200 and body["status"] == "approved" and body["steps"][0]["approvers"] == ["bob@example.com"]


async def test_an_agent_cannot_approve_for_the_human_it_acts_for(h: Harness) -> None:
    _, req = await h.call("POST", "/requests", "alice@example.com", json={"resource": "reports-db", "reason": "x"})
    status, body = await h.call("POST", f"/requests/{req['id']}/approve", "ci-runner")  # acts for alice
    assert (status, body["error"]) == (403, "in_chain") and "alice@example.com" in body["message"]
    status, body = await h.call("POST", f"/requests/{req['id']}/approve", "stranger-bot")  # acts for nobody here
    assert status == 200 and body["granted"] is True
    assert body["request"]["approvals"][0]["approver"] == "stranger-bot"


async def test_the_team_an_agent_acts_for_cannot_approve_it(h: Harness) -> None:
    status, req = await h.call("POST", "/requests", "dba-team-bot", json={"resource": "prod-db", "reason": "x"})
    assert status == 201 and req["chain"] == ["dba", "dba-team-bot"]
    for member in ("dana@example.com", "erin@example.com"):  # dba, the team it acts for (erin is in security too)
        status, body = await h.call("POST", f"/requests/{req['id']}/approve", member)
        assert (status, body["error"]) == (403, "in_chain") and "dba" in body["message"]
    status, body = await h.call("POST", f"/requests/{req['id']}/approve", "sam@example.com")  # security, not dba
    assert status == 200 and body["granted"] is False
    assert [a["approver"] for a in body["request"]["approvals"]] == ["sam@example.com"]


async def test_approval_arriving_elsewhere_reaches_the_api_requester(h: Harness) -> None:
    _, req = await h.call("POST", "/requests", "ci-runner", json={"resource": "reports-db", "reason": "x"})
    status, body = await h.call("POST", f"/requests/{req['id']}/credential", "ci-runner")
    assert (status, body["error"]) == (409, "pending")
    from broker.model import Identity
    from broker.policy import groups_of

    bob = Identity(email="bob@example.com", groups=groups_of(h.service.config, "bob@example.com"))
    await h.service.approve(req["id"], bob)  # e.g. a reaction in Slack
    status, cred = await h.call("POST", f"/requests/{req['id']}/credential", "ci-runner")
    assert status == 200 and (await h.service.authenticate_secret(cred["secret"], "reports-db")).id


async def test_deny_and_cancel(h: Harness) -> None:
    _, req = await h.call("POST", "/requests", "carol@example.com", json={"resource": "prod-db", "reason": "x"})
    status, body = await h.call("POST", f"/requests/{req['id']}/deny", "bob@example.com", json={"reason": "no"})
    assert (status, body["error"]) == (403, "not_approver")
    status, body = await h.call("POST", f"/requests/{req['id']}/deny", "dana@example.com", json={"reason": "no"})
    assert status == 200 and body["status"] == "denied" and body["decision_reason"] == "no"
    _, req2 = await h.call("POST", "/requests", "carol@example.com", json={"resource": "prod-db", "reason": "y"})
    status, body = await h.call("POST", f"/requests/{req2['id']}/cancel", "carol@example.com")
    assert status == 200 and body["status"] == "cancelled"
    status, body = await h.call("GET", "/requests?mine=true&status=denied", "carol@example.com")
    assert [r["id"] for r in body["requests"]] == [req["id"]]


async def test_requests_are_seen_only_by_their_people_approvers_and_admins(h: Harness) -> None:
    _, bobs = await h.call("POST", "/requests", "bob@example.com", json={"resource": "prod-db", "reason": "bob's"})
    _, agents = await h.call("POST", "/requests", "ci-runner", json={"resource": "prod-db", "reason": "agent's"})
    both = {bobs["id"], agents["id"]}
    seen = {
        "bob@example.com": {bobs["id"]},  # the requester
        "alice@example.com": {agents["id"]},  # in the chain of ci-runner's request; not an approver of prod-db
        "dana@example.com": both,  # an approver (dba)
        "root@example.com": both,  # an admin
        "carol@example.com": set(),  # eng, like bob, but neither requester nor approver
        "migration-script": set(),  # another agent
    }
    for who, ids in seen.items():
        status, body = await h.call("GET", "/requests", who)
        assert status == 200 and {r["id"] for r in body["requests"]} == ids, who
        for rid in both:
            status, body = await h.call("GET", f"/requests/{rid}", who)
            if rid in ids:
                assert status == 200 and body["id"] == rid, who
            else:  # as for grants: one not visible is not found, so ids cannot be probed
                assert (status, body["error"]) == (404, "no_request"), who
                assert "reason" not in body and "bob's" not in json.dumps(body)
    status, body = await h.call("GET", "/requests?mine=true", "dana@example.com")
    assert body["requests"] == []  # mine is still only mine


async def test_grants_listing_visibility_and_revoke(h: Harness) -> None:
    _, req = await h.call("POST", "/requests", "ci-runner", json={"resource": "reports-db", "reason": "x"})
    _, appr = await h.call("POST", f"/requests/{req['id']}/approve", "bob@example.com")
    gid = appr["grant"]["id"]
    _, cred = await h.call("POST", f"/requests/{req['id']}/credential", "ci-runner")
    status, body = await h.call("GET", "/grants?mine=true", "ci-runner")
    assert status == 200 and [g["id"] for g in body["grants"]] == [gid]
    assert body["grants"][0]["remaining_seconds"] == 30 * 60
    status, body = await h.call("GET", "/grants?mine=true", "alice@example.com")  # alice is in the chain
    assert [g["id"] for g in body["grants"]] == [gid]
    status, body = await h.call("GET", f"/grants/{gid}", "sam@example.com")  # not holder, approver or admin
    assert (status, body["error"]) == (404, "no_grant")
    status, body = await h.call("GET", "/grants", "sam@example.com")
    assert body["grants"] == []
    status, body = await h.call("POST", f"/grants/{gid}/revoke", "sam@example.com", json={})
    assert (status, body["error"]) == (403, "not_revoker")
    status, body = await h.call("POST", f"/grants/{gid}/revoke", "root@example.com", json={"reason": "done"})
    assert status == 200 and body["status"] == "revoked" and body["ended_by"] == "root@example.com"
    with pytest.raises(Denied) as exc:
        await h.service.authenticate(cred["login"], cred["secret"], "reports-db")
    assert exc.value.code == "revoked"
    async with h.store.tx() as tx:
        grant = await tx.get_grant(gid)
    assert grant is not None and grant.end_reason == "done"


async def test_listings_limit_what_the_caller_may_see_not_what_the_store_holds(h: Harness) -> None:
    """Carol's two requests and grants are older than 600 of bob's. Lists used to take the
    newest ``limit`` rows and then drop those carol may not see, so she got none of hers."""
    _, first = await h.call("POST", "/requests", "carol@example.com", json={"resource": "reports-db", "reason": "a"})
    _, appr = await h.call("POST", f"/requests/{first['id']}/approve", "bob@example.com")
    h.clock.advance(timedelta(seconds=1))
    _, second = await h.call("POST", "/requests", "carol@example.com", json={"resource": "prod-db", "reason": "b"})
    async with h.store.tx() as tx:
        for i in range(600):
            h.clock.advance(timedelta(milliseconds=1))
            now = h.clock.now()
            await tx.insert_request(AccessRequest(
                id=f"rb{i:04d}", resource="prod-db", requester="bob@example.com", chain=("bob@example.com",),
                duration=timedelta(hours=1), reason="bob's", status=RequestStatus.PENDING, created_at=now,
                lapses_at=now + timedelta(hours=1), steps=(StepSpec("dba", 1),)))
            await tx.insert_grant(Grant(
                id=f"gb{i:04d}", login=f"bob.{i}", identity="bob@example.com", chain=("bob@example.com",),
                resources=("prod-db",), status=GrantStatus.ACTIVE, created_at=now,
                expires_at=now + timedelta(hours=1)), secret_digest=f"d{i}", scram_verifier="x")
    for mine in ("false", "true"):
        status, body = await h.call("GET", f"/requests?mine={mine}", "carol@example.com")
        assert status == 200 and [r["id"] for r in body["requests"]] == [second["id"], first["id"]], mine
        status, body = await h.call("GET", f"/requests?mine={mine}&limit=1", "carol@example.com")
        assert [r["id"] for r in body["requests"]] == [second["id"]], mine
        status, body = await h.call("GET", f"/grants?mine={mine}", "carol@example.com")
        assert status == 200 and [g["id"] for g in body["grants"]] == [appr["grant"]["id"]], mine
    status, body = await h.call("GET", "/requests?limit=500", "dana@example.com")  # an approver sees them all
    assert len(body["requests"]) == 500 and body["requests"][0]["id"] == "rb0599"


async def test_tokens_are_required_and_checked(h: Harness) -> None:
    async with h.http.get(h.url + "/requests") as resp:
        assert resp.status == 401 and resp.headers["WWW-Authenticate"].startswith("Bearer")
        assert (await resp.json())["error"] == "no_token"
    expired = h.token("bob@example.com", expires_in=timedelta(minutes=1))
    h.clock.advance(timedelta(minutes=2))
    status, body = await h.call("GET", "/requests", headers={"Authorization": f"Bearer {expired}"})
    assert (status, body["error"]) == (401, "expired_token")
    wrong_aud = h.token("bob@example.com", audience="other")
    status, body = await h.call("GET", "/requests", headers={"Authorization": f"Bearer {wrong_aud}"})
    assert (status, body["error"]) == (401, "bad_aud")
    status, body = await h.call("GET", "/me", "ci-runner")
    assert status == 200 and body["chain"] == ["alice@example.com", "ci-runner"] and body["kind"] == "agent"


@pytest.mark.parametrize(("payload", "field"), [
    ({"resource": "prod-db", "duration": "", "reason": "x"}, "duration"),
    ({"duration": "30m", "reason": "x"}, "resource"),
    ({"resource": "Prod DB!", "reason": "x"}, "resource"),
    ({"resource": "prod-db", "reason": "x", "admin": True}, "admin"),
    ({"resource": "prod-db", "reason": 5}, "reason"),
])
async def test_bad_input_is_422_naming_the_field(h: Harness, payload: dict[str, Any], field: str) -> None:
    status, body = await h.call("POST", "/requests", "carol@example.com", json=payload)
    assert status == 422 and body["error"] == "invalid_input"
    assert body["field"] == field and body["fields"][0]["loc"] == ["body", field]


async def test_semantic_errors_name_the_field_too(h: Harness) -> None:
    status, body = await h.call("POST", "/requests", "carol@example.com",
                                json={"resource": "nope-db", "reason": "x"})
    assert (status, body["error"], body["field"]) == (422, "unknown_resource", "resource")
    status, body = await h.call("POST", "/requests", "carol@example.com",
                                json={"resource": "prod-db", "duration": "9h", "reason": "x"})
    assert (status, body["error"], body["field"]) == (422, "too_long", "duration")
    for duration, why in (("forever", "is not understood"), ("0m", "is zero"), ("-5m", "is negative")):
        status, body = await h.call("POST", "/requests", "carol@example.com",
                                    json={"resource": "prod-db", "duration": duration, "reason": "x"})
        assert (status, body["error"], body["field"]) == (422, "duration", "duration")
        assert why in body["message"] and body["message"].endswith("prod-db allows up to 4h")
    status, body = await h.call("POST", "/requests", "carol@example.com", data=b"{not json",
                                headers={"Content-Type": "application/json"})
    assert status == 422 and body["fields"][0]["loc"][0] == "body" and body["fields"][0]["type"] == "json_invalid"
    status, body = await h.call("GET", "/requests?limit=0", "carol@example.com")
    assert status == 422 and body["fields"][0]["loc"] == ["query", "limit"]
    status, body = await h.call("GET", "/requests?status=bogus", "carol@example.com")
    assert status == 422 and body["field"] == "status"
    status, body = await h.call("GET", "/requests/r404", "carol@example.com")
    assert (status, body["error"]) == (404, "no_request")
    status, body = await h.call("GET", "/no-such-thing", "carol@example.com")
    assert status == 404 and body["error"] == "not_found"
    status, body = await h.call("DELETE", "/requests", "carol@example.com")
    assert status == 405 and "message" in body


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        out = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return out + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


async def test_openapi_is_generated_from_the_models(h: Harness) -> None:
    async with h.http.get(h.url + "/openapi.json") as resp:  # public: no token
        assert resp.status == 200 and resp.content_type == "application/json"
        doc = json.loads(await resp.text())
    assert doc["openapi"].startswith("3.")
    listed = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert listed == {(r.doc.method, r.doc.path) for r in ROUTES}
    schemas = doc["components"]["schemas"]
    for ref in _refs(doc):
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in schemas, ref
    create = doc["paths"]["/requests"]["post"]
    assert create["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/RequestCreate")
    assert schemas["RequestCreate"]["properties"].keys() == RequestCreate.model_json_schema()["properties"].keys()
    assert schemas["RequestCreate"]["required"] == ["resource"]
    delegate = doc["paths"]["/grants/{id}/delegate"]["post"]
    assert {p["name"] for p in delegate["parameters"]} == {"id", "X-Hoop-Grant"}
    params = {p["name"] for p in doc["paths"]["/requests"]["get"]["parameters"]}
    assert params == {"status", "resource", "mine", "limit"}
    assert "secret" not in schemas["GrantOut"]["properties"]


async def test_ids_and_text_postgresql_cannot_hold_are_4xx_not_500(hh: Harness) -> None:
    """A NUL in a path id, a query or a body once reached PostgreSQL, which refused it: a 500."""
    h = hh
    for method, path in (("GET", "/requests/%00"), ("POST", "/requests/r%00x/approve"),
                         ("POST", "/requests/%00/credential"), ("GET", "/grants/g%00"),
                         ("POST", "/grants/%00/revoke"), ("GET", "/requests/" + "x" * 33)):
        status, body = await h.call(method, path, "carol@example.com")
        kind = path.split("/")[1].removesuffix("s")
        assert (status, body["error"]) == (404, f"no_{kind}"), (method, path, body)
    status, body = await h.call("GET", "/requests?resource=prod%00", "carol@example.com")
    assert (status, body["fields"][0]["loc"]) == (422, ["query", "resource"]), body
    status, body = await h.call("POST", "/requests", "carol@example.com",
                                json={"resource": "prod-db", "reason": "fix\u0000"})
    assert (status, body["field"]) == (422, "reason") and "NUL" in body["message"], body
    status, body = await h.call("POST", "/requests", "carol@example.com", json={"resource": "prod-db", "reason": "x"})
    assert status == 201, body
    status, body = await h.call("POST", f"/requests/{body['id']}/deny", "dana@example.com", json={"reason": "\u0000"})
    assert (status, body["field"]) == (422, "reason"), body


async def test_request_bodies_are_capped_by_the_api_not_only_by_the_hosting_app(h: Harness) -> None:
    big = b'{"resource":"prod-db","reason":"' + b"x" * (300 * 1024) + b'"}'
    status, body = await h.call("POST", "/requests", "carol@example.com", data=big,
                                headers={"Content-Type": "application/json"})
    assert (status, body["error"]) == (413, "request_entity_too_large"), body
