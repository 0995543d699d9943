"""Tests for evaluator.queue (DESIGN 8: leased, not locked) on SQLite and on a real PostgreSQL server.

Jobs are inserted through the ORM (with the work_dir, run and checkpoint rows their foreign keys need) and
driven only through the queue's functions; `now` stands in for the clock where the queue accepts it.
"""
from __future__ import annotations

import io
import multiprocessing
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from queue import Empty
from typing import Any

import pytest
from PIL import Image
from sqlalchemy import func, select

from common.backoff import BACKOFF_BASE_S, BACKOFF_CAP_S, backoff_s
from common.records import EvalOutcome, Instances, Manifest, ValImageRecord
from db import eval_results
from db import jobs as queue
from db.models import (
    Checkpoint,
    EvalJob,
    JobState,
    Prediction,
    Run,
    ValImage,
    ValManifest,
    WorkDir,
)
from db.session import Database, sqlite_url

T0 = 1_700_000_000.0  # a fixed "now" for the tests that pass the clock
LEASE = 60.0


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """A migrated, empty state DB per test, on each backend."""
    url = sqlite_url(tmp_path / "state.db") if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    database = Database(url)
    database.upgrade()
    yield database
    database.dispose()


def add_jobs(db: Database, *run_afters: float, **fields: Any) -> list[int]:
    """One queued job per `run_after`, in that id order, each for its own checkpoint of one new run."""
    key = uuid.uuid4().hex
    with db.transaction() as session:
        work_dir = WorkDir(path=f"/work_dirs/{key}", root="/work_dirs", name=key)
        run = Run(work_dir=work_dir, wandb_id=key[:16], name=key, group="g", launch="20240101_000000")
        session.add(run)
        session.flush()
        ids = []
        for n, run_after in enumerate(run_afters, start=1):
            ckpt = Checkpoint(work_dir_id=work_dir.id, run_id=run.id, path=f"{work_dir.path}/epoch_{n}.pth",
                              name=f"epoch_{n}.pth", kind="epoch", number=n, ino=n, size=1, mtime_ns=0, still_since=0.0)
            session.add(ckpt)
            session.flush()
            job = EvalJob(checkpoint_id=ckpt.id, run_id=run.id, checkpoint_path=f"/store/{key}/{n}.pth",
                          work_dir=work_dir.path, unit="epoch", number=n, config_name=f"cfg_{n}.py",
                          config_text=f"# config {n}", num_eval_images=2, bbox_score_thr=0.3, run_after=run_after,
                          **fields)
            session.add(job)
            session.flush()
            ids.append(job.id)
    return ids


def get(db: Database, job_id: int) -> EvalJob:
    with db.transaction() as session:
        job = session.get(EvalJob, job_id)
        assert job is not None
        return job


def row(db: Database, job_id: int) -> dict[str, Any]:
    job = get(db, job_id)
    return {c.key: getattr(job, c.key) for c in EvalJob.__table__.columns}


def count(db: Database, model: type) -> int:
    with db.transaction() as session:
        return session.scalar(select(func.count()).select_from(model))  # type: ignore[return-value]


def png(shade: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (2, 2), shade).save(buf, "PNG")
    return buf.getvalue()


def manifest(classes: tuple[str, ...] = ("cat", "dog")) -> Manifest:
    """A new object each call; same arguments → same content → same digest."""
    images = [
        ValImageRecord(position=i, dataset_index=7 * i, image_name=f"img_{i}.png", file_ext="png", width=2, height=2,
                       image_bytes=png(40 * i), ground_truth=Instances(boxes=[[0.0, 0.0, 1.0, 1.0]], labels=[i]))
        for i in range(2)
    ]
    return Manifest(classes=list(classes), images=images, source={"ann_file": "val.json", "val_size": 10})


def outcome(m: Manifest, seed: int) -> EvalOutcome:
    predictions = [Instances(boxes=[[0.0, 0.0, 1.0, float(seed + i)]], labels=[i], scores=[0.5 + i / 10]) for i in range(len(m.images))]
    return EvalOutcome(manifest=m, predictions=predictions, metrics={"bbox_mAP": seed / 10}, device="cpu", seconds=1.5)


def test_a_worker_claims_only_the_jobs_of_its_stack(db: Database) -> None:
    """One 2.x and one 3.x worker on one queue: each takes its own kind, oldest first, and an idle worker of
    one stack does not wait for the other's jobs."""
    v2_old, v2_new = add_jobs(db, T0 - 50, T0 - 10)
    v3_old, v3_new = add_jobs(db, T0 - 100, T0 - 20, stack="mmdet3")
    assert queue.unfinished(db, "mmdet3") == 2 and queue.unfinished(db) == 4
    assert [queue.claim(db, "w3", LEASE, now=T0, stack="mmdet3").id for _ in range(2)] == [v3_old, v3_new]  # type: ignore[union-attr]
    assert queue.claim(db, "w3", LEASE, now=T0, stack="mmdet3") is None, "the 2.x jobs are not for it"
    claimed = queue.claim(db, "w2", LEASE, now=T0, stack="mmdet2")
    assert claimed is not None and (claimed.id, claimed.stack) == (v2_old, "mmdet2")
    assert queue.claim(db, "w2", LEASE, now=T0, stack="mmdet2").id == v2_new  # type: ignore[union-attr]


def test_claim_takes_the_oldest_due_job(db: Database) -> None:
    later, older, future, tie = add_jobs(db, T0 - 100, T0 - 200, T0 + 30, T0 - 100)

    first = queue.claim(db, "w1", LEASE, stack="mmdet2", now=T0)
    assert first is not None and first.id == older
    job = get(db, older)
    assert (job.state, job.lease_owner, job.lease_expires_at, job.attempts) == (JobState.RUNNING, "w1", T0 + LEASE, 1)
    assert first == queue.ClaimedJob(older, 1, "mmdet2", job.checkpoint_path, job.work_dir, "cfg_2.py", "# config 2", 2, 0.3)

    second = queue.claim(db, "w2", LEASE, stack="mmdet2", now=T0)
    assert second is not None and second.id == later  # same run_after as `tie`: the lower id first
    third = queue.claim(db, "w3", LEASE, stack="mmdet2", now=T0)
    assert third is not None and third.id == tie
    assert queue.claim(db, "w4", LEASE, stack="mmdet2", now=T0) is None  # `future` is not due, the others are leased
    assert get(db, future).state == JobState.QUEUED and get(db, future).attempts == 0
    assert get(db, older).lease_owner == "w1"  # not taken over by the later claims

    fourth = queue.claim(db, "w4", LEASE, stack="mmdet2", now=T0 + 30)  # due now; the leases still hold
    assert fourth is not None and fourth.id == future


def test_renew_complete_fail_are_fenced(db: Database) -> None:
    (job_id,) = add_jobs(db, 0.0)
    now = time.time()
    assert queue.claim(db, "w1", LEASE, stack="mmdet2", now=now) is not None
    before = row(db, job_id)

    assert not queue.renew(db, job_id, "w2", LEASE)
    assert not queue.complete(db, job_id, "w2", outcome(manifest(), 1))
    assert not queue.fail(db, job_id, "w2", "not mine", retryable=False)
    assert row(db, job_id) == before
    assert (count(db, ValManifest), count(db, Prediction)) == (0, 0)

    assert queue.renew(db, job_id, "w1", 3600)
    assert get(db, job_id).lease_expires_at >= now + 3600  # type: ignore[operator]

    # w1 stalls past its lease: w2 reclaims the job, and w1 learns it on its next call
    taken = queue.claim(db, "w2", LEASE, stack="mmdet2", now=now + 3601)
    assert taken is not None and taken.id == job_id and taken.attempts == 2
    before = row(db, job_id)
    assert before["lease_owner"] == "w2"
    assert not queue.renew(db, job_id, "w1", LEASE)
    assert not queue.complete(db, job_id, "w1", outcome(manifest(), 1))
    assert not queue.fail(db, job_id, "w1", "late", retryable=True)
    assert row(db, job_id) == before
    assert (count(db, ValManifest), count(db, Prediction)) == (0, 0)

    assert queue.complete(db, job_id, "w2", outcome(manifest(), 2))
    done = row(db, job_id)
    assert done["state"] == JobState.DONE
    # a finished job is no one's any more, its owner included
    assert not queue.renew(db, job_id, "w2", LEASE)
    assert not queue.complete(db, job_id, "w2", outcome(manifest(), 3))
    assert not queue.fail(db, job_id, "w2", "after the fact", retryable=False)
    assert row(db, job_id) == done


def test_expired_lease_is_reclaimed_and_the_last_one_parks_the_job(db: Database) -> None:
    stuck, waiting = add_jobs(db, 0.0, T0 + 15, max_attempts=2)

    assert queue.claim(db, "w1", 10, stack="mmdet2", now=T0).id == stuck  # type: ignore[union-attr]
    assert queue.claim(db, "w2", 10, stack="mmdet2", now=T0 + 10) is None  # a lease that ends exactly now is still held
    assert get(db, stuck).lease_owner == "w1"

    retaken = queue.claim(db, "w2", 10, stack="mmdet2", now=T0 + 11)
    assert retaken is not None and retaken.id == stuck and retaken.attempts == 2
    job = get(db, stuck)
    assert (job.state, job.lease_owner, job.lease_expires_at, job.attempts) == (JobState.RUNNING, "w2", T0 + 21, 2)

    # w2 dies too: that was the last attempt, so the next claim parks it (and takes the other job)
    nxt = queue.claim(db, "w3", 10, stack="mmdet2", now=T0 + 22)
    assert nxt is not None and nxt.id == waiting
    job = get(db, stuck)
    assert (job.state, job.lease_owner, job.attempts) == (JobState.DEAD, None, 2)
    assert job.finished_at is not None
    assert job.last_error == "its worker stopped renewing the lease on every attempt"
    waiting_job = get(db, waiting)
    assert (waiting_job.state, waiting_job.attempts) == (JobState.RUNNING, 1)  # a live lease is not parked


def test_backoff_grows_and_is_capped() -> None:
    for attempts in range(1, 13):
        nominal = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** (attempts - 1))
        samples = [backoff_s(attempts) for _ in range(200)]
        assert all(0.9 * nominal <= s <= 1.1 * nominal for s in samples), (attempts, min(samples), max(samples))
        assert max(samples) > min(samples)  # jittered, so workers that failed together don't retry together
    assert BACKOFF_BASE_S * 2 ** 11 > BACKOFF_CAP_S  # so the loop above reached the cap


def test_retryable_failures_back_off_until_attempts_run_out(db: Database) -> None:
    (job_id,) = add_jobs(db, 0.0, max_attempts=3)
    now = T0
    for attempt in (1, 2):
        claimed = queue.claim(db, "w1", LEASE, stack="mmdet2", now=now)
        assert claimed is not None and claimed.attempts == attempt
        before = time.time()
        assert queue.fail(db, job_id, "w1", f"CUDA out of memory #{attempt}", retryable=True)
        after = time.time()
        job = get(db, job_id)
        assert (job.state, job.lease_owner, job.lease_expires_at) == (JobState.QUEUED, None, None)
        assert job.last_error == f"CUDA out of memory #{attempt}"
        nominal = BACKOFF_BASE_S * 2 ** (attempt - 1)
        assert before + 0.9 * nominal <= job.run_after <= after + 1.1 * nominal
        assert queue.claim(db, "w2", LEASE, stack="mmdet2", now=job.run_after - 0.01) is None  # not due yet
        now = job.run_after

    assert queue.claim(db, "w1", LEASE, stack="mmdet2", now=now).attempts == 3  # type: ignore[union-attr]
    assert queue.fail(db, job_id, "w1", "CUDA out of memory #3", retryable=True)
    job = get(db, job_id)
    assert (job.state, job.attempts, job.lease_owner, job.last_error) == (JobState.DEAD, 3, None, "CUDA out of memory #3")
    assert job.finished_at is not None
    assert queue.claim(db, "w1", LEASE, stack="mmdet2", now=now + 10_000) is None


def test_permanent_failure_parks_the_job_and_requeue_revives_it(db: Database) -> None:
    first, second, finished = add_jobs(db, 0.0, 0.0, 0.0)
    for job_id in (first, second, finished):
        assert queue.claim(db, "w1", LEASE, stack="mmdet2", now=T0).id == job_id  # type: ignore[union-attr]
    assert queue.fail(db, first, "w1", "config has no val set", retryable=False)
    assert queue.fail(db, second, "w1", "checkpoint is corrupt", retryable=False)
    assert queue.complete(db, finished, "w1", outcome(manifest(), 1))
    job = get(db, first)
    assert (job.state, job.attempts, job.last_error) == (JobState.DEAD, 1, "config has no val set")
    assert job.finished_at is not None
    assert queue.claim(db, "w2", LEASE, stack="mmdet2", now=T0 + 10_000) is None  # dead jobs are not claimable

    assert queue.requeue(db, [first]) == (1, [])
    job = get(db, first)
    assert (job.state, job.attempts, job.run_after, job.finished_at) == (JobState.QUEUED, 0, 0.0, None)
    assert get(db, second).state == JobState.DEAD
    claimed = queue.claim(db, "w2", LEASE, stack="mmdet2", now=T0)
    assert claimed is not None and (claimed.id, claimed.attempts) == (first, 1)

    assert queue.requeue(db) == (1, [])  # every dead job: `second`; the running and the done one stay as they are
    assert (get(db, second).state, get(db, second).attempts) == (JobState.QUEUED, 0)
    assert get(db, first).state == JobState.RUNNING
    assert get(db, finished).state == JobState.DONE
    assert queue.requeue(db) == (0, [])


def test_complete_stores_a_manifest_once_and_predictions_per_job(db: Database) -> None:
    a, b, c = add_jobs(db, 0.0, 0.0, 0.0)
    assert [queue.claim(db, "w1", LEASE, stack="mmdet2", now=T0).id for _ in range(3)] == [a, b, c]  # type: ignore[union-attr]
    m = manifest()
    assert not eval_results.has_manifest(db, m.digest)
    assert queue.complete(db, a, "w1", outcome(manifest(), 1))
    assert eval_results.has_manifest(db, m.digest)
    assert queue.complete(db, b, "w1", outcome(manifest(), 2))  # equal content in new objects
    assert queue.complete(db, c, "w1", outcome(manifest(("cat", "dog", "bird")), 3))

    job_a, job_b, job_c = get(db, a), get(db, b), get(db, c)
    assert job_a.manifest_id == job_b.manifest_id != job_c.manifest_id
    assert (job_a.state, job_a.lease_owner, job_a.lease_expires_at) == (JobState.DONE, None, None)
    assert (job_b.metrics_json, job_b.device, job_b.seconds) == ('{"bbox_mAP":0.2}', "cpu", 1.5)
    assert job_b.finished_at is not None
    with db.transaction() as session:
        manifests = session.scalars(select(ValManifest).order_by(ValManifest.id)).all()
        assert [(x.id, x.digest, x.num_images) for x in manifests] == [
            (job_a.manifest_id, m.digest, 2), (job_c.manifest_id, manifest(("cat", "dog", "bird")).digest, 2)]
        images = session.scalars(select(ValImage).where(ValImage.manifest_id == job_a.manifest_id).order_by(ValImage.position)).all()
        assert [(im.position, im.dataset_index, im.image_name, im.image_bytes, im.ground_truth_json) for im in images] == [
            (im.position, im.dataset_index, im.image_name, im.image_bytes, im.ground_truth.to_json()) for im in m.images]
        assert session.scalar(select(func.count()).select_from(ValImage)) == 4  # 2 per distinct manifest
        for job_id, seed in ((a, 1), (b, 2), (c, 3)):
            stored = session.execute(
                select(Prediction.position, Prediction.result_json).where(Prediction.job_id == job_id).order_by(Prediction.id)
            ).all()
            assert [tuple(r) for r in stored] == [(i, p.to_json()) for i, p in enumerate(outcome(m, seed).predictions)]


def _claim_until_empty(url: str, worker_id: str, start: Any, results: Any) -> None:
    """A worker process: its own Database, claiming (and completing, all with one manifest) until none is left."""
    claimed: list[int] = []
    try:
        db = Database(url)
        db.engine.connect().close()  # connected before the start line, so the claims overlap
        start.wait()
        while (job := queue.claim(db, worker_id, 600, stack="mmdet2")) is not None:
            claimed.append(job.id)
            if not queue.complete(db, job.id, worker_id, outcome(manifest(), job.id)):
                raise AssertionError(f"{worker_id} lost job {job.id} it had just claimed")
        db.dispose()
        results.put((worker_id, claimed, None))
    except BaseException:
        results.put((worker_id, claimed, traceback.format_exc()))


def _claims_of_concurrent_workers(db: Database, workers: int) -> Counter[int]:
    """Job id → how many times it was claimed, by `workers` processes claiming at once until none is left."""
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Barrier(workers), ctx.Queue()
    procs = [ctx.Process(target=_claim_until_empty, args=(db.url, f"w{i}", start, results)) for i in range(workers)]
    for proc in procs:
        proc.start()
    reports: list[tuple[str, list[int], str | None]] = []
    deadline = time.monotonic() + 120
    try:
        while len(reports) < workers:
            try:
                reports.append(results.get(timeout=1))
            except Empty:
                crashed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                assert not crashed, f"worker processes exited {crashed} without a report"
                assert time.monotonic() < deadline, f"only {len(reports)} of {workers} workers reported in 120 s"
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    errors = [error for _, _, error in reports if error]
    assert not errors, "\n".join(errors)
    return Counter(job_id for _, claimed, _ in reports for job_id in claimed)


def test_concurrent_workers_claim_every_job_exactly_once(db: Database) -> None:
    job_ids = add_jobs(db, *[0.0] * 30)
    claims = _claims_of_concurrent_workers(db, 4)
    assert sorted(claims) == job_ids, f"lost: {set(job_ids) - set(claims)}"
    assert all(n == 1 for n in claims.values()), {k: n for k, n in claims.items() if n > 1}
    with db.transaction() as session:
        states = session.execute(select(EvalJob.state, EvalJob.attempts, func.count()).group_by(EvalJob.state, EvalJob.attempts)).all()
    assert [tuple(s) for s in states] == [(JobState.DONE, 1, 30)]
    assert (count(db, ValManifest), count(db, ValImage), count(db, Prediction)) == (1, 2, 60)


def test_concurrent_workers_park_exhausted_jobs_and_never_claim_them(db: Database) -> None:
    """Jobs whose worker died on the last attempt, among due ones: every claim parks them, none claims them."""
    exhausted = add_jobs(db, *[0.0] * 10, state=JobState.RUNNING, lease_owner="gone", lease_expires_at=0.0,
                         attempts=2, max_attempts=2)
    due = add_jobs(db, *[0.0] * 20)
    claims = _claims_of_concurrent_workers(db, 4)
    assert sorted(claims) == due and all(n == 1 for n in claims.values()), claims
    for job_id in exhausted:
        job = get(db, job_id)
        assert (job.state, job.lease_owner, job.attempts) == (JobState.DEAD, None, 2), row(db, job_id)
        assert job.last_error == "its worker stopped renewing the lease on every attempt"
