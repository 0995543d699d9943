"""eval jobs count the leases that ran out on them (taken over by another worker, or parked), for the metrics
endpoint's lease-loss counter

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-05 22:30:00.000000

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0013'
down_revision: Union[str, Sequence[str], None] = '0012'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table('eval_jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('leases_lost', sa.Integer(), server_default='0', nullable=False))


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('eval_jobs', schema=None) as batch_op:
        batch_op.drop_column('leases_lost')
