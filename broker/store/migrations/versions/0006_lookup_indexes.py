"""indexes for the lookups made on every Slack reaction and every extension

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 09:00:00

Every reaction and button in a channel hoop is in looks up the request card or the held
statement it is on (``requests.card_channel, card_ts``; ``reviews.channel, ts``), and every
``/hoop extend`` looks for a pending extension of the grant (``requests.extends_grant``). Without
indexes each was a scan of the whole table, which only grows. Only indexes are added, so a
replica still on the old code runs unchanged against the new schema; the downgrade drops them
and loses no data.
"""

from __future__ import annotations

from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('requests', schema=None) as batch_op:
        batch_op.create_index('ix_requests_card', ['card_channel', 'card_ts'], unique=False)
        batch_op.create_index('ix_requests_extends_grant', ['extends_grant'], unique=False)
    with op.batch_alter_table('reviews', schema=None) as batch_op:
        batch_op.create_index('ix_reviews_message', ['channel', 'ts'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('reviews', schema=None) as batch_op:
        batch_op.drop_index('ix_reviews_message')
    with op.batch_alter_table('requests', schema=None) as batch_op:
        batch_op.drop_index('ix_requests_extends_grant')
        batch_op.drop_index('ix_requests_card')
