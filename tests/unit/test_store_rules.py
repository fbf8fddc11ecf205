"""The rules run inside the writer's transaction: maintenance refuses a retry there as it
refuses a submit (one home for the rule), and a write refused in a batch leaves no
trace: its listeners are not told and the queued counts are as before."""

from __future__ import annotations

import threading
from typing import Any, Iterator

import pytest

from jobd.errors import Conflict, Unavailable
from jobd.models import Job, JobStatus
from jobd.rules import Rules
from jobd.store import Listeners, Store
from jobd.store.db import Tx

from test_store import DEDUPE, Clock, new_job, submit, sync_options
from pg import StoreDb

pytest_plugins = ["pg"]

MAINTENANCE = Rules(refusal=Unavailable("jobd is in maintenance: try again later"))


@pytest.fixture
def store(store_db: StoreDb) -> Iterator[Store]:
    s = store_db.open(synchronous="off", clock=Clock())
    yield s
    s.close()


def failed(store: Store) -> Job:
    job = submit(store, new_job(type="noop", project=None))
    store.start_job(job.id)
    return store.finish_job(job.id, JobStatus.FAILED, error="boom")


def test_maintenance_refuses_a_retry_inside_the_store(store: Store) -> None:
    one, many = failed(store), failed(store)
    with pytest.raises(Unavailable, match="maintenance"):
        store.retry_job(one.id, actor="alice", rules=MAINTENANCE)
    with pytest.raises(Unavailable, match="maintenance"):
        store.retry_jobs(actor="alice", limit=10, rules=MAINTENANCE, user_id="alice")
    assert store.get_job(one.id).status is store.get_job(many.id).status is JobStatus.FAILED
    assert store.queued_count("alice") == 0
    assert store.retry_job(one.id, actor="alice", rules=Rules()).status is JobStatus.QUEUED


def test_a_retry_is_held_to_max_queued_total_as_a_submit_is(store: Store) -> None:
    """SPEC §1: past ``max_queued_total`` (all users together) more is refused (-32029),
    whether by a submit or by a retry, of one job or by filter."""
    from jobd.errors import LimitExceeded
    mine, theirs = failed(store), failed(store)
    submit(store, new_job(type="noop", project=None, user="bob"))  # the queue: 1 job
    full = Rules(max_queued_total=1)
    with pytest.raises(LimitExceeded, match=r"max_queued_total \(1\)"):
        store.retry_job(mine.id, actor="alice", rules=full)
    with pytest.raises(LimitExceeded, match="max_queued_total"):
        store.retry_jobs(actor="alice", limit=10, rules=Rules(max_queued_total=2),
                         user_id="alice")  # two more would make three
    assert {store.get_job(j.id).status for j in (mine, theirs)} == {JobStatus.FAILED}
    assert store.queued_count() == 1
    assert store.retry_job(mine.id, actor="alice", rules=Rules(max_queued_total=2)
                           ).status is JobStatus.QUEUED


def test_a_refused_write_in_a_batch_tells_no_listener(store_db: StoreDb) -> None:
    told: list[str] = []
    store = store_db.open(synchronous="off", clock=Clock(),
                          listeners=Listeners(changed=lambda job: told.append(job.user_id)))
    try:
        def written_then_refused(tx: Tx) -> None:
            store.submit_job_in(tx, new_job(user="dave"), "dave", Rules())
            raise RuntimeError("refused after writing")

        gate = threading.Event()
        held = store.write_async(lambda tx: gate.wait(5))
        writes: list[Any] = [lambda tx: store.submit_job_in(tx, new_job(user="alice"), "alice",
                                                      Rules()),
                             written_then_refused,
                             lambda tx: store.submit_job_in(tx, new_job(user="bob"), "bob", Rules())]
        futures = [store.write_async(w) for w in writes]
        gate.set()
        held.result()
        assert isinstance(futures[1].exception(5), RuntimeError)
        assert futures[0].result(5)[0].user_id == "alice"
        assert futures[2].result(5)[0].user_id == "bob"
        # each stored job told once (the batch ran twice: plainly, then with savepoints)
        assert sorted(told) == ["alice", "bob"]
        assert (store.queued_count("alice"), store.queued_count("bob"),
                store.queued_count("dave")) == (1, 1, 0)
    finally:
        store.close()


def failed_sync(store: Store, **changed: Any) -> Job:
    job = store.submit_job(new_job(options=sync_options(**changed)), actor="alice",
                           rules=DEDUPE)[0]
    store.start_job(job.id)
    return store.finish_job(job.id, JobStatus.FAILED, error="boom")


def test_a_retry_by_filter_queues_each_work_once_the_newest_of_its_jobs(
        store: Store) -> None:
    """Of several matched jobs of one work, the newest goes back, once (as a submit of
    that work would fold into it); one whose work is queued already is left as it is.
    Refusing them all would leave an outage's failed syncs of one repository failed."""
    first, second = failed_sync(store), failed_sync(store)
    other = failed_sync(store, branch="dev")
    queued_work, again = failed_sync(store, branch="rel"), failed_sync(store, branch="rel")
    store.retry_job(queued_work.id, actor="alice", rules=DEDUPE)  # again's work is queued
    dry, _ = store.retry_jobs(actor="alice", limit=10, rules=DEDUPE, user_id="alice",
                              dry_run=True)
    assert [j.id for j in dry] == [second.id, other.id]
    jobs, more = store.retry_jobs(actor="alice", limit=10, rules=DEDUPE, user_id="alice")
    assert [j.id for j in jobs] == [second.id, other.id] and more is False
    assert {j: store.get_job(j).status for j in (first.id, second.id, other.id, again.id)} == {
        first.id: JobStatus.FAILED, second.id: JobStatus.QUEUED, other.id: JobStatus.QUEUED,
        again.id: JobStatus.FAILED}
    # nothing left to queue: an empty answer, not an error
    assert store.retry_jobs(actor="alice", limit=10, rules=DEDUPE, user_id="alice") == (
        [], False)


def test_a_retry_by_filter_looks_past_a_window_of_jobs_it_leaves_out(store: Store) -> None:
    """Jobs left out (their work is queued) still match: a call whose window of ``limit``
    holds only them looks at the next, so that a later job of other work is not left
    behind with ``more`` but nothing done."""
    folded = [failed_sync(store) for _ in range(3)]
    store.retry_job(folded[-1].id, actor="alice", rules=DEDUPE)  # their work is queued
    later = failed_sync(store, branch="dev")
    jobs, more = store.retry_jobs(actor="alice", limit=2, rules=DEDUPE, user_id="alice")
    assert [j.id for j in jobs] == [later.id] and more is False
    assert store.retry_jobs(actor="alice", limit=2, rules=DEDUPE, user_id="alice") == (
        [], False)
    assert [store.get_job(j.id).status for j in folded[:2]] == [JobStatus.FAILED] * 2


def test_a_retry_of_work_queued_or_retried_with_it_is_refused_naming_the_job(
        store: Store) -> None:
    first, second = failed_sync(store), failed_sync(store)
    other = failed_sync(store, branch="dev")
    # two failed jobs of one work retried one by one: the second is refused
    assert store.retry_job(first.id, actor="alice", rules=DEDUPE).status is JobStatus.QUEUED
    with pytest.raises(Conflict, match="already queued") as e:
        store.retry_job(second.id, actor="alice", rules=DEDUPE)
    assert e.value.data() == {"http_status": 409, "job_id": first.id}
    assert store.get_job(second.id).status is JobStatus.FAILED
    # another branch is another work
    assert store.retry_job(other.id, actor="alice", rules=DEDUPE).status is JobStatus.QUEUED
