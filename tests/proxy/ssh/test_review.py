"""The review path over SSH: an exec command or an interactive line under a ``review`` rule is held
until an approver decides through the broker's real Reviews (or the review times out)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from broker.events import ReviewRequested
from tests.proxy.ssh.conftest import OPS, Env, make_config, ssh_resource, start_env, stop_env
from tests.proxy.ssh.test_shell import shell
from tests.support.sshd import Sshd

pytestmark = pytest.mark.ssh


def _config(up: Sshd, timeout: float) -> Any:
    res = ssh_resource(up)
    res["guardrails"] = {"review_timeout": timeout, "rules": [
        {"name": "hold-touch", "action": "review", "commands": ["touch"]},
        *res["guardrails"]["rules"],
    ]}
    return make_config(up, res)


@pytest.fixture
async def renv(upstream: Sshd, tmp_path: Path) -> AsyncIterator[Env]:
    e, store = await start_env(upstream, tmp_path, _config(upstream, 30))
    try:
        yield e
    finally:
        await stop_env(e, store)


async def _held(env: Env, seen: int = 0) -> ReviewRequested:
    """The next review asked for (after ``seen`` earlier ones)."""
    async with asyncio.timeout(15):
        while True:
            asked = env.notifier.of(ReviewRequested)
            if len(asked) > seen:
                event: ReviewRequested = asked[seen]
                return event
            await asyncio.sleep(0.02)


@pytest.mark.parametrize("allow", [True, False])
async def test_reviewed_exec_waits_for_the_approver(renv: Env, allow: bool) -> None:
    grant, secret = await renv.grant()
    marker = renv.up.dir / f"reviewed-exec-{allow}"
    marker.unlink(missing_ok=True)
    run = asyncio.create_task(renv.ssh(grant.login, secret, f"touch {marker}; echo ran"))
    event = await _held(renv)
    assert event.review.text == f"touch {marker}; echo ran" and event.review.rule == "hold-touch"
    await asyncio.sleep(0.2)
    assert not run.done() and not marker.exists()  # held: nothing reached the host yet
    await renv.hub.reviews.decide(event.review.id, OPS, allow)
    code, out, err = await run
    assert b"held for review" in err
    if allow:
        assert (code, out) == (0, b"ran\n") and marker.exists()
    else:
        assert (code, out) == (126, b"") and b"not approved" in err and not marker.exists()


async def test_the_review_shows_the_command_masked(renv: Env) -> None:
    """What approvers read in the thread is masked like the recording."""
    grant, secret = await renv.grant()
    marker = renv.up.dir / "reviewed-masked"
    marker.unlink(missing_ok=True)
    run = asyncio.create_task(renv.ssh(grant.login, secret, f"touch {marker}; echo ann@corp.example"))
    event = await _held(renv)
    assert event.review.text == f"touch {marker}; echo [email]"
    await renv.hub.reviews.decide(event.review.id, OPS, True)
    code, out, _ = await run
    assert (code, out) == (0, b"[email]\n") and marker.exists()


async def test_reviewed_exec_times_out_refused(upstream: Sshd, tmp_path: Path) -> None:
    env, store = await start_env(upstream, tmp_path, _config(upstream, 0.5))
    try:
        grant, secret = await env.grant()
        marker = env.up.dir / "reviewed-timeout"
        marker.unlink(missing_ok=True)
        code, out, err = await env.ssh(grant.login, secret, f"touch {marker}")
        assert (code, out) == (126, b"") and b"not approved" in err and not marker.exists()
        async with env.service.store.tx() as tx:
            review = await tx.get_review(env.notifier.of(ReviewRequested)[0].review.id)
        assert review is not None and review.status == "timed_out"
    finally:
        await stop_env(env, store)


async def test_reviewed_interactive_line_waits_for_the_approver(renv: Env) -> None:
    grant, secret = await renv.grant()
    allowed, refused = renv.up.dir / "line-allowed", renv.up.dir / "line-refused"
    for m in (allowed, refused):
        m.unlink(missing_ok=True)
    async with await renv.client(grant.login, secret) as conn:
        term = await shell(conn)
        term.proc.stdin.write(f"touch {allowed}; echo DONE$((1+1))\r")
        await term.expect("held for review")
        event = await _held(renv)
        assert "touch" in event.review.text and not allowed.exists()
        term.proc.stdin.write("echo TYPED$((2+2))\r")  # typed while held: waits behind the held line
        await asyncio.sleep(0.2)
        assert "TYPED4" not in term.buf
        await renv.hub.reviews.decide(event.review.id, OPS, True)
        await term.expect("DONE2")
        await term.expect("TYPED4")
        assert allowed.exists()

        term.proc.stdin.write(f"touch {refused}\r")
        event = await _held(renv, 1)
        await renv.hub.reviews.decide(event.review.id, OPS, False)
        out = await term.expect("line refused: not approved")
        await term.run("echo AFTER$((3+3))", "AFTER6")
        term.proc.stdin.write("exit\r")
        await term.proc.wait_closed()
    assert not refused.exists() and "line refused" in out
