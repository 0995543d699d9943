"""eval jobs keep their evaluation insight (per-class metrics, PR curves, confusion matrix, per-image errors) and
the options it was computed with

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-05 22:30:00.000000

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0014'
down_revision: Union[str, Sequence[str], None] = '0013'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table('eval_jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('insight_json', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('eval_classwise', sa.Boolean(), nullable=False, server_default=sa.true()))
        batch_op.add_column(sa.Column('confusion_score_thr', sa.Float(), nullable=False, server_default='0.3'))
        batch_op.add_column(sa.Column('confusion_iou_thr', sa.Float(), nullable=False, server_default='0.5'))


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('eval_jobs', schema=None) as batch_op:
        batch_op.drop_column('confusion_iou_thr')
        batch_op.drop_column('confusion_score_thr')
        batch_op.drop_column('eval_classwise')
        batch_op.drop_column('insight_json')
