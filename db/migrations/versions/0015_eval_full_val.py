"""eval jobs say whether their metrics cover the whole val set (`eval_full_val`) or only the tables' subset

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-07 00:30:00.000000

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0015'
down_revision: Union[str, Sequence[str], None] = '0014'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table('eval_jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('eval_full_val', sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('eval_jobs', schema=None) as batch_op:
        batch_op.drop_column('eval_full_val')
