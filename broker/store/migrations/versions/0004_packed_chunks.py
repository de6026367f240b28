"""recorded chunks may be stored packed (zlib)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 05:20:00

Adds ``session_event_chunks.packed``: a chunk of 4,096 characters or more is stored there as zlib
(level 1) of its UTF-8 lines, and its ``lines`` is then empty. Recordings are the largest thing hoop
stores and their lines repeat themselves, so they shrink 5-60 times. Chunks stored before stay
text, and hoop reads both. The upgrade only adds the column: during a rolling upgrade a replica
still on the old code keeps writing text chunks, which the new code reads; it cannot read the
packed chunks the new replicas write (see the README's upgrade notes). The downgrade unpacks every
packed chunk into ``lines`` and drops the column. zlib is named here rather than imported from
broker/eventlines.py, so this migration keeps meaning what it meant when it was written.
"""

from __future__ import annotations

import zlib

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

_BATCH = 200  # packed chunks unpacked per round trip (each up to a few hundred KiB of text)

_chunks = sa.table('session_event_chunks', sa.column('id', sa.Integer), sa.column('lines', sa.Text),
                   sa.column('packed', sa.LargeBinary))


def upgrade() -> None:
    with op.batch_alter_table('session_event_chunks', schema=None) as batch_op:
        batch_op.add_column(sa.Column('packed', sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    bind = op.get_bind()
    after = 0
    while True:  # bounded: each round unpacks up to _BATCH chunks with higher ids
        rows = bind.execute(sa.select(_chunks.c.id, _chunks.c.packed)
                            .where(_chunks.c.packed.is_not(None), _chunks.c.id > after)
                            .order_by(_chunks.c.id).limit(_BATCH)).all()
        if not rows:
            break
        for r in rows:
            text = zlib.decompress(r.packed).decode("utf-8", "surrogatepass")
            bind.execute(sa.update(_chunks).where(_chunks.c.id == r.id).values(lines=text, packed=None))
        after = rows[-1].id
    with op.batch_alter_table('session_event_chunks', schema=None) as batch_op:
        batch_op.drop_column('packed')
