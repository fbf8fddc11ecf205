"""The dispatcher on its own: order (priority, turns, age), limits, positions, pause.

Plain ``Job`` objects go in; what ``take`` hands out, and what ``position`` answers, is
checked against the rules of SPEC §5. A hypothesis state machine drives random submits,
starts, ends and cancels and checks that no limit is ever exceeded, that a job only
waits when a rule holds it back, and that every queued job runs once runners finish.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (Bundle, RuleBasedStateMachine, consumes, invariant,
                                 precondition, rule)

from jobd.attempt import Attempt
from jobd.dispatch import Dispatcher
from jobd.handlers import load_handlers
from jobd.models import Job, JobStatus

_seq = itertools.count(1)
#: the registered handlers: a job type's ``exclusive`` comes from its handler alone
HANDLERS = load_handlers()


def job(user: str = "alice", *, priority: int = 0, type: str = "noop",
        project: str | None = None, seq: int | None = None, name: str | None = None) -> Job:
    n = next(_seq) if seq is None else seq
    return Job(id=name or f"{user}-{n}", type=type, user_id=user, project_id=project,
               status=JobStatus.QUEUED, created_at=n, updated_at=n, version=1,
               priority=priority, seq=n)


class Queue(Dispatcher):
    """A dispatcher told each job's exclusivity by its handler, as the engine does, and
    whose attempts can be finished by job id (each test job runs once at a time)."""

    def __init__(self, *, workers: int, max_running_per_user: int) -> None:
        super().__init__(workers=workers, max_running_per_user=max_running_per_user)
        self.taken: dict[str, Attempt] = {}

    def add(self, job: Job, *, exclusive: bool | None = None) -> None:  # type: ignore[override]
        super().add(job, exclusive=HANDLERS[job.type].exclusive if exclusive is None
                    else exclusive)

    def load(self, jobs: list[Job]) -> None:
        for j in jobs:
            self.add(j)

    def take(self) -> Attempt | None:
        attempt = super().take()
        if attempt is not None:
            self.taken[attempt.job_id] = attempt
        return attempt

    def finish(self, attempt: Attempt | tuple[str, int] | str) -> None:  # type: ignore[override]
        super().finish(self.taken.pop(attempt) if isinstance(attempt, str) else attempt)


def drain(d: Dispatcher) -> list[str]:
    """Take and finish one job at a time until none is left; the ids in order."""
    order = []
    while (attempt := d.take()) is not None:
        order.append(attempt.job_id)
        d.finish(attempt)
    return order


def take_all(d: Dispatcher) -> list[str]:
    """Take until nothing more may start (without finishing any); the ids."""
    taken = []
    while (attempt := d.take()) is not None:
        taken.append(attempt.job_id)
    return taken


def dispatcher(workers: int = 1, per_user: int = 100) -> Queue:
    return Queue(workers=workers, max_running_per_user=per_user)


# -- order -----------------------------------------------------------------------------

def test_higher_priority_runs_first_even_when_younger() -> None:
    d = dispatcher()
    d.load([job(name="old-low", priority=-5), job(name="mid"),
            job(name="new-high", priority=50)])
    assert drain(d) == ["new-high", "mid", "old-low"]


def test_a_queued_job_whose_priority_a_fold_raised_moves_up() -> None:
    d = dispatcher()
    older = job(name="older")
    waiting = job(name="folded-into")
    d.load([older, waiting])
    d.add(dataclasses.replace(waiting, priority=10, version=2))
    assert drain(d) == ["folded-into", "older"]


def test_exclusive_jobs_wait_on_the_repository_path_not_on_user_and_project() -> None:
    d = dispatcher(workers=4)
    def on(path: str, user: str, name: str) -> Job:
        return dataclasses.replace(job(user, type="sync", project="proj", name=name),
                                   options={"repo_path": path})
    d.load([on("/r/a/proj", "alice", "a"), on("/r/b/proj", "alice", "b"),
            on("/r/a/proj", "bob", "same-tree")])
    assert sorted(take_all(d)) == ["a", "b"]
    assert d.position("same-tree")[1] == "project_busy"
    d.finish("a")
    assert take_all(d) == ["same-tree"]


def test_users_take_turns_within_a_priority() -> None:
    d = dispatcher()
    for name in ("a1", "a2", "a3"):
        d.add(job("alice", name=name))
    for name in ("b1", "b2"):
        d.add(job("bob", name=name))
    d.add(job("carol", name="c1"))
    assert drain(d) == ["a1", "b1", "c1", "a2", "b2", "a3"]


def test_a_user_who_just_had_a_turn_waits_behind_the_others() -> None:
    d = dispatcher()
    d.add(job("alice", name="a1"))
    d.add(job("bob", name="b1"))
    assert d.take().job_id == "a1"  # type: ignore[union-attr]
    d.finish("a1")
    # alice queues again at once: bob, who waited, goes first
    d.add(job("alice", name="a2"))
    assert drain(d) == ["b1", "a2"]


def test_each_users_jobs_go_oldest_first_and_a_requeued_job_keeps_its_age() -> None:
    d = dispatcher()
    first = job("alice", name="first")
    d.add(job("alice", name="second"))
    d.add(job("alice", name="third"))
    # a resumed or retried job comes back later, with its original (smaller) seq
    d.add(first)
    assert drain(d) == ["first", "second", "third"]


def test_adding_a_job_twice_or_while_it_runs_changes_nothing() -> None:
    d = dispatcher(workers=2)
    j = job("alice", name="j")
    d.add(j)
    d.add(j)
    assert d.queued_count() == 1
    assert d.take().job_id == "j"  # type: ignore[union-attr]
    d.add(j)  # the commit listener may echo the running job
    assert d.queued_count() == 0 and d.take() is None


def test_a_removed_job_is_never_taken() -> None:
    d = dispatcher()
    d.add(job(name="gone"))
    d.add(job(name="stays"))
    d.remove("gone")
    d.remove("never-queued")  # harmless
    assert drain(d) == ["stays"]
    assert d.position("gone") == (None, None)


# -- limits ----------------------------------------------------------------------------

def test_no_more_than_workers_run_at_once() -> None:
    d = dispatcher(workers=2)
    for u in ("a", "b", "c", "d"):
        d.add(job(u, name=u))
    assert take_all(d) == ["a", "b"]
    assert d.running_count() == 2
    assert d.position("c") == (1, "slots")
    d.finish("a")
    assert take_all(d) == ["c"]
    d.finish(("unknown", 1))  # harmless
    assert d.running_count() == 2


def test_a_user_at_max_running_waits_while_others_run() -> None:
    d = dispatcher(workers=4, per_user=2)
    for name in ("a1", "a2", "a3", "a4"):
        d.add(job("alice", name=name))
    d.add(job("bob", name="b1"))
    assert sorted(take_all(d)) == ["a1", "a2", "b1"]
    assert d.running_count("alice") == 2 and d.running_count("bob") == 1
    assert d.position("a3") == (1, "user_limit")
    assert d.per_user() == {"alice": {"running": 2, "queued": 2},
                            "bob": {"running": 1, "queued": 0}}
    d.finish("a1")
    assert take_all(d) == ["a3"]


def test_one_sync_or_index_per_user_and_project() -> None:
    d = dispatcher(workers=10)
    d.add(job("alice", name="sync1", type="sync", project="p"))
    d.add(job("alice", name="index1", type="index", project="p"))
    d.add(job("alice", name="other", type="sync", project="q"))
    d.add(job("alice", name="cmd", type="command", project="p"))
    d.add(job("bob", name="bob-sync", type="sync", project="p"))
    assert sorted(take_all(d)) == ["bob-sync", "cmd", "other", "sync1"]
    assert d.position("index1") == (1, "project_busy")
    d.finish("sync1")
    assert take_all(d) == ["index1"]


def test_a_busy_project_does_not_hold_back_the_same_users_other_jobs() -> None:
    d = dispatcher(workers=10)
    d.add(job("alice", name="s1", type="sync", project="p"))
    d.add(job("alice", name="s2", type="sync", project="p"))
    d.add(job("alice", name="s3", type="sync", project="q"))
    assert take_all(d) == ["s1", "s3"]


def test_pause_stops_dispatching_and_resume_restarts_it() -> None:
    d = dispatcher(workers=2)
    d.add(job(name="j1"))
    d.set_paused(True)
    assert d.take() is None
    assert d.position("j1") == (1, "paused")
    d.set_paused(False)
    assert d.take().job_id == "j1"  # type: ignore[union-attr]


def test_pause_leaves_running_jobs_counted() -> None:
    d = dispatcher(workers=1)
    d.add(job(name="run"))
    d.add(job(name="wait"))
    d.take()
    d.set_paused(True)
    assert d.running_count() == 1
    d.finish("run")
    assert d.take() is None
    d.set_paused(False)
    assert drain(d) == ["wait"]


# -- positions -------------------------------------------------------------------------

def test_positions_follow_the_dispatch_order() -> None:
    d = dispatcher()
    jobs = [job("alice", name="a1"), job("alice", name="a2"), job("bob", name="b1"),
            job("carol", name="c1", priority=1), job("bob", name="b2", priority=-1)]
    d.load(jobs)
    positions = {j.id: d.position(j.id)[0] for j in jobs}
    assert positions == {"c1": 1, "a1": 2, "b1": 3, "a2": 4, "b2": 5}
    assert sorted(positions, key=positions.__getitem__) == drain(d)


def test_positions_move_up_as_jobs_leave() -> None:
    d = dispatcher()
    d.add(job(name="j1"))
    d.add(job(name="j2"))
    d.add(job(name="j3"))
    assert d.position("j3") == (3, "slots")
    d.remove("j1")
    assert d.position("j3") == (2, "slots")
    d.take()
    assert d.position("j3") == (1, "slots")
    assert d.position("j2") == (None, None)  # running: no position


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abcd"), st.sampled_from([-1, 0, 0, 2])),
                min_size=1, max_size=30))
def test_positions_are_the_order_take_follows_without_limits(
        specs: list[tuple[str, int]]) -> None:
    d = dispatcher()
    ids = []
    for n, (user, priority) in enumerate(specs):
        j = job(user, priority=priority, name=f"j{n}")
        d.add(j)
        ids.append(j.id)
    predicted = sorted(ids, key=lambda i: d.position(i)[0])  # type: ignore[arg-type,return-value]
    assert [d.position(i)[0] for i in predicted] == list(range(1, len(ids) + 1))
    assert drain(d) == predicted


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abcdef"), st.sampled_from([-1, 0, 0, 2])),
                min_size=1, max_size=40), st.integers(0, 5), st.data())
def test_positions_of_many_jobs_at_once_are_each_ones_position_and_the_drain_order(
        specs: list[tuple[str, int]], taken: int, data: st.DataObject) -> None:
    """``positions`` counts a priority's places job by job or in one walk of its turns,
    whichever is less work: either way each job's answer is ``position``'s, in the order
    the jobs then start (after some have started, so that turns have moved)."""
    d = dispatcher()
    ids = []
    for n, (user, priority) in enumerate(specs):
        d.add(job(user, priority=priority, name=f"j{n}"))
        ids.append(f"j{n}")
    for _ in range(taken):
        attempt = d.take()
        if attempt is not None:
            d.finish(attempt)
    asked = data.draw(st.lists(st.sampled_from(ids), unique=True, min_size=1))
    one_by_one = {i: d.position(i) for i in asked}
    assert d.positions(asked) == one_by_one
    everyone = d.positions(ids)  # every job of a priority: one walk
    assert {i: everyone[i] for i in asked} == one_by_one
    queued = sorted((i for i in ids if everyone[i][0] is not None),
                    key=lambda i: everyone[i][0])  # type: ignore[arg-type,return-value]
    assert [everyone[i][0] for i in queued] == list(range(1, len(queued) + 1))
    assert drain(d) == queued


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from("abcdef"), min_size=2, max_size=30))
def test_no_user_gets_a_second_turn_while_another_waits(submitters: list[str]) -> None:
    d = dispatcher()
    # all queued before the first runs, in any order: one user may have sent a burst
    for n, user in enumerate(submitters):
        d.add(job(user, name=f"{user}-{n}"))
    users = [job_id.split("-")[0] for job_id in drain(d)]
    assert Counter(users) == Counter(submitters)
    # before each user's first turn, and between two of its turns, nobody goes twice
    for user in set(submitters):
        turns = [i for i, u in enumerate(users) if u == user]
        for start, end in zip([-1] + turns, turns):
            between = Counter(users[start + 1:end])
            assert max(between.values(), default=0) <= 1, (
                f"{user} waited while {between.most_common(1)[0][0]} went twice: {users}")


# -- random operations -------------------------------------------------------------------

USERS = ("u1", "u2")
PROJECTS = ("p", "q")


class DispatchMachine(RuleBasedStateMachine):
    """Random submits, starts, ends, requeues, cancels and pauses against SPEC §5's rules."""

    queued = Bundle("queued")

    def __init__(self) -> None:
        super().__init__()
        self.workers = 3
        self.per_user = 2
        self.d = dispatcher(workers=self.workers, per_user=self.per_user)
        self.jobs: dict[str, Job] = {}
        self.waiting: set[str] = set()
        self.running: set[str] = set()
        self.n = 0

    @rule(target=queued, user=st.sampled_from(USERS), priority=st.sampled_from([0, 0, 1, -1]),
          type=st.sampled_from(["sync", "index", "noop", "command"]),
          project=st.sampled_from(PROJECTS))
    def submit(self, user: str, priority: int, type: str, project: str) -> str:
        self.n += 1
        j = job(user, priority=priority, type=type, project=project, seq=self.n,
                name=f"j{self.n}")
        self.jobs[j.id] = j
        self.waiting.add(j.id)
        self.d.add(j)
        return j.id

    @rule(job_id=consumes(queued))
    def cancel(self, job_id: str) -> None:
        # cancelling a job that already started is the engine's business, not dispatch's
        if job_id in self.waiting:
            self.d.remove(job_id)
            self.waiting.discard(job_id)

    @rule()
    def take(self) -> None:
        eligible = self._eligible()
        attempt = self.d.take()
        if attempt is None:
            assert not eligible or self.d.paused or len(self.running) >= self.workers, (
                f"nothing taken although {sorted(eligible)} may run")
            return
        assert attempt.job_id in eligible, f"{attempt.job_id} started against a limit"
        chosen = self.jobs[attempt.job_id]
        top = max(self.jobs[i].priority for i in eligible)
        assert chosen.priority == top, "a lower priority ran while a higher one could"
        older = [i for i in eligible if self.jobs[i].user_id == chosen.user_id
                 and self.jobs[i].priority == top and self.jobs[i].seq < chosen.seq]
        assert not older, f"{attempt.job_id} ran before its user's older {older}"
        self.waiting.discard(attempt.job_id)
        self.running.add(attempt.job_id)

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        job_id = data.draw(st.sampled_from(sorted(self.running)))
        self.running.discard(job_id)
        self.d.finish(job_id)

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def requeue(self, data: st.DataObject) -> None:
        # a running job put back (daemon stopping, or a retry) keeps its age
        job_id = data.draw(st.sampled_from(sorted(self.running)))
        self.running.discard(job_id)
        self.d.finish(job_id)
        self.waiting.add(job_id)
        self.d.add(self.jobs[job_id])

    @rule(paused=st.sampled_from([False, False, True]))
    def pause(self, paused: bool) -> None:
        self.d.set_paused(paused)

    def _eligible(self) -> set[str]:
        """Queued jobs no rule holds back, by this test's own account of who runs."""
        if self.d.paused or len(self.running) >= self.workers:
            return set()
        per_user = Counter(self.jobs[i].user_id for i in self.running)
        busy = {_project(self.jobs[i]) for i in self.running} - {None}
        return {i for i in self.waiting
                if per_user[self.jobs[i].user_id] < self.per_user
                and _project(self.jobs[i]) not in busy}

    @invariant()
    def limits_hold(self) -> None:
        assert self.d.running_count() == len(self.running) <= self.workers
        per_user = Counter(self.jobs[i].user_id for i in self.running)
        assert all(n <= self.per_user for n in per_user.values())
        assert all(self.d.running_count(u) == per_user[u] for u in USERS)
        projects = Counter(_project(self.jobs[i]) for i in self.running)
        projects.pop(None, None)
        assert all(n == 1 for n in projects.values())
        assert self.d.queued_count() == len(self.waiting)

    @invariant()
    def per_user_counts_what_waits_and_runs(self) -> None:
        expected: dict[str, dict[str, int]] = {}
        for state, ids in (("queued", self.waiting), ("running", self.running)):
            for i in ids:
                counts = expected.setdefault(self.jobs[i].user_id, {"running": 0, "queued": 0})
                counts[state] += 1
        assert self.d.per_user() == expected

    @invariant()
    def every_waiting_job_has_a_place_and_a_reason(self) -> None:
        positions = sorted(self.d.position(i)[0] for i in self.waiting)  # type: ignore[type-var]
        assert positions == list(range(1, len(self.waiting) + 1))
        eligible = self._eligible()
        for i in self.waiting:
            position, reason = self.d.position(i)
            if self.d.paused:
                assert reason == "paused"
            elif i in eligible:
                # waits for a slot only when the jobs ahead of it fill the free workers
                busy = self.d.running_count() + position > self.d.workers  # type: ignore[operator]
                assert reason == ("slots" if busy else None)
            else:
                assert reason in ("slots", "user_limit", "project_busy")

    def teardown(self) -> None:
        # runners finish: every queued job must get its turn (no starvation)
        self.d.set_paused(False)
        for _ in range(len(self.waiting) + len(self.running) + 1):
            for job_id in list(self.running):
                self.d.finish(job_id)
            self.running.clear()
            while (attempt := self.d.take()) is not None:
                self.waiting.discard(attempt.job_id)
                self.running.add(attempt.job_id)
        assert not self.waiting, f"never ran: {sorted(self.waiting)}"
        assert self.d.queued_count() == 0


def _project(j: Job) -> tuple[str, str] | None:
    return (j.user_id, j.project_id) if HANDLERS[j.type].exclusive and j.project_id else None


DispatchMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=30,
                                             deadline=None)
test_dispatch_machine = DispatchMachine.TestCase


# -- attempts: a slot is (job id, attempt number) --------------------------------------

def test_a_retry_started_before_the_old_attempt_finished_keeps_its_own_slot() -> None:
    d = Dispatcher(workers=2, max_running_per_user=10)
    first_run = job("alice", name="j")
    d.add(first_run, exclusive=False)
    first = d.take()
    assert first is not None and first.key == ("j", 1)
    # its end and a retry commit before its worker lets go: the retry is attempt 2
    d.add(dataclasses.replace(first_run, attempts=1), exclusive=False)
    second = d.take()
    assert second is not None and second.key == ("j", 2)
    assert d.running_count() == 2
    d.finish(first)  # frees attempt 1's slot only
    assert d.running_count() == 1
    d.finish(first)  # again: harmless, attempt 2 still holds its slot
    assert d.running_count() == 1 and d.may_take()
    d.finish(second)
    assert d.running_count() == 0


def test_exclusivity_is_what_the_engine_says_of_the_handler_not_the_type_name() -> None:
    d = Dispatcher(workers=10, max_running_per_user=10)
    d.add(job("alice", name="x1", type="golden", project="p"), exclusive=True)
    d.add(job("alice", name="x2", type="golden", project="p"), exclusive=True)
    d.add(job("alice", name="s1", type="sync", project="q"), exclusive=False)
    d.add(job("alice", name="s2", type="sync", project="q"), exclusive=False)
    assert sorted(take_all(d)) == ["s1", "s2", "x1"]
    assert d.position("x2") == (1, "project_busy")


# -- a slot handed on with an end, a submit started at once (issue 9) ----------------------------

def test_a_slot_handed_on_goes_back_with_its_job_when_the_commit_fails() -> None:
    d = Dispatcher(workers=1, max_running_per_user=1)
    first, second, third = job("alice"), job("alice"), job("alice")
    for j in (first, second, third):
        d.add(j, exclusive=False)
    ending = d.take()
    assert ending is not None and ending.job_id == first.id
    # the per-user limit of 1 counts the ending attempt's slot as free: it is handed on
    nxt = d.take(instead_of=ending)
    assert nxt is not None and nxt.job_id == second.id and d.running_count() == 1
    d.put_back(nxt, instead_of=ending)  # the end and the start did not commit
    assert d.running_count("alice") == 1 and d.position(second.id)[0] == 1
    assert d.position(third.id)[0] == 2
    d.finish(ending)  # the end committed alone later: its slot is freed, and only then
    assert d.running_count() == 0 and d.take().job_id == second.id  # type: ignore[union-attr]


def test_an_ending_attempt_keeps_its_slot_when_no_job_may_take_it() -> None:
    d = Dispatcher(workers=2, max_running_per_user=2)
    d.add(job("bob", type="sync", project="p", name="s1"), exclusive=True)
    d.add(job("bob", type="sync", project="p", name="s2"), exclusive=True)
    ending = d.take()
    assert ending is not None
    d.set_paused(True)
    assert d.take(instead_of=ending) is None and d.running_count() == 1
    d.finish(ending)
    assert d.running_count() == 0


@pytest.mark.parametrize("why", ["queued", "paused", "slots", "user_limit", "project_busy"])
def test_a_submitted_job_starts_at_once_only_when_it_would_be_next(why: str) -> None:
    d = Dispatcher(workers=2, max_running_per_user=1)
    new = job("carol", type="sync", project="p")
    if why == "queued":
        d.add(job("dave"), exclusive=False)
    elif why == "paused":
        d.set_paused(True)
    elif why == "slots":
        d.set_limits(workers=0, max_running_per_user=1)
    elif why == "user_limit":
        d.add(job("carol"), exclusive=False)
        d.take()
    else:
        d.set_limits(workers=2, max_running_per_user=2)
        d.add(job("carol", type="sync", project="p"), exclusive=True)
        d.take()
    running = d.running_count()
    assert d.take_new(new, exclusive=True) is None and d.running_count() == running
    fresh = Dispatcher(workers=2, max_running_per_user=1)
    attempt = fresh.take_new(new, exclusive=True)
    assert attempt is not None and attempt.key == (new.id, 1)
    assert fresh.running_count("carol") == 1 and fresh.position(new.id) == (None, None)


def test_wait_reasons_count_what_other_nodes_run_and_the_clusters_slots() -> None:
    """Cluster mode: jobs running on other nodes hold their user's limit and their
    repository; the slots are every node's; a job claimed here is no longer elsewhere."""
    d = Dispatcher(workers=1, max_running_per_user=1)
    sync = dataclasses.replace(job("bob", type="sync", project="p"),
                               options={"repo_path": "/repos/p"})
    d.elsewhere(job("alice", name="a-running"), exclusive=False)
    d.elsewhere(sync, exclusive=True)
    d.add(job("alice", name="a-queued"), exclusive=False)
    d.add(dataclasses.replace(job("cy", type="sync", project="p", name="c-sync"),
                              options={"repo_path": "/repos/p"}), exclusive=True)
    d.add(job("dee", name="d-queued"), exclusive=False)
    assert d.position("a-queued")[1] == "user_limit"
    assert d.position("c-sync")[1] == "project_busy"
    assert d.position("d-queued")[1] == "slots"  # 2 running elsewhere, 1 slot here
    assert d.position("d-queued")[0] == 3
    d.set_cluster_slots(5)
    assert d.position("d-queued")[1] is None  # 2 running and 2 ahead: the 5th slot is its
    # read anew at a heartbeat: alice's job ended meanwhile, bob's still runs
    d.set_elsewhere([(sync, True)])
    assert d.position("a-queued")[1] is None
    assert d.position("c-sync")[1] == "project_busy"
    d.not_elsewhere(sync.id)
    assert d.position("c-sync")[1] is None
    # a job claimed by this node runs here, not elsewhere
    d.elsewhere(job("eve", name="e-1"), exclusive=False)
    d.claimed(dataclasses.replace(job("eve", name="e-1"), attempts=1), exclusive=False)
    assert d.running_count() == 1 and d._elsewhere == {}
