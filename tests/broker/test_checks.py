"""`hoop check`'s policy findings: approval steps that can never be met, for anyone or for some requesters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from broker.checks import findings
from broker.config import load_settings, parse_config
from tests.conftest import base_config


def _errors(tmp_path: Path, groups: dict[str, list[str]], approval: list[dict[str, Any]],
            requesters: list[str] | None = None) -> list[str]:
    data = base_config(state_dir=str(tmp_path / "state"))
    data["groups"].update({name: {"members": members} for name, members in groups.items()})
    data["resources"][0]["approval"] = approval
    data["resources"][0]["request"]["groups"] = requesters or ["eng"]
    settings = load_settings({"PGPW": "x", "HOOP_DATABASE_URL": "sqlite+aiosqlite:///unused.db"})
    return [f.message for f in findings(parse_config(data), settings) if f.level == "error"]


def test_a_step_larger_than_its_group_once_the_requester_is_excluded(tmp_path: Path) -> None:
    assert _errors(tmp_path, {"dba": ["dana@example.com"]}, [{"from": "dba", "count": 2}]) == [
        "approval step from dba needs 2 but only 1 member(s) can approve"]
    # dana may request and approve: without her, one dba is left for a step of two
    assert _errors(tmp_path, {"dba": ["dana@example.com", "erin@example.com"]}, [{"from": "dba", "count": 2}],
                   requesters=["dba"]) == [
        "approval step from dba needs 2 but only 1 member(s) can approve when dana@example.com requests"]
    assert _errors(tmp_path, {"dba": ["dana@example.com", "erin@example.com"]}, [{"from": "dba", "count": 2}]) == []


def test_steps_that_only_the_same_people_could_fill_together(tmp_path: Path) -> None:
    """Each step alone had enough members, so check said nothing; but one person fills one slot across all
    steps, and the request could never be approved."""
    one_person = {"dba": ["erin@example.com"], "security": ["erin@example.com"]}
    assert _errors(tmp_path, one_person, [{"from": "dba", "count": 1}, {"from": "security", "count": 1}]) == [
        "approval steps 1 of dba AND 1 of security need 2 different people, but only 1 can fill them "
        "(one person fills at most one slot across all steps)"]
    # the two security members are the dba's too: three slots, two people
    overlap = {"dba": ["dana@example.com", "erin@example.com"], "security": ["dana@example.com", "erin@example.com"]}
    assert _errors(tmp_path, overlap, [{"from": "dba", "count": 1}, {"from": "security", "count": 2}]) == [
        "approval steps 1 of dba AND 2 of security need 3 different people, but only 2 can fill them "
        "(one person fills at most one slot across all steps)"]
    # sam is a requester as well: when he asks, erin alone is left for both steps
    shared = {"dba": ["erin@example.com"], "security": ["sam@example.com", "erin@example.com"],
              "eng": ["alice@example.com", "sam@example.com"]}
    assert _errors(tmp_path, shared, [{"from": "dba", "count": 1}, {"from": "security", "count": 1}]) == [
        "approval steps 1 of dba AND 1 of security need 2 different people, but only 1 can fill them when "
        "sam@example.com requests (one person fills at most one slot across all steps)"]
    # the base config's steps can be met: erin is in both groups, dana and sam fill the rest
    assert _errors(tmp_path, {}, [{"from": "dba", "count": 1}, {"from": "security", "count": 1}]) == []


def test_an_agent_whose_team_holds_every_approver_is_warned_of(tmp_path: Path) -> None:
    """The team an agent acts for cannot approve its requests; a quorum only that team can fill is never met."""
    def warnings(acts_for: str) -> list[str]:
        data = base_config(state_dir=str(tmp_path / "state"))
        data["oidc"] = {"issuer": "https://idp.example", "audience": "hoop", "agents": [
            {"subject": "s1", "name": "schema-bot", "acts_for": acts_for, "groups": ["eng"]}]}
        settings = load_settings({"PGPW": "x", "HOOP_DATABASE_URL": "sqlite+aiosqlite:///unused.db"})
        return [f.message for f in findings(parse_config(data), settings) if f.level == "warning"
                and "schema-bot" in f.message]

    # prod-db needs 1 of dba AND 1 of security; dba is dana and erin, security is sam and erin
    assert warnings("dba") == ["agent schema-bot acts for dba, whose members cannot approve its requests; without "
                               "them only 1 can fill 1 of dba AND 1 of security, so its requests can never be "
                               "approved"]
    assert warnings("eng") == []  # nobody in eng approves prod-db
    assert warnings("alice@example.com") == []  # a person, not a team
