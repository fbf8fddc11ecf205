"""The worker pool: dispatching, the job context, cancellation, timeouts, restarts.

Dispatch runs on events (a job queued, a job finished, resume), not on a timer: the
store's commit listener calls ``on_changed``, which feeds the dispatcher and wakes the
dispatch thread. A worker moves its job ``queued -> running`` by compare-and-set, runs
the handler with a ``Context``, and records the end. Progress lives in memory (every
``jobs.get``/``jobs.wait`` sees the latest value at once) and is written to the database
at most every ``FLUSH_S`` per job.

A job's end is decided once, when its handler returns: a cancel or timeout that came
before that wins, one after it changes nothing. An end that cannot be committed because
storage is unavailable (a full disk) is kept in memory and its commit retried, with
backoff, for as long as it takes: the job is shown running with a message saying so,
and its worker slot stays taken until the end commits, so a job is never left running
without a worker. An end the store refuses for any other reason (a text it cannot
hold) is recorded as a sanitised failure instead, and if that is refused as well, as a
failure of fixed text, retried like the wait for storage. ``reconfigure`` applies a reloaded config to
every decision from then on; running jobs keep the settings they started with.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
import time
from pathlib import Path
from typing import Any, Callable

import structlog

from jobd import joblogs, orphans, process
from jobd.config import Config
from jobd.dispatch import Dispatcher, Entry
from jobd.handlers import Cancelled, Handler, JobFailed
from jobd.models import Job, JobStatus, readable
from jobd.store import JobNotFound, StateConflict, StorageUnavailable
from jobd.store.interface import JobStore

__all__ = ["Context", "Engine", "Live"]

log = structlog.get_logger()

#: how often a running job's progress is written to the database, at most
FLUSH_S = 0.5
#: an end waiting for storage is retried after this, doubling up to RETRY_MAX_S
RETRY_S = 0.25
RETRY_MAX_S = 5.0
#: the longest error text recorded when an end had to be sanitised
MAX_ERROR_CHARS = 4096


@dataclasses.dataclass
class Live:
    """A running job's latest progress, ahead of the database."""

    progress: float
    phase: str | None
    message: str | None
    version: int
    started: float = dataclasses.field(default_factory=time.monotonic)
    base_progress: float = 0.0  #: where this attempt started (a resumed job starts higher)
    dirty: bool = False

    def eta_s(self, now: float | None = None) -> float | None:
        done = self.progress - self.base_progress
        if done < 1 or self.progress >= 100:
            return None
        elapsed = (now or time.monotonic()) - self.started
        return round(elapsed * (100 - self.progress) / done, 1)


class Context:
    """What a handler sees of its running job (``jobd.handlers.JobContext``)."""

    def __init__(self, engine: "Engine", job: Job) -> None:
        self.engine = engine
        self.job = job
        self.config = engine.config
        self.log = log.bind(job_id=job.id, user_id=job.user_id, type=job.type)
        self.joblog = joblogs.JobLog(engine.log_path(job.id), engine.config.execution.max_log_bytes)
        self.stop_event = threading.Event()
        self.reason: str | None = None  #: cancel, timeout or shutdown: what stopped it first
        self.cancel_asked = False  #: a cancel came, whatever else stopped it
        self.wake = threading.Event()  #: set by every stop: an end waiting for storage retries
        self.timeout_s = _time_limit(job.timeout_s, engine.config.execution.default_timeout)
        self.deadline = (None if self.timeout_s is None
                         else time.monotonic() + self.timeout_s)
        self.live = Live(job.progress, job.phase, job.message, job.version,
                         base_progress=job.progress)
        self.finishing = False  #: its end is decided and being recorded (see ``settle``)
        self.in_process = False  #: a program of the job runs (a stop sends it SIGTERM)
        self.ended: str | None = None  #: the end last told in its log
        self._lock = threading.Lock()

    # -- stopping ----------------------------------------------------------------------

    def stop(self, reason: str, by: str | None = None) -> None:
        """Stop the job for ``reason`` (cancel, timeout, shutdown); ``by``: who cancelled.
        The first reason is told in the job's log."""
        with self._lock:
            if self.finishing:
                # its end is decided (the handler returned): a stop now only wakes the
                # commit that waits for storage, so a shutdown can end the wait
                self.wake.set()
                return
            first = self.reason is None
            if first:
                self.reason = reason
            if reason == "cancel":
                self.cancel_asked = True
        if first:
            why = {"cancel": f"cancelled by {by}" if by else "cancelled",
                   "timeout": f"timed out after {_duration(self.timeout_s or 0)}",
                   "shutdown": "interrupted by daemon shutdown"}.get(reason, reason)
            self.joblog.story(why + (": sending SIGTERM" if self.in_process else ""))
        self.stop_event.set()
        self.wake.set()

    def settle(self) -> bool:
        """Mark the handler's outcome final: stops from now on change nothing about the
        end. False if it was settled already (its end is being recorded elsewhere)."""
        with self._lock:
            if self.finishing:
                return False
            self.finishing = True
            return True

    @property
    def cancelled(self) -> bool:
        if (not self.stop_event.is_set() and self.deadline is not None
                and time.monotonic() > self.deadline):
            self.stop("timeout")
        return self.stop_event.is_set()

    # -- progress ----------------------------------------------------------------------

    def set_phase(self, phase: str, message: str | None = None) -> None:
        with self._lock:
            live = self.live
            live.phase, live.version = phase, self.engine.store.next_version(live.version)
            if message is not None:
                live.message = message
            live.dirty = False
        self.joblog.note(f"phase {phase}" + (f": {message}" if message else ""))
        self.engine.store.update_progress(self.job.id, progress=live.progress, phase=phase,
                                          message=live.message, actor="jobd")
        self.engine.notify(self.job.id)

    def set_progress(self, percent: float, message: str | None = None) -> None:
        with self._lock:
            live = self.live
            percent = min(100.0, max(live.progress, float(percent)))
            if percent == live.progress and (message is None or message == live.message):
                return
            live.progress, live.dirty = percent, True
            live.version = self.engine.store.next_version(live.version)
            if message is not None:
                live.message = message
        self.engine.notify(self.job.id)

    def set_message(self, message: str) -> None:
        self.set_progress(self.live.progress, message)

    def flush(self) -> None:
        """Write the latest progress to the database if it changed."""
        with self._lock:
            if not self.live.dirty:
                return
            self.live.dirty = False
            live = dataclasses.replace(self.live)
        self.engine.store.update_progress(self.job.id, progress=live.progress,
                                          phase=live.phase, message=live.message)

    # -- checkpoints and processes -----------------------------------------------------

    def save_checkpoint(self, phase: str, data: dict[str, Any]) -> None:
        self.engine.store.save_checkpoint(self.job.id, phase, data)

    def load_checkpoints(self) -> dict[str, dict[str, Any]]:
        return self.engine.store.load_checkpoints(self.job.id)

    def run(self, argv: list[str], *, cwd: str | None = None, env: dict[str, str] | None = None,
            on_progress: Callable[[float | None, str | None], None] | None = None,
            capture: bool = False, check: bool = True) -> process.Completed:
        if self.cancelled:
            raise Cancelled(self.reason or "cancelled")
        self.joblog.note("$ " + " ".join(argv))
        self.in_process = True
        try:
            done = process.run(
                argv, cwd=cwd, env={**(env or {}), process.JOB_ENV: self.job.id},
                log=self.joblog, stop=self.stop_event, deadline=self.deadline,
                grace=self.config.execution.cancel_grace, on_progress=on_progress,
                capture=capture, on_spawn=self._record_process,
                on_timeout=lambda: self.stop("timeout"))
        finally:
            self.in_process = False
        if done.timed_out:
            self.stop("timeout")
        if done.cancelled or done.timed_out:
            raise Cancelled(self.reason or "cancelled")
        if done.supervisor_died:
            # the program's own end is unknown: what its supervisor's death tells is all
            what = "killed" if done.returncode < 0 else "ended"
            raise JobFailed(f"the job's supervisor was {what} ({_exit_text(done.returncode)}); "
                            "its processes were killed")
        if check and done.returncode != 0:
            last = joblogs.tail(self.joblog.path)
            raise JobFailed(f"{Path(argv[0]).name} exited with {_exit_text(done.returncode)}"
                            + (f": {last}" if last else ""))
        return done

    def _record_process(self, pgid: int, start: int) -> None:
        try:
            self.engine.store.set_process(self.job.id, pgid, start)
        except StorageUnavailable as e:
            # only restart recovery needs it, and the job's mark and supervisor cover that
            self.log.warning("job_process_unrecorded", pgid=pgid, error=str(e))

    def show_pending(self, end: JobStatus, error: str) -> None:
        """Say on the running job that its end waits to be recorded."""
        self.set_message(f"ended {end}; not recorded yet: {error}")


def _time_limit(timeout_s: float | None, default: float | None) -> float | None:
    """A job's run-time limit in seconds, None for none: its own ``timeout_s`` (0 is no
    limit) or else the configured default (None is no limit)."""
    if timeout_s is None:
        return default
    return timeout_s or None


def _refused_text(end: JobStatus, kw: dict[str, Any], refused: Exception,
                  refusals: int) -> str:
    """The failure recorded in place of an end the store refused: the end and why it was
    refused (sanitised), or after a second refusal a fixed text that needs nothing of
    the job's own."""
    if refusals > 1:
        return "the job's end could not be recorded (the store refused it); see jobd's log"
    what = kw.get("error") or kw.get("message") or f"ended {end}"
    return readable(f"{what} (recorded as failed: the store refused the end: "
                    f"{type(refused).__name__}: {refused})", MAX_ERROR_CHARS)


def _exit_text(code: int) -> str:
    return f"signal {-code}" if code < 0 else f"status {code}"


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def end_story(status: JobStatus | str, message: str | None) -> str:
    """The closing line of an attempt in the job's story (its log, or its events)."""
    if status == JobStatus.QUEUED:
        return f"{message or 'stopped'}; queued again"
    if status == JobStatus.COMPLETED or not message or message == str(status):
        return f"ended {status}"
    return f"ended {status}: {message}"


def story(events: list[dict[str, Any]]) -> bytes:
    """A job's story told from its events, as the engine writes it in a job's log: for
    a job that never ran a program, and so has no log file."""
    out, attempt, before = [], 0, None
    for event in events:
        status, message, at = event["status"], event["message"], event["at"]
        if status == "running" and before != "running":
            attempt += 1
            out.append(joblogs.note_lines(f"attempt {attempt} started", at))
        elif status == "running" and message == "cancel requested":
            out.append(joblogs.note_lines(f"cancelled by {event['actor']}", at))
        elif status in ("completed", "failed", "cancelled") or (
                status == "queued" and before == "running"):
            if status == "cancelled" and before == "queued":
                message = f"cancelled by {event['actor']} while queued"
            out.append(joblogs.note_lines(end_story(status, message), at))
        before = status
    return b"".join(out)


class Engine:
    """Runs queued jobs on ``config.execution.workers`` threads."""

    def __init__(self, config: Config, store: JobStore, handlers: dict[str, Handler],
                 notify: Callable[[str], None] = lambda job_id: None) -> None:
        self.config = config
        self.store = store
        self.handlers = handlers
        self.notify = notify
        ex = config.execution
        self.dispatcher = Dispatcher(workers=ex.workers,
                                     max_running_per_user=ex.max_running_per_user)
        self._contexts: dict[str, Context] = {}
        #: asked for before the job's context existed: job id -> who asked
        self._cancels: dict[str, str | None] = {}
        self._lock = threading.Lock()
        self._kick = threading.Event()
        self._stopping = False
        self._pool = concurrent.futures.ThreadPoolExecutor(ex.workers, "jobd-worker")
        self._pool_size = ex.workers
        self._thread = threading.Thread(target=self._loop, name="jobd-dispatch", daemon=True)

    def log_path(self, job_id: str) -> Path:
        return joblogs.path(self.config.log_dir, job_id)

    def reconfigure(self, config: Config) -> None:
        """Use ``config`` for every decision from now on (SIGHUP): limits, timeouts and
        grace of jobs not yet started. Running jobs go on with the settings they started
        with; a lower ``workers`` starts no job until fewer run than the new limit."""
        ex = config.execution
        with self._lock:
            self.config = config
            if ex.workers > self._pool_size:
                # a pool cannot grow: new jobs go to a larger one, the old one's running
                # jobs finish where they are
                old, self._pool = self._pool, concurrent.futures.ThreadPoolExecutor(
                    ex.workers, "jobd-worker")
                self._pool_size = ex.workers
                old.shutdown(wait=False)
        self.dispatcher.set_limits(workers=ex.workers,
                                   max_running_per_user=ex.max_running_per_user)
        log.info("engine_reconfigured", workers=ex.workers,
                 max_running_per_user=ex.max_running_per_user,
                 default_timeout=ex.default_timeout, cancel_grace=ex.cancel_grace)
        self._kick.set()

    # -- start and stop ----------------------------------------------------------------

    def start(self, *, paused: bool = False) -> None:
        """Recover what a crash left running, load the queue, start dispatching."""
        self.recover()
        self.dispatcher.set_paused(paused)
        self.dispatcher.load(self.store.queued_jobs())
        self._thread.start()
        self.kick()

    def recover(self) -> None:
        """Jobs still ``running`` belong to a daemon that died: kill what they left, requeue."""
        for job_id, pgid, start in self.store.processes():
            killed = orphans.kill_orphan_group(pgid, start)
            if killed:
                log.warning("orphan_processes_killed", job_id=job_id, pgid=pgid, count=killed)
        max_recoveries = self.config.execution.max_recoveries
        for job in self.store.running_jobs():
            # what the recorded group missed: started just before the crash, or moved out
            orphans.kill_marked(job.id)
            handler = self.handlers.get(job.type)
            bound = log.bind(job_id=job.id, user_id=job.user_id, type=job.type)
            if job.cancel_requested:
                self.store.finish_job(job.id, JobStatus.CANCELLED,
                                      message="cancelled (the daemon restarted while stopping)")
                bound.info("job_cancelled", reason="restart")
            elif handler is None or not handler.resumable:
                self.store.finish_job(job.id, JobStatus.FAILED,
                                      error="interrupted by daemon restart")
                bound.warning("job_failed", reason="interrupted by daemon restart")
            elif job.recoveries + 1 >= max_recoveries:
                error = (f"interrupted by {job.recoveries + 1} daemon restarts; gave up "
                         f"(max_recoveries = {max_recoveries})")
                self.store.finish_job(job.id, JobStatus.FAILED, error=error)
                bound.warning("job_failed", reason=error)
            else:
                self.store.requeue_job(job.id, reason="recovered after restart", recovered=True)
                bound.info("job_recovered", phase=job.phase)

    def stop(self) -> None:
        """Stop dispatching, stop running jobs, requeue what is resumable."""
        with self._lock:  # a job starting now sees _stopping once registered (see _run)
            self._stopping = True
            contexts = list(self._contexts.values())
        self.dispatcher.set_paused(True)
        self._kick.set()
        for ctx in contexts:
            ctx.stop("shutdown")
        deadline = time.monotonic() + self.config.execution.shutdown_grace
        while self._contexts and time.monotonic() < deadline:
            time.sleep(0.02)
        for ctx in list(self._contexts.values()):
            # its handler ignores stop requests: record the end for it
            self._finish(ctx, None, Cancelled("shutdown"))
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._thread.join(timeout=1)

    # -- dispatching -------------------------------------------------------------------

    def kick(self) -> None:
        self._kick.set()

    def on_changed(self, job: Job) -> None:
        """The store's commit listener: keep the dispatcher's queue in step."""
        if job.status is not JobStatus.RUNNING:
            # its worker slot is free once the end is committed (a retry may follow at once)
            self.dispatcher.finish(job.id)
        if job.status is JobStatus.QUEUED:
            self.dispatcher.add(job)
            # paused or every worker busy: resume() or the next finished job kicks anyway,
            # and waking the dispatch thread for nothing costs a GIL hand-off per submit
            if self.dispatcher.may_take():
                self._kick.set()
        else:
            self.dispatcher.remove(job.id)
        self.notify(job.id)

    def set_paused(self, paused: bool) -> None:
        self.dispatcher.set_paused(paused)
        if not paused:
            self._kick.set()

    def _loop(self) -> None:
        while not self._stopping:
            self._kick.wait(FLUSH_S)
            self._kick.clear()
            while not self._stopping and (entry := self.dispatcher.take()) is not None:
                with self._lock:  # reconfigure may swap the pool
                    self._pool.submit(self._run, entry)
            orphans.sweep_orphans()  # what a job whose supervisor died left behind
            for ctx in list(self._contexts.values()):
                if ctx.finishing:
                    continue  # its end is decided: a deadline passing now changes nothing
                ctx.cancelled  # noqa: B018 - passes the deadline: stops a job that never checks
                ctx.flush()

    # -- running -----------------------------------------------------------------------

    def _run(self, entry: Entry) -> None:
        try:
            job = self.store.start_job(entry.id)
        except StateConflict:  # cancelled between take and start
            self.dispatcher.finish(entry.id)
            self._kick.set()
            return
        except Exception:
            log.exception("job_start_failed", job_id=entry.id)
            self.dispatcher.finish(entry.id)
            self._requeue_later(entry.id)
            return
        ctx = Context(self, job)
        ctx.joblog.story(f"attempt {job.attempts} started", job.started_at)
        with self._lock:
            self._contexts[job.id] = ctx
            if job.id in self._cancels:
                ctx.stop("cancel", self._cancels.pop(job.id))
            if self._stopping:
                ctx.stop("shutdown")
        ctx.log.info("job_started", attempt=job.attempts)
        handler = self.handlers.get(job.type)
        result: dict[str, Any] | None = None
        failure: BaseException | None = None
        try:
            if handler is None:
                raise JobFailed(f"no handler for job type {job.type!r} (a plugin went missing?)")
            if job.cancel_requested or ctx.reason == "cancel":
                ctx.stop("cancel")
                raise Cancelled("cancel")
            result = handler.run(ctx)
        except Exception as e:  # every end of a handler is recorded below
            failure = e
        self._finish(ctx, result, failure)

    def _finish(self, ctx: Context, result: dict[str, Any] | None,
                failure: BaseException | None) -> None:
        job = ctx.job
        if not ctx.settle():
            return
        end, kw = self._end_of(ctx, result, failure)
        ctx.flush()
        if failure is not None and not isinstance(failure, (JobFailed, Cancelled)):
            ctx.log.error("job_crashed", exc_info=failure)
        try:
            done = self._commit_end(ctx, end, kw)
            if done is not None:
                event = {JobStatus.COMPLETED: "job_completed", JobStatus.FAILED: "job_failed",
                         JobStatus.CANCELLED: "job_cancelled",
                         JobStatus.QUEUED: "job_requeued"}[done.status]
                ctx.log.info(event, error=done.error, seconds=round(
                    time.monotonic() - ctx.live.started, 3))
        except Exception:
            # the daemon stops while the end waits to be committed: the job stays running
            # in the store and the next start recovers it; its worker slot is free all
            # the same
            ctx.log.exception("job_finish_failed")
            self.dispatcher.finish(job.id)
        finally:
            # a recorded end freed the slot in on_changed already: finishing here again
            # could free the slot of a retry that started the same job anew meanwhile
            ctx.joblog.close()
            with self._lock:
                if self._contexts.get(job.id) is ctx:  # a retry may already run it anew
                    del self._contexts[job.id]
                self._cancels.pop(job.id, None)
            self._kick.set()

    def _end_of(self, ctx: Context, result: dict[str, Any] | None,
                failure: BaseException | None) -> tuple[JobStatus, dict[str, Any]]:
        """The end a handler's outcome means, and what goes with it: decided once, when
        the handler returned (a cancel or timeout that came before that wins)."""
        if ctx.cancel_asked or ctx.reason == "cancel":
            return JobStatus.CANCELLED, {"message": "cancelled"}
        if ctx.reason == "timeout":
            assert ctx.timeout_s is not None
            return JobStatus.FAILED, {"error": f"timed out after {_duration(ctx.timeout_s)}"}
        if ctx.reason == "shutdown" and failure is not None:
            handler = self.handlers.get(ctx.job.type)
            if handler is not None and handler.resumable:
                return JobStatus.QUEUED, {"message": "interrupted by shutdown"}
            return JobStatus.FAILED, {"error": "interrupted by daemon shutdown"}
        if isinstance(failure, JobFailed):
            return JobStatus.FAILED, {"error": str(failure)}
        if isinstance(failure, Cancelled):
            return JobStatus.CANCELLED, {"message": "cancelled"}
        if failure is not None:
            return JobStatus.FAILED, {"error": f"internal error in the {ctx.job.type} handler: "
                                               f"{type(failure).__name__}: {failure}"}
        return JobStatus.COMPLETED, {"result": result or {}}

    def _commit_end(self, ctx: Context, end: JobStatus, kw: dict[str, Any]) -> Job | None:
        """Commit the decided end; None if the job is no longer running (nothing to record).

        Storage that is unavailable is waited for, however long (until the daemon stops),
        with backoff. An end the store refuses otherwise is recorded as a sanitised
        failure instead, and if that is refused too, as a failure of fixed text, retried
        with the same backoff: a job is never left running without a worker.
        """
        delay = RETRY_S
        refusals = 0
        while True:
            told = end_story(end, kw.get("error") or kw.get("message"))
            if told != ctx.ended:  # before the commit: a reader seeing the end sees it told
                ctx.ended = told
                ctx.joblog.story(told)
            try:
                if end is JobStatus.QUEUED:
                    return self.store.requeue_job(ctx.job.id, reason=kw["message"])
                return self.store.finish_job(ctx.job.id, end, **kw)
            except (StateConflict, JobNotFound) as e:
                ctx.log.warning("job_end_unrecorded", end=str(end), error=str(e))
                return None
            except Exception as e:
                if self._stopping:
                    raise
                if isinstance(e, StorageUnavailable):
                    ctx.log.warning("job_end_pending", end=str(end), error=str(e),
                                    retry_in_s=delay)
                    if delay == RETRY_S:
                        ctx.show_pending(end, str(e))
                else:
                    refusals += 1
                    ctx.log.error("job_end_refused", end=str(end), refusals=refusals,
                                  exc_info=e)
                    end, kw = JobStatus.FAILED, {"error": _refused_text(end, kw, e, refusals)}
                    if refusals == 1:
                        continue  # the sanitised failure is tried at once
                ctx.wake.wait(delay)
                ctx.wake.clear()
                delay = min(delay * 2, RETRY_MAX_S)

    def _requeue_later(self, job_id: str) -> None:
        """A job that could not be started stays queued in the store: keep it in the queue."""
        try:
            job = self.store.get_job(job_id)
        except Exception:
            log.exception("job_requeue_failed", job_id=job_id)
            return
        if job.status is JobStatus.QUEUED:
            self.dispatcher.add(job)

    # -- answers for the manager ---------------------------------------------------------

    def cancel(self, job_id: str, actor: str | None = None) -> None:
        """Stop a running job's handler and process group (now, or as soon as it starts);
        ``actor``, who asked, is told in its log."""
        with self._lock:
            ctx = self._contexts.get(job_id)
            if ctx is None:
                if self.dispatcher.is_taken(job_id):
                    self._cancels[job_id] = actor
                return
        ctx.stop("cancel", actor)

    def live(self, job_id: str) -> Live | None:
        ctx = self._contexts.get(job_id)
        return ctx.live if ctx is not None else None
