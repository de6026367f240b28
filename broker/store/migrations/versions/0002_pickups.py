"""sealed credential pickups for API requesters

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30 23:55:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import broker.store.tables

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('pickups',
    sa.Column('request_id', sa.String(length=32), nullable=False),
    sa.Column('public_key', sa.String(length=64), nullable=False),
    sa.Column('created_at', broker.store.tables.UtcDateTime(timezone=True), nullable=False),
    sa.Column('sealed', sa.Text(), nullable=True),
    sa.Column('grant_id', sa.String(length=32), nullable=True),
    sa.Column('expires_at', broker.store.tables.UtcDateTime(timezone=True), nullable=True),
    sa.Column('collected_at', broker.store.tables.UtcDateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('request_id')
    )


def downgrade() -> None:
    op.drop_table('pickups')
