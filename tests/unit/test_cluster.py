"""Cluster mode's node on the tests' private PostgreSQL (jobd.cluster): registration refused
with the first differing setting named, the heartbeat and the node's own deadline, claims
exact under the queue lock with racing nodes and in round-robin order, and fencing: a
node whose lease lapsed, or whose attempt is no longer its own, changes nothing.

Several nodes in one process: each is a store with a writer of its own on the one
database, opened as a cluster node (the node lock shared), and a ``Node`` on it.
"""

from __future__ import annotations

import contextlib
import random
import threading
import types
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from jobd import config as jobd_config
from jobd.handlers import load_handlers
from jobd.models import Job, JobStatus
from jobd.rules import Rules
from jobd.store import StateConflict

import pg
from test_store import new_job

pytest_plugins = ["pg"]


def node_config(tmp_path: Path, dsn: str, name: str, *, lease: str = "10s",
                heartbeat: str = "2s", workers: int = 4, max_running_per_user: int = 3,
                extra: str = "") -> Any:
    state = tmp_path / name
    state.mkdir(exist_ok=True)
    conf = tmp_path / f"{name}.toml"
    conf.write_text(f"""
[storage]
backend = "postgres"
dsn = "{dsn}"
state_dir = "{state}"
[cluster]
lease = "{lease}"
heartbeat = "{heartbeat}"
[execution]
workers = {workers}
max_running_per_user = {max_running_per_user}
{extra}
""")
    return jobd_config.load(conf, env={})


class Cluster:
    """Nodes on one database, each its own store and Node; closed at the end."""

    def __init__(self, tmp_path: Path, dsn: str) -> None:
        self.tmp_path, self.dsn = tmp_path, dsn
        self.parts: list[tuple[Any, Any]] = []

    def node(self, name: str | None = None, clock: Any = None, listeners: Any = None,
             **kw: Any) -> Any:
        """A node (``name``: its state folder's, by default its own; ``clock`` and
        ``listeners``: its store's)."""
        from jobd.cluster import Node
        from jobd.store.postgres import PostgresStore
        config = node_config(self.tmp_path, self.dsn, name or f"n{len(self.parts)}", **kw)
        store = PostgresStore(self.dsn, cluster=True, listeners=listeners,
                              **({} if clock is None else {"clock": clock})).open()
        node = Node(config, store, load_handlers(config))
        self.parts.append((store, node))
        return node

    def close(self) -> None:
        for store, node in self.parts:
            node.stop()
            store.close()


@pytest.fixture
def cluster(tmp_path: Path, pg_dsn: str) -> Iterator[Cluster]:
    c = Cluster(tmp_path, pg_dsn)
    yield c
    c.close()


def submit(store: Any, user: str = "alice", **kw: Any) -> Any:
    kw.setdefault("type", "noop")
    kw.setdefault("project", None)
    return store.submit_job(new_job(user=user, **kw), actor=user, rules=Rules())[0]


def claim(node: Any, slots: int = 1) -> list[Any]:
    return node.store.write(lambda tx: node.claim_in(tx, slots))


def rows(dsn: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    import psycopg
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(sql, args).fetchall()


# -- registration ------------------------------------------------------------------------------

def test_cluster_nodes_share_the_database_with_each_other_only(
        cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    from jobd.store import StoreError, postgres
    monkeypatch.setattr(postgres, "NODE_WAIT_S", 0.2)
    a, b = cluster.node(), cluster.node()  # both open
    with pytest.raises(StoreError, match="in use by another jobd .*run as cluster nodes"):
        postgres.PostgresStore(cluster.dsn).open()
    a.stop(), b.stop()
    for store, _ in cluster.parts:
        store.close()
    cluster.parts.clear()
    alone = postgres.PostgresStore(cluster.dsn).open()
    try:
        with pytest.raises(StoreError, match="in use by a jobd that is no cluster node"):
            postgres.PostgresStore(cluster.dsn, cluster=True).open()
    finally:
        alone.close()


def test_each_start_is_a_new_node_and_other_settings_are_refused_naming_the_first(
        cluster: Cluster) -> None:
    from jobd.cluster import NodeRefused
    a = cluster.node(max_running_per_user=3)
    b = cluster.node(max_running_per_user=3, workers=8)  # workers is per node
    assert {a.register(), b.register()} == {1, 2}
    c = cluster.node(max_running_per_user=5)
    with pytest.raises(NodeRefused, match=r"\[execution\] max_running_per_user: 5 here, 3 on "
                                          r"node 1 \(host "):
        c.register()
    assert c.id is None
    a.stop(), b.stop()  # ended: their settings bind no one
    assert c.register() == 3  # the refused try took no id


def test_a_lapsed_node_no_longer_binds_the_settings(cluster: Cluster) -> None:
    a = cluster.node(lease="1s", heartbeat="0.3s", max_running_per_user=3)
    a.register()
    b = cluster.node(lease="1s", heartbeat="0.3s", max_running_per_user=4)
    time.sleep(1.1)
    assert b.register() == 2


# -- heartbeat, deadline, fencing --------------------------------------------------------------

def test_the_heartbeat_renews_the_lease_and_moves_the_deadline(cluster: Cluster) -> None:
    clock = [100.0]
    a = cluster.node(lease="1s", heartbeat="0.3s")
    a.clock = lambda: clock[0]
    a.register()
    assert a.deadline() == pytest.approx(100.7)
    for _ in range(4):  # 1.6 s of beats: past the first lease, still held
        time.sleep(0.4)
        clock[0] += 0.4
        assert a.beat()
    assert a.deadline() == pytest.approx(clock[0] + 0.7)
    (until,), = rows(cluster.dsn, "SELECT lease_until - jobd_now_us() FROM nodes WHERE id = %s",
                     a.id)
    assert 0 < until <= 1_000_000


def test_a_node_whose_lease_lapsed_changes_nothing_and_knows_it(cluster: Cluster) -> None:
    from jobd.store.errors import Fenced
    a = cluster.node(lease="1s", heartbeat="0.3s")
    a.register()
    job = submit(a.store)
    other = submit(a.store)
    started = claim(a, 2)
    assert [j.id for j in started] == [job.id, other.id]
    a.store.save_checkpoint(job.id, "init", {"n": 1})  # while the lease holds: written
    time.sleep(1.1)  # no heartbeat: the lease lapses in the database's clock
    with pytest.raises(Fenced, match="nothing was written"):
        a.store.finish_job(job.id, JobStatus.COMPLETED)
    with pytest.raises(Fenced):
        a.store.save_checkpoint(other.id, "git_sync", {"n": 2})
    assert a.store.update_progress(other.id, progress=50, phase=None,
                                   message="late").result() is None
    a.store.set_process(other.id, 4242, 1)
    assert not a.beat() and a.lost and a.deadline() == 0.0
    assert claim(a) == []
    got = rows(cluster.dsn, "SELECT id, status, progress, pgid, node_id FROM jobs ORDER BY seq")
    assert got == [(job.id, "running", 0.0, None, a.id), (other.id, "running", 0.0, None, a.id)]
    assert rows(cluster.dsn, "SELECT phase FROM job_checkpoints") == [("init",)]
    # its lease ends now; the row stays for the rescue that takes its jobs over
    assert rows(cluster.dsn, "SELECT ended_at IS NULL, lease_until <= jobd_now_us() "
                             "FROM nodes WHERE id = %s", a.id) == [(True, True)]


def test_a_write_for_an_attempt_that_is_no_longer_the_nodes_is_refused(
        cluster: Cluster) -> None:
    from jobd.store.errors import Fenced
    a = cluster.node()
    a.register()
    job = submit(a.store)
    claim(a)
    # the job as another node would hold it after a rescue: a later attempt
    rows(cluster.dsn, "UPDATE jobs SET attempts = attempts + 1 WHERE id = %s RETURNING 1", job.id)
    with pytest.raises(Fenced) as refused:
        a.store.finish_job(job.id, JobStatus.FAILED, error="late")
    assert isinstance(refused.value, StateConflict)  # the engine records nothing for it
    assert a.beat()  # the node's own lease is fine
    assert rows(cluster.dsn, "SELECT status, error FROM jobs") == [("running", None)]


def test_an_attempt_that_ends_in_time_is_written_and_frees_its_slot(cluster: Cluster) -> None:
    a = cluster.node(workers=1)
    a.register()
    first, second = submit(a.store), submit(a.store)
    assert [j.id for j in claim(a, 2)] == [first.id]  # one worker
    assert claim(a) == []
    a.store.save_checkpoint(first.id, "init", {"n": 1})
    done = a.store.finish_job(first.id, JobStatus.COMPLETED)
    assert done.status is JobStatus.COMPLETED and first.id not in a.store.fences
    assert [j.id for j in claim(a)] == [second.id]
    assert rows(cluster.dsn, "SELECT status, node_id FROM jobs ORDER BY seq") == [
        ("completed", None), ("running", a.id)]


# -- claims ------------------------------------------------------------------------------------

def test_claims_pick_what_the_dispatcher_of_one_node_would(cluster: Cluster) -> None:
    """Random submits (users, priorities, exclusive repositories), claims and ends: each
    claim starts the job ``jobd.dispatch.Dispatcher.take`` picks for the same queue."""
    from jobd.dispatch import Dispatcher
    a = cluster.node(workers=4, max_running_per_user=2)
    a.register()
    mirror = Dispatcher(workers=4, max_running_per_user=2)
    rng = random.Random(3)
    running: dict[str, Any] = {}
    claims = 0
    for _ in range(250):
        roll = rng.random()
        if roll < 0.45:
            user, priority = rng.choice("abcde"), rng.choice((0, 0, 5, -3))
            if rng.random() < 0.3:
                job = submit(a.store, user, type="sync", project="p", priority=priority,
                             options={"repo_path": rng.choice(("/r/1", "/r/2", "/r/3"))})
            else:
                job = submit(a.store, user, priority=priority)
            mirror.add(job, exclusive=job.type == "sync")
        elif roll < 0.75 or not running:
            expected = mirror.take()
            got = claim(a)
            assert [j.id for j in got] == ([expected.job_id] if expected else []), claims
            claims += 1
            if expected is not None:
                running[expected.job_id] = expected
        else:
            job_id = rng.choice(sorted(running))
            a.store.finish_job(job_id, JobStatus.COMPLETED)
            mirror.finish(running.pop(job_id))
    assert claims > 50


def test_paused_nothing_is_claimed(cluster: Cluster) -> None:
    a = cluster.node()
    a.register()
    submit(a.store)
    a.store.set_meta("paused", "1")
    assert claim(a) == []
    a.store.set_meta("paused", None)
    assert len(claim(a)) == 1


def test_ends_and_claims_batched_together_on_several_nodes_never_deadlock(
        cluster: Cluster) -> None:
    """A node's writer puts an attempt's end and its next claim in one transaction. The
    end updates the shared count rows; had the claim then waited for the queue lock, a
    node holding the lock and updating those rows would deadlock with it (PostgreSQL
    breaks it after a second, and the batch runs again: a second lost each time)."""
    import structlog.testing
    # no heartbeat runs here: a lease long enough for a loaded machine
    nodes = [cluster.node(workers=4, max_running_per_user=50, lease="300s") for _ in range(3)]
    for node in nodes:
        node.register()
    for i in range(900):
        submit(nodes[0].store, f"u{i % 6}")
    errors: list[BaseException] = []

    def run(node: Any) -> None:
        try:
            mine = [j.id for j in claim(node, 4)]
            while mine:
                ends = [node.store.write_async(lambda tx, job_id=job_id: node.store.finish_job_in(
                    tx, job_id, JobStatus.COMPLETED)) for job_id in mine]
                claimed = node.store.write_async(lambda tx: node.claim_in(tx, 4))
                for end in ends:
                    end.result()
                mine = [j.id for j in claimed.result()]
        except BaseException as e:
            errors.append(e)

    with structlog.testing.capture_logs() as logs:
        threads = [threading.Thread(target=run, args=(n,)) for n in nodes]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert not errors, errors
    assert rows(cluster.dsn, "SELECT count(*) FROM jobs WHERE status = 'completed'") == [(900,)]
    reruns = [e for e in logs if e.get("event") == "store_batch_rerun"]
    assert reruns == [], f"{len(reruns)} batches ran again: {reruns[0]}"

def test_an_attempts_end_and_the_claim_of_its_slot_commit_in_one_transaction(
        cluster: Cluster) -> None:
    """A node's engine writes an attempt's end and the claim of the next job in the slot
    it frees in one transaction: one commit, one pass through the queue lock, per job."""
    from jobd.engine import Engine
    from jobd.store.base import Listeners
    engines: list[Any] = []
    a = cluster.node(workers=1, listeners=Listeners(
        changed=lambda job: engines and engines[0].on_changed(job)))
    a.register()
    jobs = [submit(a.store, f"u{i % 2}") for i in range(5)]
    engine = Engine(a.config, a.store, a.handlers, cluster=a)
    engines.append(engine)
    engine.start()
    try:
        deadline = time.monotonic() + 20
        while rows(cluster.dsn, "SELECT count(*) FROM jobs WHERE status = 'completed'") != [
                (5,)] and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        engine.stop()
    events = {(job_id, status): tx for job_id, status, tx in rows(
        cluster.dsn, "SELECT j.id, e.status, e.xmin::text FROM job_events e "
                     "JOIN jobs j ON j.seq = e.job WHERE e.status IN ('running', 'completed')")}
    assert len(events) == 10, events
    order = [j for j, _ in sorted(rows(cluster.dsn, "SELECT id, started_at FROM jobs"),
                                  key=lambda r: r[1])]
    assert sorted(order) == sorted(j.id for j in jobs)
    for ended, started in zip(order, order[1:]):
        assert events[ended, "completed"] == events[started, "running"], (ended, started)


def test_an_end_with_its_logs_rest_and_the_next_claim_wait_for_four_answers(
        cluster: Cluster) -> None:
    """Pipeline mode under the queue lock: the write of an attempt's end (the rest of its
    log copied first, its progress row dropped, its event) and the claim of the next job
    wait only for the queue lock (with the version floor), the end's row, the claim's, and
    the commit."""
    from jobd import joblogs
    from test_store_pg import waits_of
    a = cluster.node(workers=1)
    a.register()
    first, second = submit(a.store), submit(a.store, "bob")
    assert [j.id for j in claim(a)] == [first.id]
    joblog = joblogs.JobLog(joblogs.path(a.config.log_dir, first.id), 1 << 20)
    joblog.write(b"the last words\n")
    joblog.close()
    waits = waits_of(a.store)
    ended, claimed = a.store.write(lambda tx: (
        a.store.finish_job_in(tx, first.id, JobStatus.COMPLETED), a.claim_in(tx, 1)))
    assert waits[0] <= 4, waits[0]  # fewer when an answer is there before it is read
    assert ended.status is JobStatus.COMPLETED and [j.id for j in claimed] == [second.id]
    assert a.store.read_log(first.id, 0, 100) == (b"the last words\n", 15)
    assert rows(cluster.dsn, "SELECT status, node_id FROM jobs ORDER BY seq") == [
        ("completed", None), ("running", a.id)]


def test_racing_nodes_keep_every_limit_across_the_cluster(cluster: Cluster) -> None:
    """Three nodes claim and end at random while a sampler reads, in one snapshot, the
    most jobs running per user, per repository and per node: never above the limits."""
    nodes = [cluster.node(workers=4, max_running_per_user=2) for _ in range(3)]
    for node in nodes:
        node.register()
    users, repos = ["u1", "u2", "u3", "u4", "u5"], ["/r/a", "/r/b", "/r/c"]
    rng = random.Random(7)
    for i in range(300):
        user = rng.choice(users)
        if i % 3 == 0:  # exclusive on a shared repository
            submit(nodes[0].store, user, type="sync", project="p",
                   options={"repo_path": rng.choice(repos)})
        else:
            submit(nodes[0].store, user)
    stop = threading.Event()
    worst = [0, 0, 0]
    errors: list[BaseException] = []

    def run(node: Any) -> None:
        mine: list[str] = []
        r = random.Random(node.id)
        try:
            while not stop.is_set():
                mine += [j.id for j in claim(node, 4 - len(mine))]
                if mine and r.random() < 0.6:
                    node.store.finish_job(mine.pop(r.randrange(len(mine))),
                                          JobStatus.COMPLETED)
        except BaseException as e:
            errors.append(e)

    def sample() -> None:
        import psycopg
        with psycopg.connect(cluster.dsn, autocommit=True) as conn:
            while not stop.is_set():
                got = conn.execute("""
                    SELECT (SELECT coalesce(max(n), 0) FROM (SELECT count(*) n FROM jobs
                            WHERE status = 'running' GROUP BY user_id) u),
                           (SELECT coalesce(max(n), 0) FROM (SELECT count(*) n FROM jobs
                            WHERE status = 'running' AND repository IS NOT NULL
                            GROUP BY repository) r),
                           (SELECT coalesce(max(n), 0) FROM (SELECT count(*) n FROM jobs
                            WHERE status = 'running' GROUP BY node_id) n)""").fetchone()
                for i, v in enumerate(got):
                    worst[i] = max(worst[i], v)

    threads = [threading.Thread(target=run, args=(n,)) for n in nodes]
    threads.append(threading.Thread(target=sample))
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not errors and rows(
            cluster.dsn, "SELECT 1 FROM jobs WHERE status = 'queued' LIMIT 1"):
        time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors
    assert worst[0] == 2 and worst[1] == 1 and 1 <= worst[2] <= 4, worst
    assert rows(cluster.dsn, "SELECT count(*) FROM jobs WHERE status = 'queued'") == [(0,)]
    # every job started once
    assert rows(cluster.dsn, "SELECT max(attempts) FROM jobs") == [(1,)]


# -- rescue and recovery -----------------------------------------------------------------------

FAST_GRACE = '[execution]\ncancel_grace = "0.2s"\nmax_recoveries = 3\n'


def lapse(node: Any) -> None:
    """``node`` is cut off: no more heartbeats; its lease (1 s) ends in the database."""
    node.stop = lambda: None  # as a dead node: nothing ends its row
    time.sleep(1.05)


def test_rescue_takes_a_lost_nodes_jobs_as_a_restart_would(cluster: Cluster) -> None:
    """The rescue rules as a table: resumable requeued to resume, not resumable failed,
    cancel requested cancelled, recovered max_recoveries times failed."""
    a = cluster.node(lease="1s", heartbeat="0.3s", extra=FAST_GRACE.replace(
        "[execution]\n", ""), workers=10)
    a.register()
    jobs = {
        "resumable": submit(a.store, type="noop"),
        "not resumable": submit(a.store, "bob", type="command", options={"argv": ["true"]}),
        "cancel asked": submit(a.store, "cy", type="noop"),
        "recovered twice": submit(a.store, "dee", type="noop"),
    }
    assert len(claim(a, 10)) == 4
    a.store.save_checkpoint(jobs["resumable"].id, "init", {"step": 1})
    a.store.cancel_job(jobs["cancel asked"].id, actor="cy")
    rows(cluster.dsn, "UPDATE jobs SET recoveries = 2 WHERE id = %s RETURNING 1",
         jobs["recovered twice"].id)
    # the live progress a reported last, far ahead of the jobs' versions
    reported = rows(cluster.dsn, "INSERT INTO job_progress SELECT seq, node_id, attempts, 50, "
                    "NULL, NULL, version + 1000, 0 FROM jobs RETURNING job, version")
    clock = [0.0]
    b = cluster.node(extra=FAST_GRACE.replace("[execution]\n", ""))  # a 10 s lease
    b.clock = lambda: clock[0]
    b.register()
    assert b.rescue() == []  # its first sight of a's beat
    lapse(a)
    clock[0] += 10 + 1.2  # b's lease + cancel_grace + 1 s of a standing beat
    time.sleep(1.25)  # and as long past the lease's end by the database's clock
    moved = {j.id: j for j in b.rescue()}
    got = {what: (moved[j.id].status.value, moved[j.id].error or moved[j.id].message)
           for what, j in jobs.items()}
    assert got == {
        "resumable": ("queued", f"recovered: node {a.id} lost its lease"),
        "not resumable": ("failed", f"interrupted: node {a.id} lost its lease"),
        "cancel asked": ("cancelled", f"cancelled (node {a.id} lost its lease while stopping)"),
        "recovered twice": ("failed", f"interrupted 3 times, last as node {a.id} lost its "
                                      "lease; gave up (max_recoveries = 3)"),
    }
    assert rows(cluster.dsn, "SELECT phase FROM job_checkpoints") == [("init",)]
    assert rows(cluster.dsn, "SELECT count(*) FROM jobs WHERE node_id IS NOT NULL") == [(0,)]
    # their live progress rows went; their versions passed every one reported
    assert rows(cluster.dsn, "SELECT count(*) FROM job_progress") == [(0,)]
    reported_at = dict(reported)
    assert all(j.version > reported_at[j.seq] for j in moved.values()), (moved, reported)
    assert rows(cluster.dsn, "SELECT ended_at IS NOT NULL FROM nodes WHERE id = %s",
                a.id) == [(True,)]
    # the requeued job resumes on b: a new attempt, its checkpoint kept
    (again,) = claim(b)
    assert again.id == jobs["resumable"].id and again.attempts == 2
    assert b.store.load_checkpoints(again.id) == {"init": {"step": 1}}
    # a's late writes change nothing
    from jobd.store.errors import Fenced
    with pytest.raises(Fenced):
        a.store.finish_job(again.id, JobStatus.COMPLETED)
    assert claim(a) == []


@pytest.mark.parametrize("case", ["lease holds", "within the margin", "beat moved",
                                  "beat not watched long enough"])
def test_no_rescue_before_both_clocks_say_the_node_is_gone(cluster: Cluster, case: str) -> None:
    grace = FAST_GRACE.replace("[execution]\n", "")
    a = cluster.node(lease="1s", heartbeat="0.3s", extra=grace)
    a.register()
    job = submit(a.store)
    claim(a)
    clock = [0.0]
    b = cluster.node(lease="1s", heartbeat="0.3s", extra=grace)
    b.clock = lambda: clock[0]
    b.register()
    b.rescue()
    if case == "lease holds":
        for _ in range(8):
            time.sleep(0.3)
            assert a.beat()
        clock[0] += 100  # b's own watch alone never rescues
    elif case == "within the margin":
        lapse(a)  # ended 0 s ago by the database's clock: within cancel_grace + 1 s
        clock[0] += 100
    elif case == "beat moved":
        time.sleep(0.5)
        assert a.beat()  # a beat b has not seen yet
        lapse(a)
        time.sleep(1.25)
        clock[0] += 100
        assert b.rescue() == []  # b sees the new beat now, and starts watching again
    else:
        lapse(a)
        time.sleep(1.25)
        clock[0] += 2.0  # below lease + margin (2.2 s)
    assert b.rescue() == []
    assert rows(cluster.dsn, "SELECT status, node_id FROM jobs WHERE id = %s", job.id) == [
        ("running", a.id)]


def test_restart_recovery_takes_only_this_hosts_and_state_folders_earlier_nodes(
        cluster: Cluster) -> None:
    here = cluster.node("here")
    there = cluster.node("there")
    here.register(), there.register()
    mine, theirs = submit(here.store), submit(there.store, "bob")
    claim(here), claim(there)
    # a node left running jobs before a one-node jobd's upgrade: no node
    orphan = submit(here.store, "cy")
    here.store.start_job(orphan.id)
    again = cluster.node("here")  # this state folder's next start
    again.register()
    moved = {j.id: j.status for j in again.recover()}
    assert moved == {mine.id: JobStatus.QUEUED, orphan.id: JobStatus.QUEUED}
    assert rows(cluster.dsn, "SELECT status, node_id FROM jobs WHERE id = %s", theirs.id) == [
        ("running", there.id)]
    assert rows(cluster.dsn, "SELECT id FROM nodes WHERE ended_at IS NOT NULL") == [(here.id,)]


def test_a_node_that_lost_its_lease_stops_its_attempts_and_comes_back_as_a_new_node(
        cluster: Cluster) -> None:
    a = cluster.node(lease="1s", heartbeat="0.3s")
    a.register()
    old = a.id
    job, other = submit(a.store), submit(a.store, "bob", type="command",
                                           options={"argv": ["true"]})
    claim(a, 2)
    stopped: list[bool] = []
    a.on_lost = lambda: stopped.append(True)
    time.sleep(1.05)
    assert not a.beat() and a.lost and a.deadline() == 0.0
    a.rejoin()
    assert stopped == [True] and not a.lost and a.id != old
    assert a.deadline() is not None and a.deadline() > 0
    assert rows(cluster.dsn, "SELECT status, node_id FROM jobs ORDER BY seq") == [
        ("queued", None), ("failed", None)]
    assert rows(cluster.dsn, "SELECT error FROM jobs WHERE id = %s", other.id) == [
        (f"interrupted: node {old} lost its lease",)]
    (resumed,) = claim(a)
    assert resumed.id == job.id and resumed.attempts == 2
    a.store.finish_job(job.id, JobStatus.COMPLETED)  # the new id's fence holds


def test_a_node_that_came_back_as_a_new_node_names_its_sessions_for_it(
        cluster: Cluster) -> None:
    """pg_stat_activity names the listener's and the progress reporter's sessions for the
    node id they work for; after a rejoin, for the new one (they kept the old name, which
    an operator, and a rescue ending a node's sessions by name, would take for another
    node's)."""
    a = cluster.node(lease="1s", heartbeat="0.3s")
    a.register()
    old = a.id
    Heard(a)
    a._reporter = threading.Thread(target=a._report_loop, daemon=True)
    a._reporter.start()

    def sessions(of: int) -> set[str]:
        return {name for (name,) in rows(cluster.dsn, "SELECT application_name FROM "
                                         "pg_stat_activity WHERE application_name LIKE %s",
                                         f"jobd node {of} %")}

    def report() -> None:  # live progress of the job a runs, as the engine would hand it
        (job,) = claim(a)
        a.progressed(job.id, types.SimpleNamespace(progress=5.0, phase="p", message="m"))

    def wait_for(want: set[str], of: int) -> None:
        deadline = time.monotonic() + 5
        while sessions(of) != want:
            assert time.monotonic() < deadline, (sessions(old), sessions(a.id))
            time.sleep(0.05)

    submit(a.store)
    report()
    wait_for({f"jobd node {old} listen", f"jobd node {old} progress"}, old)
    time.sleep(1.05)
    assert not a.beat()
    a.rejoin()
    report()  # the job, requeued by the rejoin, claimed again under the new id
    wait_for({f"jobd node {a.id} listen", f"jobd node {a.id} progress"}, a.id)
    wait_for(set(), old)


# -- notifications -----------------------------------------------------------------------------

class Heard:
    """What a node's listener told (its callbacks), with the time of each."""

    def __init__(self, node: Any) -> None:
        self.calls: list[tuple[str, Any, float]] = []
        node.on_jobs = lambda jobs, gone: self.calls.extend(
            ("job", job_id, time.monotonic()) for job_id in [j.id for j in jobs] + gone)
        node.on_cancel = lambda job_id: self.calls.append(("cancel", job_id, time.monotonic()))
        node.on_claimable = lambda: self.calls.append(("claim", None, time.monotonic()))
        node.on_meta = lambda: self.calls.append(("meta", None, time.monotonic()))
        node.on_resync = lambda: self.calls.append(("resync", None, time.monotonic()))
        self.thread = threading.Thread(target=node.listen, daemon=True)
        self.thread.start()
        node._listener = self.thread  # stopped with the node

    def of(self, kind: str, what: Any = None) -> list[float]:
        return [at for k, w, at in self.calls if k == kind and (what is None or w == what)]

    def wait(self, kind: str, what: Any = None, after: float = 0.0,
             timeout: float = 5.0) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = [at for at in self.of(kind, what) if at > after]
            if got:
                return got[0]
            time.sleep(0.005)
        raise AssertionError(f"no {kind} {what or ''} heard: {self.calls}")


def test_a_cancel_through_another_node_reaches_the_owner_by_notification(
        cluster: Cluster) -> None:
    a, b = cluster.node(), cluster.node()  # poll 1 s: only a notification is this fast
    a.register(), b.register()
    job = submit(b.store)
    heard = Heard(a)
    heard.wait("resync")
    assert [j.id for j in claim(a)] == [job.id]
    asked = time.monotonic()
    b.store.cancel_job(job.id, actor="admin:root")
    assert heard.wait("cancel", job.id, after=asked) - asked < 0.5
    assert heard.of("job", job.id)  # its waiters on a were woken too
    # and a job a does not run is only its waiters' business
    other = submit(b.store, "bob")
    b.store.cancel_job(other.id, actor="bob")
    heard.wait("job", other.id)
    assert not heard.of("cancel", other.id)


def test_the_queue_and_the_settings_wake_every_node(cluster: Cluster) -> None:
    a, b = cluster.node(), cluster.node()
    a.register(), b.register()
    heard = Heard(a)
    start = heard.wait("resync")
    time.sleep(0.05)
    submitted = time.monotonic()
    submit(b.store)
    assert heard.wait("claim", after=submitted) - submitted < 0.5
    paused = time.monotonic()
    b.store.set_meta("paused", "1")
    assert heard.wait("meta", after=paused) - paused < 0.5
    assert start


def test_the_listener_reconnects_after_a_postgres_restart_and_resyncs(
        cluster: Cluster, postgres: pg.PostgresServer) -> None:
    from structlog.testing import capture_logs
    a, b = cluster.node(), cluster.node()
    a.register(), b.register()
    with capture_logs() as logs:
        heard = Heard(a)
        heard.wait("resync")
        postgres.restart()
        back = time.monotonic()
        heard.wait("resync", after=back, timeout=10)
        deadline = time.monotonic() + 5
        while not [e for e in logs if e["event"] == "cluster_listener_reconnected"]:
            assert time.monotonic() < deadline, logs
            time.sleep(0.02)
    # notifications flow again: a change on b reaches a
    job = None
    for _ in range(3):  # b's writer finds its connection broken once, then reconnects
        try:
            job = submit(b.store)
            break
        except Exception:
            time.sleep(0.2)
    assert job is not None
    heard.wait("job", job.id)


# -- stats and cleanup -------------------------------------------------------------------------

def test_stats_nodes_lists_every_node_not_ended_with_what_it_runs(cluster: Cluster) -> None:
    from jobd.models import iso
    a, b = cluster.node(workers=2), cluster.node()
    a.register(), b.register()
    submit(a.store), submit(a.store, "bob")
    claim(a, 2)
    nodes = a.nodes()
    assert [(n["id"], n["running"]) for n in nodes] == [(a.id, 2), (b.id, 0)]
    (row,) = rows(cluster.dsn, "SELECT started_at, lease_until FROM nodes WHERE id = %s", a.id)
    assert (nodes[0]["started_at"], nodes[0]["lease_until"]) == (iso(row[0]), iso(row[1]))
    assert nodes[0]["host"] == a.host
    b.stop()
    assert [n["id"] for n in a.nodes()] == [a.id]


def test_cleanup_runs_on_one_node_at_a_time(cluster: Cluster) -> None:
    a, b = cluster.node(), cluster.node()
    for i in range(6):
        job = submit(a.store, f"u{i}")
        a.store.cancel_job(job.id, actor="jobd")
    far = 2**62
    sweep = a.store.cleanup(keep_before=far, keep_failed_before=far, chunk=2)
    first = next(sweep)  # a sweeps, and holds the turn between its chunks
    assert list(b.store.cleanup(keep_before=far, keep_failed_before=far)) == []
    rest = [ids for ids in sweep]
    assert len(first) + sum(map(len, rest)) == 6
    # a's turn is over: b sweeps the next round
    job = submit(b.store, "late")
    b.store.cancel_job(job.id, actor="jobd")
    assert list(b.store.cleanup(keep_before=far, keep_failed_before=far)) == [[job.id]]


def reporting(cluster: Cluster) -> tuple[Any, Any, Job, list[tuple[str, int]]]:
    """Nodes a and b, a's job running, and a's live-progress reporter started: (a, b, the
    job, the (job id, version) of each report a wrote)."""
    a, b = cluster.node(), cluster.node()
    a.register(), b.register()
    submit(a.store)
    [job] = claim(a)
    reported: list[tuple[str, int]] = []
    a.on_reported = lambda job_id, version: reported.append((job_id, version))
    a._reporter = threading.Thread(target=a._report_loop, daemon=True)
    a._reporter.start()
    return a, b, job, reported


def test_live_progress_is_taken_only_from_the_running_attempts_own_node(
        cluster: Cluster) -> None:
    import types
    a, b, job, reported = reporting(cluster)
    a.progressed(job.id, types.SimpleNamespace(progress=42.0, phase="git_sync",
                                               message="half", version=job.version))
    deadline = time.monotonic() + 5
    while not reported:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    # the database gave the report its version: above the job's, and told this node's own
    [(job_id, version)] = reported
    assert job_id == job.id and version > job.version
    assert b.store.live_progress(job.id, 0) == (42.0, "git_sync", "half", version)
    assert b.store.live_progress(job.id, version) is None  # not newer
    assert a.store.echoes.own(job.id, version)  # its notification is this node's echo
    out = {"id": job.id, "version": 0, "progress": 0}
    b.annotate(out)
    assert (out["progress"], out["message"]) == (42.0, "half")
    # the row of an earlier attempt (the job rescued and run again) is not taken
    rows(cluster.dsn, "UPDATE jobs SET attempts = attempts + 1 WHERE id = %s RETURNING 1",
         job.id)
    assert b.store.live_progress(job.id, 0) is None


def test_a_node_past_its_lease_writes_no_live_progress(cluster: Cluster) -> None:
    # frozen past its lease and thawed before a rescue: it changes nothing (SPEC §11)
    import types
    a, b, job, reported = reporting(cluster)

    def report(message: str, count: int) -> None:
        a.progressed(job.id, types.SimpleNamespace(progress=10.0 * count, phase="git_sync",
                                                   message=message, version=job.version))
        deadline = time.monotonic() + 5
        while a._pending or len(reported) < count:
            assert time.monotonic() < deadline, (message, reported)
            time.sleep(0.005)

    report("before", 1)
    (lease,) = rows(cluster.dsn, "SELECT lease_until FROM nodes WHERE id = %s", a.id)[0]
    rows(cluster.dsn, "UPDATE nodes SET lease_until = 0 WHERE id = %s RETURNING 1", a.id)
    report("lapsed", 1)  # taken, written nowhere
    time.sleep(0.5)
    rows(cluster.dsn, "UPDATE nodes SET lease_until = %s WHERE id = %s RETURNING 1", lease, a.id)
    report("after", 2)
    assert b.store.live_progress(job.id, 0)[2] == "after"
    assert len(reported) == 2


def test_versions_never_go_down_across_nodes_whose_clocks_differ(cluster: Cluster) -> None:
    """Versions come from one sequence (SPEC §11): a job's live progress reported by a node
    whose clock is an hour ahead, then changes written by one an hour behind, still rise
    past every version a client has seen."""
    import types
    from jobd.store.base import now_us
    hour = 3600 * 1_000_000
    a = cluster.node(clock=lambda: now_us() + hour)
    b = cluster.node(clock=lambda: now_us() - hour)
    a.register(), b.register()
    submit(b.store)
    [job] = claim(a)
    seen = [job.version]
    reported: list[int] = []
    a.on_reported = lambda job_id, version: reported.append(version)
    a._reporter = threading.Thread(target=a._report_loop, daemon=True)
    a._reporter.start()
    # the version the engine keeps in memory for the live progress, as it asks the store
    live = types.SimpleNamespace(progress=10.0, phase="git_sync", message=None,
                                 version=a.store.next_version(job.version))
    a.progressed(job.id, live)
    deadline = time.monotonic() + 5
    while not reported:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    seen.append(b.store.live_progress(job.id, 0)[3])
    seen.append(b.store.cancel_job(job.id, actor="bob").version)  # requested: still running
    seen.append(a.store.get_job(job.id).version)
    assert seen == sorted(seen) and len(set(seen)) == 3, seen


def test_a_reload_with_other_cluster_wide_settings_is_refused_naming_the_difference(
        cluster: Cluster, tmp_path: Path) -> None:
    from jobd.config import ConfigError
    a = cluster.node(max_running_per_user=3, workers=2)
    b = cluster.node(max_running_per_user=3)
    a.register(), b.register()
    other = node_config(tmp_path, cluster.dsn, "n0", max_running_per_user=5, workers=2)
    with pytest.raises(ConfigError, match=r"not reloaded: \[execution\] max_running_per_user: "
                                          rf"5 here, 3 on node {b.id} \(host "):
        a.check_reload(other)
    assert a.config.execution.max_running_per_user == 3
    # workers is the node's own: taken, and claims count it
    more = node_config(tmp_path, cluster.dsn, "n0", max_running_per_user=3, workers=3)
    a.check_reload(more)
    for i in range(4):
        submit(a.store, f"u{i}")
    assert len(claim(a, 4)) == 3
    # alone on the database, a node may change them
    b.stop()
    a.check_reload(node_config(tmp_path, cluster.dsn, "n0", max_running_per_user=5, workers=3))
    assert a.config.execution.max_running_per_user == 5


def test_a_reload_and_a_registration_are_checked_one_at_a_time(
        cluster: Cluster, tmp_path: Path) -> None:
    """A node alone reloading other settings while a node with the old ones registers:
    both check under the registration lock, so one of them is refused, whichever came
    first; never both taken with different settings."""
    import psycopg
    from jobd.cluster import REGISTER_KEY, NodeRefused
    from jobd.config import ConfigError
    a = cluster.node(max_running_per_user=3)
    a.register()
    c = cluster.node(max_running_per_user=3)
    outcomes: dict[str, Any] = {}

    def run(name: str, fn: Any) -> None:
        try:
            outcomes[name] = fn()
        except (ConfigError, NodeRefused) as e:
            outcomes[name] = e
    with psycopg.connect(cluster.dsn, autocommit=True) as held:
        held.execute("SELECT pg_advisory_lock(%s)", (REGISTER_KEY,))
        threads = [threading.Thread(target=run, args=("reload", lambda: a.check_reload(
                       node_config(tmp_path, cluster.dsn, "n0", max_running_per_user=4)))),
                   threading.Thread(target=run, args=("register", c.register))]
        for t in threads:
            t.start()
        time.sleep(0.5)
        assert outcomes == {}  # both wait for the lock
    for t in threads:
        t.join(10)
    refused = [name for name, e in outcomes.items() if isinstance(e, Exception)]
    assert len(outcomes) == 2 and len(refused) == 1, outcomes
    limits = {n for (n,) in rows(cluster.dsn, "SELECT settings::jsonb -> 'execution' ->> "
                                 "'max_running_per_user' FROM nodes WHERE ended_at IS NULL")}
    assert len(limits) == 1 and None not in limits, limits


def test_a_nodes_own_announcements_are_told_apart_from_others_and_kept_bounded(
        postgres: pg.PostgresServer) -> None:
    """A node hears its own notifications too: those at or below the version it announced
    are its echo (no read), later ones another node's; the memory keeps the newest."""
    from jobd.store.postgres import Echoes
    echoes = Echoes()
    echoes.KEEP = 10
    echoes.sent("a", 5)
    echoes.sent("a", 3)  # an older version never lowers what was announced
    assert echoes.own("a", 5) and echoes.own("a", 4)
    assert not echoes.own("a", 6) and not echoes.own("b", 1)
    for n in range(30):
        echoes.sent(f"job{n}", 1)
    assert echoes.own("job29", 1) and not echoes.own("job0", 1)
    assert len(echoes._sent) <= echoes.KEEP


def test_a_notification_no_node_sent_is_ignored(cluster: Cluster) -> None:
    """Any client of the database may NOTIFY jobd's channels: a payload that is not a
    node's ``id:version`` is passed over, and the listener lives on."""
    node = cluster.node()
    node.register()
    heard: list[str] = []
    node.on_jobs = lambda jobs, gone: heard.extend([j.id for j in jobs] + gone)
    node.heard([("jobd", payload)
                for payload in ("", "x", "some-id:", "some-id:v2", "some-id:1:2")])
    assert heard == []
    node.heard([("jobd", "some-id:7")])
    assert heard == ["some-id"]


def test_a_burst_of_notifications_is_read_in_one_query_and_claimed_once(
        cluster: Cluster) -> None:
    """Every notification come in together is acted on together: the jobs other nodes
    changed read in one query, each once whatever its count of payloads; one claim and one
    re-read of the settings for the whole burst. Of a job this node runs, its own last
    change is not read, and any other version is: a cancel another node asked may be
    heard only after this node's own later write."""
    a, b = cluster.node(), cluster.node()
    a.register(), b.register()
    jobs = [submit(b.store, f"u{n}") for n in range(3)]
    told: list[tuple[list[str], list[str]]] = []
    claims, metas, cancels, reads = [], [], [], []
    a.on_jobs = lambda found, gone: told.append((sorted(j.id for j in found), gone))
    a.on_claimable = lambda: claims.append(1)
    a.on_meta = lambda: metas.append(1)
    a.on_cancel = cancels.append
    get_jobs = a.store.get_jobs
    a.store.get_jobs = lambda ids: reads.append(ids) or get_jobs(ids)
    a.heard([("jobd", f"{j.id}:{j.version}") for j in jobs] * 2
            + [("jobd", "gone-id:5"), ("jobd_queue", "x"), ("jobd_queue", "y"),
               ("jobd_meta", ""), ("jobd_meta", "")])
    assert told == [(sorted(j.id for j in jobs), ["gone-id"])]
    assert (len(reads), len(claims), len(metas)) == (1, 1, 1)
    (mine,) = claim(a)
    a.heard([("jobd", f"{mine.id}:{mine.version}")])  # its own claim's echo
    assert len(reads) == 1
    cancelled = b.store.cancel_job(mine.id, actor="admin:root")
    a.store.echoes.sent(mine.id, cancelled.version + 1)  # a wrote it since
    other = next(j for j in jobs if j.id != mine.id)
    a.store.echoes.sent(other.id, other.version + 1)
    a.heard([("jobd", f"{other.id}:{other.version}")])  # older than a's own: passed over
    assert len(reads) == 1 and not cancels
    a.heard([("jobd", f"{mine.id}:{cancelled.version}")])
    assert len(reads) == 2 and cancels == [mine.id]


@pytest.mark.parametrize("sent", ["nothing", "a statement not waited for"])
def test_a_frozen_nodes_batch_does_not_hold_the_queue_lock_past_its_stuck_time(
        pg_dsn: str, sent: str) -> None:
    """A node frozen inside a write transaction (here: its write sleeping, after it sent
    nothing or a statement whose answer it does not wait for) holds the queue lock every
    other node's claims wait for; PostgreSQL ends that transaction after the store's
    stuck_s (the daemon gives it the lease), and the other node goes on. (PostgreSQL
    counts a session idle only once it has had a Sync: without one after the unawaited
    statement, the lock was held for the whole freeze.)"""
    from jobd.store.postgres import PostgresStore
    frozen = PostgresStore(pg_dsn, cluster=True, stuck_s=1.0).open()
    other = PostgresStore(pg_dsn, cluster=True).open()
    other.node_key = frozen.node_key
    outcome: list[Any] = []
    runs: list[int] = []

    def freeze(tx: Any) -> str:
        runs.append(1)
        if sent != "nothing":
            frozen._count_queued(tx, "nobody", 0)
        if len(runs) == 1:  # frozen the first time; the node then runs again
            time.sleep(3.0)
        return "written"

    def run() -> None:
        try:
            outcome.append(frozen.write(freeze))
        except BaseException as e:
            outcome.append(e)
    thread = threading.Thread(target=run)
    try:
        thread.start()
        time.sleep(0.2)
        began = time.monotonic()
        job = submit(other)  # waits for the queue lock
        waited = time.monotonic() - began
        assert job.status is JobStatus.QUEUED and waited < 2.0, waited
        thread.join(10)
        # the frozen transaction was ended, not committed: once the node runs again its
        # batch runs anew on a new session (a fenced write then finds the lease gone)
        assert (outcome, len(runs)) == (["written"], 2)
        assert submit(frozen, "bob").status is JobStatus.QUEUED
    finally:
        frozen.close(), other.close()


@contextlib.contextmanager
def lock_held(dsn: str) -> Iterator[tuple[Any, Callable[[], None]]]:
    """A cluster store whose next batch waits for the queue lock, which another store's
    write holds until ``release()`` (called for the caller at the end, if it did not)."""
    from jobd.store.postgres import PostgresStore
    holder = PostgresStore(dsn, cluster=True).open()
    waiter = PostgresStore(dsn, cluster=True).open()
    waiter.node_key = holder.node_key
    gate = threading.Event()
    held = holder.write_async(lambda tx: gate.wait(10))  # holds the lock until set

    def release() -> None:
        gate.set()
        assert held.result(10)
    try:
        time.sleep(0.3)
        yield waiter, release
    finally:
        gate.set()
        holder.close(), waiter.close()


def test_writes_queued_while_a_batch_waits_for_the_queue_lock_join_that_batch(
        pg_dsn: str) -> None:
    """A cluster node's batch begins by waiting for the queue lock, which another node's
    batch holds: the writes queued on the node meanwhile join the batch once the lock is
    granted (one transaction, one more wait for the lock saved), rather than waiting for
    the lock again in a batch of their own."""
    with lock_held(pg_dsn) as (waiter, release):
        first = waiter.write_async(lambda tx: tx)  # each answer holds on to its transaction
        time.sleep(0.3)  # the waiter's writer has begun: it waits for the lock
        assert not first.done()
        rest = [waiter.write_async(lambda tx: tx) for _ in range(3)]
        release()
        assert all(f.result(10) is first.result(10) for f in rest)


def test_a_store_closed_while_its_batch_waits_for_the_queue_lock_stops_after_it(
        pg_dsn: str) -> None:
    """The writer's end mark, queued while a batch waits for the lock, joins that batch:
    the writer commits it and then stops (rather than waiting for writes for ever)."""
    with lock_held(pg_dsn) as (waiter, release):
        first = waiter.write_async(lambda tx: "written")
        time.sleep(0.3)
        closing = threading.Thread(target=waiter.close)
        closing.start()
        time.sleep(0.3)
        release()
        closing.join(10)
        assert not closing.is_alive()
        assert first.result(10) == "written"


def test_a_frozen_nodes_own_sessions_do_not_hold_their_locks_past_the_lease(
        cluster: Cluster) -> None:
    """A node's own sessions (the heartbeat's, whose registration and reload checks hold
    the registration lock; the progress reporter's, whose reports share-lock a job's
    row) have the lease as their idle-in-transaction limit: a node frozen inside one of
    their transactions holds its locks no longer than that."""
    import psycopg
    a = cluster.node(lease="1s", heartbeat="0.2s")
    a.register()
    session = a._session("test")
    try:
        session.execute("BEGIN")
        session.execute("SELECT pg_advisory_xact_lock(4242)")  # then frozen
        time.sleep(1.8)
        with psycopg.connect(cluster.dsn, autocommit=True) as other:
            assert other.execute("SELECT pg_try_advisory_lock(4242)").fetchone()[0]
        with pytest.raises(psycopg.errors.IdleInTransactionSessionTimeout):
            session.execute("SELECT 1")  # the server ended the frozen session
    finally:
        session.close()


def test_an_attempt_seeded_from_a_trimmed_copy_of_its_log_keeps_its_offsets(
        cluster: Cluster) -> None:
    """The database's copy of a job's log holds it only from offset 5000 on (max_log_bytes
    trimmed it, or bytes were dropped before they were copied): the next attempt's file
    on another node goes on from the same offsets, its first 5000 bytes dropped too."""
    from jobd import joblogs
    a, b = cluster.node(), cluster.node()
    a.register(), b.register()
    submit(a.store)
    [job] = claim(a)
    rows(cluster.dsn, "INSERT INTO job_log_chunks (job, pos, data) "
         "SELECT seq, 5000, %s FROM jobs WHERE id = %s RETURNING 1", b"kept tail\n", job.id)
    b.config.log_dir.mkdir(parents=True, exist_ok=True)
    b.seed_log(job.id)
    path = joblogs.path(b.config.log_dir, job.id)
    assert joblogs.end(path) == 5010
    assert joblogs.read(path, 0, 100) == (b"kept tail\n", 5010)
    assert b.store.log_end(job.id) == 5010
    # the attempt's next output lands after it, at the offsets both copies agree on
    log = joblogs.JobLog(path, 1 << 20)
    log.write(b"more\n")
    log.close()
    assert joblogs.read(path, 5010, 100) == (b"more\n", 5015)
