"""Three real jobd nodes on one PostgreSQL database (SPEC §11, issue #12's tests).

Limits and the round-robin between users hold across the nodes (a SQL checker samples
them throughout); a job submitted on one node is seen, waited for, listed, logged,
cancelled and retried through the others; progress on one node reaches a ``jobs.wait``
on another within 50 ms; a node killed with kill -9 has its jobs rescued after its lease
and resumed from their checkpoints, and one stopped with SIGSTOP past its lease is
rescued, its processes stopped by their supervisors, and changes nothing when it comes
back; a PostgreSQL restart in the middle of running jobs loses nothing; a node with other
cluster-wide settings is refused, naming the difference.

Every job program is ``RunLedger``'s, which records each run (and a run while another
run of the same job held its lock), so "never runs twice" is checked on the processes
themselves, not only on the rows.

``JOBD_CLUSTER_ROUNDS=N`` (default 1) makes the load of the limits and round-robin
tests N times larger, and repeats the kill -9 test N times (see the README's cluster
section).
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

import pg
from cluster_nodes import CANCEL_GRACE, TIMING, Checker, Cluster, Node, connect, toml_table
from conftest import (clone, commit_files, git, make_upstream, pid_alive, result_of,
                      wait_for, wait_terminal)

pytest_plugins = ["pg"]

#: how many times larger the load is (CI: 1)
ROUNDS = int(os.environ.get("JOBD_CLUSTER_ROUNDS", "1"))

TERMINAL = ("completed", "failed", "cancelled")


@pytest.fixture
def make_cluster(pg_dsn: str, tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    """``make_cluster(execution=..., sync=..., sections=...)``: nodes on this test's
    database (add them with ``.start(n)`` or ``.add()``); all stopped afterwards."""
    made: list[Cluster] = []

    def make(**kw: Any) -> Cluster:
        cluster = Cluster(tmp_path / f"c{len(made)}", pg_dsn, **kw)
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        cluster.close()


def job_ids(jobs: list[dict[str, Any]]) -> list[str]:
    return [j["id"] for j in jobs]


def start_order(cluster: Cluster) -> list[str]:
    """The users of every start so far, in the order the starts were recorded."""
    return [r[0] for r in cluster.rows(
        "SELECT j.user_id FROM job_events e JOIN jobs j ON j.seq = e.job "
        "WHERE e.status = 'running' ORDER BY e.id")]


def running_on(cluster: Cluster, job_id: str, node: Node | None = None,
               timeout: float = 15) -> Node:
    """Wait until the job's program runs (on ``node``, if given); the node running it."""
    def found() -> Node | None:
        name = cluster.ledger.node_of(job_id)
        if name is None or (node is not None and name != node.name):
            return None
        return cluster.by_name(name)
    return wait_for(found, timeout=timeout, what=f"job {job_id} to run")


# -- the checker itself ----------------------------------------------------------------------------

def test_the_checker_names_each_broken_rule(make_cluster: Callable[..., Cluster]) -> None:
    """Rows made by hand to break each rule, read by the checker: it must not be a
    checker that can never fire."""
    cluster = make_cluster(execution={"max_running_per_user": 1})
    node = cluster.add(workers=1)
    result_of(node, "admin.pause")
    shared = cluster.repos / "shared" / "p"
    shared.mkdir(parents=True)
    git("init", "-q", cwd=shared)
    jobs = [result_of(node, "jobs.submit", type="noop", as_user="u0") for _ in range(2)]
    # two users' index jobs on one repository (an admin may name its path)
    jobs += [result_of(node, "jobs.submit", type="index", project_id="p", as_user=user,
                       options={"repo_path": str(shared)}) for user in ("u1", "u2")]
    with Checker(cluster.dsn, max_running_per_user=1, exclusive=("sync", "index")) as quiet:
        wait_for(lambda: quiet.samples >= 5, what="quiet samples")
    quiet.assert_held(min_samples=5)
    assert node.stop() == 0
    with connect(cluster.dsn) as conn:
        # all four on the stopped node; its unique index on running jobs' repository
        # kept out of the way (NULL): the checker must see past it
        conn.execute("UPDATE jobs SET status = 'running', started_at = created_at, "
                     "node_id = (SELECT max(id) FROM nodes), repository = NULL "
                     "WHERE id = ANY(%s)", (job_ids(jobs),))
    with Checker(cluster.dsn, max_running_per_user=1, exclusive=("sync", "index")) as checker:
        wait_for(lambda: checker.samples >= 3, what="samples")
    # the stopped node ended its lease: its jobs are owned by no live node
    rules = {rule for _, rule, _, _ in checker.broken}
    assert rules == {"user", "repository", "node", "owner"}, checker.broken
    with pytest.raises(AssertionError, match="rules broken"):
        checker.assert_held(min_samples=1)


def test_the_run_ledger_sees_a_job_run_twice_at_once(tmp_path: Path) -> None:
    """Two runs of one job's program at once (as two nodes would run it), then a third
    after they ended: the second is recorded as a double, the third is not."""
    from cluster_nodes import RunLedger
    ledger = RunLedger(tmp_path / "ledger")
    env = {**os.environ, "JOBD_JOB_ID": "j1"}
    first = subprocess.Popen(ledger.program(5), env={**env, "JOBD_TEST_NODE": "a"},
                             stdout=subprocess.DEVNULL)
    wait_for(lambda: ledger.runs("j1"), what="the first run")
    second = subprocess.Popen(ledger.program(5), env={**env, "JOBD_TEST_NODE": "b"},
                              stdout=subprocess.DEVNULL)
    wait_for(lambda: len(ledger.runs("j1")) == 2, what="the second run")
    ledger.release("j1")
    assert (first.wait(10), second.wait(10)) == (0, 0)
    third = subprocess.run(ledger.program(0.05), env={**env, "JOBD_TEST_NODE": "c"},
                           stdout=subprocess.DEVNULL, timeout=10)
    assert third.returncode == 0
    assert [node for node, _ in ledger.runs("j1")] == ["a", "b", "c"]
    assert ledger.doubles() == [f"j1.{second.pid}.double"]
    assert ledger.ended("j1") == 3 and ledger.node_of("j1") == "c"


# -- limits, fairness, every job from every node ---------------------------------------------------

def exclusive_type(cluster: Cluster) -> str:
    """``[types.touch]``: a ledger program on a shared repository named by its alias."""
    return "\n" + toml_table("types.touch", {
        # n: a number of its own, so that no two jobs are the same work
        "argv": ["sh", str(cluster.ledger.script), "{ticks}", "{n}"],
        "options": ["alias", "ticks", "n"], "roles": ["user", "service", "admin"],
        "repo": f"{cluster.repos}/golden/{{alias}}", "exclusive": True})


def test_limits_hold_across_three_nodes(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(execution={"max_running_per_user": 2})
    cluster.sections = exclusive_type(cluster)
    for alias in ("r0", "r1"):
        (cluster.repos / "golden" / alias).mkdir(parents=True)
    # 6 slots for 3 users of at most 2 each: the limits hold, and no two nodes' slots hold
    # all the jobs that may run (with 3 slots each, two nodes could take every one of them
    # at each end, and the third ran none in about one run of eight)
    nodes = cluster.start(3, workers=2)
    jobs = []
    with cluster.checked(exclusive=("sync", "index", "touch")) as checker:
        for n in range(4 * ROUNDS):
            for u in range(3):
                via = nodes[(n + u) % 3]
                jobs.append(result_of(via, "jobs.submit", type="touch", as_user=f"u{u}",
                                      options={"alias": f"r{(n + u) % 2}", "ticks": "4",
                                               "n": f"{n}.{u}"}))
                jobs.append(result_of(via, "jobs.submit", type="command", as_user=f"u{u}",
                                      options={"argv": cluster.ledger.program(0.2)}))
        for job in jobs:
            assert wait_terminal(nodes[0], job["id"], timeout=60)["status"] == "completed"
    # the run came up to each limit it checks
    assert checker.peak_user == 2
    assert checker.peak_repository == 1 and checker.peak_waiting >= 1
    assert checker.peak_running > 2  # more than one node's share ran at once
    ran_on = {cluster.ledger.node_of(j["id"]) for j in jobs}
    assert ran_on == {"a", "b", "c"}, ran_on
    for job in jobs:
        assert len(cluster.ledger.runs(job["id"])) == 1


def test_users_take_turns_across_three_nodes(make_cluster: Callable[..., Cluster]) -> None:
    # no user limit in the way: only the turns decide who goes next
    cluster = make_cluster(execution={"max_running_per_user": 6})
    nodes = cluster.start(3, workers=2)
    result_of(nodes[0], "admin.pause")  # cluster-wide: every queue fills before a start
    per_user = 5 * ROUNDS
    jobs = [result_of(nodes[u % 3], "jobs.submit", type="noop", as_user=f"u{u}",
                      options={"seconds": 0.05})
            for u in range(4) for _ in range(per_user)]
    time.sleep(TIMING.poll * 2)  # a node that missed the pause would start one meanwhile
    assert start_order(cluster) == []
    with cluster.checked():
        result_of(nodes[2], "admin.resume")
        for job in jobs:
            assert wait_terminal(nodes[1], job["id"], timeout=60)["status"] == "completed"
    # u0 joined the line first, u3 last; each start sends its user to the back
    assert start_order(cluster) == ["u0", "u1", "u2", "u3"] * per_user


def test_a_job_submitted_on_one_node_is_seen_waited_listed_and_logged_on_the_others(
        make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(execution={"max_running_per_user": 6})
    a, b, c = cluster.start(3, workers=1)
    jobs = [result_of(a, "jobs.submit", type="command",
                      options={"argv": cluster.ledger.program(1.0)}) for _ in range(5)]
    # seen from the other nodes as the node that answers the submit sees it
    for job in jobs:
        for node in (b, c):
            assert result_of(node, "jobs.get", job_id=job["id"])["id"] == job["id"]
    listed = result_of(b, "jobs.list", limit=100)["jobs"]
    assert set(job_ids(jobs)) <= set(job_ids(listed))

    done = {j["id"]: wait_terminal(c, j["id"]) for j in jobs}
    assert all(j["status"] == "completed" for j in done.values()), done
    ran_on = {j["id"]: cluster.ledger.node_of(j["id"]) for j in jobs}
    assert len(set(ran_on.values())) >= 2, ran_on
    for job in jobs:
        # the log of a run on any node, read through each node
        for node in (a, b, c):
            log = result_of(node, "jobs.logs", job_id=job["id"], limit_bytes=1 << 20)
            assert f"ran on {ran_on[job['id']]}" in log["data"] and log["eof"], log
        events = [e["status"] for e in result_of(b, "jobs.events", job_id=job["id"])]
        assert events == ["created", "queued", "running", "completed"], events



def test_a_queued_jobs_wait_reason_is_the_same_through_every_node(
        make_cluster: Callable[..., Cluster]) -> None:
    """Each node's wait reasons count every node's running jobs and slots: the user's
    limit held by a job on another node, then the cluster's slots full."""
    cluster = make_cluster(execution={"max_running_per_user": 1})
    nodes = cluster.start(2, workers=1)
    first = result_of(nodes[0], "jobs.submit", type="command", as_user="u0",
                      options={"argv": cluster.ledger.program(60)})
    runner = running_on(cluster, first["id"])
    held = result_of(nodes[1], "jobs.submit", type="command", as_user="u0",
                     options={"argv": cluster.ledger.program(60)})

    def reasons(job_id: str) -> list[Any]:
        return [result_of(n, "jobs.get", job_id=job_id)["wait_reason"] for n in nodes]
    wait_for(lambda: reasons(held["id"]) == ["user_limit", "user_limit"], timeout=10,
             what="user_limit through both nodes")
    # another user takes the other node's slot: the cluster's two slots are full
    other = result_of(nodes[0], "jobs.submit", type="command", as_user="u1",
                      options={"argv": cluster.ledger.program(60)})
    running_on(cluster, other["id"])
    last = result_of(runner, "jobs.submit", type="command", as_user="u2",
                     options={"argv": cluster.ledger.program(60)})
    wait_for(lambda: reasons(last["id"]) == ["slots", "slots"], timeout=10,
             what="slots through both nodes")
    assert reasons(held["id"]) == ["user_limit", "user_limit"]
    cluster.ledger.release()
    for job in (first, held, other, last):
        assert wait_terminal(nodes[0], job["id"], timeout=30)["status"] == "completed"


def test_every_attempts_log_of_a_retried_job_is_read_through_any_node(
        make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(execution={"max_running_per_user": 6})
    a, b, c = cluster.start(3, workers=1)
    failing = result_of(a, "jobs.submit", type="command", options={"argv": [
        "sh", "-c", f"echo $JOBD_TEST_NODE > {cluster.ledger.folder}/$JOBD_JOB_ID.$$.run; "
                    "echo broken on $JOBD_TEST_NODE; exit 3"]})
    assert wait_terminal(b, failing["id"])["status"] == "failed"
    # retried through a node that did not run it: it starts there when its slot is free
    (first,) = [n for n, _ in cluster.ledger.runs(failing["id"])]
    via = [n for n in (a, b, c) if n.name != first][0]
    again = result_of(via, "jobs.retry", job_id=failing["id"])
    assert again["status"] in ("queued", "running"), again
    retried = wait_terminal(c, failing["id"])
    assert (retried["status"], retried["attempts"]) == ("failed", 2), retried
    ran_on = [n for n, _ in cluster.ledger.runs(failing["id"])]
    for node in (a, b, c):
        log = result_of(node, "jobs.logs", job_id=failing["id"], limit_bytes=1 << 20)
        said = [line for line in log["data"].splitlines() if line.startswith("broken on ")]
        assert said == [f"broken on {n}" for n in ran_on] and log["eof"], (node.name, log)


def test_a_cancel_while_queued_through_any_node_ends_the_log_every_node_reads(
        make_cluster: Callable[..., Cluster]) -> None:
    """A job that ran on one node, retried and cancelled while queued through the others:
    the cancel's line ends its log in the database, which every node reads (and a later
    attempt's log goes on from), not only the file of the node the cancel went through."""
    cluster = make_cluster()
    a, b, c = cluster.start(3, workers=1)
    job = result_of(a, "jobs.submit", type="command", options={"argv": [
        "sh", "-c", "echo ran on $JOBD_TEST_NODE; exit 3"]})
    assert wait_terminal(a, job["id"])["status"] == "failed"
    ran = result_of(a, "jobs.logs", job_id=job["id"], limit_bytes=1 << 20)["data"]
    result_of(a, "admin.pause")  # cluster-wide: the retry stays queued
    try:
        assert result_of(b, "jobs.retry", job_id=job["id"])["status"] == "queued"
        for node in (a, b):  # one node that ran it, and one that did not
            if node is b:
                result_of(c, "jobs.retry", job_id=job["id"])
            cancelled = result_of(node, "jobs.cancel", job_id=job["id"])
            assert cancelled["status"] == "cancelled", cancelled
        line = " while queued\n"
        for reader in (a, b, c):
            told = wait_for(lambda: (log := result_of(reader, "jobs.logs", job_id=job["id"],
                                                      limit_bytes=1 << 20))["data"].count(line)
                            == 2 and log, timeout=5)
            assert told["data"].startswith(ran) and told["eof"], (reader.name, told)
    finally:
        result_of(a, "admin.resume")


def test_admin_stats_on_any_node_lists_every_node_with_what_it_runs(
        make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster()
    nodes = cluster.start(3, workers=1)
    jobs = [result_of(nodes[0], "jobs.submit", type="command",
                      options={"argv": cluster.ledger.program(30)}) for _ in range(2)]
    owners = {running_on(cluster, j["id"]).name for j in jobs}
    for node in nodes:
        listed = result_of(node, "admin.stats")["nodes"]
        assert {n["id"] for n in listed} == {n.node_ids()[-1] for n in nodes}, listed
        assert all(n["host"] and n["started_at"] and n["lease_until"] for n in listed), listed
        running = {n["id"]: n["running"] for n in listed}
        assert running == {n.node_ids()[-1]: int(n.name in owners) for n in nodes}, listed
    cluster.ledger.release()
    for job in jobs:
        assert wait_terminal(nodes[1], job["id"])["status"] == "completed"


def test_cancel_through_another_node_stops_the_job_within_cancel_grace_and_a_second(
        make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster()
    nodes = cluster.start(3, workers=1)
    # one that ends on SIGTERM, and one that ignores it (SIGKILL after cancel_grace),
    # noted in the ledger as its runs are
    argvs = [cluster.ledger.program(60),
             ["sh", "-c", "trap '' TERM; echo $JOBD_TEST_NODE > "
                          f"{cluster.ledger.folder}/$JOBD_JOB_ID.$$.run; "
                          "while :; do sleep 0.05; done"]]
    figures = []
    with cluster.checked():
        for argv in argvs:
            job = result_of(nodes[0], "jobs.submit", type="command", options={"argv": argv})
            owner = running_on(cluster, job["id"])
            ((_, pid),) = cluster.ledger.runs(job["id"])
            via, reader = [n for n in nodes if n is not owner][:2]
            started = time.monotonic()
            asked = result_of(via, "jobs.cancel", job_id=job["id"])
            assert asked["status"] in ("running", "cancelled"), asked
            wait_for(lambda: not pid_alive(pid)
                     and result_of(reader, "jobs.get", job_id=job["id"])["status"]
                     == "cancelled", timeout=10, interval=0.01,
                     what="the cancelled job to stop")
            figures.append(time.monotonic() - started)
    print(f"\ncancel through another node: {', '.join(f'{f * 1000:.0f} ms' for f in figures)}"
          f" (bound {CANCEL_GRACE + 1:.1f} s)")
    assert all(f <= CANCEL_GRACE + 1.0 for f in figures), figures


def test_progress_on_one_node_reaches_a_wait_on_another_within_50_ms(
        make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster()
    nodes = cluster.start(3, workers=1)
    seen = progress_latencies(cluster, nodes, seconds=3)
    assert len(seen) >= 20, f"a wait on another node saw {len(seen)} progress updates"
    p50, p90 = statistics.median(seen), statistics.quantiles(seen, n=10)[-1]
    print(f"\nprogress across nodes: p50 {p50 * 1000:.1f} ms, p90 {p90 * 1000:.1f} ms, "
          f"max {max(seen) * 1000:.1f} ms over {len(seen)} updates (SPEC §9: ≤ 50 ms)")
    # generous for a loaded CI machine; a poll instead of a notification takes ~poll
    assert p50 <= 0.05 and p90 < TIMING.poll / 2, seen


def progress_latencies(cluster: Cluster, nodes: list[Node], seconds: float
                       ) -> list[float]:
    """Seconds from a progress line's print on the owning node until a ``jobs.wait``
    on another node returns it."""
    job = result_of(nodes[0], "jobs.submit", type="command",
                    options={"argv": cluster.ledger.program(seconds, progress=True)})
    owner = running_on(cluster, job["id"])
    waiter = cluster.others(owner)[0]
    seen, last = [], None
    while job["status"] not in TERMINAL:
        job = result_of(waiter, "jobs.wait", job_id=job["id"], after_version=job["version"],
                        timeout_s=5)
        arrived = time.monotonic()
        if job["status"] == "running" and job.get("message") != last:
            last = job.get("message")
            try:
                seen.append(arrived - float(last))
            except (TypeError, ValueError):
                pass  # jobd's own "running ..." message
    assert job["status"] == "completed", job
    return seen


# -- a node that dies, freezes; PostgreSQL that restarts -------------------------------------------

def fetches(log: str) -> int:
    """How many times jobd ran ``git fetch`` for a job, as its own log lines tell."""
    return sum(1 for line in log.splitlines()
               if line.startswith("[jobd ") and "$ git" in line and " fetch " in line)


def sync_and_command_on(cluster: Cluster, node: Node, tmp_path: Path
                        ) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """A sync of a fresh project in its (ledger) indexer and a running command, both on
    ``node``: (the sync, the upstream revision it pulls, the command)."""
    upstream = make_upstream(tmp_path / "upstream")
    clone(upstream, cluster.repos / "root" / "proj")
    new = commit_files(upstream, {"new.txt": "new\n"})
    sync = result_of(node, "jobs.submit", type="sync", project_id="proj")
    command = result_of(node, "jobs.submit", type="command",
                        options={"argv": cluster.ledger.program(60)})
    for job in (sync, command):
        running_on(cluster, job["id"], node)
    assert result_of(node, "jobs.get", job_id=sync["id"])["phase"] == "indexing"
    return sync, new, command


def when_each(timeout: float, **conditions: Callable[[], bool]) -> dict[str, float]:
    """Poll every condition together until each has held once; how many seconds from now
    each first held (so a test can tell which came first)."""
    began = time.monotonic()
    held: dict[str, float] = {}
    while len(held) < len(conditions):
        for name, condition in conditions.items():
            if name not in held and condition():
                held[name] = time.monotonic() - began
        if time.monotonic() - began > timeout:
            pytest.fail(f"after {timeout}s still waiting for "
                        f"{sorted(set(conditions) - set(held))} (held: {held})")
        time.sleep(0.01)
    return held


def owned(cluster: Cluster, job_id: str, node_id: int) -> bool:
    """Whether the job's row says it runs on ``node_id``."""
    return cluster.rows("SELECT 1 FROM jobs WHERE id = %s AND status = 'running' "
                        "AND node_id = %s", job_id, node_id) != []


def resumed_from_checkpoint(cluster: Cluster, sync: dict[str, Any], new: str,
                            lost: Node) -> None:
    """The rescued sync ran its indexer again on another node, once, after the first run
    had stopped, and completes from its checkpoint: one fetch in its whole log."""
    rerun = wait_for(lambda: len(cluster.ledger.runs(sync["id"])) == 2
                     and cluster.ledger.runs(sync["id"]), timeout=15,
                     what="the rescued sync's indexer to run again")
    (first_node, first_pid), (second_node, _) = rerun
    assert first_node == lost.name and second_node != lost.name, rerun
    assert not pid_alive(first_pid)
    resumer = cluster.by_name(second_node)
    reader = cluster.others(resumer)[0]
    cluster.ledger.release(sync["id"])
    done = wait_terminal(reader, sync["id"])
    assert (done["status"], done["attempts"]) == ("completed", 2), done
    # the pull of attempt 1, from its checkpoint: a sync started over would pull nothing
    assert (done["result"]["new_revision"], done["result"]["commits_pulled"]) == (new, 1)
    assert git("rev-parse", "HEAD", cwd=cluster.repos / "root" / "proj") == new
    # and the attempt that resumed fetched nothing (the log of the node that ran it; a
    # log of several attempts read elsewhere: test_every_attempts_log_...)
    log = result_of(resumer, "jobs.logs", job_id=sync["id"], limit_bytes=1 << 20)["data"]
    resumed = log.split("resuming after the finished phases init, git_sync", 1)
    assert len(resumed) == 2, log
    assert fetches(resumed[1]) == 0, log
    assert len(cluster.ledger.runs(sync["id"])) == 2 and cluster.ledger.ended(sync["id"]) == 1


def two_jobs_on_a_node_of_three(make_cluster: Callable[..., Cluster], tmp_path: Path
                                ) -> tuple[Cluster, tuple[Node, Node, Node],
                                           tuple[dict[str, Any], str, dict[str, Any]], int]:
    """Three nodes of 2 workers; on the first, a sync in its (ledger) indexer and a
    running command: (the cluster, its nodes, ``sync_and_command_on``'s three, the first
    node's id)."""
    cluster = make_cluster()
    cluster.sync["index_command"] = cluster.ledger.program(60)
    a = cluster.add(workers=2)
    jobs = sync_and_command_on(cluster, a, tmp_path)
    b, c = cluster.add(workers=2), cluster.add(workers=2)
    (node_id,) = a.node_ids()
    return cluster, (a, b, c), jobs, node_id


def gone_and_rescued(cluster: Cluster, jobs: list[dict[str, Any]], node_id: int
                     ) -> dict[str, float]:
    """How long until every program of ``jobs`` is gone, and until the first of them is
    no longer owned by node ``node_id``."""
    pids = [pid for j in jobs for _, pid in cluster.ledger.runs(j["id"])]
    return when_each(20, gone=lambda: not any(pid_alive(p) for p in pids),
                     rescued=lambda: not owned(cluster, jobs[0]["id"], node_id))


@pytest.mark.parametrize("repeat", range(ROUNDS))
def test_kill_9_of_a_node_rescues_its_jobs_after_the_lease_and_resumes_them(
        make_cluster: Callable[..., Cluster], tmp_path: Path, repeat: int) -> None:
    cluster, (a, b, c), (sync, new, command), lost_id = two_jobs_on_a_node_of_three(
        make_cluster, tmp_path)
    with cluster.checked():
        a.kill()
        times = gone_and_rescued(cluster, [sync, command], lost_id)
        # each program's supervisor outlives jobd just long enough to kill it
        assert times["gone"] < 2, times
        took = times["rescued"]
        # not before the lease ran out (its last renewal came at most a heartbeat before
        # the kill) and cancel_grace + 1 s more; and not much later either
        assert TIMING.rescue_after - TIMING.heartbeat - 0.2 <= took, times
        assert took <= TIMING.rescue_after + 2 * (TIMING.heartbeat + TIMING.poll) + 2, took
        failed = wait_terminal(b, command["id"])
        assert failed["status"] == "failed" and "interrupted" in failed["error"], failed
        # the rescue closes the attempt in its log, read through either node
        for node in (b, c):
            told = result_of(node, "jobs.logs", job_id=command["id"], limit_bytes=1 << 20)
            assert told["data"].endswith(f"ended failed: {failed['error']}\n"), told
        resumed_from_checkpoint(cluster, sync, new, a)
    assert len(cluster.ledger.runs(command["id"])) == 1  # not resumable: never again
    # one rescue, by one node, of both jobs (logged as their count or their ids)
    rescues = [e for n in (b, c) for e in n.events("node_rescued") if e["node_id"] == lost_id]
    assert [(int(e["node_id"]), count(e["jobs"])) for e in rescues] == [(lost_id, 2)], rescues
    print(f"\nkill -9: rescued {took:.2f} s after the kill "
          f"(earliest allowed {TIMING.rescue_after - TIMING.heartbeat:.2f} s)")


def test_a_node_stopped_past_its_lease_is_rescued_and_changes_nothing_when_it_resumes(
        make_cluster: Callable[..., Cluster], tmp_path: Path) -> None:
    cluster, (a, b, c), (sync, new, command), old_id = two_jobs_on_a_node_of_three(
        make_cluster, tmp_path)
    with cluster.checked():
        a.freeze()
        times = gone_and_rescued(cluster, [sync, command], old_id)
        assert a.frozen and a.proc.poll() is None  # still stopped all along
        # the supervisors, not frozen with jobd, stopped its programs at its own deadline
        # (lease - heartbeat after its last renewal, which came at most a heartbeat
        # before the stop), and before anyone took its jobs
        stopped = times["gone"]
        assert TIMING.deadline - TIMING.heartbeat - 0.3 <= stopped, times
        assert stopped <= TIMING.deadline + CANCEL_GRACE + 0.5, times
        assert stopped < times["rescued"], times
        assert TIMING.rescue_after - TIMING.heartbeat - 0.2 <= times["rescued"], times
        failed = wait_terminal(b, command["id"])
        assert failed["status"] == "failed" and "interrupted" in failed["error"], failed
        rerun = wait_for(lambda: len(cluster.ledger.runs(sync["id"])) == 2,
                         what="the rescued sync to run elsewhere")
        assert rerun
        before = snapshot(cluster, command["id"]), snapshot(cluster, sync["id"])

        a.thaw()
        wait_for(lambda: len(a.node_ids()) == 2, timeout=10,
                 what="the resumed node to register anew")
        assert a.events("node_lease_lost"), a.log()[-3000:]
        time.sleep(3 * TIMING.heartbeat)  # what it might still write, it would by now
        # nothing of the old attempts changed: not the failed command, nor the sync that
        # now runs on another node
        assert (snapshot(cluster, command["id"]), snapshot(cluster, sync["id"])) == before
        assert a.node_ids()[0] == old_id and a.node_ids()[1] != old_id
        resumed_from_checkpoint(cluster, sync, new, a)
    assert len(cluster.ledger.runs(command["id"])) == 1
    # and it goes on as a node of the cluster
    job = result_of(a, "jobs.submit", type="noop")
    assert wait_terminal(c, job["id"])["status"] == "completed"
    print(f"\nSIGSTOP: the frozen node's programs stopped {stopped:.2f} s after the stop "
          f"(its deadline: {TIMING.deadline:.1f} s after its last heartbeat)")


def count(jobs: int | list[Any]) -> int:
    return len(jobs) if isinstance(jobs, list) else int(jobs)


def snapshot(cluster: Cluster, job_id: str) -> tuple[Any, ...]:
    """A job's row and its history as stored: what a fenced node must leave alone."""
    row = cluster.rows("SELECT status, attempts, version, node_id, error, progress, phase, "
                       "result FROM jobs WHERE id = %s", job_id)
    events = cluster.rows("SELECT e.id, e.status, e.message FROM job_events e "
                          "JOIN jobs j ON j.seq = e.job WHERE j.id = %s ORDER BY e.id", job_id)
    checkpoints = cluster.rows("SELECT c.phase, c.data FROM job_checkpoints c "
                               "JOIN jobs j ON j.seq = c.job WHERE j.id = %s ORDER BY c.phase",
                               job_id)
    return tuple(row), tuple(events), tuple(checkpoints)


def test_a_postgres_restart_in_the_middle_of_running_jobs_loses_nothing(
        make_cluster: Callable[..., Cluster], postgres: pg.PostgresServer) -> None:
    cluster = make_cluster(execution={"max_running_per_user": 6})
    nodes = cluster.start(3, workers=2)
    running = [result_of(nodes[n % 3], "jobs.submit", type="command",
                         options={"argv": cluster.ledger.program(4)}) for n in range(6)]
    for job in running:
        running_on(cluster, job["id"])
    with cluster.checked():
        began = time.monotonic()
        postgres.restart()
        outage = time.monotonic() - began
        # submitted while the nodes reconnect: taken once they are back
        later = [submit_through_an_outage(node) for node in nodes]
        for node in nodes:
            wait_for(lambda: node.events("cluster_listener_reconnected"), timeout=15,
                     what=f"node {node.name}'s listener to reconnect")
        for job in running + later:
            assert wait_terminal(nodes[0], job["id"], timeout=30)["status"] == "completed"
    for job in running:  # the outage was shorter than a lease: none ran again
        assert len(cluster.ledger.runs(job["id"])) == 1 and cluster.ledger.ended(job["id"]) == 1
    # the listeners are back: progress crosses nodes by notification again, not by poll
    seen = progress_latencies(cluster, nodes, seconds=2)
    assert len(seen) >= 10, f"a wait on another node saw {len(seen)} progress updates"
    print(f"\nPostgreSQL restart took {outage:.2f} s; progress across nodes afterwards: "
          f"p50 {statistics.median(seen) * 1000:.1f} ms")
    assert statistics.median(seen) < TIMING.poll / 2, seen


def submit_through_an_outage(node: Node, timeout: float = 10) -> dict[str, Any]:
    """A noop submitted through ``node``, again while it answers "storage unavailable"
    (-32050, HTTP 503: the first write on a connection the restart cut is refused, cleanly,
    as on one node) and nothing else."""
    deadline = time.monotonic() + timeout
    while True:
        answer = node.raw("jobs.submit", type="noop")
        if "result" in answer:
            return answer["result"]
        assert answer["error"]["code"] == -32050, answer
        assert time.monotonic() < deadline, f"node {node.name} still refuses: {answer}"
        time.sleep(0.1)


def test_a_node_with_other_cluster_wide_settings_is_refused_naming_the_difference(
        make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(execution={"max_running_per_user": 2})
    a = cluster.add(workers=2)
    other = cluster.add(workers=2, start=False, execution={"max_running_per_user": 5})
    other.state.mkdir(parents=True)
    refused = subprocess.run(other.argv(), env=other.env, capture_output=True, text=True,
                             timeout=60, stdin=subprocess.DEVNULL)
    assert refused.returncode == 1, refused.stderr
    said = [line for line in refused.stderr.splitlines() if not line.startswith("{")]
    assert len(said) == 1 and said[0].startswith("jobd: "), refused.stderr
    # the key, this node's value, then the live node's
    assert re.search(r"max_running_per_user\b.*\b5\b.*\b2\b", said[0]), said
    assert not other.socket.exists()
    # workers is each node's own: a node with other workers joins
    joined = cluster.add(workers=5)
    job = result_of(joined, "jobs.submit", type="noop")
    assert wait_terminal(a, job["id"])["status"] == "completed"
    # the refused node never registered
    assert cluster.rows("SELECT count(*) FROM nodes WHERE ended_at IS NULL") == [(2,)]
