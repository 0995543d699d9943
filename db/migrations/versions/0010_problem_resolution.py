"""problems get a resolved state: the next scan or read of their source that no longer finds the cause sets
resolved_at (db/problems.py); `status` shows only the open ones.

Revision ID: 0010
Revises: 0008
Create Date: 2026-12-04 17:05:00.000000

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0010'
down_revision: Union[str, Sequence[str], None] = '0008'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table('problems', schema=None) as batch_op:
        batch_op.add_column(sa.Column('resolved_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('problems', schema=None) as batch_op:
        batch_op.drop_column('resolved_at')
