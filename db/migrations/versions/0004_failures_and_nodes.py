"""runs back off after upload failures; every uploader-owned row belongs to a node

Runs get `failures` (in a row) and `retry_at` (the next try). Work_dirs, sources, runs, segments, checkpoints and
problems get `node`, the uploader that owns them (DESIGN 11); rows that exist already get '' and are adopted by
the first uploader that starts after the upgrade. A path is unique per node, no longer across the cluster.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 22:40:00.000000

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0004'
down_revision: Union[str, Sequence[str], None] = '0003'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

# SQLite reflects the unnamed UNIQUE(path) of 0001 without a name; this convention names it for batch mode.
UNNAMED = {"uq": "uq_%(table_name)s_%(column_0_name)s"}


def _path_constraint(table: str) -> str:
    return f"{table}_path_key" if op.get_bind().dialect.name == "postgresql" else f"uq_{table}_path"


def _node_column() -> sa.Column:
    return sa.Column('node', sa.String(length=255), nullable=False, server_default='')


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('failures', sa.Integer(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('retry_at', sa.Float(), nullable=True))
        batch_op.add_column(_node_column())
    for table in ('segments', 'checkpoints'):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(_node_column())
    for table, name in (('work_dirs', 'uq_work_dir_node_path'), ('sources', 'uq_source_node_path')):
        with op.batch_alter_table(table, schema=None, naming_convention=UNNAMED) as batch_op:
            batch_op.add_column(_node_column())
            batch_op.drop_constraint(_path_constraint(table), type_='unique')
            batch_op.create_unique_constraint(name, ['node', 'path'])
    with op.batch_alter_table('problems', schema=None) as batch_op:
        batch_op.add_column(_node_column())
        batch_op.drop_constraint('uq_problem', type_='unique')
        batch_op.create_unique_constraint('uq_problem', ['node', 'path', 'byte_offset', 'kind'])


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('problems', schema=None) as batch_op:
        batch_op.drop_constraint('uq_problem', type_='unique')
        batch_op.create_unique_constraint('uq_problem', ['path', 'byte_offset', 'kind'])
        batch_op.drop_column('node')
    for table, name in (('work_dirs', 'uq_work_dir_node_path'), ('sources', 'uq_source_node_path')):
        with op.batch_alter_table(table, schema=None, naming_convention=UNNAMED) as batch_op:
            batch_op.drop_constraint(name, type_='unique')
            batch_op.create_unique_constraint(_path_constraint(table), ['path'])
            batch_op.drop_column('node')
    for table in ('segments', 'checkpoints'):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column('node')
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.drop_column('node')
        batch_op.drop_column('retry_at')
        batch_op.drop_column('failures')
