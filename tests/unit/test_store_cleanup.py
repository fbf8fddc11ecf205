"""Retention on real databases: a cleanup or a forgetting takes a job with all of its
events and checkpoints and leaves every other job's, keeps the status counts and stored
weights in step (on both backends); on a large SQLite file it goes in chunks that never
hold the writer past the budget, and keeps the WAL from growing by every chunk (SQLite
only: its file and WAL).

``JOBD_CLEANUP_JOBS`` sets the size of the large database (default 100,000 jobs, a tenth
of them expired; the issue's figure is for 1,000,000: ``bench/rpc_bench.py --prefill``).
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from jobd.models import JobStatus
from jobd.store import Listeners, Store
from jobd.store.db import Checkpointer
from jobd.store.sqlite import CLEANUP_CHUNK

from pg import StoreDb
from test_store import T0, Clock, clock, db, new_job, raw, submit  # noqa: F401 - fixtures

pytest_plugins = ["pg"]

DAY = 86_400 * 10**6
LARGE = int(os.environ.get("JOBD_CLEANUP_JOBS", "100000"))


def stored(db: StoreDb) -> dict[str, Any]:
    """What the database holds, counted from the rows themselves."""
    order = "rowid" if db.backend == "sqlite" else "id"  # events in the order written
    return {
        "events": {job_id: db.rows(
            f"SELECT at, status, actor FROM job_events WHERE job = ? ORDER BY {order}", seq)
            for seq, job_id in db.rows("SELECT seq, id FROM jobs")},
        "checkpoints": dict(db.rows(
            "SELECT j.id, count(*) FROM job_checkpoints c JOIN jobs j ON j.seq = c.job "
            "GROUP BY j.id")),
        "orphans": db.value(
            "SELECT (SELECT count(*) FROM job_events WHERE job NOT IN (SELECT seq FROM jobs))"
            " + (SELECT count(*) FROM job_checkpoints"
            "    WHERE job NOT IN (SELECT seq FROM jobs))"),
        "counts": dict(db.rows("SELECT status, count(*) FROM jobs GROUP BY status")),
        "weights": dict(db.rows(
            "SELECT user_id, sum(weight) FROM jobs "
            "WHERE status IN ('completed', 'failed', 'cancelled') GROUP BY user_id")),
    }


def weights(store: Store, users: list[str]) -> dict[str, int]:
    return {u: w for u in users if (w := store.stored_weight(u))}


def finished(store: Store, clock: Clock, at: int, status: JobStatus, *, user: str,
             checkpoint: bool = False, big: bool = False) -> str:
    clock.now = at
    job = submit(store, new_job(user=user, description="x" * 9000 if big else None))
    store.start_job(job.id)
    if checkpoint:
        store.save_checkpoint(job.id, "git_sync", {"rev": 1})
    return store.finish_job(job.id, status, error="boom" if status is JobStatus.FAILED
                            else None).id


def test_cleanup_leaves_no_event_or_checkpoint_of_a_deleted_job_and_keeps_every_others(
        db: StoreDb, clock: Clock) -> None:
    store = db.open(clock=clock)
    try:
        users = ["alice", "bob", "carol"]
        # active jobs older than every cutoff, among the expired ones: never touched
        running = submit(store, new_job(user="bob"))
        store.start_job(running.id)
        store.save_checkpoint(running.id, "git_sync", {"rev": 2})
        old = [finished(store, clock, T0 + n, status, user=users[n % 3], checkpoint=True,
                        big=n % 4 == 0)
               for n, status in enumerate([JobStatus.COMPLETED, JobStatus.CANCELLED] * 30)]
        old_failed = finished(store, clock, T0 + 100, JobStatus.FAILED, user="bob",
                              checkpoint=True)
        # kept: failed within its longer retention, and finished recently
        kept_failed = finished(store, clock, T0 + 5 * DAY, JobStatus.FAILED, user="alice",
                               checkpoint=True)
        recent = finished(store, clock, T0 + 9 * DAY, JobStatus.COMPLETED, user="carol",
                          checkpoint=True, big=True)
        clock.now = T0 + 1
        queued = submit(store, new_job(user="carol"))
        before = stored(db)
        clock.now = T0 + 10 * DAY
        gone = [i for ids in store.cleanup(keep_before=T0 + 8 * DAY,
                                           keep_failed_before=T0 + 2 * DAY, chunk=7)
                for i in ids]
        assert sorted(gone) == sorted([*old, old_failed])
        after = stored(db)
        assert after["orphans"] == 0
        assert set(after["events"]) == {kept_failed, recent, running.id, queued.id}
        for job_id in after["events"]:  # every event of every other job, as it was
            assert after["events"][job_id] == before["events"][job_id]
        assert after["checkpoints"] == {kept_failed: 1, recent: 1, running.id: 1}
        # the kept counts and weights (what admin.stats and max_stored_per_user read)
        assert store.counts() == after["counts"] == {"failed": 1, "completed": 1,
                                                     "running": 1, "queued": 1}
        assert weights(store, users) == after["weights"]
        assert [e["status"] for e in store.events(recent)] == [
            "created", "queued", "running", "completed"]
    finally:
        store.close()


def test_forgetting_the_excess_keeps_counts_weights_and_the_others_history(
        db: StoreDb, clock: Clock) -> None:
    store = db.open(clock=clock, max_stored_per_user=5)
    try:
        first = [finished(store, clock, T0 + n, JobStatus.COMPLETED, user="alice",
                          checkpoint=True) for n in range(5)]
        bobs = finished(store, clock, T0 + 10, JobStatus.FAILED, user="bob", checkpoint=True)
        before = stored(db)
        # a heavy job (weight 3) ending takes alice over 5: her three oldest go
        heavy = finished(store, clock, T0 + 20, JobStatus.COMPLETED, user="alice", big=True)
        after = stored(db)
        assert set(after["events"]) == {*first[3:], bobs, heavy}
        assert after["orphans"] == 0
        for job_id in (*first[3:], bobs):
            assert after["events"][job_id] == before["events"][job_id]
        assert store.stored_weight("alice") == after["weights"]["alice"] == 5
        assert store.counts() == after["counts"] == {"completed": 3, "failed": 1}
        # a lowered limit: the next cleanup forgets her oldest until she is under it
        store.max_stored_per_user = 4
        gone = [i for ids in store.cleanup(keep_before=0, keep_failed_before=0) for i in ids]
        assert gone == first[3:4]
        assert weights(store, ["alice", "bob"]) == stored(db)["weights"] == {"alice": 4,
                                                                             "bob": 1}
        assert store.counts() == stored(db)["counts"] == {"completed": 2, "failed": 1}
    finally:
        store.close()


def prefill(db: Path, n: int, expired: int) -> None:
    """``n`` finished jobs of 1,000 users with four events each, the oldest ``expired``
    of them finished 60 days before T0, the rest a day before; random ids, as uuid4."""
    Store(db).open().close()
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("BEGIN")
    conn.execute(
        "WITH RECURSIVE r(k) AS (SELECT 1 UNION ALL SELECT k + 1 FROM r WHERE k < :n) "
        "INSERT INTO jobs (id, type, user_id, project_id, status, progress, options, "
        "  version, created_at, started_at, completed_at, updated_at) "
        "SELECT lower(hex(randomblob(16))), 'sync', 'user' || (k % 1000), 'p' || (k % 17), "
        "  'completed', 100, '{\"branch\":\"main\"}', 1, t, t, t, t "
        "FROM (SELECT k, CASE WHEN k <= :expired THEN :old + k ELSE :recent + k END AS t "
        "      FROM r)",
        {"n": n, "expired": expired, "old": T0 - 60 * DAY, "recent": T0 - DAY})
    conn.execute(
        "INSERT INTO job_events (job, at, status, progress, actor) "
        "SELECT seq, created_at, s.status, 0, 'jobd' FROM jobs CROSS JOIN "
        "(SELECT 'created' AS status UNION ALL SELECT 'queued' UNION ALL SELECT 'running' "
        " UNION ALL SELECT 'completed') AS s ORDER BY seq")
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


@pytest.fixture(scope="module")
def large(tmp_path_factory: pytest.TempPathFactory) -> Path:
    db = tmp_path_factory.mktemp("large") / "jobd.db"
    prefill(db, LARGE, LARGE // 10)
    return db


def copy_of(large: Path, tmp_path: Path) -> Path:
    db = tmp_path / "jobd.db"
    db.write_bytes(large.read_bytes())
    return db


def test_a_cleanup_of_a_large_database_goes_in_bounded_chunks(
        large: Path, tmp_path: Path) -> None:
    db = copy_of(large, tmp_path)
    store = Store(db, clock=Clock(T0)).open()  # synchronous=full, as jobd runs
    try:
        live = submit(store, new_job(user="user7"))
        chunks = [len(ids) for ids in store.cleanup(keep_before=T0 - 30 * DAY,
                                                    keep_failed_before=T0 - 30 * DAY)]
        assert sum(chunks) == LARGE // 10
        # a write queued behind a chunk waits for it: no chunk is larger than the bound
        # (how long one takes is bench/rpc_bench.py's figure, not a test's)
        assert max(chunks) <= CLEANUP_CHUNK and len(chunks) >= LARGE // 10 // CLEANUP_CHUNK
        assert store.counts() == {"completed": LARGE - LARGE // 10, "queued": 1}
        assert store.get_job(live.id).status is JobStatus.QUEUED
    finally:
        store.close()
    assert stored_rows(db) == (LARGE - LARGE // 10 + 1, 4 * (LARGE - LARGE // 10) + 2)


def stored_rows(db: Path) -> tuple[int, int]:
    with raw(db) as conn:
        return (conn.execute("SELECT count(*) FROM jobs").fetchone()[0],
                conn.execute("SELECT count(*) FROM job_events").fetchone()[0])


def test_a_cleanup_checkpoints_between_chunks_so_the_wal_starts_over(
        large: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a smaller bound than jobd's, so that a test-sized sweep passes it many times
    monkeypatch.setattr(Checkpointer, "SWEEP_BYTES", 2 << 20)
    db = copy_of(large, tmp_path)
    wal = Path(f"{db}-wal")
    store = Store(db, clock=Clock(T0)).open()
    try:
        sizes = [wal.stat().st_size for _ in store.cleanup(keep_before=T0 - 30 * DAY,
                                                           keep_failed_before=T0 - 30 * DAY)]
    finally:
        store.close()
    assert len(sizes) >= 5
    # the WAL started over several times (SQLite cuts the file back when it does), so it
    # never held what all the chunks wrote to it
    written = sizes[0] + sum(max(0, b - a) for a, b in zip(sizes, sizes[1:]))
    restarts = sum(b < a for a, b in zip(sizes, sizes[1:]))
    assert restarts >= 2 and max(sizes) < written, sizes


def test_the_files_of_every_chunk_deleted_go_even_when_the_caller_stops_early(
        db: StoreDb, clock: Clock) -> None:
    # a chunk's files go while the next chunk is written: one in flight when the caller
    # lets go of the sweep has committed, and its files must go as well
    told: list[str] = []
    store = db.open(clock=clock, listeners=Listeners(deleted=told.extend))
    try:
        ids = {finished(store, clock, T0 + n, JobStatus.COMPLETED, user="alice")
               for n in range(120)}
        sweep = store.cleanup(keep_before=T0 + 1000, keep_failed_before=T0 + 1000, chunk=50)
        first = next(sweep)
        assert set(first) <= set(told)
        sweep.close()
        left = {r[0] for r in db.rows("SELECT id FROM jobs")}
        assert left < ids and set(told) == ids - left and len(told) == len(set(told))
        assert set(told) > set(first)  # the chunk written meanwhile went with its files
    finally:
        store.close()
