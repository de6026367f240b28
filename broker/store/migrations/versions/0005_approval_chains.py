"""approvals record the approver's chain of identities

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 10:00:00

Adds ``approvals.chain``: the approver's chain (``alice → ci-runner`` for an agent acting for
alice). The broker compares approvers by everyone in their chain, so a human and the agents
acting for them fill one slot between them, not one each. The column is nullable: during a
rolling upgrade the replicas still on the old code insert approvals without it, and the new code
reads a NULL chain as the approver alone. The upgrade fills the chain of the approvals on
still-pending requests from their ``request.approval`` audit entries, which have always recorded
it, so an agent's approval given just before the upgrade still counts for its human. Decided
requests are left NULL: nothing reads their approvers' chains. The downgrade drops the column.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

_BATCH = 500  # pending requests filled per round trip

_approvals = sa.table('approvals', sa.column('id', sa.Integer), sa.column('request_id', sa.String),
                      sa.column('approver', sa.String), sa.column('chain', sa.JSON))
_requests = sa.table('requests', sa.column('id', sa.String), sa.column('status', sa.String))
_audit = sa.table('audit_log', sa.column('seq', sa.Integer), sa.column('actor', sa.String),
                  sa.column('chain', sa.JSON), sa.column('action', sa.String), sa.column('request_id', sa.String))


def upgrade() -> None:
    with op.batch_alter_table('approvals', schema=None) as batch_op:
        batch_op.add_column(sa.Column('chain', sa.JSON(), nullable=True))
    bind = op.get_bind()
    pending = [r.id for r in bind.execute(sa.select(_requests.c.id).where(_requests.c.status == 'pending')
                                          .order_by(_requests.c.id))]
    for i in range(0, len(pending), _BATCH):
        ids = pending[i:i + _BATCH]
        chains: dict[tuple[str, str], list[str]] = {}
        for e in bind.execute(sa.select(_audit.c.request_id, _audit.c.actor, _audit.c.chain)
                              .where(_audit.c.action == 'request.approval', _audit.c.request_id.in_(ids))
                              .order_by(_audit.c.seq)):
            chains[(e.request_id, e.actor.lower())] = list(e.chain)  # the latest approval wins
        for a in bind.execute(sa.select(_approvals.c.id, _approvals.c.request_id, _approvals.c.approver)
                              .where(_approvals.c.request_id.in_(ids))).all():
            chain = chains.get((a.request_id, a.approver.lower()))
            if chain:
                bind.execute(sa.update(_approvals).where(_approvals.c.id == a.id).values(chain=chain))


def downgrade() -> None:
    with op.batch_alter_table('approvals', schema=None) as batch_op:
        batch_op.drop_column('chain')
