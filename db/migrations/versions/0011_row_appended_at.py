"""outbox rows keep when their line was appended (their log's mtime when it was read), so that the metrics
endpoint can give the lag to W&B's confirmation and the age of the oldest pending row

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-05 12:30:00.000000

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0011'
down_revision: Union[str, Sequence[str], None] = '0010'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table('outbox_rows', schema=None) as batch_op:
        batch_op.add_column(sa.Column('appended_at', sa.Float(), nullable=True))


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('outbox_rows', schema=None) as batch_op:
        batch_op.drop_column('appended_at')
