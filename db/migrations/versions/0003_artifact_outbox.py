"""one outbox for artifacts: checkpoint versions, val and prediction tables become outbox_artifacts rows

What the writer used to record on checkpoints (segment, metadata, aliases), on eval jobs (segment,
uploaded) and in run_val_artifacts moves into the artifact outbox. Artifacts already uploaded keep their record
there; artifacts logged into a segment that was not closed yet get no entry: their producers queue them again
and the open segment, which then holds an artifact nobody expects, is rebuilt by recovery.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30 22:10:00.000000

"""
import json
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0003'
down_revision: Union[str, Sequence[str], None] = '0002'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table('outbox_artifacts',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.Enum('model', 'val', 'pred', name='artifactkind', native_enum=False, length=16), nullable=False),
    sa.Column('key', sa.String(length=64), nullable=False),
    sa.Column('checkpoint_id', sa.Integer(), nullable=True),
    sa.Column('eval_job_id', sa.Integer(), nullable=True),
    sa.Column('manifest_id', sa.Integer(), nullable=True),
    sa.Column('file_path', sa.String(length=4096), nullable=True),
    sa.Column('file_name', sa.String(length=512), nullable=True),
    sa.Column('file_md5', sa.String(length=32), nullable=True),
    sa.Column('aliases_json', sa.Text(), nullable=False),
    sa.Column('metadata_json', sa.Text(), nullable=False),
    sa.Column('logged_json', sa.Text(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('segment_id', sa.Integer(), nullable=True),
    sa.Column('uploaded', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['checkpoint_id'], ['checkpoints.id'], ),
    sa.ForeignKeyConstraint(['eval_job_id'], ['eval_jobs.id'], ),
    sa.ForeignKeyConstraint(['manifest_id'], ['val_manifests.id'], ),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], ),
    sa.ForeignKeyConstraint(['segment_id'], ['segments.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('run_id', 'key', name='uq_outbox_artifact')
    )
    with op.batch_alter_table('outbox_artifacts', schema=None) as batch_op:
        batch_op.create_index('ix_outbox_artifacts_pending', ['run_id', 'uploaded', 'id'], unique=False)

    _move_uploaded_artifacts(op.get_bind())

    with op.batch_alter_table('eval_jobs', schema=None) as batch_op:
        batch_op.drop_column('segment_id')
        batch_op.drop_column('uploaded')
    with op.batch_alter_table('checkpoints', schema=None) as batch_op:
        batch_op.drop_column('metadata_json')
        batch_op.drop_column('aliases_json')
        batch_op.drop_column('segment_id')
    op.drop_table('run_val_artifacts')


def _move_uploaded_artifacts(conn: sa.Connection) -> None:
    now = sa.func.now()
    entries = []
    for row in conn.execute(sa.text(
        "SELECT id, run_id, name, pin_path, path, md5_b64, metadata_json, aliases_json, segment_id "
        "FROM checkpoints WHERE state = 'uploaded' AND segment_id IS NOT NULL AND run_id IS NOT NULL"
    )).mappings():
        logged = {"type": "model", "md5": row["md5_b64"], "metadata": json.loads(row["metadata_json"] or "{}")}
        entries.append(dict(run_id=row["run_id"], kind="model", key=f"model:{row['id']}", checkpoint_id=row["id"], file_path=row["pin_path"] or row["path"], file_md5=row["md5_b64"],
                            file_name=row["name"], aliases_json=row["aliases_json"] or "[]",
                            metadata_json=row["metadata_json"] or "{}", logged_json=json.dumps(logged),
                            segment_id=row["segment_id"]))
    for row in conn.execute(sa.text(
        "SELECT v.run_id, v.manifest_id, v.segment_id, v.client_id, v.artifact_digest, v.entries_json "
        "FROM run_val_artifacts v JOIN segments s ON s.id = v.segment_id WHERE s.state = 'closed'"
    )).mappings():
        logged = {"type": "dataset", "digest": row["artifact_digest"], "client_id": row["client_id"],
                  **json.loads(row["entries_json"])}
        entries.append(dict(run_id=row["run_id"], kind="val", key=f"val:{row['manifest_id']}", manifest_id=row["manifest_id"], logged_json=json.dumps(logged),
                            segment_id=row["segment_id"]))
    for row in conn.execute(sa.text(
        "SELECT id, run_id, manifest_id, unit, number, segment_id FROM eval_jobs WHERE uploaded AND segment_id IS NOT NULL"
    )).mappings():
        entries.append(dict(run_id=row["run_id"], kind="pred", key=f"pred:{row['id']}", eval_job_id=row["id"], manifest_id=row["manifest_id"],
                            aliases_json=json.dumps(["latest", f"{row['unit']}_{row['number']}"]),
                            logged_json=json.dumps({"type": "evaluation"}), segment_id=row["segment_id"]))
    table = sa.table(
        'outbox_artifacts', *(sa.column(c) for c in (
            'run_id', 'kind', 'key', 'checkpoint_id', 'eval_job_id', 'manifest_id', 'file_path', 'file_name', 'file_md5', 'aliases_json',
            'metadata_json', 'logged_json', 'segment_id', 'uploaded', 'created_at'))
    )
    for entry in entries:
        values = {"checkpoint_id": None, "eval_job_id": None, "manifest_id": None, "file_path": None, "file_name": None, "file_md5": None,
                  "aliases_json": "[]", "metadata_json": "{}", **entry}
        conn.execute(table.insert().values(**values, uploaded=True, created_at=now))


def downgrade() -> None:
    """Downgrade schema (artifact records of the outbox are dropped: their artifacts stay in W&B)."""
    op.create_table('run_val_artifacts',
    sa.Column('id', sa.INTEGER(), nullable=False),
    sa.Column('run_id', sa.INTEGER(), nullable=False),
    sa.Column('manifest_id', sa.INTEGER(), nullable=False),
    sa.Column('segment_id', sa.INTEGER(), nullable=False),
    sa.Column('client_id', sa.VARCHAR(length=128), nullable=False),
    sa.Column('artifact_digest', sa.VARCHAR(length=64), nullable=False),
    sa.Column('entries_json', sa.TEXT(), nullable=False),
    sa.ForeignKeyConstraint(['manifest_id'], ['val_manifests.id'], ),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], ),
    sa.ForeignKeyConstraint(['segment_id'], ['segments.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('run_id', 'manifest_id', name='uq_run_val')
    )
    with op.batch_alter_table('checkpoints', schema=None) as batch_op:
        batch_op.add_column(sa.Column('segment_id', sa.INTEGER(), nullable=True))
        batch_op.add_column(sa.Column('aliases_json', sa.TEXT(), nullable=True))
        batch_op.add_column(sa.Column('metadata_json', sa.TEXT(), nullable=True))
    with op.batch_alter_table('eval_jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('uploaded', sa.BOOLEAN(), nullable=False, server_default=sa.false()))
        batch_op.add_column(sa.Column('segment_id', sa.INTEGER(), nullable=True))
    with op.batch_alter_table('outbox_artifacts', schema=None) as batch_op:
        batch_op.drop_index('ix_outbox_artifacts_pending')
    op.drop_table('outbox_artifacts')
