"""A submit that starts its job at once (a worker free, nothing queued): one row written
running, with the history and counts a submit followed by ``start_job`` leaves, and a
slot given back when the write fails."""

from __future__ import annotations

from typing import Any, Callable, Iterator

import pytest

from jobd.models import Job, JobStatus
from jobd.rules import Rules
from jobd.store import DuplicateId, Listeners, Store
from jobd.store.db import Tx

from test_store import T0, Clock, new_job
from pg import StoreDb

pytest_plugins = ["pg"]


@pytest.fixture
def store(store_db: StoreDb) -> Iterator[tuple[Store, list[Job]]]:
    heard: list[Job] = []
    s = store_db.open(synchronous="normal", clock=Clock(),
              listeners=Listeners(changed=heard.append))
    yield s, heard
    s.close()


def history(store: Store, job_id: str) -> list[tuple[Any, ...]]:
    return [(e["status"], e["actor"], e["at"], e["progress"], e["phase"], e["message"])
            for e in store.events(job_id)]


def test_a_submit_started_at_once_is_the_submit_and_the_start_in_one_row(
        store: tuple[Store, list[Job]], store_db: Any) -> None:
    s, heard = store
    started: list[Job] = []

    def take(tx: Tx, job: Job) -> Callable[[Job], None]:
        return started.append
    job, deduplicated = s.write(lambda tx: s.submit_job_in(tx, new_job(), "alice", Rules(),
                                                           start=take))
    # the submit answers the job as it submitted it (PostgreSQL's versions come from its
    # sequence, SQLite's from the clock)
    assert not deduplicated and job.status is JobStatus.QUEUED
    assert store_db.backend != "sqlite" or job.version == T0
    stored = s.get_job(job.id)
    assert [started[0]] == heard  # the listener hears it once, running
    for seen in (stored, started[0]):
        assert (seen.status, seen.attempts, seen.started_at, seen.version) == (
            JobStatus.RUNNING, 1, T0, job.version + 1)  # above the submit's version
    # what submit_job then start_job leave
    other = s.submit_job(new_job(project="p2"), actor="alice")[0]
    s.start_job(other.id)
    assert history(s, job.id) == [("created", "alice", T0, 0, None, None),
                                  ("queued", "alice", T0, 0, None, None),
                                  ("running", "jobd", T0, 0, None, None)]
    assert history(s, job.id) == history(s, other.id)
    assert s.counts() == {"running": 2} and s.queued_count() == 0


def test_a_submit_not_started_is_queued_with_its_two_events(
        store: tuple[Store, list[Job]]) -> None:
    s, heard = store
    job, _ = s.write(lambda tx: s.submit_job_in(tx, new_job(), "alice", Rules(),
                                                start=lambda tx, job: None))
    assert s.get_job(job.id).status is JobStatus.QUEUED and heard == [job]
    assert [e["status"] for e in s.events(job.id)] == ["created", "queued"]
    assert s.counts() == {"queued": 1} and s.queued_count("alice") == 1


def test_a_start_whose_submit_fails_is_undone(store: tuple[Store, list[Job]]) -> None:
    s, heard = store
    taken = s.submit_job(new_job(), actor="alice")[0]
    taken_slots: list[str] = []
    given_back: list[str] = []

    def take(tx: Tx, job: Job) -> Callable[[Job], None]:
        taken_slots.append(job.id)
        tx.undo.append(lambda: given_back.append(job.id))  # as the engine frees its slot
        return lambda started: None
    with pytest.raises(DuplicateId):
        s.write(lambda tx: s.submit_job_in(tx, new_job(id=taken.id), "alice", Rules(),
                                           start=take))
    # (the writer runs a write that failed after writing once more, in a savepoint)
    assert taken_slots and given_back == taken_slots
    assert s.counts() == {"queued": 1} and heard == [taken]
