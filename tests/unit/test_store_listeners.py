"""What the store's commit listener hears: each job a commit changed, once, in the state
the commit left it (a job submitted and started in one commit is heard running), and
never a state that a failed write's savepoint undid."""

from __future__ import annotations

from typing import Iterator

import pytest

from jobd.models import Job, JobStatus
from jobd.rules import Rules
from jobd.store import Listeners, Store
from jobd.store.db import Tx

from test_store import Clock, new_job
from pg import StoreDb

pytest_plugins = ["pg"]
from test_store_writer import one_batch


@pytest.fixture
def heard(store_db: StoreDb) -> Iterator[tuple[Store, list[Job]]]:
    seen: list[Job] = []
    s = store_db.open(synchronous="normal", clock=Clock(),
              listeners=Listeners(changed=seen.append))
    yield s, seen
    s.close()


def test_a_job_submitted_and_started_in_one_commit_is_heard_once_running(
        heard: tuple[Store, list[Job]]) -> None:
    store, seen = heard
    job = new_job()

    def submit_and_start(tx: Tx) -> Job:
        store.submit_job_in(tx, job, "alice", Rules())
        return store.start_job_in(tx, job.id)
    store.write(submit_and_start)
    assert [(j.id, j.status) for j in seen] == [(job.id, JobStatus.RUNNING)]


def test_jobs_changed_by_different_writes_of_one_commit_are_each_heard(
        heard: tuple[Store, list[Job]]) -> None:
    store, seen = heard
    jobs = [new_job(project=f"p{n}") for n in range(3)]
    one_batch(store, [lambda tx, j=j: store.submit_job_in(tx, j, "alice", Rules())
                      for j in jobs])
    assert sorted(j.id for j in seen) == sorted(j.id for j in jobs)


def test_a_change_undone_by_its_savepoint_leaves_the_one_before_it_heard(
        heard: tuple[Store, list[Job]]) -> None:
    store, seen = heard
    job = new_job()

    def start_then_fail(tx: Tx) -> None:
        store.start_job_in(tx, job.id)
        raise RuntimeError("the rest of this write failed")
    outcomes = one_batch(store, [lambda tx: store.submit_job_in(tx, job, "alice", Rules()),
                                 start_then_fail])
    assert isinstance(outcomes[1], RuntimeError)
    assert [(j.id, j.status) for j in seen] == [(job.id, JobStatus.QUEUED)]
    assert store.get_job(job.id).status is JobStatus.QUEUED
