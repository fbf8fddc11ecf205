"""The rules behind each method: who may do what to which job, and the input checks.

Every public method takes the call's ``Scope`` (``jobd.auth``) first and answers the
wire shape (dicts). ``rpc.py`` maps method names onto these; the store does the
persistence and the engine the running.
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import contextlib
import contextvars
import dataclasses
import hashlib
import heapq
import json
import re
import time
from typing import Any, Iterable, Protocol

import structlog

from jobd import __version__, joblogs, jsonenc
from jobd.attempt import end_story
from jobd.auth import Scope, check_id
from jobd.changes import REWIND_US, Change, ChangeLog, Position
from jobd.config import Config, ConfigState
from jobd.engine import Engine, cancelled_while_queued, story
from jobd.errors import (BY_CODE, Conflict, Forbidden, InvalidParams, JobdError, NotFound,
                         Unavailable)
from jobd.handlers import Handler
from jobd.metrics import Metrics
from jobd.models import TERMINAL, Job, JobStatus, RawJSON, Role, iso, new_job_id, readable
from jobd.params import flag, integer, iso_time, number, shown, text, utf8
from jobd.rules import Rules
from jobd.store import (DuplicateId, JobNotFound, StateConflict, StorageUnavailable,
                        StoreError)
from jobd.store.interface import FINISHED_KEEP_US, HOUR_US, JobStore

__all__ = ["ANSWER_ROOM", "AnswerRoom", "Hub", "Manager", "jobd_error"]

log = structlog.get_logger()

# fullmatch everywhere: with match or search, "$" also matches before a final newline
JOB_ID_RE = re.compile(r"[0-9a-f-]{4,36}")
_CURSOR_RE = re.compile(r"[A-Za-z0-9_-]{1,96}={0,2}")
#: jobs.list's orders: by a time, newest first (jobs without it last), or dispatch order
ORDERS = ("created", "started", "completed", "queue")
_SEQ_RE = re.compile(r"[0-9]{1,19}")
#: a cursor's sort key: a time, or -1 for a job without it (ORDER_KEYS)
_KEY_RE = re.compile(r"-1|[0-9]{1,19}")
#: the most job types one filter may name (each is a bound parameter of the query)
MAX_TYPE_FILTER = 100
#: the end statuses, as admin.stats' finished names them
_END_NAMES = sorted(map(str, TERMINAL))
_BOUND_RE = re.compile(r"[0-9a-f]{12}")
#: jobs.list's deepest ``offset`` and the count ``with_total`` stops at
MAX_OFFSET = TOTAL_CAP = 10_000
#: admin.stats' per_user: the users with the most active jobs
PER_USER_TOP = 100
MAX_OPTIONS = 16 * 1024
MAX_METADATA = 64 * 1024
MAX_DESCRIPTION = 1024
MAX_WAIT_S = 60.0
#: admin.maintenance's reason, in characters
MAX_REASON = 200
#: the store's ``meta`` keys of the switches that survive a restart
_PAUSED_KEY, _MAINTENANCE_KEY = "paused", "maintenance"
#: the largest file offset the OS takes (off_t is a signed 64-bit integer)
MAX_FILE_OFFSET = 2**63 - 1
_STATUSES = frozenset(str(s) for s in JobStatus)
#: SPEC §2's job fields, the names jobs.list's ``fields`` may pick (Job.to_dict is the shape)
JOB_FIELDS = tuple(Job(id="", type="", user_id="", project_id=None, status=JobStatus.QUEUED,
                       created_at=0, updated_at=0, version=0).to_dict())
#: what a response line holds around a jobs.list result: the JSON-RPC envelope with its id
#: (a client's id longer than about 1 KiB may push a full page over the limit: -32050)
_ENVELOPE_BYTES = 1024
#: the filter of a filtered jobs.cancel / jobs.retry
FILTER_KEYS = ("status", "type", "user_id", "project_id", "created_after", "created_before")
#: the most jobs one filtered cancel or retry touches: all in one write transaction, which
#: holds every other write (submits, progress) until it commits; ``more`` says to call again
MAX_BULK = 1000
#: jobs.list reads its rows in chunks of at most this many, sized to the bytes still free
_CHUNK_ROWS = 128
#: the most jobs one jobs.changes answer holds (its cursor goes on from the last)
MAX_CHANGES = 1000
#: how many changed jobs' texts jobs.changes keeps for the next poll, and the largest kept
_CHANGED_TEXTS, _CHANGED_TEXT_BYTES = 1000, 4096
#: what a jobs.changes answer holds around its jobs, the longest cursor included
_CHANGES_FRAME = len('{"jobs":[],"cursor":""}') + 120
#: the most one stored job's wire JSON can take: its options, metadata and description at
#: their limits, and room for every other field
_MAX_JOB_BYTES = MAX_OPTIONS + MAX_METADATA + MAX_DESCRIPTION + 4096


#: a jobs.changes answer as built: the jobs' texts, the cursor past them, its position
_Answer = tuple[list[str], str, Position]
#: each job changed since a cursor, once, at its latest change: (counter, change)
_Latest = list[tuple[int, Change]]


class AnswerRoom(Protocol):
    """The server's answer memory for one call (``jobd.server.Connection``)."""

    async def reserve(self) -> None: ...
    def settle(self, nbytes: int) -> None: ...


#: set by the rpc layer for a long poll whose answer may be large (jobs.changes): the
#: call holds room for an answer while it builds one, and none while it waits
ANSWER_ROOM: contextvars.ContextVar[AnswerRoom | None] = contextvars.ContextVar(
    "answer_room", default=None)


def _optional_id(value: Any, field: str) -> str | None:
    return None if value is None else check_id(value, field)


def _id_prefix(id_prefix: Any) -> str | None:
    """The ``id_prefix`` filter of jobs.list and jobs.changes, checked."""
    if id_prefix is not None and (not isinstance(id_prefix, str)
                                  or not JOB_ID_RE.fullmatch(id_prefix)):
        raise InvalidParams(f"id_prefix must be at least 4 of [0-9a-f-] (got "
                            f"{shown(id_prefix)})", field="id_prefix")
    return id_prefix


def _check_job_id(job_id: Any) -> str:
    if not isinstance(job_id, str) or not JOB_ID_RE.fullmatch(job_id):
        raise InvalidParams(f"job_id must be a job's UUID (got {shown(job_id)})",
                            field="job_id")
    return job_id


#: compact JSON, with one encoder made once (``jobd.jsonenc``)
_dumps = jsonenc.encoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _json_size(value: Any, field: str, limit: int) -> int:
    try:
        size = len(_dumps(value).encode())
    except UnicodeEncodeError:
        raise InvalidParams(f"{field} holds text that is not valid Unicode (a lone surrogate "
                            "such as \\ud800); send UTF-8 text", field=field) from None
    except ValueError:
        raise InvalidParams(f"{field} holds a number JSON cannot carry (NaN or infinite); "
                            "send finite numbers", field=field) from None
    except RecursionError:
        raise InvalidParams(f"{field} is nested too deeply", field=field) from None
    if size > limit:
        raise InvalidParams(f"{field} is {size} bytes as JSON; the limit is {limit}", field=field)
    return size


def _statuses(status: Any, field: str = "status") -> list[str]:
    """The ``status`` filter: one status or a list of them ([] or None: every one)."""
    statuses = [status] if isinstance(status, str) else [] if status is None else status
    if not isinstance(statuses, list) or not all(isinstance(s, str) and s in _STATUSES
                                                 for s in statuses):
        raise InvalidParams(f"status must be one of {', '.join(JobStatus)} or a list of them "
                            f"(got {shown(status)})", field=field)
    # each once, in one order: the query's size is bounded and the same filter is one cursor's
    return sorted(set(statuses))


def _fields(fields: Any) -> frozenset[str] | None:
    """jobs.list's ``fields``: the job fields to send, ``id`` always among them (for paging)."""
    if fields is None:
        return None
    if not isinstance(fields, list) or not all(isinstance(f, str) for f in fields):
        raise InvalidParams(f"fields must be a list of job field names (got {shown(fields)})",
                            field="fields")
    unknown = [f for f in fields if f not in JOB_FIELDS]
    if unknown:
        raise InvalidParams(f"fields: {shown(unknown[0])} is not a job field (known: "
                            f"{', '.join(JOB_FIELDS)})", field="fields")
    return frozenset(fields) | {"id"}


def _bound(order: str, filters: dict[str, Any]) -> str:
    """What a cursor is bound to: its order and the checked filters, as a short digest."""
    text = json.dumps([order, filters], sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=6).hexdigest()


def _cursor(key: int, seq: int, bound: str) -> str:
    """The cursor past a page's last job: its sort key, its seq and what it is bound to."""
    return base64.urlsafe_b64encode(f"{key}.{seq}.{bound}".encode()).decode()


def _cursor_key(cursor: Any, order: str, bound: str) -> tuple[int, int] | None:
    """The (sort key, seq) a cursor given out by ``_cursor`` for this order and these
    filters pages below; a cursor of another order or other filters is refused."""
    if cursor is None:
        return None
    if isinstance(cursor, str) and _CURSOR_RE.fullmatch(cursor):
        try:
            text = base64.urlsafe_b64decode(cursor).decode("ascii")
        except ValueError:  # bad padding, or bytes that are not text
            text = ""
        numbers = text.split(".")
        # beyond SQLite's integers: forged
        if (len(numbers) == 3 and _BOUND_RE.fullmatch(numbers[2])
                and _KEY_RE.fullmatch(numbers[0]) and _SEQ_RE.fullmatch(numbers[1])
                and all(int(n) < 2**63 for n in numbers[:2])):
            if numbers[2] == bound:
                return int(numbers[0]), int(numbers[1])
            raise InvalidParams(f"cursor belongs to another order or other filters than "
                                f"these (order {order!r}): page with the order and filters "
                                "the cursor came with, or start again without a cursor",
                                field="cursor")
    raise InvalidParams("cursor is not one this daemon gave out: pass next_cursor of the "
                        "previous page as it came", field="cursor")


def _quantile(hist: list[int], uppers: list[int | None], q: float) -> float | None:
    """The ``q`` quantile (seconds) of the run times counted in ``hist``, interpolated
    linearly inside its bucket; in the last, unbounded bucket, that bucket's lower bound."""
    target = q * sum(hist)
    if not target:
        return None
    seen, lower = 0, 0
    for n, upper in zip(hist, uppers):
        if n and seen + n >= target:
            if upper is None:
                return lower / 1e6
            return (lower + (target - seen) / n * (upper - lower)) / 1e6
        seen, lower = seen + n, upper if upper is not None else lower
    return lower / 1e6


def _admin_only(method: str, scope: Scope) -> str:
    if scope.caller.role is Role.ADMIN:
        return f"{method} is not available while acting for a user; call it without as_user"
    return f"{method} is for jobd admins (auth.admins in jobd.toml)"


class Hub:
    """Wakes ``jobs.wait`` callers when their job changes (from any thread)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}
        self.closed = False

    def close(self) -> None:
        """The daemon is stopping: wake every waiter now rather than at its timeout."""
        self.closed = True
        for job_id in list(self._waiters):
            self._wake(job_id)

    def notify(self, job_id: str) -> None:
        if job_id in self._waiters:
            self.loop.call_soon_threadsafe(self._wake, job_id)

    def notify_all(self) -> None:
        """Every waiter re-reads its job (cluster mode: a notification may have been lost)."""
        for job_id in list(self._waiters):
            self.notify(job_id)

    def _wake(self, job_id: str) -> None:
        for fut in self._waiters.pop(job_id, ()):
            if not fut.done():
                fut.set_result(None)

    def subscribe(self, job_id: str) -> asyncio.Future[None]:
        fut = self.loop.create_future()
        self._waiters.setdefault(job_id, set()).add(fut)
        return fut

    def unsubscribe(self, job_id: str, fut: asyncio.Future[None]) -> None:
        waiters = self._waiters.get(job_id)
        if waiters is not None:
            waiters.discard(fut)
            if not waiters:
                del self._waiters[job_id]


class Manager:
    def __init__(self, config: Config, store: JobStore, engine: Engine,
                 handlers: dict[str, Handler], hub: Hub | None = None,
                 config_state: ConfigState | None = None,
                 change_log: ChangeLog | None = None,
                 telemetry: Metrics | None = None) -> None:
        self.config = config
        #: how the config in force was loaded (a SIGHUP reload may have failed)
        self.config_state = config_state or ConfigState(config)
        self.store = store
        self.engine = engine
        self.handlers = handlers
        self.hub = hub
        #: every job change this start saw, for jobs.changes (the daemon records into it)
        self.change_log = change_log or ChangeLog()
        #: admin.metrics' counters (the daemon records jobs into it, the RPC layer calls)
        self.telemetry = telemetry or Metrics(types=lambda: self.handlers, codes=BY_CODE)
        #: (job id, fields) -> (the change log's head when it was read, the job's text):
        #: every poll of jobs.changes that a change wakes sends that job, read once
        self._changed_texts: dict[tuple[str, frozenset[str] | None], tuple[int, str]] = {}
        self.started = time.monotonic()
        #: admin.maintenance: on, and the reason told to those refused (restore() loads it)
        self.maintenance_on = False
        self.maintenance_reason: str | None = None

    def restore(self) -> bool:
        """Load the stored maintenance switch; whether dispatch was left paused (the
        engine starts so). Both survive a restart: an operator's pause before an upgrade
        must not end with the upgrade."""
        reason = self.store.get_meta(_MAINTENANCE_KEY)
        self.maintenance_on, self.maintenance_reason = reason is not None, reason or None
        return self.store.get_meta(_PAUSED_KEY) == "1"

    def _rules(self) -> Rules:
        """The rules a submit or retry passes now (the config and maintenance in force)."""
        return Rules.of(self.config, refusal=self._refusal(),
                        exclusive=[n for n, h in self.handlers.items() if h.exclusive])

    def _refusal(self) -> Unavailable | None:
        """What a submit or retry gets while maintenance is on."""
        if not self.maintenance_on:
            return None
        why = f" ({self.maintenance_reason})" if self.maintenance_reason else ""
        return Unavailable(f"jobd is in maintenance{why}: new jobs and retries are refused "
                           f"until it ends; try again later")

    # -- reading -------------------------------------------------------------------------

    def _view(self, job: Job) -> dict[str, Any]:
        """The job as answered: live progress, queue position, wait reason, ETA."""
        return self._live(job.to_dict())

    def _live(self, out: dict[str, Any]) -> dict[str, Any]:
        """Add to a stored job's wire shape what only the daemon knows."""
        return self.engine.annotate(out)

    def _job(self, scope: Scope, job_id: Any) -> Job:
        job = self.store.get_job(_check_job_id(job_id))
        if scope.user_id is not None and job.user_id != scope.user_id:
            raise Forbidden(f"job {job_id} belongs to another user", field="job_id")
        return job

    def get(self, scope: Scope, job_id: str) -> dict[str, Any]:
        return self._view(self._job(scope, job_id))

    async def wait(self, scope: Scope, job_id: str, after_version: Any = None,
                   timeout_s: Any = 30) -> dict[str, Any]:
        """The job once its version passes ``after_version`` or it is terminal, else at timeout.

        A long poll: it wakes on the change itself (the hub), not on a timer.
        """
        if after_version is not None:
            integer(after_version, "after_version", hint=" (a job's version)")
        timeout = number(timeout_s, "timeout_s", 0, MAX_WAIT_S)
        _check_job_id(job_id)  # before the hub files a waiter under it
        return await self._watch(scope, job_id, timeout, lambda job: after_version is None
                                 or job["version"] > after_version)

    async def _watch(self, scope: Scope, job_id: str, timeout: float,
                     ready: Any) -> dict[str, Any]:
        assert self.hub is not None
        deadline = time.monotonic() + timeout
        while True:
            fut = self.hub.subscribe(job_id)
            try:
                # read after subscribing, so a change in between still wakes us
                job = await asyncio.to_thread(lambda: self._view(self._job(scope, job_id)))
                remaining = deadline - time.monotonic()
                if job["status"] in TERMINAL or ready(job) or remaining <= 0:
                    return job
                if self.hub.closed:
                    raise Unavailable("jobd is shutting down; wait again in a moment")
                try:
                    await asyncio.wait_for(asyncio.shield(fut), remaining)
                except asyncio.TimeoutError:
                    pass
            finally:
                self.hub.unsubscribe(job_id, fut)

    def list(self, scope: Scope, *, status: Any = None, type: Any = None, user_id: Any = None,
             project_id: Any = None, created_after: Any = None, created_before: Any = None,
             id_prefix: Any = None, order: Any = "created", limit: Any = 50,
             cursor: Any = None, offset: Any = None, with_total: Any = False,
             fields: Any = None) -> RawJSON:
        """A page of jobs in ``order`` (newest first by creation, start or end, or queued
        jobs in dispatch order), from a cursor or an offset, with the matching jobs' count
        if asked; it ends early rather than pass max_response_bytes."""
        if order not in ORDERS:
            raise InvalidParams(f"order must be one of {', '.join(ORDERS)} (got "
                                f"{shown(order)})", field="order")
        filters = self._filters(scope, status=status, type=type, user_id=user_id,
                                project_id=project_id, created_after=created_after,
                                created_before=created_before)
        filters["id_prefix"] = _id_prefix(id_prefix)
        integer(limit, "limit", 1, 1000)
        if offset is not None:
            integer(offset, "offset", 0, MAX_OFFSET)
            if cursor is not None:
                raise InvalidParams("offset and cursor cannot both be given: page with "
                                    "next_cursor, or jump with offset", field="offset")
        flag(with_total, "with_total")
        wanted = _fields(fields)
        bound = _bound(order, filters)
        budget = self.config.server.max_response_bytes - _ENVELOPE_BYTES
        frame = len('{"jobs":[],"next_cursor":"","total":10000,"total_capped":false}') + len(
            _cursor(2**63 - 1, 2**63 - 1, bound))
        jobs: list[str] = []
        before = _cursor_key(cursor, order, bound)
        size, last, more = frame, (0, 0), False
        fetch, queued = (self._queue_rows(filters) if order == "queue" else (
            lambda before, want, skip: self.store.list_wire(
                **filters, order=order, before=before, limit=want, offset=skip), None))
        skip = offset or 0
        # rows are read in chunks, so a page that fills its bytes early reads little more;
        # the first as many as fit the budget even if every job is as big as one can be
        # (a small max_response_bytes must not read eight times the page it sends)
        chunk = max(1, min(_CHUNK_ROWS, budget // _MAX_JOB_BYTES))
        while True:
            want = min(limit + 1 - len(jobs), chunk)
            rows = fetch(before, want, skip)
            waiting = self._queued(rows)
            for key, seq, job_status, wire in rows:
                if len(jobs) == limit:  # the row past the page: there is a next one
                    more = True
                    break
                text = self._listed(job_status, wire, wanted, waiting.get(seq))
                # its bytes as UTF-8, and its comma (isascii is a flag, not a scan)
                cost = (len(text) if text.isascii() else len(text.encode())) + 1
                # the first job always goes out, however small the configured limit: an
                # empty page with a cursor would have a client page on the spot for ever
                # (a job bigger than the limit cannot be stored at the default limit; at
                # a tiny one the rpc layer answers that line -32050 "response too large")
                if jobs and size + cost > budget:
                    more = True
                    break
                jobs.append(text)
                size += cost
                last = key, seq
            if more or len(rows) < want:
                break
            # later chunks page by key from the last row, past the offset already
            before, skip = (rows[-1][0], rows[-1][1]), 0
            chunk = max(1, min(_CHUNK_ROWS, (budget - size) * len(jobs) // (size - frame) + 1))
        next_cursor = _cursor(last[0], last[1], bound) if more else None
        total = ""
        if with_total:
            counted = (queued if queued is not None
                       else self.store.count_jobs(TOTAL_CAP + 1, **filters))
            total = (f',"total":{min(counted, TOTAL_CAP)},'
                     f'"total_capped":{json.dumps(counted > TOTAL_CAP)}')
        return RawJSON(f'{{"jobs":[{",".join(jobs)}],"next_cursor":{json.dumps(next_cursor)}'
                       f'{total}}}')

    async def changes(self, scope: Scope, *, after: Any = None, timeout_s: Any = 30,
                      status: Any = None, type: Any = None, user_id: Any = None,
                      project_id: Any = None, created_after: Any = None,
                      created_before: Any = None, id_prefix: Any = None,
                      fields: Any = None) -> RawJSON:
        """Every job in scope passing the filters (jobs.list's) that changed after the
        cursor ``after``, each once in its latest state, in the order of their changes:
        at once if any did, else as soon as one does, else none at ``timeout_s`` (0-60 s,
        default 30). ``{jobs, cursor}``: the next call passes ``cursor`` as ``after``.

        A change is any status transition, cancel request, retry, phase change or live
        progress tick (as fresh as jobs.wait's). Without ``after`` the answer is, at once,
        the jobs queued or running now, and a cursor from which every later change
        follows: what a web server following its users' jobs shows first (finished ones
        are jobs.list's). An answer holds at most MAX_CHANGES jobs and stays under
        max_response_bytes; its cursor then goes on from the last job it holds. A cursor
        from before a restart, or older than the change log keeps, is answered from the
        database by time (``jobd.changes``): a job may come twice then, none is missed.
        """
        filters = self._filters(scope, status=status, type=type, user_id=user_id,
                                project_id=project_id, created_after=created_after,
                                created_before=created_before)
        filters["id_prefix"] = _id_prefix(id_prefix)
        timeout = number(timeout_s, "timeout_s", 0, MAX_WAIT_S)
        wanted = _fields(fields)
        feed = self.change_log
        position = feed.position(after)
        deadline = time.monotonic() + timeout
        room = ANSWER_ROOM.get()
        while True:
            waiter = feed.subscribe(filters)  # before reading: a change in between wakes it
            try:
                if room is not None:
                    await room.reserve()
                jobs, cursor, position = await asyncio.to_thread(
                    self._changed, position, filters, wanted)
                remaining = deadline - time.monotonic()
                if jobs or after is None or remaining <= 0:
                    return RawJSON(f'{{"jobs":[{",".join(jobs)}],'
                                   f'"cursor":{json.dumps(cursor)}}}')
                if room is not None:
                    room.settle(0)  # nothing to send yet: no room held while waiting
                if feed.closed:
                    raise Unavailable("jobd is shutting down; ask again in a moment with "
                                      "the same after")
                try:
                    await asyncio.wait_for(asyncio.shield(waiter.future), remaining)
                except asyncio.TimeoutError:
                    pass
            finally:
                feed.unsubscribe(waiter)

    def _changed(self, position: Position, filters: dict[str, Any],
                 wanted: frozenset[str] | None) -> _Answer:
        """One jobs.changes answer from ``position``: the jobs' wire texts, the cursor
        past them, and the position that cursor stands for."""
        if position.counter is not None:
            found = self.change_log.since(position.counter, filters)
            if found is not None:
                return self._changed_in_log(*found, filters, wanted)
            position = Position(at_us=position.at_us - REWIND_US)
        return self._changed_in_store(position, filters, wanted)

    def _changed_in_log(self, latest: _Latest, head: int, head_us: int,
                        filters: dict[str, Any], wanted: frozenset[str] | None
                        ) -> _Answer:
        """The answer from the change log: ``latest`` holds each job changed since the
        cursor at its latest change. A job's text read after that change (by an earlier
        poll: many polls send the same changes) is sent again; the others are read now,
        with the filters again (a job whose state now fails them is passed over)."""
        budget = self.config.server.max_response_bytes - _ENVELOPE_BYTES
        texts = self._changed_texts
        jobs: list[str] = []
        size, to = _CHANGES_FRAME, (head, head_us)
        for start in range(0, len(latest), MAX_CHANGES):
            chunk = latest[start:start + MAX_CHANGES]
            known = {change.job_id: hit[1] for number, change in chunk
                     if (hit := texts.get((change.job_id, wanted))) is not None
                     and hit[0] >= number}
            missing = [change.job_id for _, change in chunk if change.job_id not in known]
            rows = {row[1]: row for row in self.store.list_wire(
                ids=missing, limit=len(missing), **filters)} if missing else {}
            waiting = self._queued(rows.values())
            if len(texts) + len(missing) > _CHANGED_TEXTS:
                texts.clear()
            for i, (_, change) in enumerate(chunk, start):
                text = known.get(change.job_id)
                if text is None:
                    row = rows.get(change.seq)
                    if row is None:
                        continue  # deleted since, or its state now fails the filters
                    text = self._listed(row[2], row[3], wanted, waiting.get(change.seq))
                    if len(text) <= _CHANGED_TEXT_BYTES:
                        # read after every change up to the head: as true for them all
                        texts[(change.job_id, wanted)] = (head, text)
                cost = (len(text) if text.isascii() else len(text.encode())) + 1
                if len(jobs) == MAX_CHANGES or (jobs and size + cost > budget):
                    # the cursor goes on from the change before this job's
                    before, previous = latest[i - 1]
                    to = before, previous.at_us
                    break
                jobs.append(text)
                size += cost
            else:
                continue
            break
        return jobs, self.change_log.cursor(*to), Position(counter=to[0], at_us=to[1])

    def _changed_in_store(self, position: Position, filters: dict[str, Any],
                          wanted: frozenset[str] | None) -> _Answer:
        """The answer from the database, in (last change, seq) order: the active jobs
        for a ``snapshot``, else every job changed after the position. Once it is all
        sent, the cursor goes on in the change log from where the log stood before the
        read, so a change committed meanwhile comes next time (perhaps twice), never
        not at all."""
        budget = self.config.server.max_response_bytes - _ENVELOPE_BYTES
        head, head_us = self.change_log.head()
        rows = self.store.changed_wire(after=(position.at_us, position.seq),
                                       limit=MAX_CHANGES + 1, active_only=position.snapshot,
                                       **filters)
        jobs: list[str] = []
        size, last = _CHANGES_FRAME, (position.at_us, position.seq)
        waiting = self._queued(rows)
        for changed, seq, job_status, wire in rows:
            text = self._listed(job_status, wire, wanted, waiting.get(seq))
            cost = (len(text) if text.isascii() else len(text.encode())) + 1
            if len(jobs) == MAX_CHANGES or (jobs and size + cost > budget):
                return (jobs, self.change_log.database_cursor(*last),
                        Position(at_us=last[0], seq=last[1]))
            jobs.append(text)
            size += cost
            last = changed, seq
        return jobs, self.change_log.cursor(head, head_us), Position(counter=head, at_us=head_us)

    def _queue_rows(self, filters: dict[str, Any]) -> tuple[Any, int]:
        """jobs.list's rows in dispatch order, and how many there are: the matching queued
        jobs by their place in the dispatcher's queue (the sort key), paged past the last
        one. The queue moves as jobs start: a page holds the places as they were when it
        was read, and the next goes on after the last job's place now (the jobs ahead of
        it that started meanwhile skip none), or after its old place once it has left.
        """
        statuses = filters["statuses"]
        if statuses and "queued" not in statuses:
            places: list[tuple[int, str, int]] = []
        else:
            keys = self.store.list_ids(**dict(filters, statuses=["queued"]))
            positions = self.engine.positions([job_id for _, job_id in keys])
            places = sorted((place, job_id, seq) for seq, job_id in keys
                            if (place := positions[job_id][0]) is not None)
        now = {seq: place for place, _, seq in places}

        def rows(before: tuple[int, int] | None, want: int, skip: int) -> list[Any]:
            after = now.get(before[1], before[0]) if before else None
            start = skip + (bisect.bisect_right(places, (after, "\uffff")) if before else 0)
            page = places[start:start + want]
            # a queued job's wire is decoded for its live fields anyway (``_listed``)
            found = {json.loads(row[3])["id"]: row for row in self.store.list_wire(
                ids=[job_id for _, job_id, _ in page], limit=want)}
            return [(place, *found[job_id][1:]) for place, job_id, _ in page if job_id in found]
        return rows, len(places)

    @staticmethod
    def _filters(scope: Scope, *, status: Any = None, type: Any = None, user_id: Any = None,
                 project_id: Any = None, created_after: Any = None, created_before: Any = None,
                 prefix: str = "") -> dict[str, Any]:
        """The job filters jobs.list and the filtered cancel and retry share, checked (a
        ``user_id`` outside the scope is Forbidden), as the store takes them. ``prefix``
        names the fields as the client sent them (``filter.``)."""
        types = [type] if isinstance(type, str) else [] if type is None else type
        if not isinstance(types, list) or not all(isinstance(t, str) for t in types):
            raise InvalidParams(f"{prefix}type must be a job type's name or a list of them "
                                f"(got {shown(type)})", field=f"{prefix}type")
        types = sorted(set(types))
        if len(types) > MAX_TYPE_FILTER:
            raise InvalidParams(f"{prefix}type names {len(types)} job types; at most "
                                f"{MAX_TYPE_FILTER} may be asked for at once",
                                field=f"{prefix}type")
        for name in types:
            utf8(name, f"{prefix}type")
        return dict(statuses=_statuses(status, f"{prefix}status"), types=types,
                    user_id=scope.check_filter(_optional_id(user_id, f"{prefix}user_id")),
                    project_id=_optional_id(project_id, f"{prefix}project_id"),
                    created_after=iso_time(created_after, f"{prefix}created_after"),
                    created_before=iso_time(created_before, f"{prefix}created_before"))

    def _queued(self, rows: Iterable[tuple[Any, int, str, str]]) -> dict[int, dict[str, Any]]:
        """The queued jobs among ``rows`` (a page's, ``(key, seq, status, wire)``) by seq,
        as answered: their places and wait reasons all counted at once
        (``Dispatcher.positions``)."""
        jobs = {seq: json.loads(wire) for _, seq, status, wire in rows
                if status == JobStatus.QUEUED}
        places = self.engine.positions([out["id"] for out in jobs.values()])
        return {seq: self.engine.annotate(out, places) for seq, out in jobs.items()}

    def _listed(self, status: str, wire: str, wanted: frozenset[str] | None,
                queued: dict[str, Any] | None) -> str:
        """One job of a list page: finished jobs go out as SQLite encoded them; active ones
        get what the daemon knows (a queued one is ``queued``, from ``_queued``); with
        ``fields``, only those."""
        active = status in (JobStatus.QUEUED, JobStatus.RUNNING)
        if not active and wanted is None:
            return wire
        out = queued if queued is not None else json.loads(wire)
        if active and queued is None:
            out = self._live(out)
        if wanted is not None:
            out = {k: v for k, v in out.items() if k in wanted}
        return _dumps(out)

    def events(self, scope: Scope, job_id: str) -> list[dict[str, Any]]:
        job = self._job(scope, job_id)
        return [dict(e, at=iso(e["at"])) for e in self.store.events(job.id)]

    def logs(self, scope: Scope, job_id: str, offset: Any = 0,
             limit_bytes: Any = 65536) -> dict[str, Any]:
        job = self._job(scope, job_id)
        integer(limit_bytes, "limit_bytes", 1, 1_048_576)
        # offset + limit_bytes stays within what the OS seeks to (a signed 64-bit off_t)
        high = MAX_FILE_OFFSET - limit_bytes
        integer(offset, "offset", 0, high, " (a byte offset: 2**63 - 1 less limit_bytes)")
        path = joblogs.path(self.config.log_dir, job.id)
        cluster = self.engine.cluster
        # cluster mode: a job this node does not run now is read from the database's copy
        # when that reaches further than this node's file (which lacks the attempts other
        # nodes ran; the copy may lack the last output of an attempt a crash stopped here)
        copied = (cluster.read_log(job.id, offset, limit_bytes)
                  if cluster is not None and self.engine.live(job.id) is None
                  and cluster.log_end(job.id) > joblogs.end(path) else None)
        if copied is not None:
            data, next_offset = copied
            more = job.terminal and bool(
                (cluster.read_log(job.id, next_offset, 1) or (b"",))[0])
        elif path.exists():
            data, next_offset = joblogs.read(path, offset, limit_bytes)
            more = job.terminal and bool(joblogs.read(path, next_offset, 1)[0])
        else:
            # a job that never ran a program has no log: its story is told from its events,
            # byte for byte as a log would begin (so offsets hold if a log appears later)
            told = story(self.store.events(job.id))
            data = told[offset:offset + limit_bytes]
            next_offset = offset + len(data)
            more = next_offset < len(told)
        # a running job's log that ended short of the limit: its end is being written
        text, whole = joblogs.page(data, next_offset,
                                   growing=not job.terminal and len(data) < limit_bytes)
        return {"data": text, "next_offset": whole,
                "eof": job.terminal and not more and whole == next_offset}

    # -- changing ------------------------------------------------------------------------

    async def submit(self, scope: Scope, *, type: Any, project_id: Any = None,
                     options: Any = None, priority: Any = 0, metadata: Any = None,
                     description: Any = None, timeout_s: Any = None,
                     idempotency_key: Any = None, on_duplicate: Any = "fold"
                     ) -> dict[str, Any]:
        """Check and record a job; answered once its commit is durable.

        The checks of a sync or index look at the repository (git), so they run off the
        event loop; the others are cheap and run on it, and the commit is awaited, not
        blocked on: a submit then costs no thread hand-off but the writer's.
        """
        handler = self.handlers.get(type) if isinstance(type, str) else None
        if handler is None:
            raise InvalidParams(f"unknown job type {shown(type)} (known: "
                                f"{', '.join(sorted(self.handlers))})", field="type")
        # before the draft's checks, which may run git
        if on_duplicate not in ("fold", "reject"):
            raise InvalidParams(f'on_duplicate must be "fold" or "reject", not '
                                f'{shown(on_duplicate)}', field="on_duplicate")
        params = dict(project_id=project_id, options=options, priority=priority,
                      metadata=metadata, description=description, timeout_s=timeout_s,
                      idempotency_key=idempotency_key)
        if handler.exclusive:
            draft = await asyncio.to_thread(self._draft, scope, handler, **params)
        else:
            draft = self._draft(scope, handler, **params)
        rules = dataclasses.replace(self._rules(), reject_duplicates=on_duplicate == "reject")

        # a job that would start at once starts in its submit's statement
        job, deduplicated = await self.store.write_on(
            asyncio.get_running_loop(), lambda tx: self.store.submit_job_in(
                tx, draft, scope.actor, rules, start=self.engine.start_in))
        if not deduplicated:
            self.telemetry.submitted(job.type)
            # one line per job at info, at its end (the engine's)
            log.debug("job_submitted", job_id=job.id, user_id=job.user_id, type=job.type,
                     project_id=job.project_id, actor=scope.actor)
        return dict(self._view(job), deduplicated=deduplicated)

    def _draft(self, scope: Scope, handler: Handler, *, project_id: Any, options: Any,
               priority: Any, metadata: Any, description: Any, timeout_s: Any,
               idempotency_key: Any) -> Job:
        """The job as submitted, every input checked (SPEC §3, §3a), not yet stored."""
        type = handler.name
        if not handler.may_submit(scope):
            raise Forbidden(handler.refusal("submit"))
        project_id = _optional_id(project_id, "project_id")
        options = {} if options is None else options
        if not isinstance(options, dict):
            raise InvalidParams("options must be an object", field="options")
        _json_size(options, "options", MAX_OPTIONS)
        metadata = {} if metadata is None else metadata
        if not isinstance(metadata, dict):
            raise InvalidParams("metadata must be an object", field="metadata")
        _json_size(metadata, "metadata", MAX_METADATA)
        if description is not None:
            text(description, "description", max_bytes=MAX_DESCRIPTION)
        integer(priority, "priority", -100, 100)
        if priority > 0 and not scope.may_raise_priority:
            raise Forbidden("only admins and services may set a priority above 0",
                            field="priority")
        if timeout_s is not None:
            timeout_s = self._timeout(scope, timeout_s)
        if idempotency_key is not None:
            text(idempotency_key, "idempotency_key", min_chars=1, max_chars=128)
        if "repo_path" in options and not scope.may_repo_path:
            raise Forbidden("only admins and services may pass options.repo_path",
                            field="options.repo_path")
        try:
            options = handler.validate(options, user_id=scope.owner, project_id=project_id,
                                       trusted=scope.may_repo_path, config=self.config)
        except (ValueError, TypeError) as e:  # a plugin's way of refusing its options
            log.warning("handler_validate_raised", type=type, error=f"{e.__class__.__name__}: {e}")
            raise InvalidParams(f"{type} jobs refuse these options: {readable(str(e), 500)}",
                                field="options") from None
        return Job(id=new_job_id(), type=type, user_id=scope.owner, project_id=project_id,
                   status=JobStatus.CREATED, created_at=0, updated_at=0, version=0,
                   priority=priority, options=options, metadata=metadata,
                   description=description, timeout_s=timeout_s,
                   idempotency_key=idempotency_key)

    def _timeout(self, scope: Scope, timeout_s: Any) -> float:
        """A submit's ``timeout_s`` (SPEC §3a): 0 is no limit (services and admins only);
        a plain user asks from 1 s up to ``max_timeout``."""
        if scope.may_any_timeout:
            return number(timeout_s, "timeout_s", 0, None, " seconds (0: no limit)")
        high = self.config.execution.max_timeout
        bound = "" if high is None else "the max_timeout; "
        return number(timeout_s, "timeout_s", 1, high,
                       f" seconds ({bound}0, no limit, is for services and admins)")

    def _selection(self, scope: Scope, method: str, job_id: Any, filter: Any,
                   dry_run: Any) -> tuple[Job | None, dict[str, Any]]:
        """What a cancel or retry acts on: one job (found and in scope), or the store's
        filters of a ``filter`` (admins, and services acting with as_admin)."""
        flag(dry_run, "dry_run")
        if (job_id is None) == (filter is None):
            raise InvalidParams(f"{method} takes job_id (one job) or filter (every job it "
                                f"matches): exactly one of them",
                                field="filter" if filter is not None else "job_id")
        if job_id is not None:
            if dry_run:
                raise InvalidParams("dry_run goes with filter; for one job, jobs.get shows "
                                    "what it would touch", field="dry_run")
            job = self._job(scope, job_id)
            return job, {"job_id": job.id}
        if not scope.may_repo_path or (scope.caller.role is not Role.ADMIN
                                       and scope.user_id is not None):
            raise Forbidden(f"{method} with a filter is for jobd admins and services acting "
                            f"with as_admin; name each job by job_id instead", field="filter")
        if not isinstance(filter, dict):
            raise InvalidParams(f"filter must be an object of {', '.join(FILTER_KEYS)} "
                                f"(got {shown(filter)})", field="filter")
        unknown = sorted(set(filter) - set(FILTER_KEYS))
        if unknown:
            raise InvalidParams(f"filter.{unknown[0]} is not a filter (known: "
                                f"{', '.join(FILTER_KEYS)})", field=f"filter.{unknown[0]}")
        return None, self._filters(scope, **filter, prefix="filter.")

    @staticmethod
    def _touched(jobs: list[Job], more: bool, dry_run: bool) -> dict[str, Any]:
        """The answer of a filtered cancel or retry."""
        return {"jobs": [job.id for job in jobs], "count": len(jobs), "more": more,
                "dry_run": dry_run}

    async def cancel(self, scope: Scope, job_id: Any = None, filter: Any = None,
                     dry_run: Any = False, wait: Any = False) -> dict[str, Any]:
        """Cancel queued jobs at once; for running ones, ask the engine to stop them.

        One job (``job_id``: the job is answered; with ``wait``, once it has stopped,
        within ``cancel_grace`` and a little) or every active job ``filter`` matches, up
        to MAX_BULK in one transaction (``{jobs, count, more, dry_run}``).
        """
        flag(wait, "wait")
        if wait and filter is not None:
            raise InvalidParams("wait goes with job_id; after a filtered cancel, wait on "
                                "each job it answered", field="wait")
        answer = await asyncio.to_thread(self._cancel, scope, job_id, filter, dry_run)
        if wait and answer["status"] == JobStatus.RUNNING:
            answer = await self._watch(scope, answer["id"],
                                       self.config.execution.cancel_grace + 2, lambda job: False)
        return answer

    def _cancel(self, scope: Scope, job_id: Any, filter: Any, dry_run: Any) -> dict[str, Any]:
        one, filters = self._selection(scope, "jobs.cancel", job_id, filter, dry_run)
        try:
            if one is None:
                jobs, more = self.store.cancel_jobs(actor=scope.actor, limit=MAX_BULK,
                                                    dry_run=dry_run, **filters)
            else:
                jobs, more = [self.store.cancel_job(one.id, actor=scope.actor)], False
        except StateConflict:
            jobs, more = [], False  # cancelled or stopping already: answered below
        except StorageUnavailable:
            if one is None or one.status is not JobStatus.RUNNING:
                raise
            # storage full or read-only: the engine still stops the job, and records it
            # cancelled once the store takes writes again (its end waits for that)
            self.engine.cancel(one.id, actor=scope.actor)
            log.warning("job_cancel_requested", job_id=one.id, actor=scope.actor,
                        recorded=False)
            return dict(self._view(one), cancel_requested=True)
        for job in jobs if not dry_run else ():
            if job.status is JobStatus.RUNNING:
                self.engine.cancel(job.id, actor=scope.actor)
                log.info("job_cancel_requested", job_id=job.id, actor=scope.actor)
            else:  # its log, if an earlier attempt left one, says so (SPEC §5)
                self.engine.tell(job.id, end_story(job.status,
                                                   cancelled_while_queued(scope.actor)))
                log.info("job_cancelled", job_id=job.id, actor=scope.actor)
        if one is None:
            return self._touched(jobs, more, dry_run)
        job = jobs[0] if jobs else self.store.get_job(one.id)
        if job.status is JobStatus.RUNNING and not jobs:  # asked before: ask again, harmless
            self.engine.cancel(job.id, actor=scope.actor)
        if job.status in (JobStatus.RUNNING, JobStatus.CANCELLED):
            return self._view(job)
        raise Conflict(f"job {job.id} is {job.status}; only queued or running jobs can be "
                       f"cancelled", detail={"status": str(job.status)})

    def retry(self, scope: Scope, job_id: Any = None, filter: Any = None,
              dry_run: Any = False) -> dict[str, Any]:
        """Queue failed or cancelled jobs again: one (``job_id``), or every one ``filter``
        matches (as ``cancel``); a user past max_queued_per_user gets none retried."""
        one, filters = self._selection(scope, "jobs.retry", job_id, filter, dry_run)
        denied = sorted(name for name, handler in self.handlers.items()
                        if not handler.may_submit(scope))
        retryable = (JobStatus.FAILED, JobStatus.CANCELLED)
        if one is not None:
            if one.type in denied:
                raise Forbidden(self.handlers[one.type].refusal("retry"))
            if one.status not in retryable:
                raise Conflict(f"job {one.id} is {one.status}; only failed or cancelled jobs "
                               f"can be retried", detail={"status": str(one.status)})
        if one is None:
            jobs, more = self.store.retry_jobs(actor=scope.actor, limit=MAX_BULK,
                                               rules=self._rules(), dry_run=dry_run,
                                               exclude_types=denied, **filters)
        else:
            try:
                jobs, more = [self.store.retry_job(one.id, actor=scope.actor,
                                                   rules=self._rules())], False
            except StateConflict as e:  # it changed meanwhile
                raise Conflict(f"job {one.id} is {e.status}; only failed or cancelled jobs "
                               f"can be retried", detail={"status": e.status}) from None
        for job in jobs if not dry_run else ():
            log.info("job_retried", job_id=job.id, actor=scope.actor)
        if one is None:
            return self._touched(jobs, more, dry_run)
        return self._view(jobs[0])

    # -- admin ---------------------------------------------------------------------------

    def stats(self, scope: Scope, since: Any = None) -> dict[str, Any]:
        """admin.stats: counts kept as jobs change, the jobs finished since ``since``
        (rounded down to the hour, default 24 h ago, at most 35 days back) by type, and
        the top ``PER_USER_TOP`` users by active jobs."""
        if not scope.may_stats:
            raise Forbidden(_admin_only("admin.stats", scope))
        now = time.time_ns() // 1000
        since_us = iso_time(since, "since")
        if since_us is None:
            since_us = now - 24 * HOUR_US
        elif since_us < now - FINISHED_KEEP_US:
            days = FINISHED_KEEP_US // (24 * HOUR_US)
            raise InvalidParams(f"since is more than {days} days ago (got {shown(since)}); "
                                f"finished jobs are counted for {days} days: ask for a "
                                "later time", field="since")
        counts = {str(s): 0 for s in JobStatus if s is not JobStatus.CREATED}
        counts.update(self.store.counts())
        live = self.engine.stats()
        del live["running_here"]  # each node's: ``nodes``
        # the busiest first: a bounded heap, not a sort of every user with a job
        users = heapq.nsmallest(PER_USER_TOP + 1, live["per_user"].items(),
                                key=lambda kv: (-kv[1]["running"] - kv[1]["queued"], kv[0]))
        return {"jobs": counts, "by_type": self.store.type_counts(),
                "finished": self._finished(since_us // HOUR_US), **live,
                "per_user": dict(users[:PER_USER_TOP]),
                "per_user_truncated": len(users) > PER_USER_TOP,
                "maintenance": self.maintenance_on,
                "config": self.config_state.to_dict(),
                "db_bytes": self.store.size_bytes(), "uptime_s": self.uptime_s(),
                **({} if self.engine.cluster is None else {"nodes": self.engine.cluster.nodes()})}

    def _finished(self, since_hour: int) -> dict[str, dict[str, Any]]:
        """admin.stats' ``finished``: by type, the end statuses' counts, the success rate
        and the run time's mean, p50 and p95 (interpolated in the fixed histogram)."""
        uppers = self.store.run_buckets()
        by_type: dict[str, dict[str, Any]] = {}
        for type, status, bucket, n, run_us in self.store.finished(since_hour):
            entry = by_type.setdefault(type, {"ends": dict.fromkeys(_END_NAMES, 0),
                                              "hist": [0] * len(uppers), "run_us": 0})
            entry["ends"][status] += n
            if bucket >= 0:
                entry["hist"][bucket] += n
                entry["run_us"] += run_us
        out = {}
        for type, entry in by_type.items():
            ends, hist = entry["ends"], entry["hist"]
            judged = ends["completed"] + ends["failed"]
            ran = sum(hist)
            out[type] = {**ends, "success_rate": ends["completed"] / judged if judged else None,
                         "duration_s": {
                             "mean": entry["run_us"] / ran / 1e6 if ran else None,
                             "p50": _quantile(hist, uppers, 0.5),
                             "p95": _quantile(hist, uppers, 0.95)}}
        return out

    def cleanup(self, scope: Scope, *, older_than_s: Any = None, status: Any = None,
                dry_run: Any = False) -> dict[str, Any]:
        if not scope.may_stats:
            raise Forbidden(_admin_only("admin.cleanup", scope))
        if older_than_s is not None:
            older_than_s = number(older_than_s, "older_than_s", 0, 100 * 366 * 86400)
        statuses = _statuses(status)
        if not set(statuses) <= set(_END_NAMES):
            raise InvalidParams(f"status must be one of {', '.join(_END_NAMES)} or a list of "
                                f"them: only finished jobs are cleaned up (got {shown(status)})",
                                field="status")
        flag(dry_run, "dry_run")
        return self.run_cleanup(older_than_s=older_than_s, statuses=statuses or None,
                                dry_run=dry_run, actor=scope.actor, asked=True)

    def run_cleanup(self, *, older_than_s: float | None = None,
                    statuses: list[str] | None = None, dry_run: bool = False,
                    actor: str = "jobd", now: int | None = None, asked: bool = False
                    ) -> dict[str, Any]:
        """Delete terminal jobs past retention (and users' finished jobs past
        ``max_stored_per_user``), with their logs; also the scheduled job. With
        ``statuses``, only jobs that ended so, and none for ``max_stored_per_user``.
        Cluster mode: a scheduled round skips while another node sweeps, one ``asked``
        for waits its turn a while; and either removes the logs this node keeps of jobs
        another node's sweep or purge forgot (nothing tells a node of those at once)."""
        now = now if now is not None else time.time_ns() // 1000
        keep = older_than_s if older_than_s is not None else self.config.retention.keep
        keep_failed = (older_than_s if older_than_s is not None
                       else self.config.retention.keep_failed)
        cutoffs = (now - int(keep * 1e6), now - int(keep_failed * 1e6))
        deleted = 0
        # the logs of deleted jobs go with them (the store's ``deleted`` listener)
        for ids in self.store.cleanup(keep_before=cutoffs[0], keep_failed_before=cutoffs[1],
                                      statuses=statuses, dry_run=dry_run, wait=asked):
            deleted += len(ids)
        if self.engine.cluster is not None and not dry_run:
            joblogs.sweep_strays(self.config.log_dir, self.store.known_ids)
        log.info("cleanup_finished", deleted=deleted, dry_run=dry_run, actor=actor,
                 **({"statuses": statuses} if statuses else {}))
        return {"deleted": deleted, "dry_run": dry_run,
                "cutoffs": {"keep": iso(cutoffs[0]), "keep_failed": iso(cutoffs[1])}}

    async def purge(self, scope: Scope, user_id: Any) -> dict[str, Any]:
        """admin.purge: a removed account's jobs, gone. Its active jobs are cancelled
        first (the running ones waited for, at most cancel_grace + 2 s, as jobs.cancel
        with wait); then every finished job of the user goes with its events,
        checkpoints and log by the store's one delete (as cleanup), and its manifests.
        ``{deleted}``: how many jobs went (0 for a user jobd never saw)."""
        if not scope.may_stats:
            raise Forbidden(_admin_only("admin.purge", scope))
        user_id = check_id(user_id, "user_id")
        mine = {"user_id": user_id}
        while (await asyncio.to_thread(self._cancel, scope, None, mine, False))["more"]:
            pass
        deadline = time.monotonic() + self.config.execution.cancel_grace + 2
        for _, job_id in await asyncio.to_thread(self.store.list_ids, user_id=user_id,
                                                 statuses=["running"]):
            with contextlib.suppress(JobNotFound):  # gone meanwhile: nothing to wait for
                await self._watch(scope, job_id, max(0.0, deadline - time.monotonic()),
                                  lambda job: False)
        deleted = await asyncio.to_thread(self._purge, user_id)
        log.info("jobs_purged", user=user_id, deleted=deleted, actor=scope.actor)
        return {"deleted": deleted}

    def _purge(self, user_id: str) -> int:
        """Delete ``user_id``'s finished jobs (their logs go with them: the store's
        ``deleted`` listener) and manifests; how many jobs went."""
        deleted = sum(len(ids) for ids in self.store.purge(user_id))
        self.store.purge_manifests(user_id)
        return deleted

    def pause(self, scope: Scope) -> dict[str, Any]:
        return self._set_paused(scope, True)

    def resume(self, scope: Scope) -> dict[str, Any]:
        return self._set_paused(scope, False)

    def _set_paused(self, scope: Scope, paused: bool) -> dict[str, Any]:
        if not scope.may_pause:
            raise Forbidden(_admin_only(f"admin.{'pause' if paused else 'resume'}", scope))
        self.store.set_meta(_PAUSED_KEY, "1" if paused else None)
        self.engine.set_paused(paused)
        log.info("dispatch_paused" if paused else "dispatch_resumed", actor=scope.actor)
        return {"paused": paused}

    def maintenance(self, scope: Scope, enabled: Any = None,
                        reason: Any = None) -> dict[str, Any]:
        """admin.maintenance: switch it on (``reason`` told to those refused) or off; without
        ``enabled`` only report. The answer says whether the daemon is drained."""
        if not scope.may_pause:
            raise Forbidden(_admin_only("admin.maintenance", scope))
        if enabled is not None:
            flag(enabled, "enabled")
        if reason is not None:
            text(reason, "reason", max_chars=MAX_REASON)
            if enabled is not True:
                raise InvalidParams("reason goes with enabled: true (it is told to everyone "
                                    "refused while maintenance is on)", field="reason")
        if enabled is not None:
            reason = (reason or None) if enabled else None
            self.store.set_meta(_MAINTENANCE_KEY, (reason or "") if enabled else None)
            self.maintenance_on, self.maintenance_reason = enabled, reason
            log.info("maintenance_enabled" if enabled else "maintenance_disabled",
                     actor=scope.actor, reason=reason)
        now = self.engine.stats()
        running, queued = now["running"], now["queued"]
        if self.engine.cluster is not None:  # exact: every node's, as the database has them
            counts = self.store.counts()
            running, queued = counts.get("running", 0), counts.get("queued", 0)
        return {"maintenance": self.maintenance_on, "reason": self.maintenance_reason,
                "running": running, "queued": queued,
                "drained": running == 0 and (queued == 0 or now["paused"])}

    def metrics(self, scope: Scope) -> dict[str, str]:
        """admin.metrics: the Prometheus text of SPEC §10, gauges read now."""
        if not scope.may_stats:
            raise Forbidden(_admin_only("admin.metrics", scope))
        counts = {str(s): 0 for s in JobStatus if s is not JobStatus.CREATED}
        counts.update(self.store.counts())
        live = self.engine.stats()
        return {"text": self.telemetry.text({
            "jobd_jobs": counts, "jobd_running": live["running_here"],
            "jobd_queued": live["queued"], "jobd_workers": live["workers"],
            "jobd_paused": live["paused"], "jobd_maintenance": self.maintenance_on,
            "jobd_db_bytes": self.store.size_bytes()}, self.store.write_times())}

    def ping(self, caller: Any) -> dict[str, Any]:
        return {"version": __version__, "uptime_s": self.uptime_s(),
                "caller": {"uid": caller.uid, "user": caller.user, "role": str(caller.role)}}

    def uptime_s(self) -> float:
        return round(time.monotonic() - self.started, 3)


def jobd_error(e: StoreError) -> JobdError:
    """The one place a store error becomes what the client hears."""
    if isinstance(e, JobNotFound):
        return NotFound(str(e), field="job_id")
    if isinstance(e, StateConflict):
        return Conflict(str(e), detail={"status": e.status})
    if isinstance(e, DuplicateId):
        return Conflict(str(e), field="id")
    if isinstance(e, StorageUnavailable):
        return Unavailable(str(e))
    return Unavailable(f"storage unusable: {e}")
