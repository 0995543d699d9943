"""uploaded rows are folded into spans: their payloads are dropped once W&B has them (db/spans.py). Existing
uploaded rows are folded here; `Database.upgrade` then gives the freed pages back to the filesystem (SQLite).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01 04:30:00.000000

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op
from sqlalchemy.orm import Session

from db import spans

# revision identifiers, used by Alembic.
revision: str = '0008'
down_revision: Union[str, Sequence[str], None] = '0007'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        'uploaded_spans',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('run_id', sa.Integer(), nullable=False),
        sa.Column('source_id', sa.Integer(), nullable=False),
        sa.Column('generation', sa.Integer(), nullable=False),
        sa.Column('first_offset', sa.BigInteger(), nullable=False),
        sa.Column('last_offset', sa.BigInteger(), nullable=False),
        sa.Column('first_step', sa.BigInteger(), nullable=False),
        sa.Column('last_step', sa.BigInteger(), nullable=False),
        sa.Column('rows', sa.Integer(), nullable=False),
        sa.Column('min_epoch', sa.Integer(), nullable=True),
        sa.Column('max_epoch', sa.Integer(), nullable=True),
        sa.Column('min_iter', sa.BigInteger(), nullable=True),
        sa.Column('max_iter', sa.BigInteger(), nullable=True),
        sa.Column('lines', sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(['run_id'], ['runs.id']),
        sa.ForeignKeyConstraint(['source_id'], ['sources.id']),
        sa.PrimaryKeyConstraint('id'),
    )
    with op.batch_alter_table('uploaded_spans', schema=None) as batch_op:
        batch_op.create_index('ix_uploaded_spans_run', ['run_id'], unique=False)
        batch_op.create_index('ix_uploaded_spans_source', ['source_id', 'first_offset'], unique=False)
    session = Session(bind=op.get_bind())
    for run_id in session.scalars(sa.text("SELECT DISTINCT run_id FROM outbox_rows WHERE uploaded AND kind != 'val'")):
        spans.fold_uploaded(session, run_id)
    session.flush()


def downgrade() -> None:
    """Downgrade schema (folded rows stay folded: their payloads are gone)."""
    with op.batch_alter_table('uploaded_spans', schema=None) as batch_op:
        batch_op.drop_index('ix_uploaded_spans_source')
        batch_op.drop_index('ix_uploaded_spans_run')
    op.drop_table('uploaded_spans')
