"""Access requests and their approvals: rows in and out of ``requests`` and ``approvals``."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Row, delete, insert, select, update

from broker.model import AccessRequest, Approval, RequestStatus, StepSpec
from broker.store import tables as t
from broker.store.base import TxBase


def _request(row: Row[Any], approvals: list[Approval]) -> AccessRequest:
    m = row._mapping
    return AccessRequest(
        id=m["id"], resource=m["resource"], requester=m["requester"], chain=tuple(m["chain"]),
        duration=timedelta(seconds=m["duration_s"]), reason=m["reason"], status=RequestStatus(m["status"]),
        created_at=m["created_at"], lapses_at=m["lapses_at"],
        steps=tuple(StepSpec(group=s["group"], count=s["count"]) for s in m["steps"]),
        approvals=approvals, requester_slack_id=m["requester_slack_id"], card_channel=m["card_channel"],
        card_ts=m["card_ts"], decided_by=m["decided_by"], decision_reason=m["decision_reason"],
        decided_at=m["decided_at"], grant_id=m["grant_id"], extends_grant=m["extends_grant"],
    )


def _request_values(r: AccessRequest) -> dict[str, Any]:
    return {
        "id": r.id, "resource": r.resource, "requester": r.requester, "chain": list(r.chain),
        "duration_s": int(r.duration.total_seconds()), "reason": r.reason, "status": r.status.value,
        "created_at": r.created_at, "lapses_at": r.lapses_at,
        "steps": [{"group": s.group, "count": s.count} for s in r.steps],
        "requester_slack_id": r.requester_slack_id, "card_channel": r.card_channel, "card_ts": r.card_ts,
        "decided_by": r.decided_by, "decision_reason": r.decision_reason, "decided_at": r.decided_at,
        "grant_id": r.grant_id, "extends_grant": r.extends_grant,
    }


class RequestOps(TxBase):
    """Requests and approvals, and the request behind a Slack card."""

    async def insert_request(self, r: AccessRequest) -> None:
        await self.conn.execute(insert(t.requests).values(**_request_values(r)))

    async def update_request(self, r: AccessRequest) -> None:
        values = _request_values(r)
        del values["id"]
        await self.conn.execute(update(t.requests).where(t.requests.c.id == r.id).values(**values))

    async def _approvals(self, ids: list[str]) -> dict[str, list[Approval]]:
        out: dict[str, list[Approval]] = {i: [] for i in ids}
        if not ids:
            return out
        rows = await self.conn.execute(
            select(t.approvals).where(t.approvals.c.request_id.in_(ids)).order_by(t.approvals.c.id))
        for row in rows:
            m = row._mapping
            out[m["request_id"]].append(Approval(approver=m["approver"], groups=tuple(m["groups"]),
                                                 at=m["at"], via=m["via"], chain=tuple(m["chain"] or ())))
        return out

    async def get_request(self, request_id: str, *, lock: bool = False) -> AccessRequest | None:
        q = select(t.requests).where(t.requests.c.id == request_id)
        if lock and self._row_lock():
            q = q.with_for_update()
        row = (await self.conn.execute(q)).first()
        if row is None:
            return None
        return _request(row, (await self._approvals([request_id]))[request_id])

    async def list_requests(self, *, status: RequestStatus | None = None, requester: str | None = None,
                            resource: str | None = None, limit: int = 500, offset: int = 0) -> list[AccessRequest]:
        q = (select(t.requests).order_by(t.requests.c.created_at.desc(), t.requests.c.id.desc())
             .limit(limit).offset(offset))
        if status is not None:
            q = q.where(t.requests.c.status == status.value)
        if requester is not None:
            q = q.where(t.requests.c.requester == requester)
        if resource is not None:
            q = q.where(t.requests.c.resource == resource)
        rows = list(await self.conn.execute(q))
        approvals = await self._approvals([r._mapping["id"] for r in rows])
        return [_request(r, approvals[r._mapping["id"]]) for r in rows]

    async def pending_extension(self, grant_id: str, now: datetime) -> AccessRequest | None:
        """The oldest request to extend ``grant_id`` that is pending and not yet lapsed at ``now``."""
        q = (select(t.requests)
             .where(t.requests.c.extends_grant == grant_id, t.requests.c.status == RequestStatus.PENDING.value,
                    t.requests.c.lapses_at > now)
             .order_by(t.requests.c.created_at).limit(1))
        row = (await self.conn.execute(q)).first()
        if row is None:
            return None
        return _request(row, (await self._approvals([row._mapping["id"]]))[row._mapping["id"]])

    async def add_approval(self, request_id: str, a: Approval) -> None:
        await self.conn.execute(insert(t.approvals).values(
            request_id=request_id, approver=a.approver, groups=list(a.groups), at=a.at, via=a.via,
            chain=list(a.chain)))

    async def remove_approval(self, request_id: str, approver: str, *, via: str | None = None) -> bool:
        q = delete(t.approvals).where(t.approvals.c.request_id == request_id, t.approvals.c.approver == approver)
        if via is not None:
            q = q.where(t.approvals.c.via == via)
        return bool((await self.conn.execute(q)).rowcount)

    async def request_by_card(self, channel: str, ts: str) -> AccessRequest | None:
        row = (await self.conn.execute(select(t.requests.c.id).where(
            t.requests.c.card_channel == channel, t.requests.c.card_ts == ts))).first()
        return await self.get_request(row[0], lock=True) if row is not None else None
