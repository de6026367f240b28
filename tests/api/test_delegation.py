"""Nested agents over the API: alice → ci-runner → migration-script → third-hop. Children can
only narrow; escalations get 403 and an audit entry; ending a parent ends its children; the
audit export shows the whole chain."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from broker.audit import export_jsonl, verify
from broker.delegation import delegate
from broker.errors import Denied, InvalidInput
from broker.events import GrantIssued
from broker.model import GrantStatus, Identity
from tests.api.conftest import Harness, harness

CHAIN3 = ["alice@example.com", "ci-runner", "migration-script", "third-hop"]


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    async with harness(f"sqlite+aiosqlite:///{tmp_path / 'hoop.db'}",
                       config_overrides={"delegation": {"max_depth": 2}}) as hh:
        yield hh


async def root_grant(h: Harness, duration: str = "1h") -> dict[str, Any]:
    _, req = await h.call("POST", "/requests", "ci-runner",
                          json={"resource": "reports-db", "duration": duration, "reason": "migrate"})
    status, _ = await h.call("POST", f"/requests/{req['id']}/approve", "bob@example.com")
    assert status == 200
    status, cred = await h.call("POST", f"/requests/{req['id']}/credential", "ci-runner")
    assert status == 200
    return cred


async def delegate_via(h: Harness, who: str, parent: dict[str, Any], **body: Any) -> tuple[int, dict[str, Any]]:
    body.setdefault("resources", ["reports-db"])
    return await h.call("POST", f"/grants/{parent['grant']['id']}/delegate", who, json=body,
                        headers={"X-Hoop-Grant": parent["secret"]})


async def audit(h: Harness) -> list[dict[str, Any]]:
    return [json.loads(line) async for line in export_jsonl(h.store)]


async def test_three_hops_escalations_revocation_and_audit_export(h: Harness) -> None:
    g1 = await root_grant(h)
    status, g2 = await delegate_via(h, "ci-runner", g1, duration="20m", label="migration-script")
    assert status == 201, g2
    assert g2["grant"]["chain"] == CHAIN3[:3] and g2["grant"]["depth"] == 1
    assert g2["grant"]["parent_id"] == g1["grant"]["id"] and g2["secret"] != g1["secret"]
    assert g2["grant"]["remaining_seconds"] == 20 * 60
    status, g3 = await delegate_via(h, "migration-script", g2, label="third-hop")  # all of the remaining time
    assert status == 201, g3
    assert g3["grant"]["chain"] == CHAIN3 and g3["grant"]["depth"] == 2
    assert g3["grant"]["expires_at"] == g2["grant"]["expires_at"]
    assert g3["grant"]["chain_text"] == " → ".join(CHAIN3)

    # each child is an ordinary credential to every proxy's gate
    child = await h.service.authenticate(g3["login"], g3["secret"], "reports-db")
    assert child.chain == tuple(CHAIN3)
    issued = [e for e in h.events.of(GrantIssued) if e.grant.parent_id]
    assert [e.grant.id for e in issued] == [g2["grant"]["id"], g3["grant"]["id"]]

    # escalation attempts: wider, longer, deeper
    status, body = await delegate_via(h, "migration-script", g2, resources=["reports-db", "prod-db"], label="x")
    assert (status, body["error"], body["field"]) == (403, "wider", "resources")
    status, body = await delegate_via(h, "migration-script", g2, duration="2h", label="x")
    assert (status, body["error"], body["field"]) == (403, "longer", "duration")
    status, body = await delegate_via(h, "third-hop", g3, label="fourth-hop")
    assert (status, body["error"]) == (403, "too_deep")
    # a token alone, or a secret for another grant, or a caller outside the chain
    status, body = await h.call("POST", f"/grants/{g2['grant']['id']}/delegate", "migration-script",
                                json={"resources": ["reports-db"], "label": "x"})
    assert (status, body["error"], body["field"]) == (403, "no_grant_secret", "X-Hoop-Grant")
    status, body = await h.call("POST", f"/grants/{g2['grant']['id']}/delegate", "migration-script",
                                json={"resources": ["reports-db"], "label": "x"},
                                headers={"X-Hoop-Grant": g1["secret"]})
    assert (status, body["error"]) == (403, "bad_credentials")
    status, body = await delegate_via(h, "stranger-bot", g2, label="x")
    assert (status, body["error"]) == (403, "not_holder")
    # the body field works as well as the header
    status, body = await h.call("POST", f"/grants/{g2['grant']['id']}/delegate", "migration-script",
                                json={"resources": ["reports-db"], "label": "sibling", "duration": "5m",
                                      "parent_secret": g2["secret"]})
    assert status == 201 and body["grant"]["chain"][-1] == "sibling"

    entries = await audit(h)
    refused = [e for e in entries if e["action"] == "grant.delegation_refused"]
    assert [e["detail"]["code"] for e in refused] == ["wider", "longer", "too_deep", "not_holder"]
    assert refused[2]["chain"] == [*CHAIN3, "fourth-hop"] and refused[2]["grant_id"] == g3["grant"]["id"]
    assert refused[0]["actor"] == "migration-script"

    # revoking the root ends every descendant; their credentials stop working
    status, body = await h.call("POST", f"/grants/{g1['grant']['id']}/revoke", "ci-runner",
                                json={"reason": "job finished"})
    assert status == 200 and body["status"] == "revoked"
    for cred in (g1, g2, g3):
        with pytest.raises(Denied) as exc:
            await h.service.authenticate(cred["login"], cred["secret"], "reports-db")
        assert exc.value.code == "revoked"
    status, body = await h.call("GET", f"/grants/{g3['grant']['id']}", "ci-runner")
    assert body["status"] == "revoked" and g2["grant"]["id"] in body["end_reason"]

    # the audit export shows the whole chain, for delegation and for the cascade
    entries = await audit(h)
    delegated = [e for e in entries if e["action"] == "grant.delegated"]
    assert [e["chain"] for e in delegated][:2] == [CHAIN3[:3], CHAIN3]
    assert delegated[1]["chain_text"] == "alice@example.com → ci-runner → migration-script → third-hop"
    assert delegated[1]["detail"]["parent"] == g2["grant"]["id"] and delegated[1]["request_id"]
    revoked = {e["grant_id"]: e for e in entries if e["action"] == "grant.revoked"}
    assert revoked[g3["grant"]["id"]]["detail"]["chain"] == CHAIN3
    assert (await verify(h.store)).ok


async def test_expiring_the_parent_ends_children(h: Harness) -> None:
    g1 = await root_grant(h)
    _, g2 = await delegate_via(h, "ci-runner", g1, label="migration-script")
    h.clock.advance(timedelta(hours=1))  # expiry of a grant not yet due is a no-op
    await h.service.expire(g1["grant"]["id"])
    with pytest.raises(Denied) as exc:
        await h.service.authenticate(g2["login"], g2["secret"], "reports-db")
    assert exc.value.code == "revoked"
    status, body = await delegate_via(h, "ci-runner", g1, label="late")  # an ended parent cannot delegate
    assert (status, body["error"]) == (403, "expired")


async def test_child_expires_on_its_own_deadline(h: Harness) -> None:
    g1 = await root_grant(h)
    _, g2 = await delegate_via(h, "ci-runner", g1, duration="10m", label="migration-script")
    h.clock.advance(timedelta(minutes=10))
    with pytest.raises(Denied) as exc:
        await h.service.authenticate(g2["login"], g2["secret"], "reports-db")
    assert exc.value.code == "expired"
    assert (await h.service.authenticate(g1["login"], g1["secret"], "reports-db")).id == g1["grant"]["id"]


async def test_delegate_function_bounds(h: Harness) -> None:
    g1 = await root_grant(h, duration="30m")
    async with h.store.tx() as tx:
        parent = await tx.get_grant(g1["grant"]["id"])
    assert parent is not None
    runner = Identity(email="ci-runner", kind="agent", acts_for="alice@example.com")
    h.clock.advance(timedelta(minutes=10))
    child, secret = await delegate(h.service, parent, runner, ["reports-db"], None, "Script-1")
    assert child.expires_at == parent.expires_at and child.label == "script-1" and secret.startswith("hoop_")
    assert child.status is GrantStatus.ACTIVE and child.login.startswith("script1.")
    with pytest.raises(Denied) as exc:
        await delegate(h.service, parent, runner, ["reports-db"], timedelta(minutes=21), "s2")
    assert exc.value.code == "longer" and exc.value.http_status == 403
    assert (await delegate(h.service, parent, runner, ["reports-db"], "20m", "s3"))[0].expires_at == parent.expires_at
    with pytest.raises(InvalidInput):
        await delegate(h.service, parent, runner, ["reports-db"], None, "bad label!")
    with pytest.raises(InvalidInput):
        await delegate(h.service, parent, runner, [], None, "s4")


async def test_live_children_per_parent_are_capped(tmp_path: Path) -> None:
    async with harness(f"sqlite+aiosqlite:///{tmp_path / 'cap.db'}",
                       config_overrides={"delegation": {"max_children": 2}}) as hh:
        g1 = await root_grant(hh)
        first = [await delegate_via(hh, "ci-runner", g1, label=f"worker-{i}") for i in range(2)]
        assert [status for status, _ in first] == [201, 201]
        status, body = await delegate_via(hh, "ci-runner", g1, label="worker-2")
        assert (status, body["error"]) == (403, "too_many_children") and "2" in body["message"]
        refused = [e for e in await audit(hh) if e["action"] == "grant.delegation_refused"]
        assert [e["detail"]["code"] for e in refused] == ["too_many_children"]
        # an ended child frees its place; a grandchild counts under its own parent, not the root's
        await hh.call("POST", f"/grants/{first[0][1]['grant']['id']}/revoke", "ci-runner", json={"reason": "done"})
        assert (await delegate_via(hh, "ci-runner", g1, label="worker-3"))[0] == 201
        assert (await delegate_via(hh, "ci-runner", first[1][1], label="helper"))[0] == 201
