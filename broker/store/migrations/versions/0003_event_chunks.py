"""session recordings stored as chunks of JSON lines instead of a row per event

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 03:40:00

A row per event cost the PostgreSQL proxy 3-6 µs of CPU per statement; a chunk holds a run of
one session's events as the JSON lines its spool already has (broker/eventlines.py). The
upgrade moves every stored event into chunks (up to 5,000 events each) and keeps the emptied
``session_events`` table: during a rolling upgrade the replicas still running the old code keep
storing their events there, and the new code reads both tables. The downgrade expands the chunks
back into rows. The line format is written out here rather than imported, so this migration keeps meaning what
it meant when it was written.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from alembic import op

import broker.store.tables

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

_BATCH = 5000  # events moved per round trip

_events = sa.table('session_events', sa.column('session_id', sa.String), sa.column('seq', sa.Integer),
                   sa.column('at', broker.store.tables.UtcDateTime(timezone=True)),
                   sa.column('kind', sa.String), sa.column('data', sa.JSON))
_chunks = sa.table('session_event_chunks', sa.column('session_id', sa.String), sa.column('first_seq', sa.Integer),
                   sa.column('last_seq', sa.Integer), sa.column('lines', sa.Text))


def _line(seq: int, at: datetime, kind: str, data: Any) -> str:
    return json.dumps({"seq": seq, "at": at.isoformat(timespec="microseconds"), "kind": kind, "data": data},
                      separators=(",", ":"), default=str) + "\n"


def upgrade() -> None:
    op.create_table('session_event_chunks',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('session_id', sa.String(length=32), nullable=False),
    sa.Column('first_seq', sa.Integer(), nullable=False),
    sa.Column('last_seq', sa.Integer(), nullable=False),
    sa.Column('lines', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('session_event_chunks', schema=None) as batch_op:
        batch_op.create_index('ix_session_event_chunks_session_first', ['session_id', 'first_seq'], unique=True)
    bind = op.get_bind()
    sessions = [r[0] for r in bind.execute(sa.select(_events.c.session_id).distinct())]
    for session_id in sessions:
        after = 0
        while True:  # bounded: each round moves up to _BATCH events with higher sequence numbers
            rows = bind.execute(sa.select(_events.c.seq, _events.c.at, _events.c.kind, _events.c.data)
                                .where(_events.c.session_id == session_id, _events.c.seq > after)
                                .order_by(_events.c.seq).limit(_BATCH)).all()
            if not rows:
                break
            bind.execute(sa.insert(_chunks).values(
                session_id=session_id, first_seq=rows[0].seq, last_seq=rows[-1].seq,
                lines="".join(_line(r.seq, r.at, r.kind, r.data) for r in rows)))
            after = rows[-1].seq
            bind.execute(sa.delete(_events).where(_events.c.session_id == session_id, _events.c.seq <= after))
    # session_events stays: replicas older than this migration, still running during a rolling
    # upgrade, keep storing their events there, and hoop reads both tables


def downgrade() -> None:
    bind = op.get_bind()
    chunks = bind.execute(sa.select(_chunks.c.session_id, _chunks.c.lines)
                          .order_by(_chunks.c.session_id, _chunks.c.first_seq)).all()
    for r in chunks:
        rows = []
        for text in r.lines.split("\n"):
            try:
                item = json.loads(text)
                at = datetime.fromisoformat(item["at"])
                rows.append({"session_id": r.session_id, "seq": int(item["seq"]), "kind": str(item["kind"]),
                             "at": at if at.tzinfo else at.replace(tzinfo=UTC), "data": item["data"]})
            except (ValueError, KeyError, TypeError):
                continue  # a line that never was an event
        if rows:
            bind.execute(sa.insert(_events), rows)
    with op.batch_alter_table('session_event_chunks', schema=None) as batch_op:
        batch_op.drop_index('ix_session_event_chunks_session_first')
    op.drop_table('session_event_chunks')
