"""admin.stats' finished jobs in the store: hourly rows per (type, end status) with a fixed
run-time histogram, written in the end's transaction, pruned after 35 days by upkeep; on
both backends (SQLite's upgrade that counts the ends before it: SQLite only)."""

from __future__ import annotations

from jobd.models import JobStatus
from jobd.store import Store
from jobd.store.db import count_finished
from jobd.store.interface import FINISHED_KEEP_US, HOUR_US

from pg import StoreDb, sqlite_only
from test_store import T0, Clock, clock, db, new_job, raw, store, submit  # noqa: F401 - fixtures

pytest_plugins = ["pg"]


def ended(store: Store, clock: Clock, type: str, status: JobStatus, run_s: float) -> None:
    job = store.start_job(submit(store, new_job(type=type, project=None)).id)
    clock.now += int(run_s * 1e6)
    store.finish_job(job.id, status)


def by_key(store: Store, since_hour: int) -> dict[tuple[str, str, int], tuple[int, int]]:
    return {(t, s, b): (n, run) for t, s, b, n, run in store.finished(since_hour)}


def test_each_end_lands_in_its_hour_type_status_and_run_time_bucket(
        store: Store, clock: Clock) -> None:
    uppers = store.run_buckets()
    assert uppers[-1] is None and uppers[:-1] == sorted(uppers[:-1])
    hour = T0 // HOUR_US
    ended(store, clock, "sync", JobStatus.COMPLETED, 0.05)
    ended(store, clock, "sync", JobStatus.COMPLETED, 0.07)
    ended(store, clock, "sync", JobStatus.FAILED, 3)
    ended(store, clock, "noop", JobStatus.COMPLETED, 10**6)  # past the last bound
    queued = submit(store, new_job(type="noop", project=None))
    store.cancel_job(queued.id, actor="alice")  # never ran: counted, no run time
    rows = by_key(store, hour)
    assert rows[("sync", "completed", 0)] == (2, 120_000)
    assert rows[("sync", "failed", uppers.index(5_000_000))] == (1, 3_000_000)
    assert rows[("noop", "completed", len(uppers) - 1)] == (1, 10**12)
    assert rows[("noop", "cancelled", -1)] == (1, 0)
    assert sum(n for n, _ in rows.values()) == 5
    # a retried job that is cancelled while queued again has no second run time
    store.retry_job(queued.id, actor="alice")
    store.cancel_job(queued.id, actor="alice")
    assert by_key(store, hour)[("noop", "cancelled", -1)] == (2, 0)
    # hours before ``since_hour`` are left out
    assert by_key(store, clock.now // HOUR_US + 1) == {}


def test_upkeep_prunes_finished_hours_past_35_days(store: Store, clock: Clock,
                                                   db: StoreDb) -> None:
    ended(store, clock, "sync", JobStatus.COMPLETED, 1)
    first = T0 // HOUR_US
    store.upkeep(now=clock.now + FINISHED_KEEP_US - HOUR_US)
    assert by_key(store, first)  # 34 days and 23 hours later: kept
    clock.now += FINISHED_KEEP_US + 2 * HOUR_US
    ended(store, clock, "sync", JobStatus.COMPLETED, 1)
    store.upkeep(now=clock.now)
    oldest = (clock.now - FINISHED_KEEP_US) // HOUR_US  # the earliest ``since`` allowed
    assert [r[:4] for r in store.finished(oldest)] == [("sync", "completed", 3, 1)]
    assert db.value("SELECT count(*) FROM finished_hours WHERE hour < ?", oldest) == 0
    assert db.value("SELECT count(*) FROM finished_days WHERE (day + 1) * 24 <= ?",
                    oldest) == 0


def test_finished_since_any_hour_equals_the_sum_of_its_hours(
        store: Store, clock: Clock, db: StoreDb) -> None:
    """Whole days are read from the daily rows: whatever the ``since``, the answer is the
    sum of the hours from it on."""
    start = clock.now
    for i in range(80):  # an end every hour for three days and more, of two types
        clock.now = start + i * HOUR_US + 7 * 60 * 10**6
        ended(store, clock, ("sync", "noop")[i % 2],
              (JobStatus.COMPLETED, JobStatus.FAILED)[i % 3 == 0], 0.3 * (i % 5 + 1))
    hours = db.rows("SELECT hour, type, status, bucket, n, run_us FROM finished_hours")
    assert db.value("SELECT count(*) FROM finished_days") < len(hours)
    first, last = min(h[0] for h in hours), max(h[0] for h in hours)
    for since in range(first - 1, last + 2):
        expected: dict[tuple[str, str, int], tuple[int, int]] = {}
        for hour, type, status, bucket, n, run_us in hours:
            if hour >= since:
                total = expected.get((type, status, bucket), (0, 0))
                expected[(type, status, bucket)] = (total[0] + n, total[1] + run_us)
        assert by_key(store, since) == expected, f"since hour {since - first}"


def test_a_cleanup_takes_each_type_off_its_own_counts(store: Store, clock: Clock,
                                                      db: StoreDb) -> None:
    for type, n in (("sync", 3), ("noop", 1)):
        for _ in range(n):
            ended(store, clock, type, JobStatus.COMPLETED, 1)
    submit(store, new_job(type="sync", project=None))
    assert store.type_counts() == {"sync": {"completed": 3, "queued": 1},
                                   "noop": {"completed": 1}}
    clock.now += 10**9
    assert sum(len(ids) for ids in store.cleanup(keep_before=clock.now,
                                                 keep_failed_before=clock.now)) == 4
    assert store.type_counts() == {"sync": {"queued": 1}}
    # none taken off another type's count (none below 0)
    assert db.value("SELECT min(n) FROM type_counts") == 0
    # the finished counts outlive the jobs (kept 35 days whatever the retention)
    assert sum(r[3] for r in store.finished(0)) == 4


@sqlite_only
def test_the_upgrade_counts_stored_ends_as_their_trigger_did(store: Store, clock: Clock) -> None:
    """Migration 8 counts the jobs that ended before it (``count_finished``) the way the
    end trigger counts each end since: the same rows, from the same jobs, 35 days back."""
    ended(store, clock, "sync", JobStatus.FAILED, 3)  # the oldest end
    clock.now += 2 * 86_400 * 10**6
    for type, status, run_s in (("sync", JobStatus.COMPLETED, 0.05),
                                ("noop", JobStatus.COMPLETED, 100_000)):  # past the last bound
        ended(store, clock, type, status, run_s)
    store.cancel_job(submit(store, new_job(type="noop", project=None)).id, actor="alice")
    counted = by_key(store, 0)
    assert sum(n for n, _ in counted.values()) == 4
    for now, kept in ((clock.now, 4), (T0 + 3 * 10**6 + FINISHED_KEEP_US + HOUR_US, 3)):
        with raw(store.path) as conn:
            conn.execute("DELETE FROM finished_hours")
            conn.execute("DELETE FROM finished_days")
            count_finished(conn, now=now)
        again = by_key(store, 0)
        assert sum(n for n, _ in again.values()) == kept
        # the same rows as the trigger's: all of them, or all but the end 35 days back
        assert again.items() <= counted.items() and (kept < 4 or again == counted)
