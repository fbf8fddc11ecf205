"""Which queued job runs next: priority, fair turns between users, limits, positions.

An in-memory mirror of the queue, loaded from the store at start and kept by the
store's commit listener (``add``/``remove``) and the engine (``take``/``finish``). Order:
highest priority first; within a priority, users take turns (round-robin); each user's
jobs go oldest first. A job waits while every worker is busy (``slots``), while its user
runs ``max_running_per_user`` jobs (``user_limit``), while an exclusive job (its
handler says ``exclusive``: sync, index, an exclusive ``[types]``) on the same resolved
repository path runs, whoever owns it (``project_busy``), or while dispatching is paused
(``paused``).

``take`` hands out an ``Attempt``; its slot is ``(job id, attempt number)`` and
``finish(attempt)`` frees exactly that one: a retry reuses the job id and may start
before the previous attempt's worker has let go of it.

In cluster mode the database picks what starts (``claimed``), and the mirror also holds
the jobs other nodes run (``elsewhere``) and the cluster's slots (``set_cluster_slots``),
so that a queued job's wait reason counts every node's running jobs, as the claim does.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import Counter, OrderedDict, defaultdict
from typing import Iterable

from jobd.attempt import Attempt
from jobd.models import Job, WaitReason

__all__ = ["Dispatcher", "Entry"]


@dataclasses.dataclass(frozen=True, slots=True)
class Entry:
    """What dispatch needs to know of a queued job."""

    id: str
    seq: int
    user_id: str
    #: what an exclusive job waits on: its resolved repository path (None: not exclusive)
    repository: str | None
    type: str
    priority: int
    number: int  #: the attempt its next start is

    @classmethod
    def of(cls, job: Job, *, exclusive: bool) -> "Entry":
        return cls(job.id, job.seq, job.user_id, _repository(job) if exclusive else None,
                   job.type, job.priority, job.attempts + 1)

    @property
    def key(self) -> tuple[str, int]:
        return (self.id, self.number)


def _repository(job: Job) -> str | None:
    """The work tree an exclusive job acts on: its ``repo_path`` as ``validate`` resolved
    it; a job queued before paths were stored waits on its (user, project) instead."""
    path = job.options.get("repo_path")
    if isinstance(path, str):
        return path
    if job.project_id is None:
        return None
    return f"{job.user_id}\0{job.project_id}"


class _Level:
    """One priority: a queue per user, and the users' turn order."""

    def __init__(self) -> None:
        self.users: OrderedDict[str, OrderedDict[str, Entry]] = OrderedDict()
        self.size = 0  #: jobs in this level

    def add(self, entry: Entry) -> None:
        jobs = self.users.setdefault(entry.user_id, OrderedDict())
        newest = next(reversed(jobs.values()), None)
        if entry.id not in jobs:
            self.size += 1
        jobs[entry.id] = entry
        # a re-queued (resumed or retried) job goes back to its place by age
        if newest is not None and entry.seq < newest.seq:
            ordered = sorted(jobs.values(), key=lambda e: e.seq)
            jobs.clear()
            jobs.update((e.id, e) for e in ordered)

    def remove(self, entry: Entry) -> None:
        jobs = self.users.get(entry.user_id)
        if jobs is not None and jobs.pop(entry.id, None) is not None:
            self.size -= 1
            if not jobs:
                del self.users[entry.user_id]

    def served(self, user_id: str) -> None:
        """``user_id`` just had a turn: it goes to the back of the line."""
        if user_id in self.users:
            self.users.move_to_end(user_id)

    def place(self, entry: Entry) -> int:
        """How many jobs of this priority take their turn before ``entry``, in O(users).

        ``entry`` is its user's k-th job (from 0), so it comes in turn round k: each user
        ahead of its user in the turn order has had k + 1 turns by then, each user after
        it k (or fewer, if they have fewer jobs).
        """
        jobs = self.users[entry.user_id]
        if len(jobs) == 1 and next(reversed(self.users)) == entry.user_id:
            # its user's only job, its user last in turn (a first job just submitted): one
            # job of every other user comes first
            return len(self.users) - 1
        # a job just submitted is its user's newest: no walk through the user's queue
        k = len(jobs) - 1 if next(reversed(jobs)) == entry.id else list(jobs).index(entry.id)
        before, ahead = k, True
        for user_id, queue in self.users.items():
            if user_id == entry.user_id:
                ahead = False
            else:
                before += min(len(queue), k + 1 if ahead else k)
        return before

    def places(self) -> dict[str, int]:
        """``place`` of every job of this priority in one walk, in O(jobs): round k takes
        each user's k-th job, the users in turn order."""
        out: dict[str, int] = {}
        turns = [iter(queue) for queue in self.users.values()]
        while turns:
            left = []
            for turn in turns:
                job_id = next(turn, None)
                if job_id is not None:
                    out[job_id] = len(out)
                    left.append(turn)
            turns = left
        return out


class Dispatcher:
    """Thread-safe; every method is cheap (O(users) at most), however long the queue."""

    def __init__(self, *, workers: int, max_running_per_user: int) -> None:
        self.workers = workers
        self.max_running_per_user = max_running_per_user
        self.paused = False
        self._lock = threading.Lock()
        self._levels: dict[int, _Level] = defaultdict(_Level)
        self._queued: dict[str, Entry] = {}
        self._queued_per_user: Counter[str] = Counter()
        #: (job id, attempt number) -> what runs in that slot
        self._running: dict[tuple[str, int], Entry] = {}
        self._running_per_user: Counter[str] = Counter()
        self._busy_repositories: Counter[str] = Counter()
        #: attempts whose slot ``take(instead_of=)`` handed on, until their end commits
        self._handed: dict[tuple[str, int], Entry] = {}
        #: cluster mode: the jobs other nodes run, and every live node's workers together
        self._elsewhere: dict[str, Entry] = {}
        self._elsewhere_per_user: Counter[str] = Counter()
        self._elsewhere_repositories: Counter[str] = Counter()
        self._cluster_slots: int | None = None

    # -- the queue -------------------------------------------------------------------------

    def add(self, job: Job, *, exclusive: bool) -> None:
        """Queue ``job``; ``exclusive``: its handler's (the engine knows the handlers)."""
        entry = Entry.of(job, exclusive=exclusive)
        with self._lock:
            if entry.key in self._running:
                return
            queued = self._queued.get(entry.id)
            if queued is not None:
                if queued.priority == entry.priority:
                    return
                self._dequeue(queued)  # a fold raised its priority
            self._enqueue(entry)

    def remove(self, job_id: str) -> None:
        """A queued job left the queue other than by ``take`` (cancelled)."""
        with self._lock:
            entry = self._queued.get(job_id)
            if entry is not None:
                self._dequeue(entry)

    def _enqueue(self, entry: Entry) -> None:
        self._queued[entry.id] = entry
        self._levels[entry.priority].add(entry)
        self._queued_per_user[entry.user_id] += 1

    def _dequeue(self, entry: Entry) -> None:
        del self._queued[entry.id]
        level = self._levels[entry.priority]
        level.remove(entry)
        if not level.users:
            del self._levels[entry.priority]
        self._queued_per_user[entry.user_id] -= 1
        if not self._queued_per_user[entry.user_id]:
            del self._queued_per_user[entry.user_id]

    def take(self, *, instead_of: Attempt | None = None) -> Attempt | None:
        """The next job's attempt, its slot now taken; None if none may start.

        ``instead_of``: an attempt whose end is being written, its slot handed to the
        next job as if free (the end and the next start commit together); when none may
        start, it keeps its slot. ``put_back`` undoes a hand-over whose commit failed.
        """
        with self._lock:
            ending = None if instead_of is None else self._running.get(instead_of.key)
            if ending is not None:
                self._free(ending)
            attempt = self._take()
            if ending is not None:
                if attempt is None:
                    self._start(ending)
                else:
                    self._handed[instead_of.key] = ending  # type: ignore[union-attr]
            return attempt

    def take_new(self, job: Job, *, exclusive: bool) -> Attempt | None:
        """A job being submitted, its slot taken at once, when it would be the next to
        start anyway: nothing else is queued and its limits let it run. None: it is queued
        as any other once its submit commits."""
        entry = Entry.of(job, exclusive=exclusive)
        with self._lock:
            if (self._queued or self.paused or len(self._running) >= self.workers
                    or self._running_per_user[entry.user_id] >= self.max_running_per_user
                    or entry.repository and self._busy_repositories[entry.repository]):
                return None
            self._start(entry)
            return Attempt(entry.id, entry.number)

    def claimed(self, job: Job, *, exclusive: bool) -> Attempt:
        """Cluster mode: ``job`` was started for this node by the database's claim; it runs
        here from now on (its user served, as ``take`` does)."""
        entry = Entry.of(dataclasses.replace(job, attempts=job.attempts - 1),
                         exclusive=exclusive)
        with self._lock:
            queued = self._queued.get(entry.id)
            if queued is not None:
                self._levels[queued.priority].served(entry.user_id)
                self._dequeue(queued)
            self._not_elsewhere(entry.id)
            self._start(entry)
            return Attempt(entry.id, entry.number)

    def elsewhere(self, job: Job, *, exclusive: bool) -> None:
        """Cluster mode: ``job`` runs on another node (its wait reasons count it here)."""
        with self._lock:
            self._add_elsewhere(Entry.of(job, exclusive=exclusive))

    def set_elsewhere(self, jobs: list[tuple[Job, bool]]) -> None:
        """Cluster mode: what every other node runs, read anew (``(job, exclusive)``)."""
        with self._lock:
            for job_id in list(self._elsewhere):
                self._not_elsewhere(job_id)
            for job, exclusive in jobs:
                self._add_elsewhere(Entry.of(job, exclusive=exclusive))

    def _add_elsewhere(self, entry: Entry) -> None:
        queued = self._queued.get(entry.id)
        if queued is not None:
            self._dequeue(queued)
        if entry.id in self._elsewhere or any(key[0] == entry.id for key in self._running):
            return
        self._elsewhere[entry.id] = entry
        self._elsewhere_per_user[entry.user_id] += 1
        if entry.repository:
            self._elsewhere_repositories[entry.repository] += 1

    def not_elsewhere(self, job_id: str) -> None:
        """Cluster mode: ``job_id`` no longer runs on another node."""
        with self._lock:
            self._not_elsewhere(job_id)

    def _not_elsewhere(self, job_id: str) -> None:
        entry = self._elsewhere.pop(job_id, None)
        if entry is None:
            return
        _drop(self._elsewhere_per_user, entry.user_id)
        if entry.repository:
            _drop(self._elsewhere_repositories, entry.repository)

    def set_cluster_slots(self, slots: int) -> None:
        """Cluster mode: every live node's ``workers`` together."""
        with self._lock:
            self._cluster_slots = slots

    def free_slots(self) -> int:
        """How many jobs this node may start now (0 while paused)."""
        with self._lock:
            return 0 if self.paused else max(0, self.workers - len(self._running))

    def put_back(self, attempt: Attempt, *, instead_of: Attempt | None = None,
                 queued: bool = True) -> None:
        """Undo a ``take`` whose start did not commit: its slot is freed and, if
        ``queued`` (the job still waits), the job is queued again in its place by age;
        the slot of ``instead_of`` goes back to it."""
        with self._lock:
            entry = self._running.get(attempt.key)
            if entry is not None:
                self._free(entry)
                if queued and entry.id not in self._queued:
                    self._enqueue(entry)
            if instead_of is not None:
                ending = self._handed.pop(instead_of.key, None)
                if ending is not None:
                    self._start(ending)

    def _take(self) -> Attempt | None:
        """``take``, under the lock."""
        if self.paused or len(self._running) >= self.workers:
            return None
        for priority in sorted(self._levels, reverse=True):
            level = self._levels[priority]
            for user_id, jobs in list(level.users.items()):
                if self._running_per_user[user_id] >= self.max_running_per_user:
                    continue
                for entry in jobs.values():
                    key = entry.repository
                    if key is None or not self._busy_repositories[key]:
                        level.served(user_id)
                        self._dequeue(entry)
                        self._start(entry)
                        return Attempt(entry.id, entry.number)
        return None

    def _start(self, entry: Entry) -> None:
        self._running[entry.key] = entry
        self._running_per_user[entry.user_id] += 1
        if entry.repository:
            self._busy_repositories[entry.repository] += 1

    def finish(self, attempt: Attempt | tuple[str, int]) -> None:
        """Free the slot of an attempt ``take`` handed out (or of its key), whatever its
        end; a slot already free is left as it is."""
        key = attempt.key if isinstance(attempt, Attempt) else attempt
        with self._lock:
            self._handed.pop(key, None)  # its slot went to the next job with its end
            entry = self._running.get(key)
            if entry is not None:
                self._free(entry)

    def _free(self, entry: Entry) -> None:
        if self._running.pop(entry.key, None) is not None:
            _drop(self._running_per_user, entry.user_id)
            if entry.repository:
                _drop(self._busy_repositories, entry.repository)

    def may_take(self) -> bool:
        """Whether ``take`` could start a job now: else there is no one to wake."""
        with self._lock:
            return not self.paused and len(self._running) < self.workers

    def set_paused(self, paused: bool) -> None:
        with self._lock:
            self.paused = paused

    def set_limits(self, *, workers: int, max_running_per_user: int) -> None:
        """New limits for every ``take`` from now on; jobs already taken keep running."""
        with self._lock:
            self.workers = workers
            self.max_running_per_user = max_running_per_user

    # -- answers ---------------------------------------------------------------------------

    def position(self, job_id: str) -> tuple[int | None, str | None]:
        """(1-based place in dispatch order, why it waits) of a queued job."""
        with self._lock:
            entry = self._queued.get(job_id)
            if entry is None:
                return None, None
            return self._placed(entry, self._levels[entry.priority].place(entry))

    def positions(self, job_ids: Iterable[str]) -> dict[str, tuple[int | None, str | None]]:
        """``position`` of each of ``job_ids`` (a list page's): a priority's places counted
        for each job (O(users) each), or all of them in one walk (O(jobs), ``places``)
        when that is less work, so that a page of one user's thousand queued jobs among
        thousands of users costs one walk, not a thousand."""
        out: dict[str, tuple[int | None, str | None]] = {}
        with self._lock:
            by_priority: defaultdict[int, list[Entry]] = defaultdict(list)
            for job_id in job_ids:
                out[job_id] = None, None
                if (entry := self._queued.get(job_id)) is not None:
                    by_priority[entry.priority].append(entry)
            for priority, entries in by_priority.items():
                level = self._levels[priority]
                places = (level.places() if len(entries) * len(level.users) > level.size
                          else {entry.id: level.place(entry) for entry in entries})
                for entry in entries:
                    out[entry.id] = self._placed(entry, places[entry.id])
        return out

    def _placed(self, entry: Entry, place: int) -> tuple[int, str | None]:
        """``position``'s answer for ``entry``, ``place`` jobs of its priority before it."""
        position = place + 1 + sum(level.size for priority, level in self._levels.items()
                                   if priority > entry.priority)
        reason = self._reason(entry, position)
        return position, str(reason) if reason else None

    def _reason(self, entry: Entry, position: int) -> WaitReason | None:
        """Why ``entry`` waits; None when nothing holds it (a worker is about to take it).
        In cluster mode every node's running jobs and slots count."""
        if self.paused:
            return WaitReason.PAUSED
        repository = entry.repository
        if repository and (self._busy_repositories[repository]
                           or self._elsewhere_repositories[repository]):
            return WaitReason.PROJECT_BUSY
        user = entry.user_id
        if (self._running_per_user[user] + self._elsewhere_per_user[user]
                >= self.max_running_per_user):
            return WaitReason.USER_LIMIT
        slots = self.workers if self._cluster_slots is None else self._cluster_slots
        if len(self._running) + len(self._elsewhere) + position > slots:
            return WaitReason.SLOTS  # the jobs ahead fill the slots
        return None

    def running_count(self, user_id: str | None = None) -> int:
        with self._lock:
            if user_id is None:
                return len(self._running)
            return self._running_per_user[user_id]

    def running_everywhere(self) -> int:
        """The jobs running on every node: this node's and (cluster mode) the others'."""
        with self._lock:
            return len(self._running) + len(self._elsewhere)

    def per_user(self) -> dict[str, dict[str, int]]:
        """Each user with a job queued or running (on any node): O(users), counted as jobs
        move."""
        with self._lock:
            running = self._running_per_user + self._elsewhere_per_user
            return {user: {"running": running[user], "queued": self._queued_per_user[user]}
                    for user in self._queued_per_user.keys() | running.keys()
                    if running[user] or self._queued_per_user[user]}

    def queued_count(self) -> int:
        return len(self._queued)


def _drop(counter: Counter[str], key: str) -> None:
    """One less of ``key``; a count that reaches 0 goes (the counters stay O(active))."""
    counter[key] -= 1
    if not counter[key]:
        del counter[key]
