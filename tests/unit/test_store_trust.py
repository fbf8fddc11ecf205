"""The store keeps its promises against bad text and greedy users: every text it writes is
valid UTF-8, and a user's finished jobs are capped by ``max_stored_per_user`` (on both
backends; the migrations that weighed and repaired old SQLite rows: SQLite only)."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Iterator

import pytest

from jobd.models import JobStatus
from jobd.store import Listeners, Store
from jobd.store.sql import MIGRATIONS
from jobd.store.sqlite import WEIGHT_BYTES

from pg import StoreDb
from test_store import Clock, move, new_job, raw, submit

pytest_plugins = ["pg"]

BAD = "caf\udce9.txt"  # what surrogateescape makes of the bytes b"caf\xe9.txt"


@pytest.fixture
def forgotten() -> list[str]:
    return []


@pytest.fixture
def capped(store_db: StoreDb, forgotten: list[str]) -> Iterator[Store]:
    s = store_db.open(clock=Clock(), max_stored_per_user=5,
                      listeners=Listeners(deleted=forgotten.extend))
    yield s
    s.close()


def finish(store: Store, job_id: str, to: JobStatus = JobStatus.COMPLETED) -> None:
    move(store, job_id, JobStatus.RUNNING, actor="jobd")
    move(store, job_id, to, actor="jobd", error="no" if to is JobStatus.FAILED else None)


# -- text ---------------------------------------------------------------------------------

def test_an_end_whose_text_is_not_utf8_is_recorded_escaped(capped: Store) -> None:
    job = submit(capped, new_job(type="command", project=None))
    move(capped, job.id, JobStatus.RUNNING, actor="jobd")
    capped.update_progress(job.id, progress=10, phase="git\udcff", message=BAD).result()
    done = move(capped, job.id, JobStatus.FAILED, actor="jobd",
                             error=f"merge conflicts in {BAD}", result={"file": BAD})
    assert done.status is JobStatus.FAILED
    assert done.error == "merge conflicts in caf\\udce9.txt"
    assert capped.get_job(job.id).phase == "git\\udcff"
    assert capped.events(job.id)[-1]["message"] == "merge conflicts in caf\\udce9.txt"
    assert capped.get_job(job.id).result == {"file": "caf\\udce9.txt"}
    # and what is stored reads back as UTF-8 everywhere, jobs.list's SQLite-made JSON too
    capped.list_wire(limit=5)[0][2].encode()


def test_a_submit_with_lone_surrogates_is_stored_escaped(capped: Store) -> None:
    job = submit(capped, new_job(description=BAD, metadata={"k": BAD}, options={BAD: 1},
                                 idempotency_key=BAD))
    stored = capped.get_job(job.id)
    assert stored.description == "caf\\udce9.txt"
    assert stored.idempotency_key == "caf\\udce9.txt"
    # escaped in the text itself, so that what is read back is valid text again
    assert stored.metadata == {"k": "caf\\udce9.txt"}
    assert stored.options == {"caf\\udce9.txt": 1}
    assert capped.get_job(job.id).to_dict()["metadata"]["k"].encode()


# -- max_stored_per_user ------------------------------------------------------------------

def test_past_the_limit_a_users_oldest_finished_jobs_go(capped: Store,
                                                       forgotten: list[str]) -> None:
    ids = [submit(capped, new_job(user="alice", project=f"p{n}")).id for n in range(8)]
    other = submit(capped, new_job(user="bob"))
    finish(capped, other.id)
    for job_id in ids:
        finish(capped, job_id, JobStatus.FAILED if job_id == ids[3] else JobStatus.COMPLETED)
    kept = {j.id for j in capped.list_jobs(user_id="alice", limit=100)}
    assert kept == set(ids[3:]) and forgotten == ids[:3]
    assert capped.stored_weight("alice") == 5
    assert capped.get_job(other.id).status is JobStatus.COMPLETED  # bob is not alice


def test_active_jobs_are_never_forgotten(capped: Store) -> None:
    active = [submit(capped, new_job(project=f"a{n}")).id for n in range(6)]
    done = [submit(capped, new_job(project=f"d{n}")).id for n in range(6)]
    for job_id in done:
        finish(capped, job_id)
    assert {j.id for j in capped.list_jobs(statuses=["queued"], limit=100)} == set(active)
    assert len(capped.list_jobs(statuses=["completed"], limit=100)) == 5


def test_big_jobs_weigh_more(capped: Store) -> None:
    heavy = {"blob": "x" * (3 * WEIGHT_BYTES)}  # 1 + 3 units
    first = submit(capped, new_job(project="p0", metadata=heavy))
    finish(capped, first.id)
    assert capped.stored_weight("alice") == 4
    second = submit(capped, new_job(project="p1", metadata=heavy))
    finish(capped, second.id)  # 8 > 5: the older heavy job goes
    assert [j.id for j in capped.list_jobs(user_id="alice")] == [second.id]


def test_a_retried_job_no_longer_counts_until_it_ends_again(capped: Store) -> None:
    job = submit(capped, new_job())
    finish(capped, job.id, JobStatus.FAILED)
    assert capped.stored_weight("alice") == 1
    move(capped, job.id, JobStatus.QUEUED, actor="alice")
    assert capped.stored_weight("alice") == 0
    move(capped, job.id, JobStatus.CANCELLED, actor="alice")
    assert capped.stored_weight("alice") == 1


def test_cleanup_applies_a_lowered_limit(capped: Store, forgotten: list[str]) -> None:
    ids = [submit(capped, new_job(project=f"p{n}")).id for n in range(5)]
    for job_id in ids:
        finish(capped, job_id)
    capped.max_stored_per_user = 2  # a reload lowered it
    deleted = [i for chunk in capped.cleanup(keep_before=0, keep_failed_before=0) for i in chunk]
    assert deleted == ids[:3] and forgotten == ids[:3]
    assert capped.stored_weight("alice") == 2


def test_the_migration_weighs_jobs_stored_before_it(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    conn = sqlite3.connect(db, isolation_level=None)
    for number, _, script in MIGRATIONS[:2]:
        conn.executescript(script)
        conn.execute(f"PRAGMA user_version = {number}")
    for seq, status, metadata in ((1, "completed", "{}"), (2, "failed", '{"b":"%s"}' % ("x" * 9000)),
                                  (3, "queued", "{}")):
        conn.execute("INSERT INTO jobs (seq, id, type, user_id, status, metadata, version, "
                     "created_at, updated_at) VALUES (?, ?, 'noop', 'alice', ?, ?, 1, 1, 1)",
                     (seq, f"id-{seq}", status, metadata))
    conn.close()
    store = Store(db, synchronous="normal").open()
    try:
        assert store.stored_weight("alice") == 1 + 3  # the queued job does not count
    finally:
        store.close()
    with raw(db) as check:
        assert check.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_the_migration_repairs_stored_nan_and_infinity(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    conn = sqlite3.connect(db, isolation_level=None)
    for number, _, script in MIGRATIONS[:2]:
        conn.executescript(script)
        conn.execute(f"PRAGMA user_version = {number}")
    conn.execute("INSERT INTO jobs (id, type, user_id, status, options, metadata, version, "
                 "created_at, updated_at) VALUES ('j1', 'noop', 'alice', 'completed', "
                 "'{\"a\":NaN}', '{\"b\":Infinity,\"c\":-Infinity,\"d\":\"ok\"}', 1, 1, 1)")
    conn.close()
    store = Store(db, synchronous="normal").open()
    try:
        job = store.get_job("j1")
        assert job.options == {"a": None}
        assert job.metadata == {"b": None, "c": None, "d": "ok"}
        assert len(store.list_wire(limit=5)) == 1  # SQLite's json() takes the row again
    finally:
        store.close()


def test_the_migration_repairs_results_stored_with_nan_and_infinity(tmp_path: Path) -> None:
    """Migration 9: a program's result line with NaN was stored as Python writes it."""
    db = tmp_path / "old.db"
    Store(db, synchronous="normal").open().close()
    with raw(db) as conn:
        conn.execute("PRAGMA user_version = 8")
        for job_id, result in (("j1", '{"x":NaN,"l":[Infinity,-Infinity,1],"s":"NaN"}'),
                               ("j2", '{"ok":1}'), ("j3", None)):
            conn.execute("INSERT INTO jobs (id, type, user_id, status, result, version, "
                         "created_at, updated_at, started_at, completed_at) VALUES "
                         "(?, 'noop', 'alice', 'completed', ?, 1, 1, 1, 1, 1)",
                         (job_id, result))
    store = Store(db, synchronous="normal").open()
    try:
        assert store.get_job("j1").result == {"x": None, "l": [None, None, 1], "s": "NaN"}
        assert store.get_job("j2").result == {"ok": 1} and store.get_job("j3").result is None
        assert len(store.list_wire(limit=5)) == 3  # SQLite's json() takes the row again
    finally:
        store.close()


def test_the_migration_repair_keeps_strings_and_keeps_unparsable_text(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    conn = sqlite3.connect(db, isolation_level=None)
    for number, _, script in MIGRATIONS[:2]:
        conn.executescript(script)
        conn.execute(f"PRAGMA user_version = {number}")
    rows = (
        # a NaN beside strings that hold "NaN" and "Infinity": only the number changes
        ("j1", '{"title":"Infinity War","note":"NaN here","n":NaN,"l":[-Infinity,1.5]}',
         '{"ok":true}'),
        # valid already: left byte for byte, even a string holding NaN
        ("j2", '{"s":"NaN"}', '{"x":"-Infinity"}'),
        # no JSON at all, even to Python: kept as a string
        ("j3", '{"a":NaN,', '{"b": 1}'),
    )
    for job_id, options, metadata in rows:
        conn.execute("INSERT INTO jobs (id, type, user_id, status, options, metadata, version, "
                     "created_at, updated_at) VALUES (?, 'noop', 'alice', 'completed', ?, ?, "
                     "1, 1, 1)", (job_id, options, metadata))
    conn.close()
    store = Store(db, synchronous="normal").open()
    try:
        j1, j2, j3 = (store.get_job(job_id) for job_id in ("j1", "j2", "j3"))
        assert j1.options == {"title": "Infinity War", "note": "NaN here", "n": None,
                              "l": [None, 1.5]}
        assert j1.metadata == {"ok": True}
        assert (j2.options, j2.metadata) == ({"s": "NaN"}, {"x": "-Infinity"})
        assert j3.options == {"unreadable": '{"a":NaN,'} and j3.metadata == {"b": 1}
        assert len(store.list_wire(limit=5)) == 3
    finally:
        store.close()
    with raw(db) as check:
        assert check.execute("SELECT metadata FROM jobs WHERE id = 'j2'").fetchone() == (
            '{"x":"-Infinity"}',)
