"""The schema: a database made by the store before jobd/store/ migrates and keeps working,
the job's invariants are CHECKs a raw write cannot pass, and the status counts stay in
step with the rows across every transition and cleanup."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Iterator

import pytest

from jobd.models import JobStatus
from jobd.rules import Rules
from jobd.store import Store
from jobd.store.sql import MIGRATIONS

from test_store import T0, Clock, new_job, raw, submit

FIXTURE = Path(__file__).parent / "fixtures" / "store_v4.sql"
#: the fixture's jobs by the state it left them in (see its header)
OLD = {name: f"0000000{n}-0000-4000-8000-00000000000{n}" for n, name in enumerate(
    ["queued", "running", "stopping", "completed", "failed", "cancelled", "retried"], 1)}


def counted(db: Path) -> dict[str, int]:
    with raw(db) as conn:
        return dict(conn.execute("SELECT status, count(*) FROM jobs GROUP BY status"))


def old_database(db: Path) -> None:
    """The fixture at schema version 4, less its first job (a gap in seq, as cleanup leaves)."""
    conn = sqlite3.connect(db, isolation_level=None)
    conn.executescript(FIXTURE.read_text())
    conn.execute("DELETE FROM job_events WHERE job = 1")
    conn.execute("DELETE FROM jobs WHERE seq = 1")
    conn.close()


def test_a_database_of_the_old_store_migrates_and_keeps_working(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    old_database(db)
    with raw(db) as conn:
        before = {r[0]: r for r in conn.execute("SELECT * FROM jobs")}
        events = conn.execute("SELECT * FROM job_events ORDER BY rowid").fetchall()
        checkpoints = conn.execute("SELECT * FROM job_checkpoints ORDER BY job").fetchall()
        stored = dict(conn.execute("SELECT * FROM user_stored"))
    store = Store(db, synchronous="normal", max_stored_per_user=100).open()
    try:
        assert store.type_counts() == counted_by_type(db) and store.type_counts()
        with raw(db) as conn:
            assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
            # every row as it was, seq kept: events and checkpoints still point at their job;
            # an old job has no work key (0007): it is never folded into
            after = conn.execute("SELECT * FROM jobs").fetchall()
            assert {r[0]: r[:-1] for r in after} == before
            assert {r[-1] for r in after} == {None}
            assert conn.execute("SELECT * FROM job_events ORDER BY rowid").fetchall() == events
            assert conn.execute("SELECT * FROM job_checkpoints ORDER BY job").fetchall() == (
                checkpoints)
            assert dict(conn.execute("SELECT * FROM user_stored")) == stored
            assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        assert store.counts() == counted(db) == {"running": 2, "completed": 1, "failed": 1,
                                                 "cancelled": 1, "queued": 1}
        assert store.queued_count("carol") == 1
        assert store.processes() == [(OLD["running"], 4242, 99)]
        assert store.load_checkpoints(OLD["running"]) == {"git_sync": {"rev": 2}}
        assert [e["status"] for e in store.events(OLD["completed"])] == [
            "created", "queued", "running", "running", "completed"]
        # the idempotency keys still answer, and every transition works on the old rows
        again, dup = store.submit_job(new_job(user="alice", idempotency_key="key4"),
                                      actor="alice")
        assert (again.id, dup) == (OLD["completed"], True)
        assert store.finish_job(OLD["stopping"], JobStatus.COMPLETED).status is (
            JobStatus.CANCELLED)
        assert store.finish_job(OLD["running"], JobStatus.COMPLETED).progress == 100
        store.retry_job(OLD["failed"], actor="bob")
        store.start_job(OLD["retried"])
        store.requeue_job(OLD["retried"], reason="interrupted by shutdown")
        store.cancel_job(OLD["retried"], actor="carol")
        # the cascade and the weight triggers were made again on the new table
        fresh = submit(store, new_job(user="dave"))
        assert fresh.seq == 8
        deleted = [i for ids in store.cleanup(keep_before=T0 * 2, keep_failed_before=T0 * 2)
                   for i in ids]
        assert set(deleted) == {OLD["stopping"], OLD["running"], OLD["completed"],
                                OLD["cancelled"], OLD["retried"]}
        assert store.stored_weight("alice") == store.stored_weight("carol") == 0
        assert store.counts() == counted(db) == {"queued": 2}
        with raw(db) as conn:
            assert conn.execute("SELECT count(*) FROM job_events WHERE job NOT IN "
                                "(SELECT seq FROM jobs)").fetchone() == (0,)
    finally:
        store.close()


def test_a_new_database_has_small_pages_and_an_old_one_keeps_its_own(tmp_path: Path) -> None:
    """A new database is made with 1 KiB pages (a job's writes and a cleanup copy a
    quarter of the bytes through the WAL); one made with SQLite's 4 KiB keeps them."""
    new, old = tmp_path / "new.db", tmp_path / "old.db"
    old_database(old)
    for db in (new, old):
        Store(db, synchronous="normal").open().close()
    with raw(new) as conn:
        assert conn.execute("PRAGMA page_size").fetchone() == (1024,)
    with raw(old) as conn:
        assert conn.execute("PRAGMA page_size").fetchone() == (4096,)
    store = Store(old, synchronous="normal").open()
    try:
        assert submit(store, new_job(user="dave")).status is JobStatus.QUEUED
    finally:
        store.close()


def test_a_finished_job_without_an_end_time_is_given_one_by_the_migration(
        tmp_path: Path) -> None:
    """Rows a bug left outside the invariants do not stop the upgrade."""
    db = tmp_path / "old.db"
    old_database(db)
    with raw(db) as conn:
        conn.execute("UPDATE jobs SET completed_at = NULL, progress = 120 WHERE id = ?",
                     (OLD["completed"],))
        conn.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (OLD["failed"],))
    store = Store(db).open()
    try:
        done = store.get_job(OLD["completed"])
        assert done.completed_at == done.updated_at and done.progress == 100
        assert store.get_job(OLD["failed"]).cancel_requested is False
    finally:
        store.close()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "jobd.db", synchronous="normal", clock=Clock()).open()
    yield s
    s.close()


@pytest.mark.parametrize("change", [
    "status = 'created'",
    "status = 'done'",
    "status = 'completed'",  # without an end time
    "completed_at = 5",  # a queued job with an end time
    "progress = 100.5",
    "progress = -1",
    "priority = 101",
    "cancel_requested = 1",  # a queued job cannot be stopping
    "attempts = -1",
    "weight = 0",
])
def test_a_raw_write_past_an_invariant_is_refused(store: Store, change: str) -> None:
    job = submit(store)
    with raw(store.path) as conn:
        with pytest.raises(sqlite3.IntegrityError, match="CHECK constraint failed"):
            conn.execute(f"UPDATE jobs SET {change} WHERE id = ?", (job.id,))
    assert store.get_job(job.id) == job


def test_a_running_job_needs_its_start_and_an_ended_one_keeps_its_end(store: Store) -> None:
    running = store.start_job(submit(store).id)
    done = store.finish_job(store.start_job(submit(store).id).id, JobStatus.COMPLETED)
    with raw(store.path) as conn:
        for change, job_id in (("started_at = NULL", running.id),
                               ("completed_at = NULL", done.id)):
            with pytest.raises(sqlite3.IntegrityError, match="CHECK constraint failed"):
                conn.execute(f"UPDATE jobs SET {change} WHERE id = ?", (job_id,))


def counted_by_type(db: Path) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    with raw(db) as conn:
        for type, status, n in conn.execute(
                "SELECT type, status, count(*) FROM jobs GROUP BY type, status"):
            out.setdefault(type, {})[status] = n
    return out


def test_counts_stay_in_step_across_every_transition_and_cleanup(store: Store) -> None:
    def check() -> None:
        assert store.counts() == counted(store.path)
        assert store.type_counts() == counted_by_type(store.path)

    check()
    jobs = [submit(store, new_job(user=f"u{n % 3}", project=f"p{n}",
                                  type=("sync", "noop")[n % 2]))
            for n in range(12)]
    check()
    for job in jobs[:9]:
        store.start_job(job.id)
        check()
    for job, end in zip(jobs[:6], [JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED] * 2):
        store.finish_job(job.id, end)
        check()
    store.cancel_job(jobs[6].id, actor="alice")  # running: only its cancel is requested
    store.cancel_job(jobs[9].id, actor="alice")  # queued: cancelled
    check()
    store.requeue_job(jobs[7].id, reason="interrupted by shutdown")
    store.retry_job(jobs[1].id, actor="alice")
    store.cancel_jobs(actor="admin:root", limit=100, user_id="u2")
    check()
    store.retry_jobs(actor="admin:root", limit=100, rules=Rules(), user_id="u0")
    check()
    assert store.counts()["queued"] > 0
    store.clock.now += 10**9  # type: ignore[attr-defined]
    deleted = sum(len(ids) for ids in store.cleanup(keep_before=T0 + 10**9,
                                                    keep_failed_before=T0 + 10**9))
    assert deleted > 0
    check()
    assert sum(store.counts().values()) == len(jobs) - deleted
