"""The schema under alembic: migrations build exactly the models, and an existing state DB keeps its history."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

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
    migrated_to(empty_db, "head")
    with empty_db.engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    current, head = empty_db.revisions()
    assert current == head == ScriptDirectory.from_config(_alembic_config()).get_current_head()


def test_a_new_state_db_gets_the_models_at_once_stamped_at_the_head(empty_db: Database, tmp_path: Path) -> None:
    """A new DB is built from the models in one go (faster than replaying every migration), stamped at the head,
    so that the next migration applies to it as to any other."""
    assert empty_db.upgrade() is True, "created"
    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    with empty_db.engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
        assert MigrationContext.configure(connection).get_current_revision() == head, "alembic reads our stamp"
        ours = version_table(connection)
    assert empty_db.revisions() == (head, head)
    assert empty_db.upgrade() is False  # started again: nothing to do

    if empty_db.is_sqlite:  # the same table as alembic's own stamp makes
        stamped = Database(sqlite_url(tmp_path / "stamped.db"))
        cfg = _alembic_config()
        with stamped.engine.begin() as connection:
            cfg.attributes["connection"] = connection
            command.stamp(cfg, "head")
        with stamped.engine.connect() as connection:
            assert version_table(connection) == ours


def version_table(connection: sa.Connection) -> tuple[list[tuple[str, str, bool]], dict]:
    found = sa.inspect(connection)
    columns = [(c["name"], str(c["type"]), c["nullable"]) for c in found.get_columns("alembic_version")]
    return columns, found.get_pk_constraint("alembic_version")


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


def test_uploaded_rows_of_an_existing_state_db_are_folded_and_the_file_shrinks(empty_db: Database) -> None:
    """A DB written before spans (revision 0007) that holds every payload it ever uploaded: the migration folds
    the uploaded rows (val rows and pending rows stay whole), dedup still knows every line, and SQLite's file
    gives the space back."""
    db = empty_db
    migrated_to(db, "0007")
    uploaded, pending = 20_000, 50
    payload = json.dumps({"train/loss": 0.5, "learning_rate": 0.01, "note": "x" * 300})
    with db.engine.begin() as connection:
        connection.execute(sa.text(
            "INSERT INTO work_dirs (id, node, path, root, name, discovered_at, gone) VALUES (1, 'n1', '/w/exp', '/w', 'exp', :now, false)"
        ), {"now": "2026-11-01 00:00:00"})
        connection.execute(sa.text(
            "INSERT INTO runs (id, node, work_dir_id, wandb_id, name, \"group\", job_type, launch, next_step, summary_json, state,"
            " created_at, hook_options_json, failures) VALUES (1, 'n1', 1, 'abc12345', 'exp-1', 'exp', 'train', 'l', :next, '{}',"
            " 'active', :now, '{}', 0)"
        ), {"now": "2026-11-01 00:00:00", "next": uploaded + pending + 1})
        connection.execute(sa.text(
            "INSERT INTO sources (id, node, work_dir_id, path, format, launch, generation, head_len, head_hash, \"offset\", tail_hash,"
            " size_seen, mtime_ns, parse_state_json, state, updated_at) VALUES (1, 'n1', 1, '/w/exp/l.log.json', 'mmdet2', 'l', 0, 0,"
            " '', 0, '', 0, 0, '{}', 'active', :now)"
        ), {"now": "2026-11-01 00:00:00"})
        connection.execute(sa.text(
            "INSERT INTO outbox_rows (run_id, step, source_id, generation, byte_offset, line_hash, kind, epoch, iter, payload_json,"
            " uploaded) VALUES (1, :step, 1, 0, :offset, :hash, :kind, :epoch, :step, :payload, :uploaded)"
        ), [
            {"step": step, "offset": step * 400, "hash": f"{step:016x}{0:016x}", "kind": "val" if step % 1000 == 0 else "train",
             "epoch": 1 + step // 1000, "payload": payload, "uploaded": step <= uploaded}
            for step in range(1, uploaded + pending + 1)
        ])
    size_before = _file_size(db)

    db.upgrade()
    with db.read() as session:
        counts = session.execute(sa.text("SELECT kind, uploaded, count(*) FROM outbox_rows GROUP BY kind, uploaded ORDER BY kind, uploaded")).all()
        assert [tuple(c) for c in counts] == [("train", False, pending), ("val", True, uploaded // 1000)]
        assert session.scalar(sa.text("SELECT sum(rows) FROM uploaded_spans")) == uploaded - uploaded // 1000
        stored = outbox.stored_lines(session, 1, 0, (uploaded + pending) * 400)
        assert len(stored) == uploaded + pending and (400, f"{1:016x}") in stored
        assert outbox.reached(session, 1, "epoch", 20) and outbox.reached(session, 1, "iter", 17) and not outbox.reached(session, 1, "epoch", 22)
        assert outbox.rows_of_source(session, 1) == uploaded + pending
    if db.is_sqlite:
        with db.engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA auto_vacuum").scalar() == 2  # incremental from now on
        assert _file_size(db) < size_before / 5


def _file_size(db: Database) -> int:
    if not db.is_sqlite:
        return 0
    db.dispose()  # the WAL goes back into the file
    return Path(db.engine.url.database).stat().st_size
