"""Bulk output through hoop on uvloop (as ``hoop serve`` runs): every byte arrives, and is recorded whole."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
import uvloop

from tests.proxy.ssh.conftest import make_config, ssh_resource, start_env, stop_env
from tests.support.sshd import Sshd

pytestmark = pytest.mark.ssh

# Two- and three-byte characters, so SSH packets and socket reads split some of them.
_LINE = "2030-01-01 caf\u00e9 \u20ac12 ok \u2603 request handled path=/api/v1/orders status=200\n"


async def _cat_through_hoop(up: Sshd, tmp: Path, path: Path) -> tuple[bytes, str]:
    config = make_config(up, ssh_resource(up, masking={"enabled": True}))
    env, store = await start_env(up, tmp, config)
    try:
        grant, secret = await env.grant()
        argv = env.ssh_argv(grant.login, f"cat {path}")
        proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE,
                                                    env={**os.environ, "SSHPASS": secret})
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err
        await env.hub.flush()
        async with env.service.store.tx() as tx:
            (session,) = await tx.list_sessions()
            recorded = "".join(e.data["data"] for e in await tx.events(session.id) if e.kind == "output")
        return out, recorded
    finally:
        await stop_env(env, store)


def test_bulk_output_on_uvloop_arrives_whole_and_is_recorded_whole(upstream: Sshd, tmp_path: Path) -> None:
    text = _LINE * (3_000_000 // len(_LINE.encode()))
    path = upstream.dir / "bulk.txt"
    path.write_text(text, encoding="utf-8")
    out, recorded = uvloop.run(_cat_through_hoop(upstream, tmp_path, path))
    assert out == text.encode()
    assert recorded == text  # no U+FFFD where a character crossed a packet or a merged event
