"""eval jobs name the MMDetection stack that runs them (mmdet2 or mmdet3); existing jobs are mmdet 2.x ones.
A checkpoint version in the artifact outbox keeps the size and mtime of the file it hashed, checked again
before it is logged (MMEngine can write a checkpoint again after it was hashed).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 01:40:00.000000

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0006'
down_revision: Union[str, Sequence[str], None] = '0005'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table('eval_jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('stack', sa.String(length=16), nullable=False, server_default='mmdet2'))
    with op.batch_alter_table('outbox_artifacts', schema=None) as batch_op:
        batch_op.add_column(sa.Column('file_size', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('file_mtime_ns', sa.BigInteger(), nullable=True))


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('outbox_artifacts', schema=None) as batch_op:
        batch_op.drop_column('file_mtime_ns')
        batch_op.drop_column('file_size')
    with op.batch_alter_table('eval_jobs', schema=None) as batch_op:
        batch_op.drop_column('stack')
