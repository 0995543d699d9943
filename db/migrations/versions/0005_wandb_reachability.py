"""online: whether each node's uploader reaches W&B (the circuit that pauses every upload while it does not)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 01:10:00.000000

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0005'
down_revision: Union[str, Sequence[str], None] = '0004'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table('wandb_reachability',
    sa.Column('node', sa.String(length=255), nullable=False),
    sa.Column('base_url', sa.String(length=2048), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('since', sa.Float(), nullable=True),
    sa.Column('failures', sa.Integer(), nullable=False),
    sa.Column('retry_at', sa.Float(), nullable=True),
    sa.PrimaryKeyConstraint('node')
    )


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_table('wandb_reachability')
