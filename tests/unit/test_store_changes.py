"""The store's part of jobs.changes and admin.purge on real databases (both backends): jobs in the
order of their last change after a (µs, seq) position, and a user's finished jobs deleted
by the one delete, with the counts kept and the deleted listener told."""

from __future__ import annotations

import json

from jobd.models import JobStatus
from jobd.store import Listeners

from pg import StoreDb
from test_store import T0, Clock, clock, db, new_job, submit  # noqa: F401 - fixtures

pytest_plugins = ["pg"]


def ids(rows: list[tuple[int, int, str, str]]) -> list[str]:
    return [json.loads(wire)["id"] for _, _, _, wire in rows]


def test_jobs_come_in_the_order_of_their_last_change_after_a_position(
        db: StoreDb, clock: Clock) -> None:
    store = db.open(clock=clock)
    try:
        clock.now = T0 + 1
        a = submit(store, new_job(user="alice"))
        clock.now = T0 + 2
        b = submit(store, new_job(user="bob", project="p2"))
        clock.now = T0 + 3
        c = submit(store, new_job(user="alice", project="p3"))
        clock.now = T0 + 4
        store.start_job(a.id)
        clock.now = T0 + 5
        store.finish_job(a.id, JobStatus.COMPLETED)
        clock.now = T0 + 6
        store.start_job(b.id)

        everything = store.changed_wire(after=(T0, -1), limit=10)
        assert ids(everything) == [c.id, a.id, b.id]
        assert [(changed, status) for changed, _, status, _ in everything] == [
            (T0 + 3, "queued"), (T0 + 5, "completed"), (T0 + 6, "running")]
        # exclusive of the position, which pages on by (change time, seq)
        assert ids(store.changed_wire(after=(T0 + 3, c.seq), limit=10)) == [a.id, b.id]
        assert ids(store.changed_wire(after=(T0 + 3, c.seq), limit=1)) == [a.id]
        assert ids(store.changed_wire(after=(T0 + 5, -1), limit=10)) == [a.id, b.id]
        # the active jobs only, and the filters of jobs.list
        assert ids(store.changed_wire(after=(-1, -1), limit=10, active_only=True)) == [
            c.id, b.id]
        assert ids(store.changed_wire(after=(T0, -1), limit=10, user_id="alice")) == [
            c.id, a.id]
        assert ids(store.changed_wire(after=(T0, -1), limit=10,
                                      statuses=["completed"])) == [a.id]
    finally:
        store.close()


def test_a_purge_deletes_only_the_users_finished_jobs_and_tells_the_deleted_listener(
        db: StoreDb, clock: Clock) -> None:
    told: list[str] = []
    store = db.open(clock=clock, listeners=Listeners(deleted=told.extend))
    try:
        done = []
        for user in ("alice", "alice", "alice", "bob"):
            job = submit(store, new_job(user=user))
            store.start_job(job.id)
            done.append(store.finish_job(job.id, JobStatus.FAILED, error="boom").id)
        queued = submit(store, new_job(user="alice"))
        chunks = list(store.purge("alice", chunk=2))
        assert [len(c) for c in chunks] == [2, 1]
        assert sorted(told) == sorted(done[:3]) == sorted(i for c in chunks for i in c)
        assert store.counts() == {"failed": 1, "queued": 1}
        assert store.get_job(queued.id).status is JobStatus.QUEUED
        assert store.stored_weight("alice") == 0 and store.stored_weight("bob") == 1
        assert list(store.purge("nobody")) == []
    finally:
        store.close()
