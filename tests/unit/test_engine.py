"""The engine's bookkeeping between the store's commits and the dispatcher."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from jobd.config import load
from jobd.engine import Engine
from jobd.handlers import load_handlers
from jobd.models import Job, JobStatus
from jobd.store import Store


def test_a_job_retried_the_moment_it_ends_is_queued_again(tmp_path: Path) -> None:
    config = load(socket=str(tmp_path / "s"), db=str(tmp_path / "jobd.db"), env={})
    store = Store(config.db).open()
    try:
        engine = Engine(config, store, load_handlers())
        job = Job(id="j1", type="noop", user_id="alice", project_id=None,
                  status=JobStatus.QUEUED, created_at=1, updated_at=1, version=1, seq=1)
        engine.on_changed(job)
        assert engine.dispatcher.take() is not None
        # the end commits, and a retry commits before the worker has let go of the job
        engine.on_changed(dataclasses.replace(job, status=JobStatus.FAILED))
        engine.on_changed(dataclasses.replace(job, status=JobStatus.QUEUED))
        assert engine.dispatcher.queued_count() == 1
        assert engine.dispatcher.take() is not None
        # a cancel asked for a job no worker holds leaves nothing behind for a later run
        engine.cancel("j2")
        assert not engine._cancels
    finally:
        store.close()
