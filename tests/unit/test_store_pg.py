"""What the PostgreSQL store does beyond the suite both backends pass: its migrations under
the advisory lock (two jobd starting at once), a newer schema refused, one one-node store
per database (cluster nodes share it: test_cluster), errors told apart by SQLSTATE, a deadlock's batch run again, a PostgreSQL
restart while open, text with NUL, queue limits exact with two writers racing on one
database (as cluster mode will have), and the database check ``jobd db check`` uses. On
the tests' private PostgreSQL."""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys
import threading
from typing import Any, Iterator

import pytest

from jobd.errors import LimitExceeded
from jobd.models import JobStatus
from jobd.rules import Rules
from jobd.store import (Corrupt, DuplicateId, JobNotFound, ReadOnly, StateConflict,
                        StorageFull, StorageUnavailable, StoreError)

import pg
from test_store import Clock, new_job, submit

pytest_plugins = ["pg"]


def connect(dsn: str) -> Any:
    import psycopg
    return psycopg.connect(dsn, autocommit=True)


def open_store(dsn: str, **kw: Any) -> Any:
    from jobd.store.postgres import PostgresStore
    return PostgresStore(dsn, **kw).open()


def second_node(dsn: str, **kw: Any) -> Any:
    """A store with its own writer on the same database, as a second node of cluster mode
    will be (the one-node lock is another's)."""
    from jobd.store.postgres import PostgresStore
    other = PostgresStore(dsn, **kw)
    other.node_key += 1000
    return other.open()


@pytest.fixture(autouse=True)
def short_node_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """A refused open waits out a holder that is going away: not 3 s in every test."""
    from jobd.store import postgres
    monkeypatch.setattr(postgres, "NODE_WAIT_S", 0.3)


@pytest.fixture
def store(pg_dsn: str) -> Iterator[Any]:
    s = open_store(pg_dsn, clock=Clock())
    yield s
    s.close()


# -- the schema --------------------------------------------------------------------------------

def test_two_jobd_migrating_at_once_apply_each_migration_once(pg_dsn: str) -> None:
    from jobd.store.postgres import MIGRATIONS, migrate
    barrier = threading.Barrier(4)

    def one() -> None:
        with connect(pg_dsn) as conn:
            barrier.wait()
            migrate(conn, "the test's database")

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for fut in [pool.submit(one) for _ in range(4)]:
            fut.result()  # none failed on a table another had just made
    with connect(pg_dsn) as conn:
        assert conn.execute("SELECT version, name FROM jobd_schema ORDER BY version"
                            ).fetchall() == [(n, name) for n, name, _ in MIGRATIONS]


def test_two_stores_opening_a_new_database_at_once_one_opens_one_is_told_why(
        pg_dsn: str) -> None:
    barrier = threading.Barrier(2)

    def one() -> Any:
        barrier.wait()
        return open_store(pg_dsn)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(one) for _ in range(2)]
        outcomes = [f.exception() or f.result() for f in futures]
    refused = [o for o in outcomes if isinstance(o, BaseException)]
    opened = [o for o in outcomes if not isinstance(o, BaseException)]
    try:
        assert len(opened) == 1 and len(refused) == 1, outcomes
        assert isinstance(refused[0], StoreError) and "in use by another jobd" in str(refused[0])
        assert submit(opened[0]).status is JobStatus.QUEUED
    finally:
        for s in opened:
            s.close()


def test_the_migration_repairs_results_stored_with_nan_and_infinity(pg_dsn: str) -> None:
    """Migration 7: a program's result line with NaN was stored as Python writes it, and
    every read of the job failed at its ``::json``; run again over such rows, it keeps
    their text readable (and leaves valid ones, "NaN" in a string too, as they are)."""
    from jobd.store.postgres import MIGRATIONS
    store = open_store(pg_dsn)
    try:
        ids = [store.finish_job(store.start_job(submit(store).id).id,
                                JobStatus.COMPLETED).id for _ in range(4)]
        broken = ['{"x":NaN,"l":[Infinity,-Infinity,1]}', '{"s":"NaN"}', '{"a":NaN,',
                  '{"n":1.5}']
        with connect(pg_dsn) as conn:
            for job_id, result in zip(ids, broken):
                conn.execute("UPDATE jobs SET result = %s WHERE id = %s", (result, job_id))
            number, name, script = next(m for m in MIGRATIONS if m[0] == 7)
            assert name == "0007_finite_results.sql"
            conn.execute(script)
        assert [store.get_job(i).result for i in ids] == [
            {"unreadable": '{"x":NaN,"l":[Infinity,-Infinity,1]}'}, {"s": "NaN"},
            {"unreadable": '{"a":NaN,'}, {"n": 1.5}]
        assert len(store.list_wire(limit=10)) == 4
    finally:
        store.close()


def test_a_database_from_a_newer_jobd_is_refused(pg_dsn: str) -> None:
    from jobd.store.postgres import MIGRATIONS
    open_store(pg_dsn).close()
    with connect(pg_dsn) as conn:
        conn.execute("INSERT INTO jobd_schema VALUES (%s, 'from a newer jobd', 0)",
                     (len(MIGRATIONS) + 1,))
    with pytest.raises(StoreError, match=rf"schema version {len(MIGRATIONS) + 1} is newer "
                                         rf"than this jobd knows \({len(MIGRATIONS)}\); "
                                         "upgrade jobd"):
        open_store(pg_dsn)


# -- one one-node store per database ------------------------------------------------------------

def test_a_second_jobd_on_the_database_is_refused_until_the_first_closes(
        pg_dsn: str) -> None:
    first = open_store(pg_dsn)
    try:
        with pytest.raises(StoreError) as refused:
            open_store(pg_dsn)
        message = str(refused.value)
        assert "is in use by another jobd (jobd on " in message and "pid" in message
        assert "run as cluster nodes" in message
        assert "password" not in message and "postgresql:" not in message
        submit(first)  # the first goes on as before
    finally:
        first.close()
    again = open_store(pg_dsn)
    try:
        assert again.was_clean and again.queued_count() == 1
    finally:
        again.close()


def test_an_open_waits_out_a_jobd_whose_session_is_ending(
        pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A jobd killed a moment ago holds the lock until PostgreSQL sees its connection
    close: a restart right after it (systemd's, an operator's) opens, not refused."""
    from jobd.store import postgres
    monkeypatch.setattr(postgres, "NODE_WAIT_S", 3.0)
    open_store(pg_dsn).close()
    with connect(pg_dsn) as going:
        going.execute("SELECT pg_advisory_lock(%s)", (postgres.NODE_KEY,))
        timer = threading.Timer(0.5, going.close)
        timer.start()
        store = open_store(pg_dsn)
        timer.join()
    store.close()


# -- errors by SQLSTATE ------------------------------------------------------------------------

@pytest.mark.parametrize("sqlstate, kind", [
    ("53100", StorageFull), ("25006", ReadOnly), ("XX001", Corrupt),
    ("08006", StorageUnavailable), ("57P01", StorageUnavailable),
    ("53300", StorageUnavailable), ("40P01", StorageUnavailable),
])
def test_postgresql_errors_are_told_apart_by_their_sqlstate(
        pg_dsn: str, sqlstate: str, kind: type) -> None:
    import psycopg
    from jobd.store.postgres import from_pg
    with connect(pg_dsn) as conn:
        # a real error from the server, its message saying nothing of what it is
        with pytest.raises(psycopg.Error) as raised:
            conn.execute(f"DO $$ BEGIN RAISE EXCEPTION 'something' USING ERRCODE = "
                         f"'{sqlstate}'; END $$")
    mapped = from_pg(raised.value, "the database")
    assert type(mapped) is kind and "the database" in str(mapped)


def test_a_bugs_error_is_passed_on_as_it_is(pg_dsn: str) -> None:
    import psycopg
    from jobd.store.postgres import from_pg
    with connect(pg_dsn) as conn, pytest.raises(psycopg.Error) as raised:
        conn.execute("SELECT 1 / 0")
    assert from_pg(raised.value, "the database") is raised.value


class NoLookup(Rules):
    """Rules that store every submit as new: straight to the insert."""

    def admit(self, job: Any, view: Any) -> None:
        return None


def test_only_the_ids_unique_key_refused_is_a_duplicate_id(store: Any) -> None:
    """SQLSTATE 23505 is DuplicateId on the id's constraint alone: another unique key
    refused (an idempotency key, which a submit looks up first) is a bug's error, passed
    on as it is."""
    import psycopg
    first = submit(store, new_job(idempotency_key="k1"))
    with pytest.raises(psycopg.errors.UniqueViolation, match="jobs_idempotency"):
        store.submit_job(new_job(idempotency_key="k1"), actor="alice", rules=NoLookup())
    with pytest.raises(DuplicateId) as taken:
        store.submit_job(new_job(id=first.id), actor="alice", rules=NoLookup())
    assert taken.value.job_id == first.id
    assert store.counts() == {"queued": 1} and store.queued_count("alice") == 1


def test_a_deadlock_runs_the_whole_batch_again(store: Any) -> None:
    """A batch that lost a deadlock (40P01) to another writer is rolled back by
    PostgreSQL; the writer runs it again, so its writes are stored once, none refused."""
    from test_store_writer import one_batch
    tries = []

    def deadlocked_once(tx: Any) -> str:
        tries.append(1)
        if len(tries) == 1:
            tx.conn.execute("DO $$ BEGIN RAISE EXCEPTION 'deadlock detected' "
                            "USING ERRCODE = '40P01'; END $$")
        return "written"

    outcomes = one_batch(store, [
        lambda tx: store.submit_job_in(tx, new_job(user="alice"), "alice", Rules())[0],
        deadlocked_once,
        lambda tx: store.submit_job_in(tx, new_job(user="bob"), "bob", Rules())[0]])
    assert [o if isinstance(o, str) else o.status for o in outcomes] == [
        JobStatus.QUEUED, "written", JobStatus.QUEUED]
    assert len(tries) == 2
    assert dict(store._all("SELECT user_id, count(*) FROM jobs GROUP BY user_id")) == {
        "alice": 1, "bob": 1}
    assert store.queued_count() == 2


# -- a restart of PostgreSQL -------------------------------------------------------------------

def test_a_write_after_a_postgresql_restart_is_run_again_on_a_new_connection(
        postgres: pg.PostgresServer, pg_dsn: str) -> None:
    """The restart broke the writer's connection before the batch's COMMIT was sent, so
    nothing of it committed: it runs again on a new connection, and its caller never
    sees the restart."""
    store = open_store(pg_dsn, clock=Clock())
    try:
        kept = submit(store)
        postgres.restart()
        after = [submit(store) for _ in range(3)]
        assert all(job.status is JobStatus.QUEUED for job in after)
        # reads work again too (a connection the restart broke is read again on a new one)
        assert store.get_job(kept.id).status is JobStatus.QUEUED
        assert store.queued_count() == 4
        assert store.start_job(kept.id).status is JobStatus.RUNNING
        # the writer took the one-node lock again with its new connection
        with pytest.raises(StoreError, match="in use by another jobd"):
            open_store(pg_dsn)
    finally:
        store.close()


def test_writes_while_postgresql_is_down_are_refused_and_work_once_it_is_back(
        postgres: pg.PostgresServer, pg_dsn: str) -> None:
    store = open_store(pg_dsn, clock=Clock())
    try:
        with postgres.down():
            with pytest.raises(StorageUnavailable, match="storage unavailable"):
                submit(store)
        assert submit(store).status is JobStatus.QUEUED
    finally:
        store.close()


def test_a_read_after_a_postgresql_restart_goes_through_every_broken_pooled_connection(
        postgres: pg.PostgresServer, pg_dsn: str) -> None:
    """Every connection the read pool holds is broken by the restart: the first read
    after it drops each in turn and answers from a new one, not an error."""
    import contextlib
    store = open_store(pg_dsn, clock=Clock())
    try:
        kept = submit(store)
        with contextlib.ExitStack() as held:  # the pool grows to its size, then keeps them
            for _ in range(store.pool_size):
                held.enter_context(store._pool.connection())
        postgres.restart()
        assert store.get_job(kept.id).status is JobStatus.QUEUED
    finally:
        store.close()


# -- text PostgreSQL cannot hold ---------------------------------------------------------------

def test_text_with_nul_is_stored_escaped_and_a_job_with_it_still_ends(store: Any) -> None:
    job = submit(store, new_job(type="command", project=None, description="a\0b"))
    assert store.get_job(job.id).description == "a\\x00b"
    store.start_job(job.id)
    done = store.finish_job(job.id, JobStatus.FAILED, error="fatal: \0 in a path")
    assert done.status is JobStatus.FAILED and done.error == "fatal: \\x00 in a path"
    assert store.events(job.id)[-1]["message"] == "fatal: \\x00 in a path"
    # a read with NUL in its text finds what such a write stored, and refuses nothing
    keyed = submit(store, new_job(user="a\0b", type="noop", project=None))
    assert [j.id for j in store.list_jobs(user_id="a\0b")] == [keyed.id]
    assert store.list_jobs(id_prefix="\0") == []
    with pytest.raises(JobNotFound):
        store.get_job("no\0such")


# -- queue limits across writers ---------------------------------------------------------------

def test_queue_limits_hold_exactly_with_two_writers_racing(pg_dsn: str) -> None:
    """Two stores with a writer each on one database (as two nodes of cluster mode): the
    counts are read inside each write under the queue's lock, so however their batches
    interleave, no user and not the queue go past a limit."""
    first = open_store(pg_dsn)
    second = second_node(pg_dsn)
    rules = Rules(max_queued_per_user=25, max_queued_total=60)
    refused = [0]
    lock = threading.Lock()

    def one(store: Any, user: str) -> None:
        for _ in range(20):
            try:
                store.submit_job(new_job(user=user, type="noop", project=None),
                                 actor=user, rules=rules)
            except LimitExceeded:
                with lock:
                    refused[0] += 1

    try:
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            futures = [pool.submit(one, store, user)
                       for store in (first, second) for user in ("alice", "bob", "carol")
                       for _ in range(2)]
            for fut in futures:
                fut.result()
        per_user = {u: first.queued_count(u) for u in ("alice", "bob", "carol")}
        assert sum(per_user.values()) == first.queued_count() == 60, per_user
        assert all(n <= 25 for n in per_user.values()), per_user
        assert refused[0] == 12 * 20 - 60
        assert dict(first._all("SELECT user_id, count(*) FROM jobs GROUP BY user_id")
                    ) == per_user
        # the counts the limits read are the stored jobs' (as ``jobd db check`` sees)
        from jobd.store.postgres import check
        assert check(pg_dsn) == []
    finally:
        first.close()
        second.close()


def test_a_start_racing_on_two_writers_is_won_once(pg_dsn: str) -> None:
    first, second = open_store(pg_dsn), second_node(pg_dsn)
    try:
        for _ in range(20):
            job = submit(first)
            barrier = threading.Barrier(2)

            def start(store: Any) -> Any:
                barrier.wait()
                try:
                    return store.start_job(job.id)
                except StateConflict as e:
                    return e
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                outcomes = list(pool.map(start, (first, second)))
            assert sum(not isinstance(o, StateConflict) for o in outcomes) == 1, outcomes
            assert first.get_job(job.id).attempts == 1
        assert first.queued_count() == 0
    finally:
        first.close()
        second.close()


# -- jobd db check's helpers -------------------------------------------------------------------

def test_check_finds_counts_that_drifted_from_the_jobs(store: Any, pg_dsn: str) -> None:
    from jobd.store.postgres import check, schema_version
    from jobd.store.postgres import MIGRATIONS
    submit(store)
    assert check(pg_dsn) == [] and schema_version(pg_dsn) == len(MIGRATIONS)
    with connect(pg_dsn) as conn:
        conn.execute("UPDATE queued_counts SET n = n + 1")
    problems = check(pg_dsn)
    assert len(problems) == 1 and "queued count" in problems[0]


def test_check_of_a_database_that_does_not_answer_says_so(postgres: pg.PostgresServer,
                                                          pg_dsn: str) -> None:
    from jobd.store.postgres import check, schema_version
    problems = check(postgres.dsn_for("no_such_database"))
    assert len(problems) == 1 and "no_such_database" in problems[0]
    with pytest.raises(StoreError, match="no_such_database"):
        schema_version(postgres.dsn_for("no_such_database"))
    # a database jobd never opened: no schema yet, said so
    assert schema_version(pg_dsn) == 0
    problems = check(pg_dsn)
    assert len(problems) == 1 and problems[0].endswith(
        ": no jobd schema (jobd has never opened this database)")


def test_the_store_package_does_not_import_psycopg() -> None:
    code = ("import sys, jobd.store, jobd.store.sqlite, jobd.store.base; "
            "print(sorted(m for m in sys.modules if m == 'jobd.store.postgres' "
            "or m.split('.')[0] in ('psycopg', 'psycopg_pool')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert out.strip() == "[]"


# -- pipeline mode -----------------------------------------------------------------------------

def waits_of(store: Any) -> list[int]:
    """How many times the writer's connection waited for an answer (a round trip), counted
    from now: each exchange on the connection goes through its ``wait``, which asks to be
    woken when the socket can be read only to wait for what the server has not sent yet."""
    conn = store._driver.conn
    count = [0]
    real = conn.wait

    def answered(gen: Any) -> Any:
        waited, ready = False, None
        try:
            while True:
                wanted = gen.send(ready)
                if wanted == 1 and not waited:  # psycopg's Wait.R: nothing to send, only read
                    waited = True
                    count[0] += 1
                ready = yield wanted
        except StopIteration as done:
            return done.value

    conn.wait = lambda gen, *args, **kw: real(answered(gen), *args, **kw)
    return count


def test_a_batch_waits_only_for_the_answers_its_writes_read(store: Any) -> None:
    """Pipeline mode: a batch of submits waits for each insert's new seq and for the
    commit; the BEGIN, every event and queued count, and the COMMIT go out unawaited."""
    waits = waits_of(store)
    jobs = [new_job(user=f"u{n}") for n in range(10)]
    from test_store_writer import one_batch
    one_batch(store, [lambda tx, job=job: store.submit_job_in(tx, job, "alice", NoLookup())
                      for job in jobs])
    # one wait for each insert's seq, and for the begin (its version floor) and the
    # commit of each batch (one_batch's held write is a batch of its own); waiting for
    # every statement, it was 32
    assert waits[0] <= 10 + 2 * 2, waits[0]
    assert store.queued_count() == 10
    assert [e["status"] for e in store.events(jobs[-1].id)] == ["created", "queued"]


@pytest.mark.parametrize("case", ["unawaited mid-batch", "unawaited at the commit", "awaited"])
def test_a_statement_that_fails_in_pipeline_mode_fails_its_own_write_alone(
        store: Any, case: str) -> None:
    """A write's statement whose answer is not waited for (its queued count driven below
    zero: a CHECK refuses it) fails where the batch next waits: in a later write, or at the
    commit. The batch runs again, waiting for each statement, so that the error is that
    write's alone, passed on as it is (a bug's), and its neighbours are stored."""
    import psycopg
    queued, running = submit(store), submit(store, new_job(user="carol"))
    store.start_job(running.id)

    def failing(tx: Any) -> str:
        if case == "awaited":  # progress out of its range: refused by the update itself
            tx.run("update_progress", job_id=running.id, progress=500, phase=None,
                   message=None).fetchone()
        else:
            store._count_queued(tx, "alice", -5)
        return "not refused"

    from test_store_writer import one_batch
    bob, dave = new_job(user="bob"), new_job(user="dave")
    writes = [lambda tx: store.submit_job_in(tx, bob, "bob", Rules())[0], failing]
    if case != "unawaited at the commit":
        writes.append(lambda tx: store.submit_job_in(tx, dave, "dave", Rules())[0])
    outcomes = one_batch(store, writes)
    assert outcomes[0].id == bob.id
    assert isinstance(outcomes[1], psycopg.errors.CheckViolation), outcomes[1]
    assert all(o.status is JobStatus.QUEUED for o in outcomes[2:])
    assert store.queued_count("alice") == 1 and store.queued_count() == len(writes)
    assert store.get_job(running.id).progress == 0
    assert store.get_job(queued.id).status is JobStatus.QUEUED


def test_get_jobs_looks_each_id_up_by_the_index_however_few_jobs_are_stored(
        store: Any, pg_dsn: str) -> None:
    """A node reads the jobs of each burst of notifications with ``get_jobs``. On a table
    of a few thousand jobs, ``id IN (a set of the array's elements)`` was planned as a
    scan of the whole table (the planner guesses 100 rows for the set): 1.1 ms against
    0.07 ms for eight ids in 8,000 jobs, many times a second on every node."""
    import json
    from jobd.store.postgres import QUERIES
    with connect(pg_dsn) as conn:
        conn.execute("INSERT INTO jobs (id, type, user_id, status, created_at, updated_at, "
                     "version, options, metadata) SELECT gen_random_uuid()::text, 'noop', "
                     "'u' || (g % 50), 'queued', g, g, g, '{}', '{}' "
                     "FROM generate_series(1, 5000) g")
        conn.execute("ANALYZE jobs")
        ids = [r[0] for r in conn.execute("SELECT id FROM jobs ORDER BY random() LIMIT 8")]
        plan = "\n".join(r[0] for r in conn.execute(
            "EXPLAIN " + QUERIES["get_jobs"], {"ids": json.dumps(ids)}))
    assert "Seq Scan on jobs" not in plan, plan
    assert sorted(j.id for j in store.get_jobs(ids)) == sorted(ids)


def plan_of(conn: Any, sql: str, params: dict[str, Any]) -> dict[str, Any]:
    """``sql`` run under EXPLAIN ANALYZE in a transaction rolled back: its plan (JSON)."""
    conn.execute("BEGIN")
    try:
        (plan,), = conn.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, params).fetchall()
    finally:
        conn.execute("ROLLBACK")
    return plan[0]["Plan"]


def how_the_row_is_found(plan: dict[str, Any]) -> list[tuple[str, str | None]]:
    """How a statement's own ``jobs`` (not an alias's, as the claim's ``q``) was read:
    (node type, index) of each scan of it."""
    found, nodes = [], [plan]
    while nodes:
        node = nodes.pop()
        nodes.extend(node.get("Plans", []))
        if (node.get("Relation Name") == "jobs" and node.get("Alias") == "jobs"
                and node["Node Type"] != "ModifyTable"):
            found.append((node["Node Type"], node.get("Index Name")))
    return found


def test_a_queued_job_is_found_by_its_key_when_the_statistics_saw_none_queued(
        store: Any, pg_dsn: str) -> None:
    """Statistics taken while nothing was queued (an idle moment's ANALYZE), then a burst
    of submits: a guard written ``status = 'queued'`` beside the job's key let the planner
    reach the row through the partial index of queued jobs, reading every entry of it. A
    node's claims cost as much as the whole queue (3,000 entries: 2–3 ms a claim, under
    the queue lock, in bench/cluster_bench.py's drain); so did a start and a fold. (A
    cancel's guard, an OR of two statuses, never was so planned: it is checked too.)"""
    from jobd.store.postgres import QUERIES
    with connect(pg_dsn) as conn:
        conn.execute("INSERT INTO jobs (id, type, user_id, status, created_at, updated_at, "
                     "started_at, completed_at, version, options, metadata) "
                     "SELECT gen_random_uuid()::text, 'noop', 'u' || (g % 8), 'completed', "
                     "g, g, g, g, g, '{}', '{}' FROM generate_series(1, 300) g")
        conn.execute("ANALYZE")
    rules = Rules()
    for _ in range(6):
        jobs = [new_job(user=f"u{n % 8}", type="noop", project=None) for n in range(500)]
        store.write(lambda tx, jobs=jobs: [store.submit_job_in(tx, job, "alice", rules)
                                           for job in jobs])
    with connect(pg_dsn) as conn:
        node = conn.execute(
            "INSERT INTO nodes (host, state_dir, pid, workers, settings_hash, settings, "
            "started_at, lease_until) VALUES ('h', 's', 1, 4, '-', '{}', jobd_now_us(), "
            "jobd_now_us() + 3600000000) RETURNING id").fetchone()[0]
        job_id, seq = conn.execute("SELECT id, seq FROM jobs WHERE status = 'queued' "
                                   "ORDER BY seq DESC LIMIT 1").fetchone()
        now = {"now": 1, "floor": 1}
        plans = {
            "start_job": plan_of(conn, QUERIES["start_job"], {**now, "job_id": job_id}),
            "fold_job": plan_of(conn, QUERIES["fold_job"], {
                **now, "seq": seq, "options": "{}", "priority": 0, "idempotency_key": None}),
            "cancel_job": plan_of(conn, QUERIES["cancel_job"], {**now, "job_id": job_id}),
            "claim": plan_of(conn, QUERIES["claim"], {
                **now, "node": node, "workers": 4, "max_running_per_user": 100,
                "exclusive": ["sync", "index"]}),
        }
    for name, plan in plans.items():
        assert plan["Actual Rows"] == 1, name  # it did find its job
        found = how_the_row_is_found(plan)
        assert found and all(kind in ("Index Scan", "Index Only Scan", "Bitmap Index Scan",
                                      "Bitmap Heap Scan") and index in ("jobs_pkey",
                                                                        "jobs_id_key", None)
                             for kind, index in found), (name, found)
