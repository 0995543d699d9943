"""The schema under alembic: migrations build exactly the models, and an existing state DB keeps its history."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from db import nodes, outbox
from db.models import ArtifactKind, Base
from db.session import Database, _alembic_config, sqlite_url


def migrated_to(db: Database, revision: str) -> None:
    cfg = _alembic_config()
    with db.engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, revision)


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_db(request, tmp_path: Path) -> Database:
    if request.param == "sqlite":
        return Database(sqlite_url(tmp_path / "state.db"), node="n1")
    return Database(request.getfixturevalue("postgres_url"), node="n1")


def test_the_migrations_build_exactly_the_models(empty_db: Database) -> None:
    empty_db.upgrade()
    with empty_db.engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    current, head = empty_db.revisions()
    assert current == head


def test_an_existing_state_db_keeps_what_was_uploaded(empty_db: Database) -> None:
    """A DB written before the artifact outbox and nodes (revision 0002): uploaded artifacts become uploaded
    outbox entries, the checkpoint keeps its digests, and every row is adopted by the first uploader."""
    db = empty_db
    migrated_to(db, "0002")
    now = "2026-11-01 00:00:00"
    statements = [
        "INSERT INTO work_dirs (id, path, root, name, discovered_at, gone) VALUES (1, '/w/exp', '/w', 'exp', :now, false)",
        "INSERT INTO runs (id, work_dir_id, wandb_id, name, \"group\", job_type, launch, next_step, summary_json, state, created_at,"
        " hook_options_json) VALUES (1, 1, 'abc12345', 'exp-1', 'exp', 'train', '20261101_000000', 10, '{}', 'active', :now, '{}')",
        "INSERT INTO segments (id, run_id, seq, dir, mode, rows, state, opened_at) VALUES (1, 1, 1, '/d/abc12345/0001', 'offline', 9,"
        " 'closed', :now)",
        "INSERT INTO checkpoints (id, work_dir_id, run_id, path, name, kind, number, ino, size, mtime_ns, still_since, state,"
        " md5_b64, sha256, metadata_json, aliases_json, segment_id, pin_path, pin_by_copy, first_seen, updated_at) VALUES"
        " (1, 1, 1, '/w/exp/epoch_1.pth', 'epoch_1.pth', 'epoch', 1, 7, 1000, 1, 0, 'uploaded', 'bWQ1', 'aa', '{\"epoch\": 1}',"
        " '[\"epoch_1\", \"latest\"]', 1, '/s/1-epoch_1.pth', false, :now, :now)",
        "INSERT INTO val_manifests (id, digest, classes_json, num_images, source_json, created_at) VALUES (1, 'd1', '[]', 0, '{}', :now)",
        "INSERT INTO run_val_artifacts (id, run_id, manifest_id, segment_id, client_id, artifact_digest, entries_json) VALUES"
        " (1, 1, 1, 1, 'client-1', 'digest-1', '{\"entries\": {}, \"local\": {}}')",
        "INSERT INTO eval_jobs (id, checkpoint_id, run_id, checkpoint_path, pinned, work_dir, unit, number, num_eval_images,"
        " bbox_score_thr, state, attempts, max_attempts, run_after, created_at, uploaded, segment_id, manifest_id) VALUES"
        " (1, 1, 1, '/s/eval/1-epoch_1.pth', false, '/w/exp', 'epoch', 1, 6, 0.3, 'done', 1, 5, 0, :now, true, 1, 1)",
    ]
    with db.engine.begin() as connection:
        for statement in statements:
            connection.execute(sa.text(statement), {"now": now})

    db.upgrade()
    assert nodes.adopt_rows_without_node(db) == 4  # work_dir, run, segment, checkpoint
    with db.transaction() as session:
        models = outbox.outcomes(session, ArtifactKind.MODEL)
        tables = outbox.outcomes(session, ArtifactKind.PREDICTIONS)
        val = outbox.logged_val(session, 1, 1)
        assert outbox.pending_runs(session) == []
    assert models[1].uploaded and models[1].aliases == ["epoch_1", "latest"] and models[1].segment_dir == "/d/abc12345/0001"
    assert models[1].logged["metadata"] == {"epoch": 1}
    assert tables[1].uploaded and tables[1].aliases == ["latest", "epoch_1"]
    assert val["client_id"] == "client-1" and val["digest"] == "digest-1" and val["entries"] == {}
    with db.engine.connect() as connection:
        assert connection.execute(sa.text("SELECT md5_b64, sha256, node FROM checkpoints")).one() == ("bWQ1", "aa", "n1")
        assert json.loads(connection.execute(sa.text("SELECT metadata_json FROM outbox_artifacts WHERE kind = 'model'")).scalar())


def _upgrade(url: str) -> None:
    Database(url).upgrade()


def test_services_starting_together_on_one_postgresql_migrate_one_after_the_other(postgres_url: str) -> None:
    """Uploaders and workers of several nodes start at once against an empty PostgreSQL: each migrates or
    finds the schema migrated, none fails on the other's half-made tables."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_upgrade, args=(postgres_url,)) for _ in range(4)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
    assert [p.exitcode for p in processes] == [0, 0, 0, 0]
    current, head = Database(postgres_url).revisions()
    assert current == head
