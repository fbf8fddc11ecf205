"""The store's edges in time and state: a write racing ``close`` is answered, never left
waiting; every end of a job clears the process group it recorded (on both backends)."""

from __future__ import annotations

import concurrent.futures
import threading

import pytest

from jobd.models import JobStatus
from jobd.store import Listeners, StoreClosed

from pg import StoreDb
from test_store import T0, Clock, new_job, submit

pytest_plugins = ["pg"]


def test_a_write_racing_close_is_answered_not_left_waiting(store_db: StoreDb) -> None:
    """A worker finishing a job while the daemon closes the store gets its write done or
    StoreClosed; none waits for ever on a writer that has gone."""
    for round in range(20):
        store = store_db.open(synchronous="off", clock=Clock())
        futures: list[concurrent.futures.Future[object]] = []
        started = threading.Event()

        def keep_writing() -> None:
            while True:
                try:
                    futures.append(store.write_async(lambda tx: None))
                except StoreClosed:
                    return
                started.set()

        writer = threading.Thread(target=keep_writing)
        writer.start()
        started.wait(5)
        store.close()
        writer.join(5)
        assert not writer.is_alive()
        done, waiting = concurrent.futures.wait(futures, timeout=5)
        assert not waiting, f"round {round}: {len(waiting)} writes never answered"
        for fut in done:
            assert fut.exception() is None or isinstance(fut.exception(), StoreClosed)


@pytest.mark.parametrize("end", ["completed", "failed", "cancelled", "cancel_job"])
def test_every_end_clears_the_recorded_process_group(store_db: StoreDb, end: str) -> None:
    store = store_db.open(synchronous="off", clock=Clock())
    try:
        job = submit(store, new_job(type="noop", project=None))
        if end != "cancel_job":
            store.start_job(job.id)
        store.set_process(job.id, 4242, 99)
        if end == "cancel_job":
            done = store.cancel_job(job.id, actor="alice")
        else:
            done = store.finish_job(job.id, JobStatus(end))
        assert done.terminal
        assert store_db.rows("SELECT pgid, pgid_start FROM jobs WHERE id = ?",
                             job.id) == [(None, None)]
    finally:
        store.close()


def test_cleanup_removes_files_off_the_writers_thread(store_db: StoreDb) -> None:
    """The files of the jobs a cleanup chunk deleted go once the chunk is durable, in the
    cleanup's own thread: writes queued behind the chunk do not wait for the unlinks."""
    told: list[tuple[str, int]] = []
    store = store_db.open(synchronous="off", clock=Clock(),
                          listeners=Listeners(deleted=lambda ids: told.append(
                              (threading.current_thread().name, len(ids)))))
    try:
        for _ in range(30):
            job = submit(store, new_job(type="noop", project=None))
            store.cancel_job(job.id, actor="alice")
        deleted = [i for ids in store.cleanup(keep_before=T0 * 2, keep_failed_before=0,
                                              chunk=10) for i in ids]
        assert len(deleted) == 30 and sum(n for _, n in told) == 30
        assert {name for name, _ in told} == {threading.current_thread().name}
    finally:
        store.close()
