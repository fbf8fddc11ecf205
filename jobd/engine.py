"""The worker pool: dispatching, the job context, cancellation, timeouts, restarts.

Dispatch runs on events (a job queued, a job finished, resume), not on a timer: the
store's commit listener calls ``on_changed``, which feeds the dispatcher and starts what
may start at once. Each start is an ``Attempt`` (``jobd.attempt``): its ``queued ->
running`` is written without anyone waiting on the commit, and once it holds a worker
runs the handler with a ``Context``. Starts share transactions where they can: a job
submitted while a worker is free and nothing is queued starts in its submit's own
statement (``start_in``, asked by the store's ``submit_job_in``), and an attempt's end is
written together with the start of the job the dispatcher hands its slot to
(``_start_next_in``; a cluster node claims the slot in the database in the end's
transaction instead, ``_claim_next_in``). No worker waits for that commit: once it holds, the store's writer
thread frees the attempt's slot and hands the next job to a worker (``_end_committed``),
before the commit's listeners hear of the end.
If the transaction fails, its undo gives the slot back, the next job returns to the
queue in its place, and the end is committed again on a worker. Progress lives in
memory (every ``jobs.get``/``jobs.wait`` sees the latest value at once) and is written to
the database at most every ``FLUSH_S`` per job. ``tick(now)`` is one turn of
housekeeping (time limits, progress flushes, orphans) on the engine's clock, so a test
can pass the time.

A job's end is decided once, when its handler returns (``outcome``): a cancel or
timeout that came before that wins, one after it changes nothing. An end that cannot be
committed because storage is unavailable (a full disk) is kept in memory and its commit
retried on a worker, with backoff, for as long as it takes: the job is shown running
with a message saying so, and its slot stays taken until the end commits, so a job is
never left running without a worker. An end the store refuses for any other reason (a
text it cannot hold) is recorded as a sanitised failure instead, and if that is refused
as well, as a failure of fixed text, retried like the wait for storage. ``reconfigure``
applies a reloaded config to every decision from then on; running jobs keep the
settings they started with.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import queue
import threading
import time
from pathlib import Path
from typing import Any, Callable

import structlog

from jobd import joblogs, orphans, process
from jobd.attempt import Attempt, StopReason, crash_end, end_story, outcome
from jobd.config import Config
from jobd.dispatch import Dispatcher
from jobd.errors import JobdError
from jobd.handlers import Aftermath, Cancelled, Handler, JobFailed, git
from jobd.models import Job, JobStatus, readable
from jobd.store import JobNotFound, StateConflict, StorageUnavailable, StoreError
from jobd.store.interface import JobStore

__all__ = ["Context", "Engine", "Live"]

log = structlog.get_logger()

#: how often a running job's progress is written to the database, at most
FLUSH_S = 0.5
#: how often ``tick`` looks for what a job whose supervisor died left behind, at most: a
#: look reads every process's /proc entry, and a cluster node ticks at every burst of other
#: nodes' notifications
SWEEP_S = 0.5
#: an end waiting for storage is retried after this, doubling up to RETRY_MAX_S
RETRY_S = 0.25
RETRY_MAX_S = 5.0
#: past shutdown_grace, how long a stop waits for the ends of programs that used all of
#: theirs before it records the ends itself (well inside systemd's grace + 5 s)
STOP_SLACK_S = 0.5
#: the longest error text recorded when an end had to be sanitised
MAX_ERROR_CHARS = 4096


@dataclasses.dataclass
class Live:
    """A running job's latest progress, ahead of the database."""

    progress: float
    phase: str | None
    message: str | None
    version: int
    started: float  #: on the engine's clock
    base_progress: float = 0.0  #: where this attempt started (a resumed job starts higher)
    dirty: bool = False

    def eta_s(self, now: float) -> float | None:
        done = self.progress - self.base_progress
        if done < 1 or self.progress >= 100:
            return None
        return round((now - self.started) * (100 - self.progress) / done, 1)


class Context:
    """What a handler sees of its running job (``jobd.handlers.JobContext``); why it
    stops is its ``attempt``'s."""

    def __init__(self, engine: "Engine", job: Job, attempt: Attempt) -> None:
        self.engine = engine
        self.job = job
        self.attempt = attempt
        self.config = engine.config
        self.log = log.bind(job_id=job.id, user_id=job.user_id, type=job.type)
        self.joblog = joblogs.JobLog(engine.log_path(job.id), engine.config.execution.max_log_bytes)
        self.stop_event = threading.Event()
        self.wake = threading.Event()  #: set by every stop: an end waiting for storage retries
        now = engine.clock()
        handler = engine.handlers.get(job.type)
        attempt.timeout_s = _time_limit(job.timeout_s, engine.config.execution.default_timeout
                                        if handler is None
                                        else handler.default_timeout(engine.config))
        attempt.deadline = None if attempt.timeout_s is None else now + attempt.timeout_s
        self.live = Live(job.progress, job.phase, job.message, job.version, started=now,
                         base_progress=job.progress)
        self.in_process = False  #: a program of the job runs (a stop sends it SIGTERM)
        self.ended: str | None = None  #: the end last told in its log
        self._lock = threading.Lock()

    # -- stopping ----------------------------------------------------------------------

    def stop(self, reason: StopReason, by: str | None = None) -> None:
        """Stop the job for ``reason`` (``by``: who cancelled); the first reason is told
        in the job's log. Once its end is decided a stop only wakes the commit that waits
        for storage, so a shutdown can end the wait."""
        if self.attempt.request_stop(reason, by):
            self.tell_stop(reason, by)
        if not self.attempt.settled:
            self.stop_event.set()
        self.wake.set()

    def tell_stop(self, reason: StopReason, by: str | None) -> None:
        """Tell the attempt's first stop in the job's log and stop its handler."""
        self.joblog.story(self.attempt.told(reason, by, self.in_process))
        self.stop_event.set()

    @property
    def cancelled(self) -> bool:
        if not self.stop_event.is_set() and self.attempt.due(self.engine.clock()):
            self.stop(StopReason.TIMEOUT)
        return self.stop_event.is_set()

    # -- progress ----------------------------------------------------------------------

    # A progress write is queued while the lock is held (queuing never waits): the writes
    # of one attempt reach the store in the order of the changes they carry, so a flush
    # on the dispatch thread cannot land after a newer phase and leave it stale.

    def set_phase(self, phase: str, message: str | None = None) -> None:
        with self._lock:
            live = self.live
            live.phase, live.version = phase, self.engine.store.next_version(live.version)
            if message is not None:
                live.message = message
            live.dirty = False
            self.engine.store.update_progress(self.job.id, progress=live.progress,
                                              phase=phase, message=live.message, actor="jobd")
        self.joblog.note(f"phase {phase}" + (f": {message}" if message else ""))
        self.engine.progressed(self.job)

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
        self.engine.progressed(self.job)

    def versioned(self, version: int) -> None:
        """The live progress's version, given by the database (cluster mode)."""
        with self._lock:
            self.live.version = max(self.live.version, version)

    def set_message(self, message: str) -> None:
        self.set_progress(self.live.progress, message)

    def flush(self) -> None:
        """Write the latest progress to the database if it changed."""
        with self._lock:
            live = self.live
            if not live.dirty:
                return
            live.dirty = False
            self.engine.store.update_progress(self.job.id, progress=live.progress,
                                              phase=live.phase, message=live.message)

    def snapshot(self) -> Live:
        """The live progress as one change left it (a reader on another thread would
        otherwise see a new version beside older values)."""
        with self._lock:
            return dataclasses.replace(self.live)

    # -- checkpoints and processes -----------------------------------------------------

    def save_checkpoint(self, phase: str, data: dict[str, Any]) -> None:
        self.engine.store.save_checkpoint(self.job.id, phase, data)

    def load_checkpoints(self) -> dict[str, dict[str, Any]]:
        return self.engine.store.load_checkpoints(self.job.id)

    def load_manifest(self) -> str | None:
        return self.engine.store.load_manifest(self.job.user_id, self.job.project_id or "")

    def save_manifest(self, document: str) -> None:
        self.engine.store.save_manifest(self.job.id, self.job.user_id,
                                        self.job.project_id or "", document)

    def run(self, argv: list[str], *, cwd: str | None = None, env: dict[str, str] | None = None,
            on_progress: Callable[[float | None, str | None], None] | None = None,
            capture: bool = False, check: bool = True, whole: bool = False
            ) -> process.Completed:
        if self.cancelled:
            raise Cancelled(_stopped(self.attempt))
        self.joblog.note("$ " + " ".join(argv))
        start = joblogs.end(self.joblog.path)  # what this program prints comes after
        self.in_process = True
        deadline = self.attempt.deadline
        try:
            done = process.run(
                argv, cwd=cwd, env={**(env or {}), process.JOB_ENV: self.job.id},
                log=self.joblog, stop=self.stop_event,
                # the program's supervisor counts on the system's monotonic clock
                deadline=None if deadline is None else (
                    time.monotonic() + deadline - self.engine.clock()),
                grace=self.config.execution.cancel_grace, stop_grace=self._stop_grace,
                on_progress=on_progress,
                capture=capture, on_spawn=self._record_process,
                on_timeout=lambda: self.stop(StopReason.TIMEOUT),
                lease=None if self.engine.cluster is None else self.engine.cluster.deadline)
        finally:
            self.in_process = False
        if done.expired:  # the node lost its lease: nothing is recorded for this attempt
            raise Cancelled(self.engine.cluster.lapsed())
        if done.timed_out:
            self.stop(StopReason.TIMEOUT)
        # a job's whole program that a shutdown asked to stop and that ended of its own
        # accord with 0 has finished: what it did stands (README: it ends as it chose), and
        # a resumable one is not run again. (A step of a sync, an indexer that saved its
        # place and exited, is still interrupted: the job resumes from its checkpoint.)
        finished = (whole and done.returncode == 0 and not done.timed_out
                    and self.attempt.stop is StopReason.SHUTDOWN)
        if (done.cancelled or done.timed_out) and not finished:
            raise Cancelled(_stopped(self.attempt))
        if done.supervisor_died:
            # the program's own end is unknown: what its supervisor's death tells is all
            what = "killed" if done.returncode < 0 else "ended"
            raise JobFailed(f"the job's supervisor was {what} ({_exit_text(done.returncode)}); "
                            "its processes were killed")
        if check and done.returncode != 0:
            last = joblogs.tail(self.joblog.path, start)
            raise JobFailed(f"{Path(argv[0]).name} exited with {_exit_text(done.returncode)}"
                            + (f": {last}" if last else ""))
        return done

    def _stop_grace(self) -> float:
        """How long the program may take to stop before SIGKILL: a shutdown gives it
        ``shutdown_grace`` (SPEC §6) to save its work, a cancel ``cancel_grace``."""
        execution = self.config.execution
        return (execution.shutdown_grace if self.attempt.stop is StopReason.SHUTDOWN
                else execution.cancel_grace)

    def _record_process(self, pgid: int, start: int) -> None:
        try:
            self.engine.store.set_process(self.job.id, pgid, start)
        except StorageUnavailable as e:
            # only restart recovery needs it, and the job's mark and supervisor cover that
            self.log.warning("job_process_unrecorded", pgid=pgid, error=str(e))

    def show_pending(self, end: JobStatus, error: str) -> None:
        """Say on the running job that its end waits to be recorded."""
        self.set_message(f"ended {end}; not recorded yet: {error}")


def _stopped(attempt: Attempt) -> str:
    return attempt.stop.value if attempt.stop is not None else "cancelled"


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


def _quietly(line: Callable[[], None]) -> None:
    """Log ``line``; a log that cannot be written (stderr gone) must not stop the
    dispatch thread, which also keeps time limits."""
    try:
        line()
    except Exception:  # noqa: BLE001 - there is nowhere left to tell it
        pass


def _exit_text(code: int) -> str:
    return f"signal {-code}" if code < 0 else f"status {code}"


def cancelled_while_queued(actor: str) -> str:
    return f"cancelled by {actor} while queued"


def story(events: list[dict[str, Any]], *, until: int | None = None) -> bytes:
    """A job's story told from its events, as the engine writes it in a job's log: for
    a job that never ran a program, and so has no log file; ``until``: up to the start
    of that attempt (what a log that first appears in it begins with)."""
    out, attempt, before = [], 0, None
    for event in events:
        status, message, at = event["status"], event["message"], event["at"]
        if status == "running" and before != "running":
            attempt += 1
            if attempt == until:
                break
            out.append(joblogs.note_lines(f"attempt {attempt} started", at))
        elif status == "running" and message == "cancel requested":
            out.append(joblogs.note_lines(f"cancelled by {event['actor']}", at))
        elif status in ("completed", "failed", "cancelled") or (
                status == "queued" and before == "running"):
            if status == "cancelled" and before == "queued":
                message = cancelled_while_queued(event["actor"])
            out.append(joblogs.note_lines(end_story(status, message), at))
        before = status
    return b"".join(out)


class Engine:
    """Runs queued jobs on ``config.execution.workers`` threads; ``clock`` is the time
    every time limit, progress rate and ``tick`` counts in."""

    def __init__(self, config: Config, store: JobStore, handlers: dict[str, Handler],
                 notify: Callable[[str], None] = lambda job_id: None,
                 clock: Callable[[], float] = time.monotonic,
                 live_changed: Callable[[Job], None] = lambda job: None,
                 cluster: Any = None) -> None:
        self.config = config
        #: ``config.log_dir``, worked out once per config (Path work cost a job a sixth of
        #: its worker's time)
        self._log_dir = config.log_dir
        self.store = store
        self.handlers = handlers
        #: told the id of every job that changed (its commit holds, or it progressed)
        self.notify = notify
        #: told every running job whose phase or live progress changed (``jobs.changes``)
        self.live_changed = live_changed
        self.clock = clock
        #: cluster mode's node (``jobd.cluster.Node``): the database picks what starts
        self.cluster = cluster
        self._claiming = self._claim_again = False
        #: when (the engine's clock) ``tick`` next looks for orphans
        self._sweep_at = float("-inf")
        ex = config.execution
        self.dispatcher = Dispatcher(workers=ex.workers,
                                     max_running_per_user=ex.max_running_per_user)
        #: the attempt of each job taken from the queue (from ``take`` until its end is
        #: recorded), and the context of those whose handler has been given the job
        self._attempts: dict[str, Attempt] = {}
        self._contexts: dict[str, Context] = {}
        self._lock = threading.Lock()
        #: the dispatch thread's chores: None (dispatch and tick now) or an end's log line
        self._chores: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._started = False
        self._stopping = False
        #: no job starts any more (``stop_dispatching``): set first when the daemon stops
        self._draining = False
        self._pool = concurrent.futures.ThreadPoolExecutor(ex.workers, "jobd-worker")
        self._pool_size = ex.workers
        self._thread = threading.Thread(target=self._loop, name="jobd-dispatch", daemon=True)

    def log_path(self, job_id: str) -> Path:
        return joblogs.path(self._log_dir, job_id)

    def reconfigure(self, config: Config) -> None:
        """Use ``config`` for every decision from now on (SIGHUP): limits, timeouts and
        grace of jobs not yet started. Running jobs go on with the settings they started
        with; a lower ``workers`` starts no job until fewer run than the new limit."""
        ex = config.execution
        with self._lock:
            self.config = config
            self._log_dir = config.log_dir
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
        self.kick()

    # -- start and stop ----------------------------------------------------------------

    def start(self, *, paused: bool = False) -> None:
        """Recover what a crash left running, load the queue, start dispatching."""
        self.recover()
        self.dispatcher.set_paused(paused)
        for job in self.store.queued_jobs():
            self._enqueue(job)
        if self.cluster is not None:  # what the other nodes run (this one runs nothing yet)
            for job in self.store.running_jobs():
                self._follow_elsewhere(job)
        self._started = True
        self._thread.start()
        self.kick()

    def recover(self) -> None:
        """Jobs still ``running`` belong to a daemon that died: kill what they left, requeue."""
        if self.cluster is not None:  # only this host's earlier nodes' (jobd.cluster)
            # (not abandoned here: another node may claim a failed sync's repository the
            # moment the rescue commits; README, Known limits)
            self.cluster.recover()
            return
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
            end, fields = crash_end(job, handler is not None and handler.resumable,
                                    max_recoveries)
            said = fields.get("message") or fields.get("error")
            if end is not JobStatus.QUEUED:
                self.abandon(job)
            # each attempt's closing line before its end commits, as a worker writes it
            self.tell(job.id, end_story(end, said))
            if end is JobStatus.QUEUED:
                self.store.requeue_job(job.id, reason=str(said), recovered=True)
                bound.info("job_recovered", phase=job.phase)
            elif end is JobStatus.CANCELLED:
                self.store.finish_job(job.id, end, **fields)
                bound.info("job_cancelled", reason="restart")
            else:
                self.store.finish_job(job.id, end, **fields)
                bound.warning("job_failed", reason=said)

    def abandon(self, job: Job) -> None:
        """``job`` was running when its daemon died, and no attempt will run it again (its
        end is failed or cancelled): its handler undoes what the attempt left half-done (a
        sync's checkout, SPEC §5), noting it in the job's log. Logged if it cannot."""
        handler = self.handlers.get(job.type)
        if handler is None:
            return
        bound = log.bind(job_id=job.id, user_id=job.user_id, type=job.type)
        joblog = joblogs.JobLog(self.log_path(job.id), self.config.execution.max_log_bytes)
        try:
            handler.abandon(Aftermath(job, self.config, bound, joblog),
                            self.store.load_checkpoints(job.id))
        except Exception:  # the job ends all the same; an operator reads why
            bound.exception("job_abandon_failed")
        finally:
            joblog.close()

    def tell(self, job_id: str, text: str) -> None:
        """A line of a job's story written by no worker of it (a recovery, a cancel while
        queued): in its log if it has one, else its events tell it (``story``). In cluster
        mode the log that counts is the database's copy (``Node.tell``)."""
        if self.cluster is not None:
            self.cluster.tell(job_id, text)
            return
        joblog = joblogs.JobLog(self.log_path(job_id), self.config.execution.max_log_bytes)
        try:
            joblog.story(text)
        finally:
            joblog.close()

    def stop_dispatching(self) -> None:
        """A stop's first step (SPEC §6: stop accepting and dispatching): no job starts
        from now on, not even in the slot of one that ends while the server finishes the
        calls under way; ``stop`` then stops the running ones. Its own flag, not only the
        pause, which a cluster's pause or resume through another node sets anew."""
        with self._lock:
            self._draining = True
        self.dispatcher.set_paused(True)

    def stop(self) -> None:
        """Stop dispatching, stop running jobs, requeue what is resumable."""
        self.stop_dispatching()
        with self._lock:  # an attempt starting now sees _stopping once registered (_run)
            self._stopping = True
            contexts = list(self._contexts.values())
            for job_id, attempt in self._attempts.items():
                ctx = self._contexts.get(job_id)
                if ctx is None or ctx.attempt is not attempt:
                    attempt.request_stop(StopReason.SHUTDOWN)  # told by its context (_run)
        self.kick()
        for ctx in contexts:
            ctx.stop(StopReason.SHUTDOWN)
        grace = self.config.execution.shutdown_grace
        # a program's grace counts from its own SIGTERM, sent by its worker's next look
        # at the stop (and its SIGKILL is the supervisor's): its end comes after that
        self._wait_for_ends(grace + STOP_SLACK_S)
        for ctx in list(self._contexts.values()):
            # its handler ignores stop requests: record the end for it
            self._finish(ctx, None, Cancelled("shutdown"))
        self._wait_for_ends(min(grace, 5.0))  # those ends are being written
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._started:
            self._thread.join(timeout=1)
        self._tell_left()

    def drop_attempts(self) -> None:
        """Cluster mode: the node lost its lease. Stop every attempt (their writes are
        fenced: nothing is recorded for them) and wait for their ends, up to
        ``shutdown_grace``."""
        with self._lock:
            contexts = list(self._contexts.values())
        for ctx in contexts:
            ctx.stop(StopReason.SHUTDOWN)
        self._wait_for_ends(self.config.execution.shutdown_grace)

    def _wait_for_ends(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while self._attempts and time.monotonic() < deadline:
            time.sleep(0.02)

    # -- dispatching -------------------------------------------------------------------

    def kick(self) -> None:
        self._chores.put(None)

    def progressed(self, job: Job) -> None:
        """A running job's phase or live progress changed (``Context``): tell its waiters;
        in cluster mode once the node has reported it, with its version (``reported``)."""
        if self.cluster is not None:
            ctx = self._contexts.get(job.id)
            self.cluster.progressed(job.id, None if ctx is None else ctx.snapshot())
            return
        self.notify(job.id)
        self.live_changed(job)

    def reported(self, job_id: str, version: int) -> None:
        """Cluster mode: the node reported a running job's live progress to every node,
        and the database gave it ``version``: this node's waiters hear it too."""
        ctx = self._contexts.get(job_id)
        if ctx is None:
            return
        ctx.versioned(version)
        self.notify(job_id)
        self.live_changed(ctx.job)

    def on_changed(self, job: Job) -> None:
        """The store's commit listener: keep the dispatcher's queue in step, and start
        what may start now (its start goes into the writer's next transaction)."""
        if job.status is JobStatus.QUEUED:
            self._enqueue(job)
            self._dispatch()
        else:
            self.dispatcher.remove(job.id)
        if self.cluster is not None:
            self._follow_elsewhere(job)
        self.notify(job.id)

    def _follow_elsewhere(self, job: Job) -> None:
        """Cluster mode: the dispatcher's mirror of what other nodes run (wait reasons)."""
        if job.status is not JobStatus.RUNNING:
            self.dispatcher.not_elsewhere(job.id)
        elif job.id not in self._attempts:  # this node's own claim is ``claimed`` there
            seen, exclusive = self._exclusivity(job)
            self.dispatcher.elsewhere(seen, exclusive=exclusive)

    def cluster_beat(self, slots: int) -> None:
        """Cluster mode, at each heartbeat: the cluster's slots (every live node's workers),
        and what the other nodes run read anew, so that a lost notification leaves the
        wait reasons behind for one beat at most."""
        self.dispatcher.set_cluster_slots(slots)
        try:
            running = self.store.running_jobs()
        except StoreError:  # the next beat reads them
            return
        self.dispatcher.set_elsewhere([self._exclusivity(job) for job in running
                                       if job.id not in self._attempts])

    def forgotten(self, job_id: str) -> None:
        """Cluster mode: another node's commit forgot a job (``admin.purge``)."""
        self.dispatcher.remove(job_id)
        self.dispatcher.not_elsewhere(job_id)

    def _enqueue(self, job: Job) -> None:
        seen, exclusive = self._exclusivity(job)
        self.dispatcher.add(seen, exclusive=exclusive)

    def _exclusivity(self, job: Job) -> tuple[Job, bool]:
        """``job`` as the dispatcher sees it, and whether its handler is exclusive. An
        exclusive job without a resolved ``repo_path`` (queued before sync and index
        stored it, or a plugin's) gets its project's from the template here, so that it
        waits on the same work tree as every other job there."""
        handler = self.handlers.get(job.type)
        exclusive = handler is not None and handler.exclusive
        if exclusive and "repo_path" not in job.options and job.project_id is not None:
            try:
                path = git.locate(self.config, user_id=job.user_id,
                                  project_id=job.project_id, repo_path=None)
            except JobdError:  # its run fails on the same check
                return job, exclusive
            job = dataclasses.replace(job, options={**job.options, "repo_path": str(path)})
        return job, exclusive

    def set_paused(self, paused: bool) -> None:
        self.dispatcher.set_paused(paused)
        if not paused:
            self.kick()

    def _dispatch(self) -> None:
        """Start every attempt the dispatcher lets start now."""
        if self.cluster is not None:
            self._claim()
            return
        while self._started and not self._draining and (
                attempt := self.dispatcher.take()) is not None:
            with self._lock:
                self._attempts[attempt.job_id] = attempt
            try:
                started = self._write_start(attempt.job_id)
            except Exception as e:  # the store is closed: the job stays queued in it
                self._not_started(attempt, e)
                continue
            started.add_done_callback(lambda fut, attempt=attempt: self._started_or_not(
                attempt, fut))

    def _claim(self) -> None:
        """Cluster mode: claim the free slots in the database (``jobd.cluster``), one claim
        in flight at a time; the dispatcher mirrors what it started."""
        with self._lock:
            slots = self.dispatcher.free_slots()
            if not self._started or self._draining or slots <= 0:
                return
            if self._claiming:
                self._claim_again = True
                return
            self._claiming = True
        try:
            claimed = self.store.write_async(lambda tx: self.cluster.claim_in(tx, slots))
        except Exception:  # the store is closed: the daemon stops
            self._claiming = False
            return
        claimed.add_done_callback(self._claimed)

    def _claimed(self, fut: concurrent.futures.Future[list[Job]]) -> None:
        """A claim's commit came back (on the store's writer thread): its jobs go to workers."""
        error = fut.exception()
        if error is not None:
            log.warning("cluster_claim_failed", error=str(error))
        self._run_claimed(fut.result() if error is None else [])
        with self._lock:
            again, self._claiming, self._claim_again = self._claim_again, False, False
        if again:
            self._claim()

    def _run_claimed(self, jobs: list[Job]) -> None:
        """Jobs the database started for this node have committed: the dispatcher mirrors
        them and workers run them."""
        for job in jobs:
            seen, exclusive = self._exclusivity(job)
            attempt = self.dispatcher.claimed(seen, exclusive=exclusive)
            with self._lock:
                self._attempts[job.id] = attempt
            self._hand_to_worker(attempt, job)

    def _started_or_not(self, attempt: Attempt, fut: concurrent.futures.Future[Job]) -> None:
        """The start's commit came back (on the store's writer thread)."""
        error = fut.exception()
        if error is not None:
            self._not_started(attempt, error)
            return
        self._hand_to_worker(attempt, fut.result())

    def _hand_to_worker(self, attempt: Attempt, job: Job) -> None:
        """A start has committed: a worker of the pool runs it."""
        try:
            self._submit(self._run, attempt, job)
        except RuntimeError:  # the pool is shut down: the daemon stopped meanwhile
            log.warning("job_start_dropped", job_id=attempt.job_id,
                        reason="the daemon stopped; the next start recovers it")
            self._release(attempt)

    def start_in(self, tx: Any, job: Job) -> Callable[[Job], None] | None:
        """In the transaction that submits ``job`` (the store's ``submit_job_in`` asks):
        take a worker's slot for it when it would be the next to start anyway (a worker
        is free and nothing is queued), and return what the store calls with the job as
        started in the same statement: a worker runs it once the commit holds. None: it
        is queued as usual."""
        if not self._started or self._draining or self.cluster is not None:
            return None
        seen, exclusive = self._exclusivity(job)
        attempt = self.dispatcher.take_new(seen, exclusive=exclusive)
        if attempt is None:
            return None
        self._taken(tx, attempt, queued=False)  # no job is left to queue if it fails
        return lambda started: tx.after_commit.append(
            lambda: self._hand_to_worker(attempt, started))

    def _start_next_in(self, tx: Any, ending: Attempt) -> tuple[Attempt, Job] | None:
        """In the transaction that records ``ending``'s end: start the next job the
        dispatcher picks in its slot (None: none may start; ``ending`` keeps its slot
        until its end commits)."""
        while self._started and not self._draining and self.cluster is None:
            attempt = self.dispatcher.take(instead_of=ending)
            if attempt is None:
                return None
            self._taken(tx, attempt, ending=ending)
            try:
                return attempt, self.store.start_job_in(tx, attempt.job_id)
            except (StateConflict, JobNotFound):
                # cancelled earlier in this same batch (its listener has not run yet): no
                # longer queued, so its slot goes back and the next one is tried
                tx.undo.pop()()
                self.dispatcher.remove(attempt.job_id)
        return None

    def _taken(self, tx: Any, attempt: Attempt, *, ending: Attempt | None = None,
               queued: bool = True) -> None:
        """``attempt`` was taken inside ``tx``: it is the engine's from now on, and if the
        transaction does not commit its slot is freed (the job queued again in its place
        if ``queued``) and ``ending`` keeps its own."""
        with self._lock:
            self._attempts[attempt.job_id] = attempt

        def undo() -> None:
            with self._lock:
                if self._attempts.get(attempt.job_id) is attempt:
                    del self._attempts[attempt.job_id]
            self.dispatcher.put_back(attempt, instead_of=ending, queued=queued)
        tx.undo.append(undo)

    def _not_started(self, attempt: Attempt, error: BaseException) -> None:
        if not isinstance(error, StateConflict):  # else: cancelled between take and start
            log.error("job_start_failed", job_id=attempt.job_id, exc_info=error)
            self._submit_quietly(self._requeue_later, attempt.job_id)
        self._release(attempt)

    def _submit(self, fn: Callable[..., Any], *args: Any) -> None:
        with self._lock:  # reconfigure may swap the pool
            self._pool.submit(fn, *args)

    def _submit_quietly(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            self._submit(fn, *args)
        except RuntimeError:  # the pool is shut down: nothing more is run
            pass

    def _loop(self) -> None:
        """The dispatch thread: dispatch and ``tick`` at each kick and every ``FLUSH_S``,
        and meanwhile log the ends the writer thread handed over (``_tell``)."""
        due = 0.0
        while not self._stopping:
            try:
                chore = self._chores.get(timeout=max(0.0, due - time.monotonic()))
            except queue.Empty:
                chore = None
            if chore is not None:
                _quietly(chore)
                if time.monotonic() < due:
                    continue
            self._dispatch()
            self.tick()
            due = time.monotonic() + FLUSH_S

    def _tell(self, line: Callable[[], None]) -> None:
        """Log ``line`` on the dispatch thread while it runs, else here. An end is taken
        over on the store's writer thread, whose time is every write's: rendering and
        writing the line there cost a tenth of it."""
        if self._started and not self._stopping:
            self._chores.put(line)
        else:
            line()

    def _tell_left(self) -> None:
        """Log the lines handed to the dispatch thread that it did not get to (a stop)."""
        while True:
            try:
                chore = self._chores.get_nowait()
            except queue.Empty:
                return
            if chore is not None:
                _quietly(chore)

    def tick(self, now: float | None = None) -> None:
        """One turn of housekeeping at ``now`` (the engine's clock by default): a running
        job past its time limit is stopped (timeout), changed progress is written, and
        what a job whose supervisor died left behind is killed (at most every ``SWEEP_S``)."""
        now = self.clock() if now is None else now
        if now >= self._sweep_at:  # what a job whose supervisor died left behind
            self._sweep_at = now + SWEEP_S
            orphans.sweep_orphans()
        for ctx in list(self._contexts.values()):
            if ctx.attempt.settled:
                continue  # its end is decided: a deadline passing now changes nothing
            if not ctx.stop_event.is_set() and ctx.attempt.due(now):
                ctx.stop(StopReason.TIMEOUT)  # also a job that never checks ``cancelled``
            ctx.flush()

    # -- running -----------------------------------------------------------------------

    def _run(self, attempt: Attempt, job: Job) -> None:
        """On a worker: run the handler of a job whose start is recorded, and write its end."""
        if self.cluster is not None:  # its log so far may be another node's
            self.cluster.seed_log(job.id)
        ctx = Context(self, job, attempt)
        if job.attempts > 1 and not ctx.joblog.path.exists():
            # the earlier attempts made no log: ``jobs.logs`` told them from the events,
            # and a log that appears now begins with those bytes (offsets already read hold)
            ctx.joblog.begin_with(story(self.store.events(job.id), until=job.attempts))
        ctx.joblog.story(f"attempt {job.attempts} started", job.started_at)
        with self._lock:
            self._contexts[job.id] = ctx
            if self._stopping:
                attempt.request_stop(StopReason.SHUTDOWN)
            # a stop asked for before the job had a context is told now; one from now on
            # goes through the context (``cancel`` finds it under this lock)
            early = attempt.stop, attempt.cancelled_by
        if early[0] is not None:
            ctx.tell_stop(*early)
        ctx.log.debug("job_started", attempt=job.attempts)
        handler = self.handlers.get(job.type)
        result: dict[str, Any] | None = None
        failure: BaseException | None = None
        try:
            if handler is None:
                raise JobFailed(f"type {job.type} is no longer defined (no built-in, plugin or "
                                "[types] entry has that name)")
            if job.cancel_requested or attempt.stop is StopReason.CANCEL:
                ctx.stop(StopReason.CANCEL)
                raise Cancelled("cancel")
            # what the handler's programs log (their groups killed, a supervisor that
            # failed) names the job as the context's own lines do
            with structlog.contextvars.bound_contextvars(job_id=job.id):
                result = handler.run(ctx)
        except Exception as e:  # every end of a handler is recorded below
            failure = e
        self._finish(ctx, result, failure)

    def _finish(self, ctx: Context, result: dict[str, Any] | None,
                failure: BaseException | None) -> None:
        """Decide the end (once) and write it, with the start of the next job in the
        attempt's slot in the same transaction.

        No one waits for the commit (the attempt keeps its slot until then in any case):
        ``_end_committed`` takes it from there on the store's writer thread, so an end
        costs no wake-up of a waiting worker.
        """
        job = ctx.job
        if not ctx.attempt.settle():
            return
        if failure is not None and not isinstance(failure, (JobFailed, Cancelled)):
            ctx.log.error("job_crashed", exc_info=failure)
            failure = JobFailed(f"internal error in the {job.type} handler: "
                                f"{type(failure).__name__}: {failure}")
        handler = self.handlers.get(job.type)
        end, kw = outcome(ctx.attempt.stop, failure,
                          resumable=handler is not None and handler.resumable,
                          result=result, timeout_s=ctx.attempt.timeout_s)
        ctx.flush()
        self._tell_end(ctx, end, kw)
        try:
            written = self.store.write_async(
                lambda tx: self._end_in(tx, ctx, end, kw, start_next=True))
        except Exception as e:  # the store is closed
            self._commit_end(ctx, end, kw, e)
            return
        written.add_done_callback(lambda fut: self._end_written(ctx, end, kw, fut))

    def _end_in(self, tx: Any, ctx: Context, end: JobStatus, kw: dict[str, Any], *,
                start_next: bool) -> None:
        """Write the attempt's end in ``tx`` (``start_next``: with the start of the next
        job the dispatcher hands its slot to); once the commit holds, the first of this
        write's hooks ends the attempt, so that no one who hears of the end (the commit's
        listeners, a ``jobs.wait``, ``admin.stats``) finds its slot still taken."""
        hooks = len(tx.after_commit)
        done = self._write_end_in(tx, ctx.job.id, end, kw)
        if done.status is not end:  # a cancel asked just before the end: it ends cancelled
            self._tell_end(ctx, done.status, {"message": done.message})
        if self.cluster is not None:
            claimed = self._claim_next_in(tx) if start_next else []
            tx.after_commit.insert(hooks, lambda: self._end_claimed(ctx, done, claimed))
            return
        following = self._start_next_in(tx, ctx.attempt) if start_next else None
        tx.after_commit.insert(hooks, lambda: self._end_committed(ctx, done, following))

    def _end_committed(self, ctx: Context, done: Job,
                       following: tuple[Attempt, Job] | None) -> None:
        """An attempt's end has committed (on the store's writer thread, before the
        commit's listeners): the attempt is over and the job started in its slot goes to
        a worker."""
        self._ended(ctx, done)
        if following is not None:
            self._hand_to_worker(*following)

    def _claim_next_in(self, tx: Any) -> list[Job]:
        """Cluster mode, in the transaction that records an attempt's end: claim the slot
        it frees (the end is written first, so the claim's count of this node's running
        jobs no longer holds it). Not while nothing is queued as far as this node knows:
        the claim after the end commits (``_release``) looks in any case."""
        if not self._started or self._draining or self.dispatcher.queued_count() == 0:
            return []
        return self.cluster.claim_in(tx, 1)

    def _end_claimed(self, ctx: Context, done: Job, claimed: list[Job]) -> None:
        """Cluster mode: an attempt's end and the claim of its slot have committed. The
        jobs claimed take their slots before the ended attempt frees its own, so that the
        claim that follows the end (``_release``) finds no slot free that is not."""
        self._run_claimed(claimed)
        self._ended(ctx, done)

    def _end_written(self, ctx: Context, end: JobStatus, kw: dict[str, Any],
                     written: concurrent.futures.Future[None]) -> None:
        """The commit of an attempt's end came back (on the store's writer thread): an
        end that failed is committed again on a worker, which waits for storage as long
        as it takes (one that held was taken over by ``_end_committed``)."""
        error = written.exception()
        if error is None:
            return
        if isinstance(error, (StateConflict, JobNotFound)):
            ctx.log.warning("job_end_unrecorded", end=str(end), error=str(error))
            self._ended(ctx, None)
        else:  # storage unavailable, or a refusal
            try:
                self._submit(self._commit_end, ctx, end, kw, error)
            except RuntimeError:  # the pool is shut down: the daemon stops
                self._end_lost(ctx, error)

    def _tell_end(self, ctx: Context, end: JobStatus, kw: dict[str, Any]) -> None:
        """The closing story line, before the commit: a reader seeing the end sees it told."""
        told = end_story(end, kw.get("error") or kw.get("message"))
        if told != ctx.ended:
            ctx.ended = told
            ctx.joblog.story(told)

    def _end_lost(self, ctx: Context, error: BaseException) -> None:
        """The daemon stops while the end waits to be committed: the job stays running in
        the store and the next start recovers it; its slot is free all the same."""
        ctx.log.error("job_finish_failed", exc_info=error)
        self._ended(ctx, None)

    def _commit_end(self, ctx: Context, end: JobStatus, kw: dict[str, Any],
                    error: BaseException) -> None:
        """Commit an end whose first write failed with ``error``, on the worker (waiting
        for storage holds it, as the attempt holds its slot).

        Storage that is unavailable is waited for, however long (until the daemon stops),
        with backoff. An end the store refuses otherwise is recorded as a sanitised
        failure instead, and if that is refused too, as a failure of fixed text, retried
        with the same backoff: a job is never left running without a worker.
        """
        delay = RETRY_S
        refusals = 0
        while True:
            if self._stopping:
                self._end_lost(ctx, error)
                return
            if isinstance(error, StorageUnavailable):
                ctx.log.warning("job_end_pending", end=str(end), error=str(error),
                                retry_in_s=delay)
                if delay == RETRY_S:
                    ctx.show_pending(end, str(error))
                wait = True
            else:
                refusals += 1
                ctx.log.error("job_end_refused", end=str(end), refusals=refusals,
                              exc_info=error)
                end, kw = JobStatus.FAILED, {"error": _refused_text(end, kw, error, refusals)}
                wait = refusals > 1  # the sanitised failure is tried at once
            if wait:
                ctx.wake.wait(delay)
                ctx.wake.clear()
                delay = min(delay * 2, RETRY_MAX_S)
            self._tell_end(ctx, end, kw)
            try:
                self.store.write_async(
                    lambda tx: self._end_in(tx, ctx, end, kw, start_next=False)).result()
            except (StateConflict, JobNotFound) as e:
                ctx.log.warning("job_end_unrecorded", end=str(end), error=str(e))
                self._ended(ctx, None)
                return
            except Exception as e:
                error = e
                continue
            return

    def _ended(self, ctx: Context, done: Job | None) -> None:
        """The attempt is over (its end recorded, or nothing left to record): one log
        line, its slot freed, the next job started."""
        if done is not None:
            self._tell(functools.partial(
                ctx.log.info, _END_EVENTS[done.status], attempt=ctx.attempt.number,
                error=done.error, seconds=round(self.clock() - ctx.live.started, 3)))
        ctx.joblog.close()
        self._release(ctx.attempt)
        with self._lock:
            if self._contexts.get(ctx.job.id) is ctx:  # a retry may already run it anew
                del self._contexts[ctx.job.id]

    def _release(self, attempt: Attempt) -> None:
        """Free the attempt's slot (only its own: a retry of the job may hold another)."""
        with self._lock:
            if self._attempts.get(attempt.job_id) is attempt:
                del self._attempts[attempt.job_id]
        self.dispatcher.finish(attempt)
        self._dispatch()

    def _write_start(self, job_id: str) -> concurrent.futures.Future[Job]:
        return self.store.start_job_async(job_id)

    def _write_end_in(self, tx: Any, job_id: str, end: JobStatus, kw: dict[str, Any]) -> Job:
        if end is JobStatus.QUEUED:
            return self.store.requeue_job_in(tx, job_id, reason=kw["message"])
        return self.store.finish_job_in(tx, job_id, end, **kw)

    def _requeue_later(self, job_id: str) -> None:
        """A job that could not be started stays queued in the store: keep it in the queue."""
        try:
            job = self.store.get_job(job_id)
        except Exception:
            log.exception("job_requeue_failed", job_id=job_id)
            return
        if job.status is JobStatus.QUEUED:
            self._enqueue(job)

    # -- answers for the manager ---------------------------------------------------------

    def cancel(self, job_id: str, actor: str | None = None) -> None:
        """Stop a running job's handler and process group (now, or as soon as it starts);
        ``actor``, who asked, is told in its log."""
        with self._lock:
            ctx = self._contexts.get(job_id)
            attempt = self._attempts.get(job_id)
            if attempt is None:
                return  # no worker holds it: nothing to stop
            if ctx is None or ctx.attempt is not attempt:
                attempt.request_stop(StopReason.CANCEL, actor)  # told once it starts (_run)
                return
        ctx.stop(StopReason.CANCEL, actor)

    def positions(self, job_ids: list[str]) -> dict[str, tuple[int | None, str | None]]:
        """Queued jobs' places and wait reasons, counted at once (a list page)."""
        return self.dispatcher.positions(job_ids)

    def annotate(self, out: dict[str, Any],
                 places: dict[str, tuple[int | None, str | None]] | None = None
                 ) -> dict[str, Any]:
        """Add to a stored job's wire shape what only the daemon knows: a running job's
        live progress, phase, message, version and ETA; a queued one's place and why it
        waits (from ``places`` when they hold it: ``positions``)."""
        if out["status"] == JobStatus.RUNNING:
            ctx = self._contexts.get(out["id"])
            if ctx is not None:
                live = ctx.snapshot()
                # memory is ahead of the database (a flush may commit older values under a
                # newer version): its values, with whichever version is higher
                out.update(progress=round(live.progress, 2), phase=live.phase,
                           message=live.message, version=max(live.version, out["version"]),
                           eta_s=live.eta_s(self.clock()))
            elif self.cluster is not None:  # run by another node
                self.cluster.annotate(out)
        elif out["status"] == JobStatus.QUEUED:
            known = None if places is None else places.get(out["id"])
            out["queue_position"], out["wait_reason"] = (
                known if known is not None else self.dispatcher.position(out["id"]))
        return out

    def stats(self) -> dict[str, Any]:
        """What runs and waits: ``running`` (on every node), ``running_here`` (on this one),
        ``queued``, ``workers``, ``per_user`` (user -> running and queued counts) and
        ``paused``."""
        d = self.dispatcher
        return {"running": d.running_everywhere(), "running_here": d.running_count(),
                "queued": d.queued_count(), "workers": d.workers, "per_user": d.per_user(),
                "paused": d.paused}

    def live(self, job_id: str) -> Live | None:
        ctx = self._contexts.get(job_id)
        return ctx.live if ctx is not None else None


#: the one log line of an attempt's end, by the status it was recorded with
_END_EVENTS = {JobStatus.COMPLETED: "job_completed", JobStatus.FAILED: "job_failed",
               JobStatus.CANCELLED: "job_cancelled", JobStatus.QUEUED: "job_requeued"}
