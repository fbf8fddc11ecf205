"""The store against real databases, on both backends (``pg.store_db``: a SQLite file and a
PostgreSQL database): transitions, races, versions, listing and paging, submit rules,
cleanup, the clean-shutdown marker. The tests about SQLite itself (its schema history,
WAL, query plans) are marked ``sqlite_only``."""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

from jobd.errors import LimitExceeded
from jobd.models import TERMINAL, TRANSITIONS, Job, JobStatus
from jobd.rules import Rules
from jobd.store import DuplicateId, JobNotFound, StateConflict, Store, StoreError
from jobd.store.db import Checkpointer, Tx
from jobd.store.sql import MIGRATIONS, QUERIES

from pg import StoreDb, sqlite_only

pytest_plugins = ["pg"]

T0 = 1_795_000_000_000_000  # 2026-11-18, in microseconds


class Clock:
    """A clock the test moves by hand (microseconds since the epoch)."""

    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def new_job(user: str = "alice", type: str = "sync", project: str | None = "p1",
            **fields: Any) -> Job:
    return Job(id=fields.pop("id", str(uuid.uuid4())), type=type, user_id=user,
               project_id=project, status=JobStatus.CREATED, created_at=0, updated_at=0,
               version=0, **fields)


#: the rules of a submit that folds the same work of the exclusive types
DEDUPE = Rules(exclusive=frozenset({"sync", "index"}))


def submit(store: Store, job: Job | None = None, **kw: Any) -> Job:
    """Submit under the rules ``kw`` names (``max_queued_per_user``, ...)."""
    actor = kw.pop("actor", "alice")
    return store.submit_job(job or new_job(), actor=actor, rules=Rules(**kw))[0]


def move(store: Store, job_id: str, to: JobStatus, *, actor: str = "jobd",
         message: str | None = None, error: str | None = None,
         result: dict[str, Any] | None = None, recovered: bool = False) -> Job:
    """Take a job to ``to`` by the transition that leads there from where it is."""
    now = store.get_job(job_id).status
    if to is JobStatus.RUNNING:
        return store.start_job(job_id)
    if to is JobStatus.QUEUED and now is JobStatus.RUNNING:
        return store.requeue_job(job_id, reason=message or "interrupted by shutdown",
                                 recovered=recovered)
    if to is JobStatus.QUEUED:
        return store.retry_job(job_id, actor=actor)
    if to is JobStatus.CANCELLED and now is JobStatus.QUEUED:
        return store.cancel_job(job_id, actor=actor)
    return store.finish_job(job_id, to, message=message, error=error, result=result)


def request_cancel(store: Store, job_id: str, actor: str) -> Job:
    """The single cancel of a running job as the manager asks for it: the job as it is."""
    try:
        return store.cancel_job(job_id, actor=actor)
    except StateConflict:
        return store.get_job(job_id)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def db(store_db: StoreDb) -> StoreDb:
    """This test's database, on each backend in turn."""
    return store_db


@pytest.fixture
def store(db: StoreDb, clock: Clock) -> Iterator[Store]:
    s = db.open(clock=clock)
    yield s
    s.close()


def second_store(db: StoreDb, **kw: Any) -> Store:
    """Another store with its own writer on the same database: a second SQLite connection
    to the file, or on PostgreSQL a second node (as cluster mode will have: the one-node
    lock is another's)."""
    if db.backend == "sqlite":
        return db.open(**kw)
    from jobd.store.postgres import PostgresStore
    other = PostgresStore(db.target, **kw)
    other.node_key += 1000
    return other.open()


@contextlib.contextmanager
def raw(db: Path | StoreDb) -> Iterator[sqlite3.Connection]:
    """A second, independent connection for looking at what the SQLite store wrote."""
    conn = sqlite3.connect(db.target if isinstance(db, StoreDb) else db,
                           isolation_level=None, timeout=10)
    try:
        yield conn
    finally:
        conn.close()


def row(db: StoreDb, job_id: str) -> tuple[Any, ...]:
    return db.rows("SELECT * FROM jobs WHERE id = ?", job_id)[0]


def count(db: StoreDb, table: str, where: str = "TRUE", args: tuple[Any, ...] = ()) -> int:
    return int(db.value(f"SELECT count(*) FROM {table} WHERE {where}", *args))


def queued_in_db(db: StoreDb) -> dict[str, int]:
    return dict(db.rows(
        "SELECT user_id, count(*) FROM jobs WHERE status = 'queued' GROUP BY user_id"))


def job_in(store: Store, db: StoreDb, status: JobStatus, user: str = "alice") -> Job:
    """A stored job in ``status``, reached by allowed transitions."""
    job = submit(store, new_job(user=user, type="noop", project=None))
    path = {
        JobStatus.QUEUED: [],
        JobStatus.RUNNING: [JobStatus.RUNNING],
        JobStatus.COMPLETED: [JobStatus.RUNNING, JobStatus.COMPLETED],
        JobStatus.FAILED: [JobStatus.RUNNING, JobStatus.FAILED],
        JobStatus.CANCELLED: [JobStatus.CANCELLED],
    }[status]
    for to in path:
        job = move(store, job.id, to)
    assert job.status is status
    return job


# -- the state machine ---------------------------------------------------------------------

#: every transition method, as a test calls it: (name, the call)
METHODS: dict[str, Any] = {
    "start_job": lambda store, job_id: store.start_job(job_id),
    "finish_job(completed)": lambda store, job_id: store.finish_job(
        job_id, JobStatus.COMPLETED, result={"ok": 1}),
    "finish_job(failed)": lambda store, job_id: store.finish_job(
        job_id, JobStatus.FAILED, error="boom"),
    "finish_job(cancelled)": lambda store, job_id: store.finish_job(
        job_id, JobStatus.CANCELLED, message="stopped"),
    "cancel_job": lambda store, job_id: store.cancel_job(job_id, actor="admin:root"),
    "retry_job": lambda store, job_id: store.retry_job(job_id, actor="admin:root"),
    "requeue_job": lambda store, job_id: store.requeue_job(job_id, reason="interrupted"),
}
#: where a job may be when a method is called: every stored status, and a running job
#: whose cancel was requested
STARTS = ["queued", "running", "stopping", "completed", "failed", "cancelled"]


def started_in(store: Store, db: StoreDb, start: str) -> Job:
    if start == "stopping":
        job = job_in(store, db, JobStatus.RUNNING)
        return store.cancel_job(job.id, actor="alice")
    return job_in(store, db, JobStatus(start))


def test_a_requeue_of_a_job_whose_cancel_was_requested_ends_it_cancelled(
        store: Store, db: StoreDb) -> None:
    # a shutdown stopped the attempt to requeue it; a cancel came before that was written
    job = started_in(store, db, "stopping")
    after = store.requeue_job(job.id, reason="interrupted by shutdown")
    assert (after.status, after.cancel_requested) == (JobStatus.CANCELLED, False)
    assert store.get_job(job.id).status is JobStatus.CANCELLED
    assert store.queued_count("alice") == 0


def test_each_transition_method_moves_only_along_transitions(
        store: Store, db: StoreDb, clock: Clock) -> None:
    """Every method over every starting status on a real database: each (from, to) it
    makes is in TRANSITIONS, with its event row and a higher version; each refusal is a
    StateConflict naming the status and leaves the row and its history as they were.
    Together with submit_job (created -> queued) they make every allowed pair."""
    seen: set[tuple[JobStatus, JobStatus]] = set()
    first = submit(store)
    assert [e["status"] for e in store.events(first.id)] == ["created", "queued"]
    seen.add((JobStatus.CREATED, JobStatus.QUEUED))
    for name, call in METHODS.items():
        for start in STARTS:
            job = started_in(store, db, start)
            before, history = row(db, job.id), store.events(job.id)
            clock.now += 1_000
            try:
                after = call(store, job.id)
            except StateConflict as e:
                assert (e.job_id, e.status) == (job.id, str(job.status)), (name, start)
                assert row(db, job.id) == before and store.events(job.id) == history
                continue
            assert after == store.get_job(job.id) and after.version > job.version
            event = store.events(job.id)[-1]
            assert len(store.events(job.id)) == len(history) + 1, (name, start)
            assert (event["status"], event["at"]) == (str(after.status), clock.now)
            if after.status is not job.status:
                pair = (job.status, after.status)
                assert after.status in TRANSITIONS[job.status], (name, start, pair)
                seen.add(pair)
            else:  # a cancel request: the job runs on, stopping
                assert (name, start, after.cancel_requested) == ("cancel_job", "running", True)
            if after.status is JobStatus.RUNNING and job.status is JobStatus.QUEUED:
                assert after.attempts == job.attempts + 1 and after.started_at == clock.now
            assert (after.completed_at == clock.now) is (after.status in TERMINAL)
    allowed = {(frm, to) for frm, tos in TRANSITIONS.items() for to in tos}
    assert seen == allowed
    counted = store.queued_count("alice")
    assert queued_in_db(db) == ({"alice": counted} if counted else {})


@pytest.mark.parametrize("name", list(METHODS))
def test_a_transition_of_a_missing_job_is_not_found(store: Store, name: str) -> None:
    missing = str(uuid.uuid4())
    with pytest.raises(JobNotFound) as refused:
        METHODS[name](store, missing)
    assert refused.value.job_id == missing and missing in str(refused.value)


def test_retry_clears_the_attempt_but_resume_keeps_progress(store: Store, db: StoreDb) -> None:
    job = job_in(store, db, JobStatus.RUNNING)
    store.update_progress(job.id, progress=40.0, phase="indexing", message="half",
                          actor="jobd").result()
    resumed = move(store, job.id, JobStatus.QUEUED, actor="jobd", recovered=True,
                               message="recovered after restart")
    assert (resumed.progress, resumed.phase, resumed.recoveries) == (40.0, "indexing", 1)
    move(store, job.id, JobStatus.RUNNING, actor="jobd")
    failed = move(store, job.id, JobStatus.FAILED, actor="jobd", error="boom")
    assert failed.error == "boom" and failed.attempts == 2
    retried = move(store, job.id, JobStatus.QUEUED, actor="alice")
    assert (retried.progress, retried.phase, retried.error, retried.completed_at) == (
        0.0, None, None, None)
    # a fresh start: the crash before it no longer counts towards max_recoveries
    assert retried.attempts == 2 and retried.recoveries == 0
    assert store.get_job(job.id).recoveries == 0


def test_racing_transitions_exactly_one_wins(db: StoreDb) -> None:
    # two stores with a writer each on one database: the compare-and-set in SQL decides,
    # not a shared lock
    first = db.open()
    second = second_store(db)
    try:
        for round in range(60):
            job = submit(first)
            barrier = threading.Barrier(2)
            outcome: list[Job | StateConflict] = []
            # even rounds: two workers start the same job; odd: a start races a cancel
            moves = [(first, "start_job"), (second, "start_job")]
            if round % 2:
                moves[1] = (second, "cancel_job")

            def race(store: Store, name: str) -> None:
                barrier.wait()
                try:
                    outcome.append(METHODS[name](store, job.id))
                except StateConflict as e:
                    outcome.append(e)

            threads = [threading.Thread(target=race, args=m) for m in moves]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            winners = [r for r in outcome if isinstance(r, Job)]
            final = first.get_job(job.id)
            assert len(outcome) == 2, outcome
            assert final.attempts == (1 if final.status is JobStatus.RUNNING else 0)
            history = [e["status"] for e in first.events(job.id)]
            if round % 2 and len(winners) == 2:
                # the start won, and the cancel then asked the running job to stop
                assert final.status is JobStatus.RUNNING and final.cancel_requested
                assert history == ["created", "queued", "running", "running"]
            else:
                assert len(winners) == 1, outcome
                assert final.status is winners[0].status
                assert history == ["created", "queued", str(final.status)]
    finally:
        first.close()
        second.close()


def test_version_only_rises_also_across_reopen(db: StoreDb) -> None:
    clock = Clock()
    store = db.open(clock=clock)
    job = submit(store)
    seen = [job.version]
    for to in (JobStatus.RUNNING, JobStatus.QUEUED, JobStatus.RUNNING):
        seen.append(move(store, job.id, to, actor="jobd").version)
    seen.append(request_cancel(store, job.id, "alice").version)
    store.close()
    clock.now -= 3_600_000_000  # the clock went back an hour while jobd was down
    store = db.open(clock=clock)
    try:
        seen.append(store.get_job(job.id).version)
        seen.append(store.update_progress(job.id, progress=5, phase=None,
                                          message=None).result().version)
        seen.append(move(store, job.id, JobStatus.CANCELLED, actor="jobd").version)
    finally:
        store.close()
    assert seen[5] == seen[4]
    del seen[5]
    assert seen == sorted(set(seen)), seen


# -- migrations ------------------------------------------------------------------------------

@sqlite_only
def test_a_version_1_database_is_upgraded_and_keeps_its_rows(db: StoreDb) -> None:
    conn = sqlite3.connect(db.target, isolation_level=None)
    conn.executescript(MIGRATIONS[0][2])  # as the first release of jobd left it
    conn.execute("PRAGMA user_version = 1")
    conn.execute("INSERT INTO jobs (id, type, user_id, project_id, status, version, "
                 "created_at, updated_at, options) VALUES "
                 "('old-job', 'sync', 'alice', 'p1', 'completed', 7, 1, 2, ?)",
                 ('{"branch":"main"}',))
    conn.execute("INSERT INTO job_events (job, at, status, progress, actor) "
                 "VALUES (1, 1, 'created', 0, 'alice'), (1, 2, 'completed', 100, 'jobd')")
    conn.execute("INSERT INTO job_checkpoints (job, phase, data, saved_at) "
                 "VALUES (1, 'git_sync', '{\"rev\":\"abc\"}', 2)")
    conn.close()

    store = db.open()
    try:
        job = store.get_job("old-job")
        assert (job.status, job.version, job.options) == (
            JobStatus.COMPLETED, 7, {"branch": "main"})
        assert [(e["status"], e["actor"]) for e in store.events("old-job")] == [
            ("created", "alice"), ("completed", "jobd")]
        assert store.load_checkpoints("old-job") == {"git_sync": {"rev": "abc"}}
        store.set_process("old-job", 4242, 99)  # a column added by migration 2
    finally:
        store.close()
    with raw(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        assert conn.execute("SELECT pgid, pgid_start FROM jobs").fetchone() == (4242, 99)


@sqlite_only
def test_a_database_from_a_newer_jobd_is_refused(db: StoreDb) -> None:
    db.open().close()
    with raw(db) as conn:
        conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    with pytest.raises(StoreError, match="newer than this jobd knows.*upgrade jobd"):
        db.open()


# -- listing -----------------------------------------------------------------------------------

def test_list_filters_newest_first(store: Store, clock: Clock) -> None:
    specs = [  # user, type, project, ends as
        ("alice", "sync", "p1", JobStatus.QUEUED),
        ("alice", "index", "p2", JobStatus.RUNNING),
        ("bob", "sync", "p1", JobStatus.COMPLETED),
        ("bob", "noop", None, JobStatus.FAILED),
        ("carol", "sync", "p3", JobStatus.CANCELLED),
        ("alice", "noop", None, JobStatus.QUEUED),
    ]
    jobs = []
    for user, type, project, status in specs:
        clock.now += 1_000_000
        job = submit(store, new_job(user=user, type=type, project=project))
        if status is JobStatus.CANCELLED:
            move(store, job.id, status, actor="jobd")
        elif status is not JobStatus.QUEUED:
            move(store, job.id, JobStatus.RUNNING, actor="jobd")
            if status is not JobStatus.RUNNING:
                move(store, job.id, status, actor="jobd")
        jobs.append(job)

    def ids(**filters: Any) -> list[str]:
        return [j.id for j in store.list_jobs(**filters)]

    def expect(*indexes: int) -> list[str]:
        return [jobs[i].id for i in sorted(indexes, reverse=True)]

    assert ids() == expect(0, 1, 2, 3, 4, 5)
    assert ids(statuses=["queued"]) == expect(0, 5)
    assert ids(statuses=["failed", "cancelled", "completed"]) == expect(2, 3, 4)
    assert ids(types=["sync"]) == expect(0, 2, 4)
    assert ids(types=["sync", "noop"]) == expect(0, 2, 3, 4, 5)
    assert ids(user_id="alice") == expect(0, 1, 5)
    assert ids(user_id="alice", statuses=["queued"], types=["noop"]) == expect(5)
    assert ids(project_id="p1") == expect(0, 2)
    assert ids(created_after=jobs[2].created_at) == expect(2, 3, 4, 5)
    assert ids(created_before=jobs[2].created_at) == expect(0, 1)
    assert ids(created_after=jobs[1].created_at, created_before=jobs[4].created_at) == expect(
        1, 2, 3)
    assert ids(id_prefix=jobs[3].id[:8]) == expect(3)
    assert ids(limit=2) == expect(4, 5)
    assert ids(user_id="nobody") == []


def test_count_jobs_counts_what_matches_up_to_its_cap(store: Store) -> None:
    for n in range(5):
        submit(store, new_job(type="sync" if n % 2 else "noop"))
    assert store.count_jobs(100) == 5
    assert store.count_jobs(100, types=["sync"]) == 2
    assert store.count_jobs(3) == 3  # the scan stops at the cap
    assert store.count_jobs(100, types=["sync"], statuses=["completed"]) == 0


def test_get_jobs_reads_the_stored_ones_of_any_number_of_ids_in_one_statement(
        store: Store) -> None:
    jobs = [submit(store, new_job(user=f"u{n}")) for n in range(3)]
    gone = "00000000-0000-4000-8000-000000000000"
    got = store.get_jobs([jobs[2].id, gone, jobs[0].id, jobs[0].id])
    assert sorted(j.id for j in got) == sorted([jobs[0].id, jobs[2].id])
    assert {j.id: j for j in got}[jobs[2].id] == store.get_job(jobs[2].id)
    assert store.get_jobs([]) == [] and store.get_jobs([gone]) == []


def test_id_prefix_matches_only_that_prefix(store: Store) -> None:
    for job_id in ("abcd0000-1", "abcd0000-2", "abce0000-1", "abc"):
        submit(store, new_job(id=job_id))
    assert sorted(j.id for j in store.list_jobs(id_prefix="abcd")) == [
        "abcd0000-1", "abcd0000-2"]
    assert [j.id for j in store.list_jobs(id_prefix="abcd0000-2")] == ["abcd0000-2"]


def test_keyset_paging_sees_every_job_once_when_created_at_ties(store: Store,
                                                                clock: Clock) -> None:
    # the fake clock never moves: every job has the same created_at
    stored = [submit(store, new_job(user=f"u{i % 3}")) for i in range(203)]
    assert len({j.created_at for j in stored}) == 1
    for filters in ({}, {"user_id": "u1"}, {"statuses": ["queued"]}):
        seen: list[Job] = []
        before = None
        while page := store.list_jobs(before_seq=before, limit=17, **filters):
            seen += page
            before = page[-1].seq
        expected = [j for j in stored if filters.get("user_id", j.user_id) == j.user_id]
        assert [j.id for j in seen] == [j.id for j in reversed(expected)]
        assert len({j.id for j in seen}) == len(seen)


# -- submit: idempotency, dedupe, limits, group commit --------------------------------------

def test_idempotency_key_is_per_user(store: Store) -> None:
    first, dup = store.submit_job(new_job(idempotency_key="k1"), actor="alice")
    again, dup_again = store.submit_job(new_job(idempotency_key="k1"), actor="alice")
    other, dup_other = store.submit_job(new_job(user="bob", idempotency_key="k1"), actor="bob")
    assert (dup, dup_again, dup_other) == (False, True, False)
    assert again.id == first.id
    assert other.id != first.id and other.user_id == "bob"
    # the key still answers once the job has finished
    move(store, first.id, JobStatus.CANCELLED, actor="alice")
    assert store.submit_job(new_job(idempotency_key="k1"), actor="alice")[0].id == first.id
    assert store.queued_count("alice") == 0 and store.queued_count("bob") == 1


def sync_options(**changed: Any) -> dict[str, Any]:
    """A sync's options as its ``validate`` leaves them (defaults filled in)."""
    return {"branch": "main", "remote": "origin", "full_reindex": False,
            "strategy": "ff-only", "repo_path": "/r/p1", **changed}


def test_dedupe_of_a_queued_sync_keeps_full_reindex(store: Store, db: StoreDb) -> None:
    first, dup = store.submit_job(new_job(options=sync_options()), actor="alice",
                                  rules=DEDUPE)
    full, dup_full = store.submit_job(new_job(options=sync_options(full_reindex=True)),
                                      actor="alice", rules=DEDUPE)
    plain, dup_plain = store.submit_job(new_job(options=sync_options()), actor="alice",
                                        rules=DEDUPE)
    assert (dup, dup_full, dup_plain) == (False, True, True)
    assert first.id == full.id == plain.id
    assert full.options == sync_options(full_reindex=True)
    assert full.version > first.version
    assert plain.options["full_reindex"] is True
    assert store.get_job(first.id).options["full_reindex"] is True
    # another repository, branch, type, user, or no dedupe asked: new jobs
    others = [
        store.submit_job(new_job(project="p2", options=sync_options(repo_path="/r/p2")),
                         actor="alice", rules=DEDUPE),
        store.submit_job(new_job(options=sync_options(branch="dev")), actor="alice",
                         rules=DEDUPE),
        store.submit_job(new_job(type="index", options=sync_options()), actor="alice",
                         rules=DEDUPE),
        store.submit_job(new_job(user="bob", options=sync_options()), actor="bob",
                         rules=DEDUPE),
        store.submit_job(new_job(options=sync_options()), actor="alice"),
    ]
    assert all(not d for _, d in others)
    assert len({j.id for j, _ in others} | {first.id}) == 6
    # a running sync does not absorb a new one: the new one queues behind it
    move(store, first.id, JobStatus.RUNNING, actor="jobd")
    for job, _ in others:
        if job.user_id == "alice" and job.type == "sync" and job.project_id == "p1":
            move(store, job.id, JobStatus.CANCELLED, actor="alice")
    behind, dup_behind = store.submit_job(new_job(options=sync_options()), actor="alice",
                                          rules=DEDUPE)
    assert not dup_behind and behind.id != first.id
    assert count(db, "jobs", "user_id = 'alice' AND project_id = 'p1' AND type = 'sync' "
                 "AND status = 'queued'") == 1


def test_queue_limits_refuse_and_keep_the_counter_right(store: Store, db: StoreDb) -> None:
    limits = {"max_queued_per_user": 3, "max_queued_total": 5}
    alice = [submit(store, new_job(), **limits) for _ in range(3)]
    with pytest.raises(LimitExceeded, match="alice.*max_queued_per_user = 3"):
        submit(store, new_job(), **limits)
    bob = [submit(store, new_job(user="bob"), actor="bob", **limits) for _ in range(2)]
    with pytest.raises(LimitExceeded, match="max_queued_total"):
        submit(store, new_job(user="carol"), actor="carol", **limits)
    assert store.queued_count("alice") == 3 and store.queued_count() == 5
    # a duplicate id is refused inside the write and must not be counted
    with pytest.raises(DuplicateId):
        submit(store, new_job(id=bob[0].id, user="bob"), actor="bob")
    # a write that recorded a job and then failed is rolled back, counter included
    def submit_then_fail(tx: Tx) -> None:
        store.submit_job_in(tx, new_job(user="dave"), "dave", Rules())
        raise RuntimeError("the rest of this write failed")
    with pytest.raises(RuntimeError):
        store.write(submit_then_fail)
    assert store.queued_count("dave") == 0 and store.queued_count() == 5
    # leaving the queue frees a place
    move(store, alice[0].id, JobStatus.RUNNING, actor="jobd")
    move(store, alice[1].id, JobStatus.CANCELLED, actor="alice")
    assert store.queued_count("alice") == 1
    submit(store, new_job(), **limits)
    assert queued_in_db(db) == {"alice": 2, "bob": 2}
    assert {u: store.queued_count(u) for u in ("alice", "bob", "carol", "dave")} == {
        "alice": 2, "bob": 2, "carol": 0, "dave": 0}
    # reopening counts from the database
    store.close()
    reopened = db.open()
    try:
        assert reopened.queued_count("alice") == 2 and reopened.queued_count() == 4
    finally:
        reopened.close()


def test_limit_holds_under_concurrent_submits(store: Store) -> None:
    barrier = threading.Barrier(20)
    results: list[Any] = []

    def one() -> None:
        barrier.wait()
        try:
            results.append(submit(store, new_job(), max_queued_per_user=7))
        except LimitExceeded as e:
            results.append(e)

    threads = [threading.Thread(target=one) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(isinstance(r, Job) for r in results) == 7
    assert store.queued_count("alice") == 7 == len(store.list_jobs(user_id="alice"))


def test_group_commit_concurrent_submits_all_stored(store: Store, db: StoreDb) -> None:
    threads_n, each = 16, 25
    barrier = threading.Barrier(threads_n)
    stored: list[Job] = []
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        barrier.wait()
        for _ in range(each):
            try:
                stored.append(submit(store, new_job(user=f"u{n}"), actor=f"u{n}"))
            except BaseException as e:  # noqa: BLE001 - reported by the assert below
                errors.append(e)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len({j.id for j in stored}) == threads_n * each
    assert len({j.seq for j in stored}) == threads_n * each
    assert count(db, "jobs") == threads_n * each
    assert count(db, "job_events") == 2 * threads_n * each
    assert store.queued_count() == threads_n * each
    for job in stored[:: 37]:
        assert store.get_job(job.id) == job


# -- events and checkpoints ----------------------------------------------------------------

def test_events_oldest_first_with_actors(store: Store, clock: Clock) -> None:
    job = submit(store, actor="service:cidx")
    clock.now += 10
    move(store, job.id, JobStatus.RUNNING, actor="jobd")
    clock.now += 10
    store.update_progress(job.id, progress=10, phase="git_sync", message="fetching",
                          actor="jobd").result()
    store.update_progress(job.id, progress=20, phase="git_sync", message="tick").result()
    clock.now += 10
    request_cancel(store, job.id, "admin:root")
    request_cancel(store, job.id, "admin:root")  # asking twice records it once
    clock.now += 10
    move(store, job.id, JobStatus.CANCELLED, actor="jobd", message="stopped")
    events = store.events(job.id)
    assert [(e["status"], e["phase"], e["actor"], e["message"]) for e in events] == [
        ("created", None, "service:cidx", None),
        ("queued", None, "service:cidx", None),
        ("running", None, "jobd", None),
        ("running", "git_sync", "jobd", "fetching"),
        ("running", "git_sync", "admin:root", "cancel requested"),
        ("cancelled", "git_sync", "jobd", "stopped"),
    ]
    assert [e["at"] for e in events] == sorted(e["at"] for e in events)
    assert store.get_job(job.id).message == "stopped"
    with pytest.raises(JobNotFound):
        store.events(str(uuid.uuid4()))


def test_checkpoints_save_replace_load(store: Store) -> None:
    job = submit(store)
    other = submit(store)
    assert store.load_checkpoints(job.id) == {}
    store.save_checkpoint(job.id, "init", {"repo": "/r"})
    store.save_checkpoint(job.id, "git_sync", {"old": "a", "new": "b"})
    store.save_checkpoint(job.id, "git_sync", {"old": "a", "new": "c"})
    store.save_checkpoint(other.id, "init", {"repo": "/other"})
    assert store.load_checkpoints(job.id) == {"init": {"repo": "/r"},
                                              "git_sync": {"old": "a", "new": "c"}}
    move(store, job.id, JobStatus.CANCELLED)
    move(store, job.id, JobStatus.QUEUED)  # a retry starts over
    assert store.load_checkpoints(job.id) == {}
    assert store.load_checkpoints(other.id) == {"init": {"repo": "/other"}}


# -- cleanup ---------------------------------------------------------------------------------

def finished_at(store: Store, clock: Clock, db: StoreDb, status: JobStatus, at: int) -> Job:
    clock.now = at
    job = job_in(store, db, status)
    clock.now = T0
    return job


def test_cleanup_respects_status_and_retention(store: Store, clock: Clock, db: StoreDb) -> None:
    day = 86_400_000_000
    old, recent = T0 - 40 * day, T0 - 10 * day
    queued = finished_at(store, clock, db, JobStatus.QUEUED, old)
    running = finished_at(store, clock, db, JobStatus.RUNNING, old)
    gone = [finished_at(store, clock, db, s, old) for s in
            (JobStatus.COMPLETED, JobStatus.CANCELLED)]
    recent_done = finished_at(store, clock, db, JobStatus.COMPLETED, recent + day * 5)
    failed_old = finished_at(store, clock, db, JobStatus.FAILED, old)
    failed_recent = finished_at(store, clock, db, JobStatus.FAILED, recent)
    # a retried job finished long ago, now queued again: active, kept
    retried = finished_at(store, clock, db, JobStatus.FAILED, old)
    move(store, retried.id, JobStatus.QUEUED, actor="alice")
    for job in gone + [failed_old]:
        store.save_checkpoint(job.id, "init", {"x": 1})
    store.save_checkpoint(running.id, "init", {"x": 1})

    keep_before, keep_failed_before = T0 - 7 * day, T0 - 30 * day
    dry = [i for chunk in store.cleanup(keep_before=keep_before,
                                        keep_failed_before=keep_failed_before, dry_run=True)
           for i in chunk]
    assert sorted(dry) == sorted([j.id for j in gone] + [failed_old.id])
    assert count(db, "jobs") == 8

    seqs = [j.seq for j in gone + [failed_old]]
    marks = ", ".join("?" * len(seqs))
    assert count(db, "job_events", f"job IN ({marks})", tuple(seqs)) > 0
    deleted = [i for chunk in store.cleanup(keep_before=keep_before,
                                            keep_failed_before=keep_failed_before)
               for i in chunk]
    assert sorted(deleted) == sorted(dry)
    assert count(db, "job_events", f"job IN ({marks})", tuple(seqs)) == 0
    assert count(db, "job_checkpoints", f"job IN ({marks})", tuple(seqs)) == 0
    kept = {j.id for j in store.list_jobs(limit=100)}
    assert kept == {queued.id, running.id, recent_done.id, failed_recent.id, retried.id}
    assert store.load_checkpoints(running.id) == {"init": {"x": 1}}
    assert count(db, "job_events", "job NOT IN (SELECT seq FROM jobs)") == 0
    # everything past: still never an active job
    everything = [i for chunk in store.cleanup(keep_before=T0 + 1, keep_failed_before=T0 + 1)
                  for i in chunk]
    assert sorted(everything) == sorted([recent_done.id, failed_recent.id])
    assert {j.status for j in store.list_jobs()} == {JobStatus.QUEUED, JobStatus.RUNNING}


def test_cleanup_goes_in_chunks_and_dry_run_deletes_nothing(store: Store, clock: Clock,
                                                           db: StoreDb) -> None:
    for _ in range(35):
        finished_at(store, clock, db, JobStatus.COMPLETED, T0 - 1_000)
    dry = list(store.cleanup(keep_before=T0, keep_failed_before=T0, dry_run=True, chunk=10))
    assert sum(map(len, dry)) == 35 and count(db, "jobs") == 35
    chunks = list(store.cleanup(keep_before=T0, keep_failed_before=T0, chunk=10))
    assert [len(c) for c in chunks] == [10, 10, 10, 5]
    assert count(db, "jobs") == 0 and count(db, "job_events") == 0


def test_a_slow_cleanup_chunk_shrinks_the_next_never_past_the_bound(
        store: Store, clock: Clock, db: StoreDb, monkeypatch: pytest.MonkeyPatch) -> None:
    from jobd.store import base
    monkeypatch.setattr(base, "_CHUNK_S", 0.0)  # every chunk takes too long
    for _ in range(35):
        finished_at(store, clock, db, JobStatus.COMPLETED, T0 - 1_000)
    chunks = list(store.cleanup(keep_before=T0, keep_failed_before=T0, chunk=10))
    # a slow chunk's successor is halved, down to 50 jobs, but never grows past ``chunk``
    assert [len(c) for c in chunks] == [10, 10, 10, 5]


@pytest.mark.parametrize("size, took, bound, then", [
    (500, 0.015, 1000, 500),   # on target: the same
    (500, 0.030, 1000, 250),   # twice the target: half
    (500, 0.020, 1000, 375),   # a third over: in proportion
    (500, 0.300, 1000, 250),   # one stalled commit: half, no less
    (500, 0.010, 1000, 750),   # under: in proportion
    (500, 0.001, 1000, 1000),  # far under: double, and no more than the bound
    (400, 0.001, 1000, 800),
    (60, 0.300, 1000, 50),     # never under 50 jobs
    (10, 0.300, 10, 10),       # nor over the bound, when it is lower
])
def test_each_cleanup_chunk_is_sized_to_take_about_chunk_s(size: int, took: float,
                                                           bound: int, then: int) -> None:
    from jobd.store import base
    assert base._CHUNK_S == 0.015
    assert base.next_chunk_size(size, took, bound) == then


# -- the clean-shutdown marker --------------------------------------------------------------

def test_clean_close_is_remembered(db: StoreDb) -> None:
    store = db.open()
    assert store.was_clean  # a new database
    submit(store)
    store.close()
    store = db.open()
    try:
        assert store.was_clean
    finally:
        store.close()


def test_a_killed_process_leaves_an_unclean_marker_and_the_job(db: StoreDb) -> None:
    db.open().close()
    child = textwrap.dedent(f"""
        import os, sys, uuid
        sys.path.insert(0, {str(Path(__file__).parent.parent)!r})
        from pg import StoreDb
        from jobd.models import Job, JobStatus
        store = StoreDb({db.backend!r}, {str(db.target)!r}).open()
        job = Job(id="killed-job", type="noop", user_id="alice", project_id=None,
                  status=JobStatus.CREATED, created_at=0, updated_at=0, version=0)
        store.submit_job(job, actor="alice")
        os._exit(0)
    """)
    subprocess.run([sys.executable, "-c", child], check=True, timeout=60,
                   capture_output=True)
    store = db.open()
    try:
        assert not store.was_clean
        assert store.get_job("killed-job").status is JobStatus.QUEUED
        assert store.queued_count("alice") == 1
    finally:
        store.close()


# -- the WAL is folded back while the store runs ---------------------------------------------

@sqlite_only
def test_the_wal_is_checkpointed_in_the_background_and_cut_back(db: StoreDb) -> None:
    store = db.open()
    wal = Path(f"{db.target}-wal")
    try:
        # past the size that starts a checkpoint: 24 MB through the WAL
        for _ in range((Checkpointer.START_BYTES + (8 << 20)) // 50_000):
            submit(store, new_job(metadata={"pad": "w" * 50_000}))
        deadline = time.monotonic() + 30
        # copied into the database file while the store is open, not only at close
        while db.target.stat().st_size < 10_000_000:
            assert time.monotonic() < deadline, "the WAL was never checkpointed"
            time.sleep(0.01)
        # once the copy is complete, the next write starts the WAL over, cut back
        while wal.stat().st_size >= 4 << 20:
            assert time.monotonic() < deadline, f"the WAL stayed at {wal.stat().st_size} bytes"
            submit(store)
            time.sleep(0.01)
        assert store.queued_count("alice") == count(db, "jobs")
    finally:
        store.close()


def _stream(store: Store, n: int, wal: Path) -> int:
    """Submit ``n`` jobs of 20 KB each, 8 writes always waiting (the writer never idle);
    the largest size of the WAL seen meanwhile."""
    largest = 0
    pending: list[Any] = []
    for i in range(n):
        pending.append(store.submit_job_async(new_job(metadata={"pad": "w" * 20_000}),
                                              actor="alice"))
        if len(pending) >= 8:
            pending.pop(0).result()
        if i % 10 == 0:
            largest = max(largest, wal.stat().st_size)
    for fut in pending:
        fut.result()
    return largest


@sqlite_only
def test_the_wal_starts_over_under_writes_that_never_pause(
        db: StoreDb, monkeypatch: pytest.MonkeyPatch) -> None:
    # a passive checkpoint copies the WAL as it was when it began: with the writer never
    # idle, more has been committed by its end, and a WAL not wholly copied cannot start
    # over. The writer copies that rest between two batches, so the WAL stays near the
    # size that starts a checkpoint instead of growing by everything written.
    monkeypatch.setattr(Checkpointer, "START_BYTES", 2 << 20)  # above LIMIT_BYTES
    store = db.open()
    wal = Path(f"{db.target}-wal")
    try:
        largest = _stream(store, 1500, wal)  # about 30 MB through the WAL
        assert largest < 16 << 20, f"the WAL grew to {largest} bytes"
        assert store.queued_count("alice") == count(db, "jobs") == 1500
    finally:
        store.close()


@sqlite_only
def test_a_reader_holding_the_wal_only_delays_its_start_over(
        db: StoreDb, monkeypatch: pytest.MonkeyPatch) -> None:
    # an open read transaction keeps the frames after its snapshot from being copied: the
    # WAL grows meanwhile, and once the reader has gone it starts over all the same
    monkeypatch.setattr(Checkpointer, "START_BYTES", 2 << 20)
    store = db.open()
    wal = Path(f"{db.target}-wal")
    reader = sqlite3.connect(db.target, isolation_level=None)
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM jobs").fetchone()  # its snapshot, held
        _stream(store, 500, wal)
        held = wal.stat().st_size
        assert held > 8 << 20, f"the WAL was copied past a reader's snapshot ({held} bytes)"
        reader.execute("COMMIT")
        deadline = time.monotonic() + 30
        while wal.stat().st_size >= held:
            assert time.monotonic() < deadline, f"the WAL stayed at {wal.stat().st_size} bytes"
            _stream(store, 20, wal)
        assert store.queued_count("alice") == count(db, "jobs")
    finally:
        reader.close()
        store.close()


# -- every query the store runs uses an index ------------------------------------------------

@pytest.mark.parametrize("order, column", [("started", "started_at"),
                                           ("completed", "completed_at")])
def test_a_list_by_a_time_pages_newest_first_with_jobs_without_it_last(
        store: Store, clock: Clock, order: str, column: str) -> None:
    jobs = [submit(store, new_job(user="o")) for _ in range(9)]
    # started (and completed) in an order of their own: 4, 1, 7, 2, 5; the rest never
    for i in (4, 1, 7, 2, 5):
        clock.now += 1000
        move(store, jobs[i].id, JobStatus.RUNNING, actor="jobd")
        clock.now += 1000
        move(store, jobs[i].id, JobStatus.COMPLETED, actor="jobd")
    expected = [jobs[i].id for i in (5, 2, 7, 1, 4, 8, 6, 3, 0)]
    seen, before = [], None
    while page := store.list_wire(order=order, before=before, limit=2, user_id="o"):
        seen += [json.loads(wire)["id"] for _, _, _, wire in page]
        before = page[-1][0], page[-1][1]
    assert seen == expected
    assert [json.loads(w)[column] is None for *_, w in store.list_wire(order=order)][-4:] == [True] * 4


@sqlite_only
def test_queries_use_indexes(store: Store, clock: Clock, db: StoreDb) -> None:
    for n in range(30):
        job = submit(store, new_job(user=f"u{n % 3}", project=f"p{n % 5}",
                                    idempotency_key=f"k{n}"), actor="jobd")
        if n % 2:
            move(store, job.id, JobStatus.CANCELLED, actor="jobd")
    store.list_jobs(user_id="u1")
    store.list_jobs(statuses=["queued"])
    store.list_jobs(statuses=["completed", "failed"])
    store.list_jobs(project_id="p2")
    store.list_jobs(id_prefix="abcd")
    store.list_jobs(user_id="u1", before_seq=10)
    store.list_jobs(order="started", before=(T0, 10))
    store.list_jobs(order="completed")
    store.queued_jobs()
    store.running_jobs()
    store.submit_job(new_job(user="u1", project="p1", idempotency_key="k-new",
                             options=sync_options()), actor="jobd", rules=DEDUPE)
    list(store.cleanup(keep_before=T0 + 1, keep_failed_before=T0 + 1, chunk=5))
    list(store.cleanup(keep_before=T0 + 1, keep_failed_before=T0 + 1, dry_run=True))

    # the statements each connection has prepared, as the store wrote them (with ``?``)
    with raw(db) as conn:
        if not conn.execute("SELECT 1 FROM pragma_compile_options "
                            "WHERE compile_options = 'ENABLE_STMTVTAB'").fetchone():
            pytest.skip("this SQLite is built without the sqlite_stmt table")
    statements = {sql for (sql,) in store._read().execute("SELECT sql FROM sqlite_stmt")}
    statements |= {sql for (sql,) in store.write(
        lambda tx: tx.conn.execute("SELECT sql FROM sqlite_stmt").fetchall())}
    # a migration's one-time statements may scan; the queries of daily work may not
    one_time = [*(script for _, _, script in MIGRATIONS), QUERIES["find_broken_json"],
                QUERIES["repair_json"], QUERIES["find_broken_results"],
                QUERIES["repair_result"], QUERIES["queued_per_user"]]
    queries = {s for s in statements if " jobs" in s and "sqlite_stmt" not in s
               and s.lstrip().upper().startswith(("SELECT", "UPDATE", "DELETE"))
               and not any(s.strip() in m for m in one_time)}
    wanted = ["user_id = :user_id", "status IN (:status0)", "project_id = :project_id",
              "id >= :prefix_low", "status = 'queued' ORDER BY priority",
              "idempotency_key = :key", "AND work = :work",
              "DELETE FROM jobs", "(ifnull(started_at, -1), seq) < (:before_key, :before_seq)",
              "ORDER BY ifnull(completed_at, -1)"]
    for part in wanted:
        assert any(part in q for q in queries), f"no statement with {part!r} seen"
    with raw(db) as conn:
        for sql in queries:
            names = dict.fromkeys(re.findall(r":(\w+)", sql))
            plan = [r[3] for r in conn.execute(f"EXPLAIN QUERY PLAN {sql}", names)]
            scans = [p for p in plan if p.startswith("SCAN jobs") and "INDEX" not in p]
            assert not scans, f"{sql}\n  plan: {plan}"
            if sql.startswith("DELETE FROM jobs"):
                # a cleanup chunk reads its index in completed_at order: no sort of every
                # expired job for each chunk
                assert not any("TEMP B-TREE" in p for p in plan), f"{sql}\n  plan: {plan}"


def test_an_end_records_what_the_attempt_left(store: Store) -> None:
    """A completed job is at 100 %; a failed or cancelled one stays where it stopped, with
    its error or message; every end clears what only a running job has."""
    ends = {JobStatus.COMPLETED: {"result": {"files": 2}, "message": "done"},
            JobStatus.FAILED: {"error": "boom"},
            JobStatus.CANCELLED: {"message": "stopped"}}
    for status, given in ends.items():
        job = store.start_job(submit(store).id)
        store.update_progress(job.id, progress=40.0, phase="indexing", message="half").result()
        done = store.finish_job(job.id, status, **given)
        assert done.status is status and done.completed_at is not None
        assert done.progress == (100.0 if status is JobStatus.COMPLETED else 40.0)
        assert (done.result, done.error) == (given.get("result"), given.get("error"))
        assert done.message == given.get("message", "half")
        assert done.phase == "indexing" and not done.cancel_requested
        assert store.get_job(job.id) == done


def test_a_result_holding_nan_or_infinity_is_stored_with_nulls(store: Store) -> None:
    """SQLite's JSON functions and PostgreSQL's json refuse NaN and infinities: stored as
    Python writes them, the row failed every listing it was in."""
    job = store.start_job(submit(store).id)
    done = store.finish_job(job.id, JobStatus.COMPLETED, result={
        "nan": float("nan"), "big": [float("inf"), -float("inf"), 1.5], "s": "NaN"})
    expected = {"nan": None, "big": [None, None, 1.5], "s": "NaN"}
    assert done.result == expected and store.get_job(job.id).result == expected
    assert [json.loads(row[3])["result"] for row in store.list_wire(limit=5)] == [expected]


@pytest.mark.parametrize("end", [JobStatus.COMPLETED, JobStatus.FAILED])
def test_a_job_whose_cancel_was_asked_for_ends_cancelled_whatever_it_did(
        store: Store, end: JobStatus) -> None:
    job = submit(store)
    move(store, job.id, JobStatus.RUNNING, actor="jobd")
    request_cancel(store, job.id, "bob")
    done = store.finish_job(job.id, end, error="boom" if end is JobStatus.FAILED else None,
                            result={"x": 1} if end is JobStatus.COMPLETED else None)
    assert done.status is JobStatus.CANCELLED
    assert done.cancel_requested is False and done.error is None and done.result is None
    assert [e["status"] for e in store.events(job.id)][-1] == "cancelled"


def test_next_version_of_live_progress(store: Store, db: StoreDb) -> None:
    """SQLite: the store's clock, always rising. PostgreSQL: memory keeps the version until
    the node reports the progress and the database's sequence gives it one (jobd.cluster)."""
    far = store.clock() + 10**9
    if db.backend == "sqlite":
        assert store.next_version(5) == max(6, store.clock())
        assert store.next_version(far) == far + 1
    else:
        assert (store.next_version(5), store.next_version(far)) == (5, far)


def test_every_change_of_a_job_raises_its_version(store: Store) -> None:
    job = submit(store)
    seen = [job.version, store.start_job(job.id).version]
    for n in range(2):
        seen.append(store.update_progress(job.id, progress=n, phase=None,
                                          message=None).result().version)
    seen.append(store.cancel_job(job.id, actor="bob").version)
    seen.append(store.get_job(job.id).version)
    assert seen[:-1] == sorted(set(seen[:-1])) and seen[-1] == seen[-2], seen


def test_the_wire_shape_the_database_builds_is_the_one_job_to_dict_gives(store: Store) -> None:
    """jobs.list sends the database's encoding; models.Job.to_dict is the reference."""
    plain = submit(store)
    rich = submit(store, new_job(project="p2", options={"branch": "main", "list": [1, "é"]},
                                 metadata={"quote": "a \"b\"\n\tc", "n": 1.5},
                                 description="über", timeout_s=12.5))
    move(store, rich.id, JobStatus.RUNNING, actor="jobd")
    store.update_progress(rich.id, progress=33.33333, phase="indexing",
                          message="tab\there").result()
    request_cancel(store, rich.id, "bob")
    move(store, rich.id, JobStatus.CANCELLED, actor="jobd")
    done = submit(store, new_job(project="p3"))
    move(store, done.id, JobStatus.RUNNING, actor="jobd")
    move(store, done.id, JobStatus.COMPLETED, actor="jobd", result={"files": 3})
    wire = {json.loads(text)["id"]: json.loads(text) for _, _, _, text in store.list_wire()}
    for job_id in (plain.id, rich.id, done.id):
        assert wire[job_id] == store.get_job(job_id).to_dict()
        assert list(wire[job_id]) == list(store.get_job(job_id).to_dict())
