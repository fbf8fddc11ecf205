"""The engine on a real store: bookkeeping with the dispatcher, time limits, a reloaded
config, ends the store refuses, and ends that wait for a full disk."""

from __future__ import annotations

import dataclasses
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import structlog.testing

from conftest import fill, wait_for
from jobd.attempt import Attempt, StopReason, crash_end, outcome
from jobd.config import Config, load
from jobd import engine as engine_module
from jobd.engine import SWEEP_S, Engine
from jobd.handlers import Cancelled, Handler, JobContext, JobFailed, load_handlers
from jobd.models import Job, JobStatus
from jobd.store import Listeners, StorageUnavailable, Store


def config_of(tmp_path: Path, text: str = "", db: Path | None = None) -> Config:
    path = tmp_path / "jobd.toml"
    path.write_text(text)
    return load(path, socket=str(tmp_path / "s"), db=str(db or tmp_path / "jobd.db"), env={})


class Held(Handler):
    """Runs until the test releases it (or it is cancelled); returns what it was given."""

    name = "held"

    def __init__(self) -> None:
        self.release = threading.Event()
        self.result: dict[str, Any] = {"ok": True}
        self.error: str | None = None

    def run(self, ctx: JobContext) -> dict[str, Any]:
        while not self.release.wait(0.01):
            if ctx.cancelled:
                raise JobFailed("stopped")  # the engine records why it stopped
        if self.error is not None:
            raise JobFailed(self.error)
        return self.result


class Rig:
    """A started engine on a real store, and ways to drive it."""

    def __init__(self, config: Config, store: type[Store] = Store) -> None:
        self.held = Held()
        handlers = {**load_handlers(), "held": self.held}
        engine: list[Engine] = []
        self.store = store(config.db, listeners=Listeners(
            changed=lambda job: engine[0].on_changed(job) if engine else None)).open()
        self.engine = Engine(config, self.store, handlers)
        engine.append(self.engine)
        self.engine.start()

    def submit(self, type_: str = "noop", user: str = "alice", timeout_s: float | None = None,
               **options: Any) -> str:
        job = Job(id=str(uuid.uuid4()), type=type_, user_id=user, project_id=None,
                  status=JobStatus.CREATED, created_at=0, updated_at=0, version=0,
                  options=options, timeout_s=timeout_s)
        return self.store.submit_job(job, actor="root")[0].id

    def get(self, job_id: str) -> Job:
        return self.store.get_job(job_id)

    def wait(self, job_id: str, *statuses: JobStatus, timeout: float = 10.0) -> Job:
        until = time.monotonic() + timeout
        while (job := self.get(job_id)).status not in statuses:
            assert time.monotonic() < until, f"{job_id} still {job.status}, not {statuses}"
            time.sleep(0.01)
        return job

    def running(self) -> int:
        return len(self.store.running_jobs())

    def full(self, count: int) -> None:
        """``count`` jobs run, and the dispatcher may start no other: so none will start
        while the limits stay (a check that needs no waiting)."""
        assert self.engine.dispatcher.running_count() == count
        assert not self.engine.dispatcher.may_take()
        wait_for(lambda: self.running() == count, what=f"{count} jobs running in the store")

    def close(self) -> None:
        self.held.release.set()
        self.engine.stop()
        self.store.close()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Callable[..., Rig]]:
    rigs: list[Rig] = []

    def make(text: str = "", db: Path | None = None, store: type[Store] = Store) -> Rig:
        rigs.append(Rig(config_of(tmp_path, text, db), store))
        return rigs[-1]

    yield make
    for r in rigs:
        r.close()


def test_a_job_retried_the_moment_it_ends_is_queued_again(tmp_path: Path) -> None:
    config = load(socket=str(tmp_path / "s"), db=str(tmp_path / "jobd.db"), env={})
    store = Store(config.db).open()
    try:
        engine = Engine(config, store, load_handlers())
        job = Job(id="j1", type="noop", user_id="alice", project_id=None,
                  status=JobStatus.QUEUED, created_at=1, updated_at=1, version=1, seq=1)
        engine.on_changed(job)
        first = engine.dispatcher.take()
        assert first is not None
        # the end commits, and a retry commits before the worker has let go of the job
        ended = dataclasses.replace(job, status=JobStatus.FAILED, attempts=1)
        engine.on_changed(ended)
        engine.on_changed(dataclasses.replace(ended, status=JobStatus.QUEUED))
        assert engine.dispatcher.queued_count() == 1
        second = engine.dispatcher.take()
        assert second is not None and second.number == first.number + 1
        # the old attempt's finish frees its own slot, not the retry's
        engine.dispatcher.finish(first)
        assert engine.stats()["running"] == 1
        # a cancel asked for a job no worker holds leaves nothing behind for a later run
        engine.cancel("j2")
        assert not engine._attempts
    finally:
        store.close()


# -- time limits (SPEC §1: "none" or "0" is no limit; timeout_s 0 is no limit) -----------------

@pytest.mark.parametrize("default", ['"none"', '"0"', '"0s"', "0"])
def test_a_default_timeout_of_none_lets_jobs_run(rig: Callable[..., Rig], default: str) -> None:
    r = rig(f"[execution]\ndefault_timeout = {default}\n")
    job = r.submit(seconds=0.3)
    done = r.wait(job, JobStatus.COMPLETED, JobStatus.FAILED)
    assert (done.status, done.error) == (JobStatus.COMPLETED, None)


def test_timeout_s_0_is_no_limit_and_none_takes_the_default(rig: Callable[..., Rig]) -> None:
    r = rig('[execution]\ndefault_timeout = "1s"\n')
    unlimited = r.submit(seconds=1.5, timeout_s=0)
    limited = r.submit(seconds=1.5, user="bob")
    assert r.wait(unlimited, JobStatus.COMPLETED, JobStatus.FAILED).status is JobStatus.COMPLETED
    failed = r.wait(limited, JobStatus.COMPLETED, JobStatus.FAILED)
    assert (failed.status, failed.error) == (JobStatus.FAILED, "timed out after 1s")


# -- a reloaded config (SIGHUP) -----------------------------------------------------------------

def test_reconfigure_raises_and_cuts_workers_while_running_jobs_go_on(
        tmp_path: Path, rig: Callable[..., Rig]) -> None:
    r = rig("[execution]\nworkers = 1\nmax_running_per_user = 10\n")
    r.held.release.clear()
    jobs = [r.submit("held") for _ in range(4)]
    r.wait(jobs[0], JobStatus.RUNNING)
    r.full(1)

    r.engine.reconfigure(config_of(tmp_path, "[execution]\nworkers = 3\nmax_running_per_user = 10\n"))
    for job in jobs[1:3]:
        r.wait(job, JobStatus.RUNNING)
    r.full(3)
    assert r.get(jobs[3]).status is JobStatus.QUEUED

    # a cut stops nothing that runs, and starts nothing until fewer run than the limit
    r.engine.reconfigure(config_of(tmp_path, "[execution]\nworkers = 1\nmax_running_per_user = 10\n"))
    r.full(3)
    r.held.release.set()
    for job in jobs[:3]:
        assert r.wait(job, JobStatus.COMPLETED).status is JobStatus.COMPLETED
    assert r.wait(jobs[3], JobStatus.COMPLETED).status is JobStatus.COMPLETED


def test_reconfigure_applies_per_user_limits_and_timeouts_to_jobs_not_yet_started(
        tmp_path: Path, rig: Callable[..., Rig]) -> None:
    r = rig('[execution]\nworkers = 4\nmax_running_per_user = 1\ndefault_timeout = "1s"\n')
    first = r.submit(seconds=1.5)
    second = r.submit(seconds=1.5)
    r.wait(first, JobStatus.RUNNING)
    # its limits are set when its worker takes it up, just after the store says running
    deadline = time.monotonic() + 5
    while r.engine.live(first) is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert r.get(second).status is JobStatus.QUEUED  # alice's limit

    r.engine.reconfigure(config_of(
        tmp_path, '[execution]\nworkers = 4\nmax_running_per_user = 2\ndefault_timeout = "none"\n'))
    r.wait(second, JobStatus.RUNNING)
    # the running one keeps the limit it started with; the new one has none
    assert r.wait(first, JobStatus.FAILED).error == "timed out after 1s"
    assert r.wait(second, JobStatus.COMPLETED, JobStatus.FAILED).status is JobStatus.COMPLETED


# -- ends the store refuses (issue 7, item 4) ---------------------------------------------------

def test_an_error_text_with_lone_surrogates_is_recorded_escaped(rig: Callable[..., Rig]) -> None:
    r = rig()
    r.held.error = "merge failed: CONFLICT in caf\udce9.txt"
    r.held.release.set()
    done = r.wait(r.submit("held"), JobStatus.FAILED, JobStatus.COMPLETED)
    assert done.status is JobStatus.FAILED
    assert "caf\\udce9.txt" in (done.error or "")
    done.error.encode("utf-8")  # valid text


def test_an_end_the_store_refuses_is_recorded_as_a_bounded_failure(rig: Callable[..., Rig]) -> None:
    r = rig()
    # JSON cannot hold a set: the completed end cannot be stored as it is
    r.held.result = {"files": {"a", "b"}, "note": "\udcff" * 10_000}
    r.held.release.set()
    done = r.wait(r.submit("held"), JobStatus.FAILED, JobStatus.COMPLETED)
    assert done.status is JobStatus.FAILED
    assert done.error is not None and "the store refused the end" in done.error
    assert "TypeError" in done.error and len(done.error) <= 4096
    assert r.running() == 0


class Refusing(Store):
    """A real store that refuses the first ``refusals`` ends of the jobs in ``refuse``, as
    a constraint or a driver error would (not as storage that is unavailable)."""

    refuse: set[str] = set()
    refusals = 0

    def finish_job_in(self, tx: Any, job_id: str, status: JobStatus, **kw: Any) -> Job:
        if job_id in self.refuse and self.refusals > 0:
            type(self).refusals -= 1
            raise ValueError(f"refused {status} for {job_id}")
        return super().finish_job_in(tx, job_id, status, **kw)


def test_an_end_refused_twice_is_retried_until_it_is_recorded(rig: Callable[..., Rig]) -> None:
    r = rig(store=Refusing)
    Refusing.refuse, Refusing.refusals = set(), 4
    r.held.release.clear()
    job = r.submit("held")
    Refusing.refuse.add(job)
    r.wait(job, JobStatus.RUNNING)
    with structlog.testing.capture_logs() as logs:
        r.held.release.set()
        done = r.wait(job, JobStatus.FAILED, JobStatus.COMPLETED, timeout=15)
    assert done.status is JobStatus.FAILED
    assert done.error == "the job's end could not be recorded (the store refused it); see jobd's log"
    assert [e["refusals"] for e in logs if e["event"] == "job_end_refused"] == [1, 2, 3, 4]
    assert not [e for e in logs if e["event"] == "job_finish_failed"]
    # the engine lets the attempt go once the end's commit has come back, just after the
    # store shows the end
    assert r.running() == 0
    wait_for(lambda: r.engine.dispatcher.running_count() == 0, what="the attempt's slot freed")


# -- ends that wait for a full disk (issue 7, item 3) -------------------------------------------

def pending_tries(logs: list[dict[str, Any]], job_id: str) -> int:
    """How many times the engine tried to commit the job's end and found storage full."""
    return sum(1 for e in logs if e["event"] == "job_end_pending" and e.get("job_id") == job_id)


def wait_tries(logs: list[dict[str, Any]], job_id: str, more: int) -> None:
    """Until ``more`` further tries of the job's end failed (at 0.25 s, then doubling)."""
    want = pending_tries(logs, job_id) + more
    wait_for(lambda: pending_tries(logs, job_id) >= want, timeout=15,
             what=f"{more} more failed tries of the end")


@pytest.mark.root
@pytest.mark.parametrize("cancel", [False, True], ids=["completed", "cancelled"])
def test_an_end_on_a_full_disk_is_recorded_once_space_returns(
        rig: Callable[..., Rig], small_disk: Path, cancel: bool) -> None:
    r = rig(db=small_disk / "jobd.db")
    with structlog.testing.capture_logs() as logs:
        job = r.submit("held")
        r.wait(job, JobStatus.RUNNING)
        filler = fill(small_disk)
        if cancel:
            r.engine.cancel(job)  # the store cannot record the request: memory must hold it
        else:
            r.held.release.set()
        wait_tries(logs, job, 3)

        assert r.get(job).status is JobStatus.RUNNING
        live = r.engine.live(job)
        assert live is not None and "not recorded yet: storage full" in (live.message or "")
        assert r.engine.dispatcher.running_count() == 1  # its worker still holds it

        filler.unlink()
        want = JobStatus.CANCELLED if cancel else JobStatus.COMPLETED
        done = r.wait(job, JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED, timeout=10)
    assert done.status is want, done
    # the engine lets the attempt go once the end's commit has come back, just after the
    # store shows the end
    wait_for(lambda: r.engine.live(job) is None and r.engine.dispatcher.running_count() == 0,
             what="the attempt's context and slot let go")


@pytest.mark.root
@pytest.mark.parametrize("after", ["timeout", "cancel"])
def test_a_completed_end_waiting_for_storage_stays_completed(
        rig: Callable[..., Rig], small_disk: Path, after: str) -> None:
    """Its time limit passing, or a cancel, while the end waits changes nothing: the job
    had ended (B1: it was recorded "timed out" or cancelled, its result lost)."""
    r = rig(db=small_disk / "jobd.db")
    with structlog.testing.capture_logs() as logs:
        job = r.submit("held", timeout_s=1)
        r.wait(job, JobStatus.RUNNING)
        deadline = time.monotonic() + 1
        r.held.result = {"answer": 42}
        filler = fill(small_disk)
        r.held.release.set()
        wait_tries(logs, job, 1)
        if after == "timeout":
            wait_for(lambda: time.monotonic() > deadline, what="the time limit to pass")
        else:
            r.engine.cancel(job, "alice")
        wait_tries(logs, job, 2)  # the dispatch loop ticked meanwhile, each retry woke
        filler.unlink()
        done = r.wait(job, JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED, timeout=10)
    assert (done.status, done.error, done.result) == (JobStatus.COMPLETED, None, {"answer": 42})


# -- the end of an attempt as a table (issue 9: one pure function) -------------------------------

_FAILED = JobFailed("git fetch exited with status 128")
_HANDLER_CANCELLED = Cancelled("cancelled after 0.20s of 30s")

#: (stop, failure, resumable) -> (end, fields): every row of ``outcome``
OUTCOMES = [
    (StopReason.CANCEL, None, False, JobStatus.CANCELLED, {"message": "cancelled"}),
    (StopReason.CANCEL, _FAILED, True, JobStatus.CANCELLED, {"message": "cancelled"}),
    (StopReason.CANCEL, _HANDLER_CANCELLED, True, JobStatus.CANCELLED, {"message": "cancelled"}),
    (StopReason.TIMEOUT, None, False, JobStatus.FAILED, {"error": "timed out after 90s"}),
    (StopReason.TIMEOUT, _HANDLER_CANCELLED, True, JobStatus.FAILED,
     {"error": "timed out after 90s"}),
    (StopReason.SHUTDOWN, _HANDLER_CANCELLED, True, JobStatus.QUEUED,
     {"message": "interrupted by shutdown"}),
    (StopReason.SHUTDOWN, _FAILED, True, JobStatus.QUEUED, {"message": "interrupted by shutdown"}),
    (StopReason.SHUTDOWN, _HANDLER_CANCELLED, False, JobStatus.FAILED,
     {"error": "interrupted by daemon shutdown"}),
    (StopReason.SHUTDOWN, None, False, JobStatus.COMPLETED, {"result": {"n": 1}}),
    (None, _FAILED, True, JobStatus.FAILED, {"error": "git fetch exited with status 128"}),
    (None, _HANDLER_CANCELLED, False, JobStatus.CANCELLED, {"message": "cancelled"}),
    (None, None, False, JobStatus.COMPLETED, {"result": {"n": 1}}),
]


@pytest.mark.parametrize("stop, failure, resumable, end, fields", OUTCOMES)
def test_the_end_of_an_attempt_follows_the_table(
        stop: StopReason | None, failure: JobFailed | Cancelled | None, resumable: bool,
        end: JobStatus, fields: dict[str, Any]) -> None:
    assert outcome(stop, failure, resumable=resumable, result={"n": 1},
                   timeout_s=90) == (end, fields)


#: (cancel asked, resumable, recoveries before, why) -> (end, fields): every row of
#: ``crash_end``, with max_recoveries = 3
CRASH_ENDS = [
    (True, True, 0, "restart", JobStatus.CANCELLED,
     {"message": "cancelled (the daemon restarted while stopping)"}),
    (False, False, 0, "restart", JobStatus.FAILED, {"error": "interrupted by daemon restart"}),
    (False, True, 2, "restart", JobStatus.FAILED,
     {"error": "interrupted by 3 daemon restarts; gave up (max_recoveries = 3)"}),
    (False, True, 1, "restart", JobStatus.QUEUED, {"message": "recovered after restart"}),
    (True, False, 0, "lost", JobStatus.CANCELLED,
     {"message": "cancelled (node 7 lost its lease while stopping)"}),
    (False, False, 0, "lost", JobStatus.FAILED,
     {"error": "interrupted: node 7 lost its lease"}),
    (False, True, 2, "lost", JobStatus.FAILED, {
        "error": "interrupted 3 times, last as node 7 lost its lease; gave up "
                 "(max_recoveries = 3)"}),
    (False, True, 0, "lost", JobStatus.QUEUED, {"message": "recovered: node 7 lost its lease"}),
]


@pytest.mark.parametrize("cancel, resumable, recoveries, why, end, fields", CRASH_ENDS)
def test_the_end_of_a_job_a_crash_left_running_follows_the_table(
        cancel: bool, resumable: bool, recoveries: int, why: str, end: JobStatus,
        fields: dict[str, Any]) -> None:
    job = Job(id="j", type="sync", user_id="alice", project_id="p", status=JobStatus.RUNNING,
              created_at=0, updated_at=0, version=1, cancel_requested=cancel,
              recoveries=recoveries)
    assert crash_end(job, resumable, 3, why, 7) == (end, fields)


def test_a_handler_that_returns_nothing_completes_with_an_empty_result() -> None:
    assert outcome(None, None, resumable=False) == (JobStatus.COMPLETED, {"result": {}})


def test_a_cancel_wins_over_an_earlier_timeout_but_nothing_changes_a_settled_attempt() -> None:
    attempt = Attempt("j", 1, deadline=10.0, timeout_s=5)
    assert attempt.request_stop(StopReason.TIMEOUT)  # the first stop: told in the log
    assert not attempt.request_stop(StopReason.CANCEL, "admin:root")  # not told again
    assert (attempt.stop, attempt.cancelled_by) == (StopReason.CANCEL, "admin:root")
    settled = Attempt("k", 2)
    assert settled.settle() and not settled.settle()
    assert not settled.request_stop(StopReason.CANCEL, "alice")
    assert settled.stop is None


# -- time limits on the engine's clock: tick(now) instead of sleeping ----------------------------

class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_job_past_its_time_limit_is_stopped_by_tick_at_that_time(tmp_path: Path) -> None:
    clock = FakeClock()
    config = config_of(tmp_path)
    held = Held()
    engine: list[Engine] = []
    store = Store(config.db, listeners=Listeners(
        changed=lambda job: engine[0].on_changed(job) if engine else None)).open()
    engine.append(Engine(config, store, {**load_handlers(), "held": held}, clock=clock))
    engine[0].start()
    try:
        job = Job(id=str(uuid.uuid4()), type="held", user_id="alice", project_id=None,
                  status=JobStatus.CREATED, created_at=0, updated_at=0, version=0,
                  timeout_s=30)
        job_id = store.submit_job(job, actor="root")[0].id
        wait_for(lambda: engine[0].live(job_id) is not None, what="the job's worker")
        engine[0].tick(clock.now + 29.9)  # within its limit: nothing happens
        time.sleep(0.1)
        assert store.get_job(job_id).status is JobStatus.RUNNING
        engine[0].tick(clock.now + 30.1)
        wait_for(lambda: store.get_job(job_id).status is JobStatus.FAILED,
                 what="the job to time out")
        assert store.get_job(job_id).error == "timed out after 30s"
        assert engine[0].stats()["running"] == 0
    finally:
        held.release.set()
        engine[0].stop()
        store.close()


def test_tick_looks_for_orphans_at_most_every_sweep_s_however_often_it_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a look reads every process's /proc entry; a cluster node ticks at every burst of
    # other nodes' notifications, and a look per tick took 40 % of an idle node's CPU
    clock = FakeClock()
    looks: list[float] = []
    monkeypatch.setattr(engine_module.orphans, "sweep_orphans",
                        lambda: looks.append(clock.now) or 0)
    config = config_of(tmp_path)
    store = Store(config.db).open()
    engine = Engine(config, store, load_handlers(), clock=clock)
    try:
        for _ in range(100):
            engine.tick()
        assert looks == [1000.0]
        clock.now += SWEEP_S - 0.01
        engine.tick()
        assert looks == [1000.0]
        clock.now += 0.01
        for _ in range(10):
            engine.tick()
        assert looks == [1000.0, 1000.0 + SWEEP_S]
    finally:
        store.close()


def test_annotate_and_stats_answer_what_only_the_engine_knows(rig: Callable[..., Rig]) -> None:
    r = rig("[execution]\nworkers = 1\nmax_running_per_user = 10\n")
    r.held.release.clear()
    running = r.submit("held")
    r.wait(running, JobStatus.RUNNING)
    wait_for(lambda: r.engine.live(running) is not None, what="the job's worker")
    queued = r.submit("held", user="bob")
    r.full(1)
    shown = r.engine.annotate({"id": queued, "status": "queued"})
    assert (shown["queue_position"], shown["wait_reason"]) == (1, "slots")
    r.engine.live(running).message = "halfway"  # type: ignore[union-attr]
    live = r.engine.annotate({"id": running, "status": "running", "version": 0})
    assert live["message"] == "halfway" and live["version"] > 0
    assert r.engine.stats() == {"running": 1, "running_here": 1, "queued": 1, "workers": 1,
                                "paused": False,
                                "per_user": {"alice": {"running": 1, "queued": 0},
                                             "bob": {"running": 0, "queued": 1}}}


def running_context(r: Rig, job_id: str) -> Any:
    r.wait(job_id, JobStatus.RUNNING)
    wait_for(lambda: job_id in r.engine._contexts, what="the job's worker")
    return r.engine._contexts[job_id]


def test_a_progress_flush_racing_a_phase_change_never_leaves_the_older_phase_stored(
        rig: Callable[..., Rig]) -> None:
    """The dispatch thread's flush took its snapshot, then lost the processor before
    queuing its write; the worker's phase change queued meanwhile must stay the last."""
    r = rig("[execution]\nworkers = 1\n")
    r.held.release.clear()
    job_id = r.submit("held")
    ctx = running_context(r, job_id)
    real, phases, flushing = r.store.update_progress, [], threading.Event()

    def update_progress(job: str, **kw: Any) -> Any:
        if threading.current_thread().name == "flusher":
            flushing.set()
            time.sleep(0.2)
        phases.append(kw["phase"])
        return real(job, **kw)

    r.store.update_progress = update_progress  # type: ignore[method-assign]
    ctx.set_progress(50)
    flusher = threading.Thread(target=ctx.flush, name="flusher")
    flusher.start()
    assert flushing.wait(5)
    ctx.set_phase("two")
    flusher.join()
    r.held.release.set()
    assert r.wait(job_id, JobStatus.COMPLETED).phase == "two"
    assert phases == [None, "two"]


def test_a_running_job_is_annotated_with_the_values_of_one_change(
        rig: Callable[..., Rig]) -> None:
    """``jobs.get`` of a running job reads its live progress while the worker changes it:
    the answer's progress, message and version come from the same change."""
    r = rig("[execution]\nworkers = 1\n")
    r.held.release.clear()
    job_id = r.submit("held")
    ctx = running_context(r, job_id)
    stop, torn = threading.Event(), []

    def report() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            ctx.set_progress(min(99.0, n / 100), message=str(n))

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    reporter = threading.Thread(target=report)
    reporter.start()
    try:
        until = time.monotonic() + 1.5
        while time.monotonic() < until:
            out = r.engine.annotate({"id": job_id, "status": "running", "version": 0})
            if out["message"] is not None and (
                    min(99.0, int(out["message"]) / 100) != out["progress"]):
                torn.append(out)
    finally:
        stop.set()
        reporter.join()
        sys.setswitchinterval(interval)
        r.held.release.set()
    assert torn == []


class Lingering(Handler):
    """Saves its work when stopped, taking a moment past the stop's grace (as a program
    whose own grace began at its SIGTERM, a little after the stop did), then returns."""

    name = "lingering"

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def run(self, ctx: JobContext) -> dict[str, Any]:
        while not ctx.cancelled:
            time.sleep(0.01)
        time.sleep(self.seconds)
        return {"saved": True}


def test_a_shutdown_records_the_end_of_a_job_that_stops_just_past_its_grace(
        rig: Callable[..., Rig]) -> None:
    r = rig('[execution]\nworkers = 1\nshutdown_grace = "1s"\n')
    r.engine.handlers["lingering"] = Lingering(1.0 + engine_module.STOP_SLACK_S / 2)
    job_id = r.submit("lingering")
    running_context(r, job_id)
    r.engine.stop()
    done = r.get(job_id)
    assert (done.status, done.result) == (JobStatus.COMPLETED, {"saved": True})


# -- a freed slot handed to the next job in the end's transaction (issue 9) ---------------------

def at_of(r: Rig, job_id: str, status: str) -> list[int]:
    """When (the transaction's time, µs) each event of ``job_id`` with ``status`` was written."""
    return [e["at"] for e in r.store.events(job_id) if e["status"] == status]


def test_the_next_job_is_running_when_the_end_that_freed_its_slot_commits(
        rig: Callable[..., Rig]) -> None:
    r = rig("[execution]\nworkers = 1\n")
    first = r.submit("held")
    r.wait(first, JobStatus.RUNNING)
    second, third = r.submit("noop"), r.submit("noop")
    r.held.release.set()
    for job in (first, second, third):
        r.wait(job, JobStatus.COMPLETED)
    # one transaction: the end of each and the start of the next share its time
    assert at_of(r, first, "completed") == at_of(r, second, "running")
    assert at_of(r, second, "completed") == at_of(r, third, "running")
    assert r.get(second).attempts == 1 and r.engine.dispatcher.running_count() == 0


def test_a_job_told_ended_no_longer_holds_its_worker(tmp_path: Path) -> None:
    """Whoever hears of an end (a jobs.wait, admin.stats, admin.maintenance's "drained")
    finds its slot free: the slot is let go once the end commits, before the listeners
    hear of it."""
    config = config_of(tmp_path, "[execution]\nworkers = 2\n")
    engine: list[Engine] = []
    heard: list[tuple[str, int]] = []

    def changed(job: Job) -> None:
        if job.terminal:
            heard.append((job.id, engine[0].stats()["running"]))
        engine[0].on_changed(job)
    store = Store(config.db, listeners=Listeners(changed=changed)).open()
    try:
        engine.append(Engine(config, store, load_handlers()))
        engine[0].start()
        for _ in range(20):
            job = Job(id=str(uuid.uuid4()), type="noop", user_id="alice", project_id=None,
                      status=JobStatus.CREATED, created_at=0, updated_at=0, version=0)
            store.submit_job(job, actor="root")
            wait_for(lambda: any(i == job.id for i, _ in heard), what=f"{job.id} ended")
        assert [running for _, running in heard] == [0] * 20
    finally:
        engine[0].stop()
        store.close()


class FailingStart(Store):
    """A real store whose start of the jobs in ``refuse`` fails after the write has
    written (the end in the same transaction), ``refusals`` times."""

    refuse: set[str] = set()
    refusals = 0

    def start_job_in(self, tx: Any, job_id: str) -> Job:
        job = super().start_job_in(tx, job_id)
        if job_id in self.refuse and self.refusals > 0:
            type(self).refusals -= 1
            raise StorageUnavailable(f"{self.path}: storage full (test)")
        return job


def test_an_end_whose_transaction_fails_puts_the_next_job_back_in_its_place(
        rig: Callable[..., Rig]) -> None:
    r = rig("[execution]\nworkers = 1\n", store=FailingStart)
    first = r.submit("held")
    r.wait(first, JobStatus.RUNNING)
    second, third = r.submit("noop"), r.submit("noop")
    # the batch fails, and again when run with a savepoint per write
    FailingStart.refuse, FailingStart.refusals = {second}, 2
    with structlog.testing.capture_logs() as logs:
        r.held.release.set()
        for job in (first, second, third):
            r.wait(job, JobStatus.COMPLETED)
    assert [e for e in logs if e["event"] == "job_end_pending"]  # the end waited, alone
    # the second job went back to the queue ahead of the third, and ran once
    assert at_of(r, second, "running") < at_of(r, third, "running")
    assert at_of(r, first, "completed") != at_of(r, second, "running")
    assert r.get(second).attempts == 1 and r.get(third).attempts == 1
    assert r.engine.dispatcher.running_count() == 0 and not r.engine._attempts


def test_once_dispatching_stopped_no_job_starts_even_if_the_pause_is_lifted(
        rig: Callable[..., Rig]) -> None:
    """A stop's first step holds for the rest of the stop: a cluster's resume through
    another node sets the pause anew (``set_paused``), and must start nothing then."""
    r = rig()
    r.engine.stop_dispatching()
    r.engine.set_paused(False)  # as a cluster node's meta notification would
    job_id = r.submit("noop")
    time.sleep(0.3)
    assert r.get(job_id).status is JobStatus.QUEUED and r.running() == 0
