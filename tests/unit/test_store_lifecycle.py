"""The store's edges in time and state: a write racing ``close`` is answered, never left
waiting; every end of a job clears the process group it recorded."""

from __future__ import annotations

import concurrent.futures
import threading
from pathlib import Path

import pytest

from jobd.models import JobStatus
from jobd.store import Listeners, Store, StoreClosed

from test_store import T0, Clock, new_job, raw, submit


def test_a_write_racing_close_is_answered_not_left_waiting(tmp_path: Path) -> None:
    """A worker finishing a job while the daemon closes the store gets its write done or
    StoreClosed; none waits for ever on a writer that has gone."""
    for round in range(20):
        store = Store(tmp_path / f"r{round}.db", synchronous="off", clock=Clock()).open()
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
def test_every_end_clears_the_recorded_process_group(tmp_path: Path, end: str) -> None:
    store = Store(tmp_path / "jobd.db", synchronous="off", clock=Clock()).open()
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
        with raw(store.path) as conn:
            assert conn.execute("SELECT pgid, pgid_start FROM jobs WHERE id = ?",
                                (job.id,)).fetchone() == (None, None)
    finally:
        store.close()


def test_cleanup_removes_files_off_the_writers_thread(tmp_path: Path) -> None:
    """The files of the jobs a cleanup chunk deleted go once the chunk is durable, in the
    cleanup's own thread: writes queued behind the chunk do not wait for the unlinks."""
    told: list[tuple[str, int]] = []
    store = Store(tmp_path / "jobd.db", synchronous="off", clock=Clock(),
                  listeners=Listeners(deleted=lambda ids: told.append(
                      (threading.current_thread().name, len(ids))))).open()
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
