"""The writer and the errors: a batch runs without savepoints unless a write fails, one
refused write leaves its neighbours stored, answers reach an event loop in one hop (on both
backends); SQLite's errors become the store's by their error name (a real full disk among
them), and cleanup goes in short chunks (SQLite only: its statements, file and WAL)."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from conftest import fill
from jobd.models import JobStatus
from jobd.rules import Rules
from jobd.store import (Corrupt, DuplicateId, JobNotFound, ReadOnly, StateConflict, StorageFull,
                        StorageUnavailable, Store, StoreError)
from jobd.store.db import Tx
from jobd.store.errors import from_sqlite

from pg import StoreDb, sqlite_only
from test_store import T0, Clock, new_job, raw, submit

pytest_plugins = ["pg"]


@pytest.fixture
def store(store_db: StoreDb) -> Iterator[Store]:
    s = store_db.open(clock=Clock())
    yield s
    s.close()


def traced(store: Store) -> list[str] | None:
    """The statements the writer's SQLite connection runs from now on (None: the store is
    another backend's)."""
    seen: list[str] = []
    assert store._writer is not None
    conn = getattr(store._writer.driver, "conn", None)
    if not isinstance(conn, sqlite3.Connection):
        return None
    conn.set_trace_callback(seen.append)
    return seen


def one_batch(store: Store, writes: list[Any]) -> list[Any]:
    """Run ``writes`` in one transaction of the writer: queued while it is held up."""
    gate = threading.Event()
    held = store.write_async(lambda tx: gate.wait(5))
    futures = [store.write_async(w) for w in writes]
    gate.set()
    held.result()
    outcomes = []
    for fut in futures:
        try:
            outcomes.append(fut.result())
        except Exception as e:  # noqa: BLE001 - what the caller would get
            outcomes.append(e)
    return outcomes


@sqlite_only
def test_a_batch_of_good_writes_takes_no_savepoint(store: Store) -> None:
    seen = traced(store)
    assert seen is not None
    jobs = one_batch(store, [lambda tx, n=n: store.submit_job_in(tx, new_job(project=f"p{n}"),
                                                           "alice", Rules())
                             for n in range(20)])
    assert all(not dup for _, dup in jobs)
    assert not [s for s in seen if "SAVEPOINT" in s.upper()]
    assert sum(1 for s in seen if s.strip().upper() == "COMMIT") <= 2


def test_one_refused_write_leaves_its_neighbours_stored(store: Store,
                                                        store_db: StoreDb) -> None:
    rules = Rules(max_queued_per_user=3)
    taken = submit(store, new_job(user="bob"), actor="bob")
    seen = traced(store)

    def fails_after_writing(tx: Tx) -> None:
        store.submit_job_in(tx, new_job(user="dave"), "dave", Rules())  # written, then undone
        raise RuntimeError("the rest of this write failed")

    writes = [lambda tx, n=n: store.submit_job_in(tx, new_job(project=f"a{n}"), "alice", rules)
              for n in range(5)]
    writes.insert(2, fails_after_writing)
    writes.insert(4, lambda tx: store.submit_job_in(tx, new_job(id=taken.id), "alice", Rules()))
    outcomes = one_batch(store, writes)
    kinds = [type(o).__name__ if isinstance(o, Exception) else "stored" for o in outcomes]
    # the same as one transaction per write: the limit counts the writes before it
    assert kinds == ["stored", "stored", "RuntimeError", "stored", "DuplicateId",
                     "LimitExceeded", "LimitExceeded"]
    assert isinstance(outcomes[4], DuplicateId) and outcomes[4].job_id == taken.id
    assert store.queued_count("alice") == 3 and store.queued_count("dave") == 0
    assert dict(store_db.rows("SELECT user_id, count(*) FROM jobs GROUP BY user_id")) == {
        "alice": 3, "bob": 1}
    # the batch ran plainly, then again with a savepoint per write
    assert seen is None or [s for s in seen if "SAVEPOINT" in s.upper()]


@sqlite_only
def test_writes_refused_before_writing_cost_the_batch_nothing(store: Store) -> None:
    """A start that lost its race, a submit past a limit, an id taken: each is refused
    before it changed a row, so the batch neither rolls back nor runs again. (SQLite: on
    PostgreSQL a refused insert aborts the transaction, so an id taken does run the batch
    again with savepoints, as test_one_refused_write_leaves_its_neighbours_stored does.)"""
    taken = submit(store, new_job(user="bob"), actor="bob")
    done = store.finish_job(store.start_job(submit(store).id).id, JobStatus.FAILED,
                            error="x")
    seen = traced(store)
    assert seen is not None
    limit = Rules(max_queued_per_user=1)
    outcomes = one_batch(store, [
        lambda tx: store.submit_job_in(tx, new_job(user="carol"), "carol", limit),
        lambda tx: store.start_job_in(tx, done.id),
        lambda tx: store.submit_job_in(tx, new_job(user="carol"), "carol", limit),
        lambda tx: store.submit_job_in(tx, new_job(id=taken.id), "alice", Rules()),
        lambda tx: store.submit_job_in(tx, new_job(user="dave"), "dave", Rules()),
    ])
    kinds = [type(o).__name__ if isinstance(o, Exception) else "stored" for o in outcomes]
    assert kinds == ["stored", "StateConflict", "LimitExceeded", "DuplicateId", "stored"]
    assert not [s for s in seen if "SAVEPOINT" in s.upper() or s.upper() == "ROLLBACK"]
    assert (store.queued_count("carol"), store.queued_count("dave")) == (1, 1)
    assert store.get_job(done.id).status is JobStatus.FAILED
    with raw(store.path) as conn:
        assert dict(conn.execute("SELECT user_id, count(*) FROM jobs GROUP BY user_id")) == {
            "alice": 1, "bob": 1, "carol": 1, "dave": 1}


def test_sqlite_errors_are_told_apart_by_their_name(tmp_path: Path) -> None:
    db = tmp_path / "x.db"
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("CREATE TABLE t (id TEXT UNIQUE, n INTEGER CHECK (n > 0))")
    conn.execute("INSERT INTO t VALUES ('a', 1)")
    conn.close()
    errors: dict[str, sqlite3.Error] = {}
    for name, sql, uri in (("unique", "INSERT INTO t VALUES ('a', 2)", str(db)),
                           ("check", "INSERT INTO t VALUES ('b', 0)", str(db)),
                           ("readonly", "INSERT INTO t VALUES ('c', 1)", f"file:{db}?mode=ro")):
        c = sqlite3.connect(uri, uri=True)
        try:
            c.execute(sql)
        except sqlite3.Error as e:
            errors[name] = e
        finally:
            c.close()
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database, " * 100)
    try:
        sqlite3.connect(garbage).execute("SELECT * FROM sqlite_master")
    except sqlite3.Error as e:
        errors["notadb"] = e
    assert {k: e.sqlite_errorname for k, e in errors.items()} == {
        "unique": "SQLITE_CONSTRAINT_UNIQUE", "check": "SQLITE_CONSTRAINT_CHECK",
        "readonly": "SQLITE_READONLY", "notadb": "SQLITE_NOTADB"}
    assert isinstance(from_sqlite(errors["unique"], db, job_id="j1"), DuplicateId)
    assert from_sqlite(errors["unique"], db) is errors["unique"]  # not an insert of a job
    assert from_sqlite(errors["check"], db) is errors["check"]  # a bug: passed on as it is
    readonly = from_sqlite(errors["readonly"], db)
    assert isinstance(readonly, ReadOnly) and isinstance(readonly, StorageUnavailable)
    assert str(readonly).startswith(f"storage read-only: {db}")
    assert isinstance(from_sqlite(errors["notadb"], garbage), Corrupt)
    opening = from_sqlite(errors["readonly"], db, opening=True)
    assert type(opening) is StoreError and "check the file's owner" in str(opening)


def test_a_database_locked_by_another_program_is_storage_unavailable(tmp_path: Path) -> None:
    """An operator's sqlite3 shell holding a write transaction makes a write wait out the
    busy timeout and fail: the client hears "unavailable, retry" (-32050), not an
    internal error."""
    db = tmp_path / "jobd.db"
    Store(db).open().close()
    holder = sqlite3.connect(db, isolation_level=None)
    waiter = sqlite3.connect(db, isolation_level=None, timeout=0)
    try:
        holder.execute("BEGIN IMMEDIATE")
        with pytest.raises(sqlite3.Error) as busy:
            waiter.execute("BEGIN IMMEDIATE")
    finally:
        holder.close()
        waiter.close()
    assert busy.value.sqlite_errorname == "SQLITE_BUSY"
    mapped = from_sqlite(busy.value, db)
    assert isinstance(mapped, StorageUnavailable)
    assert str(mapped).startswith(f"storage busy: {db}") and "retry" in str(mapped)


@pytest.mark.root
def test_a_full_disk_is_storage_full_and_writes_come_back(small_disk: Path) -> None:
    store = Store(small_disk / "jobd.db", synchronous="normal").open()
    try:
        kept = submit(store)
        filler = fill(small_disk)
        with pytest.raises(StorageFull) as full:
            for _ in range(50):
                submit(store, new_job(metadata={"blob": "x" * 200_000}))
        assert isinstance(full.value, StorageUnavailable)
        assert str(full.value).startswith(f"storage full: {small_disk / 'jobd.db'}")
        assert "free space, then retry" in str(full.value)
        filler.unlink()
        assert store.start_job(kept.id).status is JobStatus.RUNNING
    finally:
        store.close()


@sqlite_only
def test_a_write_that_joins_a_waiting_batch_is_stamped_no_earlier_than_it_was_queued(
        store_db: StoreDb) -> None:
    """The batch's BEGIN waited for another program's lock; a write queued meanwhile
    joins it and gets a time (its version) from after it was queued, not the batch's."""
    clock = Clock()
    store = store_db.open(clock=clock)
    try:
        holder = sqlite3.connect(store_db.target, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        first = store.write_async(lambda tx: tx.now)
        time.sleep(0.3)  # the writer took it and waits in BEGIN
        clock.now += 1_000
        joined = store.write_async(lambda tx: tx.now)
        holder.execute("COMMIT")
        holder.close()
        assert first.result(10) == joined.result(10) == T0 + 1_000
    finally:
        store.close()


def test_a_refused_transition_names_the_status_now(store: Store) -> None:
    job = store.finish_job(store.start_job(submit(store).id).id, JobStatus.FAILED, error="x")
    with pytest.raises(StateConflict) as refused:
        store.start_job(job.id)
    assert (refused.value.job_id, refused.value.status, refused.value.wanted) == (
        job.id, "failed", "running")
    assert str(refused.value) == f"job {job.id} is failed; it cannot become running"


@sqlite_only
def test_cleanup_goes_in_short_chunks_and_holds_the_checkpointer_off(store: Store) -> None:
    clock: Any = store.clock
    with raw(store.path) as conn:  # 5,000 finished jobs with a few events each, at once
        conn.execute("BEGIN")
        for n in range(5000):
            seq = conn.execute(
                "INSERT INTO jobs (id, type, user_id, status, version, created_at, updated_at, "
                "started_at, completed_at) VALUES (?, 'noop', 'bulk', 'completed', 1, ?, ?, ?, ?)",
                (f"bulk-{n:05}", T0, T0, T0, T0 + n)).lastrowid
            conn.executemany("INSERT INTO job_events (job, at, status, progress, actor) "
                             "VALUES (?, ?, ?, 0, 'jobd')",
                             [(seq, T0, s) for s in ("created", "queued", "running", "completed")])
        conn.execute("COMMIT")
    live = submit(store)
    assert store._writer is not None
    checkpointer = store._writer.driver.checkpointer
    holds: list[int] = []
    clock.now = T0 + 10**9
    chunks = []
    for ids in store.cleanup(keep_before=T0 + 10**8, keep_failed_before=T0 + 10**8):
        holds.append(checkpointer._holds)
        chunks.append(len(ids))
    assert sum(chunks) == 5000 and max(chunks) <= 1000 and len(chunks) >= 5
    assert holds and set(holds) == {1} and checkpointer._holds == 0
    assert store.longest_write_s < 0.05, store.longest_write_s
    assert store.get_job(live.id).status is JobStatus.QUEUED
    with raw(store.path) as conn:
        assert conn.execute("SELECT count(*) FROM job_events").fetchone() == (2,)
    assert store.counts() == {"queued": 1}


def test_a_commit_wakes_the_event_loop_once_for_all_its_answers(store: Store) -> None:
    """Writes submitted from an asyncio loop are answered there in one hop per commit
    (one ``call_soon_threadsafe``), an error as well as a value."""
    async def main() -> tuple[list[Any], int]:
        loop = asyncio.get_running_loop()
        wakes = 0
        real = loop.call_soon_threadsafe

        def counting(*args: Any, **kw: Any) -> Any:
            nonlocal wakes
            wakes += 1
            return real(*args, **kw)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        hold, held = threading.Event(), threading.Event()
        # the writes below queue behind it (once it runs: none joins its batch)
        store.write_async(lambda tx: (held.set(), hold.wait(5)))
        held.wait(5)
        futures = [store.write_on(loop, lambda tx, n=n: n) for n in range(20)]
        futures.append(store.write_on(loop, lambda tx: store.start_job_in(tx, "nope")))
        hold.set()
        answers = await asyncio.gather(*futures, return_exceptions=True)
        return answers, wakes

    answers, wakes = asyncio.run(main())
    assert answers[:20] == list(range(20))
    assert isinstance(answers[20], JobNotFound)
    assert wakes == 1
