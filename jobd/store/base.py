"""The store's rules, once for every backend: the transitions, listing, events, cleanup.

One method and one named query per transition (``submit_job``, ``start_job``,
``finish_job``, ``cancel_job``, ``retry_job``, ``requeue_job``): each is one
compare-and-set ``UPDATE … WHERE id = ? AND status …`` with its event row, with no read
of the status before it; a refused one raises ``JobNotFound`` or ``StateConflict``. The
rules a submit or retry must pass (``jobd.rules``) run inside the writer's transaction.
Submit, start, finish and requeue also have an ``*_in(tx, …)`` form, run inside a
caller's ``write_async``: the engine composes an attempt's end with the next start in
one transaction, and a submit that a worker takes at once (``submit_job_in``'s ``start``)
is written running by the submit's own statement (the store knows no dispatch rule).

``BaseStore`` holds all of that over ``tx.run(name, **params)`` (each backend's
``queries.sql`` has the same names) and a few reads (``_all``, ``_one``); a backend
(``sqlite.SqliteStore``, ``postgres.PostgresStore``) opens and closes its database,
gives the writer its driver, and keeps the queued counts the limits are checked
against (``_count_queued``, ``_queued_in``).

Timestamps are integer microseconds since the epoch. ``seq`` is insertion order:
``jobs.list`` pages newest first by it, so jobs sharing a ``created_at`` still page
exactly. A job's ``version`` rises on every change and never goes down: on SQLite it is
``max(version + 1, now)``, which, tied to the clock, stays above any value handed out
before a crash; on PostgreSQL the nodes' clocks may differ, so it comes from one logged
sequence (``Tx.version``, ``jobd_next_version``).
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import math
import time
from typing import (Any, Callable, Collection, ContextManager, Iterator, Mapping, Protocol,
                    Sequence, TypeVar)

import structlog

from jobd import jsonenc
from jobd.metrics import Histogram
from jobd.models import TERMINAL, Job, JobStatus, readable
from jobd.rules import Rules, fold_options
from jobd.store.errors import Fenced, JobNotFound, StateConflict, StoreClosed
from jobd.store.interface import FINISHED_KEEP_US, HOUR_US
from jobd.store.writer import Tx, Writer

__all__ = ["BaseStore", "CLEANUP_CHUNK", "Listeners", "WEIGHT_BYTES", "now_us", "weight"]

log = structlog.get_logger()
T = TypeVar("T")


def now_us() -> int:
    return time.time_ns() // 1000


#: a job's weight against max_stored_per_user: 1, plus 1 per this many bytes it carries
WEIGHT_BYTES = 4096
#: at most this many of a user's oldest finished jobs go in one write (the rest, next time)
_EXCESS_CHUNK = 250
#: cleanup deletes this many jobs per transaction at most; each chunk is sized to take
#: about _CHUNK_S with its commit, by the time its predecessor took a job (a write waiting
#: behind a chunk waits that long; SPEC §9 allows a transaction 50 ms)
CLEANUP_CHUNK = 1000
_FIRST_CHUNK = 250
_CHUNK_S = 0.015

_STATUS = {str(s): s for s in JobStatus}
#: a submit's offer to start its job at once (``submit_job_in``): what to call with the
#: job as started, or None to leave it queued
Start = Callable[[Tx, Job], Callable[[Job], None] | None]
_NO_RULES = Rules()


def _job(row: Sequence[Any]) -> Job:
    options, metadata, result = json.loads(row[10])
    return Job(
        seq=row[0], id=row[1], type=row[2], user_id=row[3], project_id=row[4],
        status=_STATUS[row[5]], progress=row[6], phase=row[7], message=row[8],
        priority=row[9], options=options, metadata=metadata, result=result, error=row[11],
        attempts=row[12], recoveries=row[13], cancel_requested=bool(row[14]),
        version=row[15], description=row[16], timeout_s=row[17], idempotency_key=row[18],
        created_at=row[19], started_at=row[20], completed_at=row[21], updated_at=row[22],
    )


#: compact JSON, its encoder made once (``jobd.jsonenc``); NaN and infinities are refused:
#: SQLite's JSON functions and PostgreSQL's ``json`` refuse them, and every listing of a
#: row holding one would fail
_encode = jsonenc.encoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _dumps(value: Any) -> str:
    try:
        text = _encode(value)
    except ValueError:  # a non-finite number (clients' are refused; a program's result)
        return _encode(_clean(_finite(value)))
    if _text(text) is text:
        return text
    # a lone surrogate somewhere: escape it in the text itself, so the stored JSON decodes
    # to valid text again (an escaped surrogate would decode back into a surrogate)
    return _encode(_clean(value))


def _finite(value: Any) -> Any:
    """``value`` with every NaN and infinite number replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        return _text(value)
    if isinstance(value, dict):
        return {_clean(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


#: every text the store writes passes through here (valid UTF-8, SQLite's condition)
_text = readable


def _opt_text(value: str | None) -> str | None:
    return None if value is None else _text(value)


def weight(options: str, metadata: str, description: str | None) -> int:
    """What a job counts against ``max_stored_per_user``: 1, plus 1 per 4 KiB it carries."""
    size = len(options.encode()) + len(metadata.encode()) + len((description or "").encode())
    return 1 + size // WEIGHT_BYTES


def _conditions(param: Callable[[str], str], *, job_id: str | None = None, ids: Sequence[str] | None = None,
                statuses: Sequence[str] = (), types: Sequence[str] = (),
                user_id: str | None = None, project_id: str | None = None,
                created_after: int | None = None, created_before: int | None = None,
                id_prefix: str | None = None, exclude_types: Sequence[str] = ()
                ) -> tuple[list[str], dict[str, Any]]:
    """The WHERE terms and their named arguments of the job filters every selection
    shares (jobs.list, and the filtered cancel and retry); ``param`` writes a named
    argument as the backend's SQL does (``:name``, ``%(name)s``)."""
    where: list[str] = []
    args: dict[str, Any] = {}

    def some(column: str, values: Sequence[str], name: str, negated: bool = False) -> None:
        names = [param(f"{name}{n}") for n in range(len(values))]
        where.append(f"{column} {'NOT IN' if negated else 'IN'} ({', '.join(names) or 'NULL'})")
        args.update({f"{name}{n}": v for n, v in enumerate(values)})

    if job_id is not None:
        where.append(f"id = {param('job_id')}")
        args["job_id"] = job_id
    if ids is not None:
        some("id", ids, "id")
    if statuses:
        some("status", statuses, "status")
    if types:
        some("type", types, "type")
    for column, value in (("user_id", user_id), ("project_id", project_id)):
        if value is not None:
            where.append(f"{column} = {param(column)}")
            args[column] = value
    if created_after is not None:
        where.append(f"created_at >= {param('created_after')}")
        args["created_after"] = created_after
    if created_before is not None:
        where.append(f"created_at < {param('created_before')}")
        args["created_before"] = created_before
    if id_prefix:
        where.append(f"id >= {param('prefix_low')} AND id < {param('prefix_high')}")
        args.update(prefix_low=id_prefix, prefix_high=id_prefix + "\U0010ffff")
    if exclude_types:
        some("type", exclude_types, "not_type", negated=True)
    return where, args


@dataclasses.dataclass(frozen=True)
class Listeners:
    """Listeners the store calls after a commit (the engine's dispatcher and the waiters)."""

    changed: Callable[[Job], None] = lambda job: None
    #: ids of jobs deleted (retention, max_stored_per_user): their files may go
    deleted: Callable[[list[str]], None] = lambda job_ids: None


class _View:
    """What ``jobd.rules`` sees of the store inside one write (``rules.View``)."""

    def __init__(self, store: BaseStore, tx: Tx) -> None:
        self.store, self.tx = store, tx

    def by_idempotency_key(self, user_id: str, key: str) -> Job | None:
        row = self.tx.run("find_by_idempotency_key", user_id=user_id, key=key).fetchone()
        return None if row is None else _job(row)

    def same_work(self, job: Job, work: str, *, running: bool) -> Job | None:
        row = self.tx.run("find_queued_work", user_id=job.user_id, work=work,
                          seq=job.seq or -1, running=running).fetchone()
        return None if row is None else _job(row)

    def queued(self, user_id: str | None = None) -> int:
        return self.store._queued_in(self.tx, user_id)

    def fold(self, found: Job, job: Job) -> Job:
        row = self.tx.run("fold_job", seq=found.seq, options=_dumps(fold_options(found, job)),
                          priority=max(found.priority, job.priority),
                          idempotency_key=job.idempotency_key).fetchone()
        if found.idempotency_key is not None and job.idempotency_key is not None:
            self.tx.run("keep_folded_key", user_id=job.user_id, key=job.idempotency_key,
                        seq=found.seq)
        return self.store._changed(self.tx, _job(row))


class Sweeps(Protocol):
    """What a long sweep of deletes (cleanup, purge) tells the backend: it runs (``held``)
    and it is between two chunks (``catch_up``); SQLite's checkpointer listens."""

    def held(self) -> ContextManager[None]: ...
    def catch_up(self) -> None: ...


class _NoSweeps:
    def held(self) -> ContextManager[None]:
        return contextlib.nullcontext()

    def catch_up(self) -> None:
        pass


_NO_SWEEPS = _NoSweeps()


def next_chunk_size(size: int, took: float, bound: int) -> int:
    """The size of a cleanup's next chunk after one of ``size`` jobs took ``took`` seconds
    with its commit: in proportion to how far that was from ``_CHUNK_S``, but by half or
    double at most (one slow commit, an fsync stalled, is not a trend), never past
    ``bound`` and never under 50 jobs (or ``bound``, if lower: a floor above it would
    make a chunk larger than asked for)."""
    aimed = int(size * _CHUNK_S / max(took, 1e-6))
    return max(min(50, bound), min(bound, size * 2, max(size // 2, aimed)))


class BaseStore(abc.ABC):
    """Jobs, their events and checkpoints: the rules, whatever the database."""

    #: the backend's named queries (the same names in every backend)
    queries: Mapping[str, str]
    #: jobs.list's orders by time: the sort key of each (newest first; -1, no time, last)
    order_keys: Mapping[str, str]
    #: a named argument as the backend's SQL writes it
    _param: Callable[[str], str]
    #: the backend's error for a unique key refused (a submit's id taken)
    _integrity: type[Exception]

    def __init__(self, *, clock: Callable[[], int] = now_us,
                 listeners: Listeners | None = None,
                 max_stored_per_user: int | None = None) -> None:
        #: finished jobs' weight kept per user (None: no limit); reloadable
        self.max_stored_per_user = max_stored_per_user
        self.clock = clock
        self.listeners = listeners or Listeners()
        self.was_clean = True
        self._writer: Writer | None = None

    # -- what a backend provides ---------------------------------------------------------

    @abc.abstractmethod
    def _all(self, sql: str, params: Mapping[str, Any] | None = None) -> list[Any]:
        """The rows of a read, on a reading connection (never waits for the writer)."""

    @abc.abstractmethod
    def _one(self, sql: str, params: Mapping[str, Any] | None = None) -> Any:
        """The first row of a read, or None."""

    @abc.abstractmethod
    def _duplicate(self, e: Exception, job_id: str) -> Exception:
        """A unique key refused on inserting ``job_id``, as the store's exception."""

    @abc.abstractmethod
    def _count_queued(self, tx: Tx, user_id: str, delta: int) -> None:
        """``user_id`` has ``delta`` more queued jobs (the write has just made it so)."""

    @abc.abstractmethod
    def _queued_in(self, tx: Tx, user_id: str | None) -> int:
        """What the queue limits are checked against inside a write: how many jobs
        ``user_id`` (None: everyone) has queued, this write's changes included."""

    def _sweeps(self) -> Sweeps:
        """What a cleanup or purge holds meanwhile, and asks between two of its chunks."""
        return _NO_SWEEPS

    def _optimize(self) -> None:
        """Upkeep's own part for the backend (planner statistics, the journal)."""

    # -- plumbing ------------------------------------------------------------------------

    @property
    def longest_write_s(self) -> float:
        """The longest write transaction so far."""
        return self._writer.longest_tx_s if self._writer else 0.0

    def write_times(self) -> Histogram | None:
        """How long the write transactions took since the store opened (``admin.metrics``);
        None while it is closed."""
        return self._writer.times if self._writer else None

    def write(self, fn: Callable[[Tx], T]) -> T:
        """Run ``fn`` in the next group-committed transaction; return once it is durable."""
        return self.write_async(fn).result()

    def write_async(self, fn: Callable[[Tx], T]) -> concurrent.futures.Future[T]:
        if self._writer is None:
            raise StoreClosed()
        return self._writer.submit(fn)

    def write_on(self, loop: asyncio.AbstractEventLoop, fn: Callable[[Tx], T]
                 ) -> asyncio.Future[T]:
        """``write_async`` for a caller on ``loop``: the answers of one commit reach the
        loop in one wake-up."""
        if self._writer is None:
            raise StoreClosed()
        return self._writer.submit_on(loop, fn)

    def upkeep(self, now: int | None = None) -> None:
        """Database housekeeping: drop the hourly finished counts past ``FINISHED_KEEP_US``,
        and the backend's own (``_optimize``)."""
        now = now if now is not None else time.time_ns() // 1000
        def prune(tx: Tx) -> None:
            for query in ("prune_finished", "prune_finished_days"):
                tx.run(query, hour=(now - FINISHED_KEEP_US) // HOUR_US)
        self.write(prune)
        self._optimize()

    def _cas(self, tx: Tx, query: str, job_id: str, wanted: str, **params: Any) -> Job:
        """Run the transition ``query`` on ``job_id``: the job as changed, or (no row
        matched) JobNotFound or StateConflict naming its status now."""
        row = tx.run(query, job_id=job_id, **params).fetchone()
        if row is not None:
            return _job(row)
        now = tx.run("job_status", job_id=job_id).fetchone()
        if now is None:
            raise JobNotFound(job_id)
        raise StateConflict(job_id, now[0], wanted)

    def _event(self, tx: Tx, job: Job, actor: str, message: str | None = None) -> None:
        tx.run("add_event", seq=job.seq, status=str(job.status), phase=_opt_text(job.phase),
               progress=job.progress,
               message=_opt_text(message if message is not None else job.message),
               actor=_text(actor))

    def _changed(self, tx: Tx, job: Job) -> Job:
        """Tell the listener of ``job`` once the commit holds, unless a later write of the
        same commit changed it again (a job submitted and started at once is told once,
        running): the listener acts on the state the commit left."""
        latest, before = tx.latest, tx.latest.get(job.id)
        latest[job.id] = job

        def told() -> None:
            if latest.get(job.id) is job:
                self.listeners.changed(job)

        def undone() -> None:  # the write's savepoint rolled back: the state before it stands
            if before is None:
                latest.pop(job.id, None)
            else:
                latest[job.id] = before
        tx.after_commit.append(told)
        tx.undo.append(undone)
        return job

    def _ended(self, tx: Tx, job: Job) -> None:
        """A job has just ended: past max_stored_per_user, its user's oldest go."""
        if self.max_stored_per_user is not None:
            self._forget_excess(tx, job.user_id, self.max_stored_per_user, keep_seq=job.seq)

    # -- the transitions -----------------------------------------------------------------

    def submit_job(self, job: Job, *, actor: str, rules: Rules = _NO_RULES) -> tuple[Job, bool]:
        """Record ``job`` (``created``, then ``queued``, in one transaction), once
        ``rules`` admit it. Returns ``(job, deduplicated)``: the job as stored, or the
        stored job the rules folded the submit into (an idempotent resend, same work)."""
        return self.submit_job_async(job, actor=actor, rules=rules).result()

    def submit_job_async(self, job: Job, *, actor: str, rules: Rules = _NO_RULES
                         ) -> concurrent.futures.Future[tuple[Job, bool]]:
        """``submit_job`` for a caller that waits on a future rather than blocking."""
        return self.write_async(lambda tx: self.submit_job_in(tx, job, actor, rules))


    def submit_job_in(self, tx: Tx, job: Job, actor: str, rules: Rules = _NO_RULES,
                      start: Start | None = None) -> tuple[Job, bool]:
        """``submit_job``'s statements inside a caller's write (``write_async``).

        ``start(tx, job)``, asked once the rules admit the job, may take a worker for it
        at once (the engine's ``start_in``): it returns what to call with the job as
        started, and the row is written running in the same statement, its ``running``
        event with it (``start_job``'s change without its second write). The job is
        returned as queued either way, as the submit left it before its start.
        """
        description, key = _opt_text(job.description), _opt_text(job.idempotency_key)
        if description is not job.description or key is not job.idempotency_key:
            # only when a lone surrogate was replaced: a copy of a Job costs ~10 µs a submit
            job = dataclasses.replace(job, description=description, idempotency_key=key)
        found = rules.admit(job, _View(self, tx))
        if found is not None:
            return found, True
        options, metadata = _dumps(job.options), _dumps(job.metadata)
        started = None if start is None else start(tx, job)
        try:
            seq = tx.insert("submit_job", id=job.id, type=job.type, user_id=job.user_id,
                         project_id=job.project_id, priority=job.priority, options=options,
                         metadata=metadata, description=job.description,
                         timeout_s=job.timeout_s, idempotency_key=job.idempotency_key,
                         weight=weight(options, metadata, job.description),
                         work=rules.work(job), started=int(started is not None))
        except self._integrity as e:
            raise self._duplicate(e, job.id) from None
        tx.run("submit_events", seq=seq, actor=_text(actor), started=int(started is not None))
        stored = dataclasses.replace(job, seq=seq, status=JobStatus.QUEUED, version=tx.version,
                                     created_at=tx.now, updated_at=tx.now)
        if started is None:
            self._count_queued(tx, job.user_id, +1)
            return self._changed(tx, stored), False
        running = dataclasses.replace(stored, status=JobStatus.RUNNING, attempts=1,
                                      started_at=tx.now, version=tx.version + 1)
        started(self._changed(tx, running))
        return stored, False

    def start_job(self, job_id: str) -> Job:
        """queued -> running: a new attempt."""
        return self.start_job_async(job_id).result()

    def start_job_async(self, job_id: str) -> concurrent.futures.Future[Job]:
        return self.write_async(lambda tx: self.start_job_in(tx, job_id))

    def start_job_in(self, tx: Tx, job_id: str) -> Job:
        """``start_job`` inside a caller's write: the engine starts the next job in the
        transaction that ends one, or that submits it."""
        job = self._cas(tx, "start_job", job_id, "running")
        self._event(tx, job, "jobd")
        self._count_queued(tx, job.user_id, -1)
        return self._changed(tx, job)

    def finish_job(self, job_id: str, status: JobStatus, *, error: str | None = None,
                   message: str | None = None, result: dict[str, Any] | None = None) -> Job:
        """running -> completed | failed | cancelled; a job whose cancel was requested
        ends cancelled, whatever ``status`` says."""
        return self.write(lambda tx: self.finish_job_in(
            tx, job_id, status, error=error, message=message, result=result))

    def finish_job_in(self, tx: Tx, job_id: str, status: JobStatus, *,
                      error: str | None = None, message: str | None = None,
                      result: dict[str, Any] | None = None) -> Job:
        """``finish_job`` inside a caller's write."""
        if status not in TERMINAL:
            raise ValueError(f"finish_job ends a job: {status} is not an end")
        message, error = _opt_text(message), _opt_text(error)
        job = self._cas(tx, "finish_job", job_id, str(status), status=str(status),
                        message=message, error=error,
                        result=None if result is None else _dumps(result))
        told = message if message is not None else error
        self._event(tx, job, "jobd", "cancelled" if job.status is not status else told)
        self._ended(tx, job)
        return self._changed(tx, job)

    def cancel_job(self, job_id: str, *, actor: str) -> Job:
        """queued -> cancelled; a running job gets its cancel requested (the engine stops
        it). A job already cancelled or stopping is a StateConflict."""
        return self.write(lambda tx: self._cancel(tx, job_id, actor))

    def _cancel(self, tx: Tx, job_id: str, actor: str) -> Job:
        job = self._cas(tx, "cancel_job", job_id, "cancelled")
        if job.status is JobStatus.CANCELLED:
            self._event(tx, job, actor, "cancelled")
            self._count_queued(tx, job.user_id, -1)
            self._ended(tx, job)
        else:
            self._event(tx, job, actor, "cancel requested")
        return self._changed(tx, job)

    def retry_job(self, job_id: str, *, actor: str, rules: Rules = _NO_RULES) -> Job:
        """failed | cancelled -> queued, once ``rules`` allow it: a fresh attempt."""
        return self.write(lambda tx: self._retry(tx, job_id, actor, rules))

    def _retry(self, tx: Tx, job_id: str, actor: str, rules: Rules | None) -> Job:
        job = self._cas(tx, "retry_job", job_id, "queued")
        if rules is not None:
            rules.retry([job], _View(self, tx))
        tx.run("clear_checkpoints", seq=job.seq)
        self._event(tx, job, actor, "retried")
        self._count_queued(tx, job.user_id, +1)
        return self._changed(tx, job)

    def requeue_job(self, job_id: str, *, reason: str, recovered: bool = False) -> Job:
        """running -> queued when the daemon stops or restarts (``recovered``: after a
        crash): phase, progress and checkpoints are kept to resume from."""
        return self.write(lambda tx: self.requeue_job_in(tx, job_id, reason=reason,
                                                         recovered=recovered))

    def requeue_job_in(self, tx: Tx, job_id: str, *, reason: str,
                       recovered: bool = False) -> Job:
        """``requeue_job`` inside a caller's write. A job whose cancel was requested since
        its attempt chose to be requeued (a shutdown's stop, then a cancel) ends cancelled
        instead, as SPEC §3 says such a job does."""
        reason = _text(reason)
        try:
            job = self._cas(tx, "requeue_job", job_id, "queued", reason=reason,
                            recovered=int(recovered))
        except Fenced:
            raise
        except StateConflict as e:
            if e.status != JobStatus.RUNNING:
                raise
            return self.finish_job_in(tx, job_id, JobStatus.CANCELLED)
        self._event(tx, job, "jobd", reason)
        self._count_queued(tx, job.user_id, +1)
        return self._changed(tx, job)

    # -- cancel and retry of every job a filter matches ---------------------------------

    def cancel_jobs(self, *, actor: str, limit: int, dry_run: bool = False,
                    **filters: Any) -> tuple[list[Job], bool]:
        """``cancel_job`` of each active job matching ``filters``, in one transaction.
        Jobs already stopping are not matched again.

        Returns (the jobs as they are now, oldest first, at most ``limit``; whether more
        matched). With ``dry_run`` nothing changes and the jobs are returned as found.
        """
        def fn(tx: Tx) -> tuple[list[Job], bool]:
            rows, more = self._matching(
                tx, "(status = 'queued' OR status = 'running' AND cancel_requested = 0)",
                limit, filters)
            if dry_run:
                return rows, more
            return [self._cancel(tx, job.id, actor) for job in rows], more
        return self.write(fn)

    def retry_jobs(self, *, actor: str, limit: int, rules: Rules = _NO_RULES,
                   dry_run: bool = False, **filters: Any) -> tuple[list[Job], bool]:
        """``retry_job`` of each failed or cancelled job matching ``filters``, in one
        transaction: all of them or, when ``rules`` refuse (a user's queue limit), none;
        but a job of work already queued or running, or of the work of a newer one
        retried here, is left as it is (``Rules.retry``'s fold). Returns as
        ``cancel_jobs`` does."""
        def fn(tx: Tx) -> tuple[list[Job], bool]:
            after = None
            while True:
                rows, more = self._matching(tx, "status IN ('failed', 'cancelled')", limit,
                                            filters, after_seq=after)
                kept = rules.retry(rows, _View(self, tx), fold=True)
                # all of them left out (their work is queued): they stay as they match, so
                # the next call would see them again; the next of them are looked at now
                if kept or not more:
                    break
                after = rows[-1].seq
            if dry_run:
                return kept, more
            return [self._retry(tx, job.id, actor, None) for job in kept], more
        return self.write(fn)

    def _matching(self, tx: Tx, state: str, limit: int, filters: dict[str, Any], *,
                  after_seq: int | None = None) -> tuple[list[Job], bool]:
        """Up to ``limit`` jobs in ``state`` matching ``filters``, oldest first (after
        ``after_seq``); and whether more matched."""
        where, args = _conditions(self._param, **filters)
        if after_seq is not None:
            where.append(f"seq > {self._param('after_seq')}")
            args["after_seq"] = after_seq
        where.append(state)
        rows = tx.conn.execute(self.queries["matching_jobs"].format(where=" AND ".join(where)),
                               dict(args, limit=limit + 1)).fetchall()
        return [_job(r) for r in rows[:limit]], len(rows) > limit

    # -- a running job's progress, process and checkpoints -------------------------------

    def next_version(self, previous: int) -> int:
        """The version after ``previous``: what every write stores (``max(version + 1, now)``)."""
        return max(previous + 1, self.clock())

    def update_progress(self, job_id: str, *, progress: float, phase: str | None,
                        message: str | None, actor: str | None = None
                        ) -> concurrent.futures.Future[Job | None]:
        """Store a running job's latest progress; with ``actor`` (a phase change) also an event.

        Returns a future: progress ticks are not worth waiting for.
        """
        def fn(tx: Tx) -> Job | None:
            row = tx.run("update_progress", job_id=job_id, progress=progress,
                         phase=_opt_text(phase), message=_opt_text(message)).fetchone()
            if row is None:
                return None
            job = _job(row)
            if actor is not None:
                self._event(tx, job, actor)
            self._progressed(tx, job)
            return job
        return self.write_async(fn)

    def _progressed(self, tx: Tx, job: Job) -> None:
        """A running job's progress was written in ``tx`` (no listener is told of it): a
        backend that tells other processes (PostgreSQL's cluster nodes) does so here."""

    def set_process(self, job_id: str, pgid: int | None, start: int | None) -> None:
        """Record (or clear) the process group a running job's subprocess lives in."""
        self.write(lambda tx: tx.run("set_process", job_id=job_id, pgid=pgid, start=start))

    def processes(self) -> list[tuple[str, int, int | None]]:
        """(job id, pgid, start time) of every running job with a recorded process group."""
        return self._all(self.queries["processes"])

    def save_checkpoint(self, job_id: str, phase: str, data: dict[str, Any]) -> None:
        self.write(lambda tx: tx.run("save_checkpoint", job_id=job_id, phase=phase,
                                     data=_dumps(data)))

    def load_checkpoints(self, job_id: str) -> dict[str, dict[str, Any]]:
        return {phase: json.loads(data) for phase, data in self._all(
            self.queries["load_checkpoints"], {"job_id": job_id})}

    # -- reading -------------------------------------------------------------------------

    def get_job(self, job_id: str) -> Job:
        row = self._one(self.queries["get_job"], {"job_id": job_id})
        if row is None:
            raise JobNotFound(job_id)
        return _job(row)

    def list_jobs(self, **filters: Any) -> list[Job]:
        """Jobs matching every given filter, newest first, from ``before_seq`` (keyset).

        Filters: ``statuses``, ``types``, ``user_id``, ``project_id``, ``created_after``,
        ``created_before``, ``id_prefix``, ``ids``, ``before_seq``, ``limit`` (default 50).
        """
        return [_job(r[2:]) for r in self._list(self.queries["job_columns"], **filters)]

    def list_wire(self, **filters: Any) -> list[tuple[int, int, str, str]]:
        """``list_jobs`` as ``(sort key, seq, status, the job's wire JSON)``, encoded by
        the database; ``order`` (``order_keys``) and ``before`` (the (key, seq) of the previous
        page's last job) page by another time than creation."""
        return self._list(f"status, {self.queries['job_wire']}", **filters)

    def list_ids(self, **filters: Any) -> list[tuple[int, str]]:
        """The (seq, id) of every job matching ``filters`` (as ``list_jobs``), newest first."""
        return [(r[1], r[2]) for r in self._list("id", limit=-1, **filters)]

    def get_jobs(self, job_ids: list[str]) -> list[Job]:
        """The stored ones of ``job_ids``, in no set order (one lookup by the id index each)."""
        return [_job(r) for r in self._all(self.queries["get_jobs"],
                                           {"ids": json.dumps(job_ids)})]

    def known_ids(self, job_ids: list[str]) -> set[str]:
        """Which of ``job_ids`` are stored jobs (one lookup by the id index each)."""
        return {r[0] for r in self._all(self.queries["known_ids"],
                                        {"ids": json.dumps(job_ids)})}

    def count_jobs(self, cap: int, **filters: Any) -> int:
        """How many jobs match ``filters`` (as ``list_jobs``), counted no further than ``cap``
        (the scan stops there, so a count costs at most ``cap`` index rows)."""
        where, args = _conditions(self._param, **filters)
        sql = self.queries["count_jobs"].format(
            where=f"WHERE {' AND '.join(where)}" if where else "")
        return self._one(sql, dict(args, cap=cap))[0]

    def changed_wire(self, *, after: tuple[int, int], limit: int, active_only: bool = False,
                     **filters: Any) -> list[tuple[int, int, str, str]]:
        """jobs.changes from the database: ``(last change µs, seq, status, wire JSON)`` of
        the jobs matching ``filters`` (as ``list_jobs``) whose last change comes after
        ``after`` (a (µs, seq) pair) in that order, at most ``limit``; with
        ``active_only``, the queued and running ones only."""
        where, args = _conditions(self._param, **filters)
        sql = self.queries["changed_jobs"].format(where="".join(f" AND {w}" for w in where))
        return self._all(sql, dict(args, after_us=after[0], after_seq=after[1], limit=limit,
                                   active_only=int(active_only)))

    def _list(self, select: str, *, order: str = "created", before: tuple[int, int] | None = None,
              before_seq: int | None = None, limit: int = 50, offset: int = 0,
              **filters: Any) -> list[Any]:
        key = self.order_keys[order]
        param = self._param
        where, args = _conditions(param, **filters)
        if before_seq is not None:
            before = (before_seq, before_seq)
        if before is not None:
            if key == "seq":
                where.append(f"seq < {param('before_seq')}")
                args["before_seq"] = before[1]
            else:  # a row value: the index on (key, seq) pages it
                where.append(f"({key}, seq) < ({param('before_key')}, {param('before_seq')})")
                args.update(before_key=before[0], before_seq=before[1])
        sql = self.queries["list_jobs"].format(
            key=key, select=select, where=f"WHERE {' AND '.join(where)}" if where else "",
            order=f"{key} DESC" + (", seq DESC" if key != "seq" else ""))
        return self._all(sql, dict(args, limit=limit, offset=offset))

    def queued_jobs(self) -> list[Job]:
        """Every queued job, in stored dispatch order (priority, then age)."""
        return [_job(r) for r in self._all(self.queries["queued_jobs"])]

    def running_jobs(self) -> list[Job]:
        return [_job(r) for r in self._all(self.queries["running_jobs"])]

    def events(self, job_id: str) -> list[dict[str, Any]]:
        job = self.get_job(job_id)
        return [{"at": at, "status": status, "phase": phase, "progress": progress,
                 "message": message, "actor": actor}
                for at, status, phase, progress, message, actor in self._all(
                    self.queries["events"], {"seq": job.seq})]

    def counts(self) -> dict[str, int]:
        """How many jobs are stored, by status (kept as jobs change: one small read)."""
        return dict(self._all(self.queries["counts"]))

    def type_counts(self) -> dict[str, dict[str, int]]:
        """How many jobs are stored, by type and status (kept as jobs change)."""
        out: dict[str, dict[str, int]] = {}
        for type, status, n in self._all(self.queries["type_counts"]):
            out.setdefault(type, {})[status] = n
        return out

    def finished(self, since_hour: int) -> list[tuple[str, str, int, int, int]]:
        """``(type, end status, run-time bucket, count, run µs)`` of the jobs that ended
        from hour ``since_hour`` (µs since the epoch // 3600 s) on; bucket -1: never ran.
        Read from the rows kept as jobs end, by day and by hour: whole days, and the hours
        of the first and the last day; its cost grows with days and types only."""
        return self._all(self.queries["finished_since"], {
            "hour": since_hour, "first_day": -(-since_hour // 24),
            "today": self.clock() // HOUR_US // 24})

    def run_buckets(self) -> list[int | None]:
        """The upper bound (µs) of each bucket ``finished`` counts in; the last has none."""
        return [r[0] for r in self._all(self.queries["run_buckets"])]

    # -- the daemon's own settings -------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        """One of the daemon's own stored settings (the pause, maintenance), None if unset."""
        row = self._one(self.queries["get_meta"], {"key": key})
        return None if row is None else row[0]

    def set_meta(self, key: str, value: str | None) -> None:
        """Store one of the daemon's own settings (None: remove it); durable on return."""
        def fn(tx: Tx) -> None:
            if value is None:
                tx.run("delete_meta", key=key)
            else:
                tx.run("set_meta", key=key, value=_text(value))
            self._meta_changed(tx, key)
        self.write(fn)

    def _meta_changed(self, tx: Tx, key: str) -> None:
        """One of the daemon's settings changed in ``tx``: a backend that tells other
        processes (PostgreSQL's cluster nodes) does so here."""

    # -- retention -----------------------------------------------------------------------

    def cleanup(self, *, keep_before: int, keep_failed_before: int,
                statuses: Collection[str] | None = None, dry_run: bool = False,
                wait: bool = False, chunk: int = CLEANUP_CHUNK) -> Iterator[list[str]]:
        """Delete terminal jobs finished before their cutoff, a chunk per transaction.

        Completed and cancelled jobs go when ``completed_at < keep_before``, failed ones
        when ``completed_at < keep_failed_before``, with their events and checkpoints;
        with ``statuses``, only the jobs that ended so (and none for
        ``max_stored_per_user``, which otherwise follows the cutoffs). Yields
        the ids of each chunk deleted (or that would be, with ``dry_run``). A chunk is
        ``chunk`` jobs at most (the first a quarter of the default), each sized by the time
        the one before took with its commit (``next_chunk_size``). On SQLite
        the WAL is checkpointed between chunks each time it has grown by
        ``Checkpointer.SWEEP_BYTES``, and after the sweep (``_sweeps``).
        """
        cutoffs = [(status, cutoff) for status, cutoff in (
            ("completed", keep_before), ("cancelled", keep_before),
            ("failed", keep_failed_before)) if statuses is None or status in statuses]
        if dry_run:
            for status, cutoff in cutoffs:
                ids = [r[1] for r in self._all(
                    self.queries["expired_jobs"], {"status": status, "cutoff": cutoff, "limit": -1})]
                if ids:
                    yield ids
            return
        if self._writer is None:
            raise StoreClosed()
        if not cutoffs:
            return
        checkpointer = self._sweeps()
        with checkpointer.held():
            yield from self._sweep(cutoffs, chunk, checkpointer,
                                   over_weight=statuses is None)

    def _sweep(self, cutoffs: list[tuple[str, int]], chunk: int, checkpointer: Sweeps, *,
               over_weight: bool) -> Iterator[list[str]]:
        expired = iter(cutoffs)
        status, cutoff = next(expired)
        # the first chunk is smaller: its pages are not cached yet, so it takes longest
        size = min(chunk, _FIRST_CHUNK)

        def next_chunk(ids: list[str] | None, took: float) -> Callable[[Tx], list[str]] | None:
            nonlocal status, cutoff, size
            if ids:
                # by what it deleted: the last chunk of a status may be a few jobs only
                size = next_chunk_size(len(ids), took, chunk)
            elif ids is not None:  # none left of this status
                status, cutoff = next(expired, (None, 0))
                if status is None:
                    return None
            return lambda tx, status=status, cutoff=cutoff, size=size: self._delete_chunk(
                tx, status, cutoff, size)
        yield from self._deleting(next_chunk, checkpointer)
        # then users whose finished jobs still weigh more than they may keep (a lowered
        # limit, or jobs that finished before the limit existed)
        limit = self.max_stored_per_user
        if limit is None or not over_weight:
            return
        for (user_id,) in self._all(self.queries["users_over_weight"], {"limit": limit}):
            while ids := self.write(lambda tx: self._forget_excess(tx, user_id, limit)):
                checkpointer.catch_up()
                yield ids

    def purge(self, user_id: str, *, chunk: int = CLEANUP_CHUNK) -> Iterator[list[str]]:
        """Delete every finished job of ``user_id`` (a removed account) with its events and
        checkpoints, a chunk per transaction (``_delete``, as cleanup); yields each chunk's
        ids once it is durable, after their files went (``Listeners.deleted``)."""
        if self._writer is None:
            raise StoreClosed()
        checkpointer = self._sweeps()

        def next_chunk(ids: list[str] | None, took: float) -> Callable[[Tx], list[str]] | None:
            if ids is not None and not ids:
                return None
            return lambda tx: self._delete(tx, [seq for seq, _ in tx.run(
                "oldest_finished", user_id=user_id, keep_seq=None, limit=chunk)])
        with checkpointer.held():
            yield from self._deleting(next_chunk, checkpointer)

    def _deleting(self, next_chunk: Callable[[list[str] | None, float],
                                             Callable[[Tx], list[str]] | None],
                  checkpointer: Sweeps) -> Iterator[list[str]]:
        """Run the deletes ``next_chunk`` gives, a transaction each, until it gives None:
        it is told the ids the last one deleted (None before the first) and the seconds
        it took with its commit (the fsync of every page it changed: a write queued
        behind it waits for both). Yields each chunk's ids once it is durable and its
        files went (``Listeners.deleted``); ``checkpointer`` hears of each gap between
        two chunks (``catch_up``).

        A chunk's files go while the next chunk is written: a thousand unlinks cost a
        sweep a third of its time after the commit, and on the writer's thread they would
        hold up every write queued behind them.
        """
        gone: list[str] = []  # committed, files not yet deleted
        written: concurrent.futures.Future[list[str]] | None = None
        try:
            ids: list[str] | None = None
            took = 0.0
            while (write := next_chunk(ids, took)) is not None:
                started = time.perf_counter()
                ended: list[float] = []
                written = self.write_async(write)
                written.add_done_callback(lambda _: ended.append(time.perf_counter()))
                if gone:
                    self.listeners.deleted(gone)
                    done, gone = gone, []
                    yield done
                pending, written = written, None
                ids = pending.result()
                # its callback may run on the writer just after ``result`` returns
                took = (ended[0] if ended else time.perf_counter()) - started
                if ids:
                    gone = ids
                    checkpointer.catch_up()
            if gone:
                self.listeners.deleted(gone)
                done, gone = gone, []
                yield done
        finally:
            # the caller stopped early: the files of what was committed go all the same
            if written is not None:
                gone += written.result()
            if gone:
                self.listeners.deleted(gone)

    def _delete_chunk(self, tx: Tx, status: str, cutoff: int, size: int) -> list[str]:
        seqs = [r[0] for r in tx.run("expired_jobs", status=status, cutoff=cutoff, limit=size)]
        return self._delete(tx, seqs)

    @staticmethod
    def _delete(tx: Tx, seqs: list[int]) -> list[str]:
        """Delete the jobs ``seqs`` with their events and checkpoints; their ids.

        The one way jobs leave the database: it takes them off the status counts and their
        users' stored weights with one statement each (migration 6 says why not per row),
        and deletes their events before them, so that the cascade finds nothing to do.
        """
        if not seqs:
            return []
        chunk = json.dumps(seqs)
        for query in ("uncount_jobs", "unweigh_jobs", "delete_events", "delete_keys",
                      "delete_checkpoints"):
            tx.run(query, seqs=chunk)
        return [r[0] for r in tx.run("delete_jobs", seqs=chunk)]

    def stored_weight(self, user_id: str) -> int:
        """What ``user_id``'s finished jobs weigh against ``max_stored_per_user``."""
        row = self._one(self.queries["stored_weight"], {"user_id": user_id})
        return row[0] if row else 0

    def _forget_excess(self, tx: Tx, user_id: str, limit: int, *,
                       keep_seq: int | None = None) -> list[str]:
        """Delete ``user_id``'s oldest finished jobs while they weigh more than ``limit``.

        At most ``_EXCESS_CHUNK`` go in one write; the files of those deleted go after the
        commit (``Listeners.deleted``).
        """
        row = tx.run("stored_weight", user_id=user_id).fetchone()
        if row is None or row[0] <= limit:
            return []
        excess = row[0] - limit
        seqs: list[int] = []
        freed = 0
        for seq, w in tx.run("oldest_finished", user_id=user_id, keep_seq=keep_seq,
                             limit=_EXCESS_CHUNK):
            seqs.append(seq)
            freed += w
            if freed >= excess:
                break
        victims = self._delete(tx, seqs)
        if victims:

            def forgotten() -> None:
                log.info("jobs_forgotten", user_id=user_id, count=len(victims),
                         reason="max_stored_per_user", limit=limit)
                self.listeners.deleted(victims)
            tx.after_commit.append(forgotten)
        return victims
