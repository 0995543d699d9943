"""offline segments keep their way to a W&B server (`mmdet-wandb sync`): sending or synced, the step the
server confirmed, attempts, the last error and the next try

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-05 22:30:00.000000

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0012'
down_revision: Union[str, Sequence[str], None] = '0011'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table('segments', schema=None) as batch_op:
        batch_op.add_column(sa.Column('sync_state', sa.Enum('sending', 'synced', name='syncstate', native_enum=False, length=16), nullable=True))
        batch_op.add_column(sa.Column('synced_step', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('sync_attempts', sa.Integer(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('sync_error', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('sync_retry_at', sa.Float(), nullable=True))


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('segments', schema=None) as batch_op:
        for column in ('sync_retry_at', 'sync_error', 'sync_attempts', 'synced_step', 'sync_state'):
            batch_op.drop_column(column)
