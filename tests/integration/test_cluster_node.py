"""A real jobd as a cluster node on the tests' private PostgreSQL (SPEC §11): it registers
a node and says so, and when it is frozen (SIGSTOP) past its lease its job's processes
are stopped by their supervisor at the node's deadline, while the daemon itself is still
stopped; resumed, it finds its lease lost, records nothing for the old attempt, and
comes back as a new node that takes its previous id's job over."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from conftest import FAST_CONFIG, Daemon, group_alive, plugin_env, result_of, wait_for
from test_postgres_daemon import connect, make_pg_daemon  # noqa: F401 (a fixture)

pytest_plugins = ["pg"]

#: a short lease: the node's deadline is 1.5 s after its last heartbeat
SHORT_LEASE = FAST_CONFIG + '\n[cluster]\nlease = "2s"\nheartbeat = "0.5s"\n'


@pytest.fixture
def dsn(pg_dsn: str) -> str:
    return pg_dsn


def row(dsn: str, sql: str, *args: Any) -> Any:
    with connect(dsn) as conn:
        return conn.execute(sql, args).fetchone()


def events_named(d: Daemon, name: str) -> list[dict[str, Any]]:
    return [e for e in d.log_events() if e.get("event") == name]


def test_a_node_registers_and_its_jobs_run_under_its_id(
        make_pg_daemon: Callable[..., Daemon], dsn: str) -> None:
    d = make_pg_daemon(SHORT_LEASE)
    (registered,) = events_named(d, "node_registered")
    job = result_of(d, "jobs.submit", type="command", options={"argv": ["sleep", "30"]})
    wait_for(lambda: result_of(d, "jobs.get", job_id=job["id"])["status"] == "running",
             what="the job to start")
    assert row(dsn, "SELECT node_id FROM jobs WHERE id = %s", job["id"]) == (
        registered["node_id"],)
    time.sleep(2.5)  # past the first lease: the heartbeat keeps it
    assert result_of(d, "jobs.get", job_id=job["id"])["status"] == "running"
    (node,) = result_of(d, "admin.stats")["nodes"]
    assert node["id"] == registered["node_id"] and node["running"] == 1
    assert node["started_at"].endswith("Z") and node["lease_until"] > node["started_at"]
    stopped = result_of(d, "jobs.cancel", job_id=job["id"], wait=True)
    assert stopped["status"] == "cancelled"
    assert d.stop() == 0
    assert row(dsn, "SELECT ended_at IS NOT NULL FROM nodes WHERE id = %s",
               registered["node_id"]) == (True,)


def test_a_frozen_nodes_job_stops_at_its_deadline_and_its_late_end_changes_nothing(
        make_pg_daemon: Callable[..., Daemon], dsn: str, tmp_path: Path) -> None:
    d = make_pg_daemon(SHORT_LEASE)
    (registered,) = events_named(d, "node_registered")
    marker = tmp_path / "pgid"
    job = result_of(d, "jobs.submit", type="command", options={
        "argv": ["sh", "-c", f"sleep 60 & echo $$ > {marker}; wait"]})
    pgid = int(wait_for(lambda: marker.exists() and marker.read_text().strip(),
                        what="the command to start"))
    assert d.proc is not None
    d.proc.send_signal(signal.SIGSTOP)
    frozen = time.monotonic()
    try:
        # the supervisor, not frozen with its node, stops the group at the deadline
        wait_for(lambda: group_alive(pgid) == [], timeout=8, what="the group to be stopped")
        assert time.monotonic() - frozen < 1.5 + 1 + 1.5  # deadline + cancel_grace + slack
        time.sleep(max(0.0, 2.2 - (time.monotonic() - frozen)))  # past the lease too
    finally:
        d.proc.send_signal(signal.SIGCONT)
    wait_for(lambda: events_named(d, "node_lease_lost"), what="the node to see its loss")
    # it comes back as a new node, which takes its previous id's job over at once
    wait_for(lambda: len(events_named(d, "node_registered")) == 2, what="a new node id")
    done = wait_for(lambda: (j := result_of(d, "jobs.get", job_id=job["id"]))["status"]
                    != "running" and j, what="the old attempt to be taken over")
    old = registered["node_id"]
    assert done["status"] == "failed" and done["attempts"] == 1, done
    assert done["error"] == f"interrupted: node {old} lost its lease"
    # the zombie recorded nothing of its own: one end, the rescue's
    statuses = [e["status"] for e in result_of(d, "jobs.events", job_id=job["id"])]
    assert statuses == ["created", "queued", "running", "failed"], statuses
    assert events_named(d, "job_end_unrecorded")
    (new,) = [e["node_id"] for e in events_named(d, "node_registered")][1:]
    assert new != old
    assert row(dsn, "SELECT ended_at IS NOT NULL FROM nodes WHERE id = %s", old) == (True,)
    # and it runs jobs again, as the new node
    again = result_of(d, "jobs.submit", type="noop")
    assert wait_for(lambda: (j := result_of(d, "jobs.get", job_id=again["id"]))["status"]
                    == "completed" and j)
    assert d.stop() == 0


def test_a_node_killed_is_rescued_by_another_which_resumes_its_job(
        make_pg_daemon: Callable[..., Daemon], dsn: str) -> None:
    """Two jobd on one database: A runs a resumable job and is killed -9; B rescues it only
    after A's lease + cancel_grace + 1 s, and runs it again from its checkpoint."""
    a = make_pg_daemon(SHORT_LEASE)
    b = make_pg_daemon(SHORT_LEASE)
    (a_node,) = [e["node_id"] for e in events_named(a, "node_registered")]
    job = result_of(b, "jobs.submit", type="noop", options={"seconds": 30})
    wait_for(lambda: row(dsn, "SELECT status FROM jobs WHERE id = %s", job["id"]) == (
        "running",), what="the job to start")
    owner = row(dsn, "SELECT node_id FROM jobs WHERE id = %s", job["id"])[0]
    victim, rescuer = (a, b) if owner == a_node else (b, a)
    victim.kill()
    killed = time.monotonic()
    (rescued,) = wait_for(lambda: events_named(rescuer, "node_rescued"), timeout=15,
                          what="the rescue")
    # 2 s lease + 1 s cancel_grace + 1 s: never before the lease ended and its margin
    assert time.monotonic() - killed >= 2 + 1 + 1 - 0.6
    assert rescued["node_id"] == owner and rescued["jobs"] == 1
    got = wait_for(lambda: (j := result_of(rescuer, "jobs.get", job_id=job["id"]))["status"]
                   == "running" and j["attempts"] == 2 and j, what="the job to run again")
    assert row(dsn, "SELECT node_id FROM jobs WHERE id = %s", job["id"]) != (owner,)
    statuses = [e["status"] for e in result_of(rescuer, "jobs.events", job_id=job["id"])]
    assert statuses == ["created", "queued", "running", "queued", "running"], statuses
    assert got["attempts"] == 2
    assert rescuer.stop() == 0


def test_every_job_is_waited_for_and_cancelled_through_either_node(
        make_pg_daemon: Callable[..., Daemon], dsn: str) -> None:
    """A wait and a cancel through the node that does not run the job: woken by the
    owner's notifications (the poll is 5 s here, so the poll alone would be late)."""
    slow_poll = SHORT_LEASE + 'poll = "5s"\n'
    a = make_pg_daemon(slow_poll)
    b = make_pg_daemon(slow_poll)
    (a_node,) = [e["node_id"] for e in events_named(a, "node_registered")]

    def started(job: dict[str, Any]) -> tuple[Daemon, dict[str, Any]]:
        """The node that does not run ``job``, and the job as it reads it running."""
        wait_for(lambda: row(dsn, "SELECT status FROM jobs WHERE id = %s", job["id"]) == (
            "running",), what="the job to start")
        (owner,) = row(dsn, "SELECT node_id FROM jobs WHERE id = %s", job["id"])
        other = b if owner == a_node else a
        return other, result_of(other, "jobs.get", job_id=job["id"])

    quick = result_of(a, "jobs.submit", type="noop", options={"seconds": 0.5})
    other, seen = started(quick)
    asked = time.monotonic()
    done = seen
    while done["status"] == "running" and time.monotonic() - asked < 10:
        # each change wakes it: the owner's progress flushes, then the end
        done = result_of(other, "jobs.wait", job_id=quick["id"],
                         after_version=done["version"], timeout_s=10)
    assert done["status"] == "completed", done
    assert time.monotonic() - asked < 0.5 + 0.5
    # a running job cancelled through the node that does not run it
    long = result_of(a, "jobs.submit", type="command", options={"argv": ["sleep", "60"]})
    other, _ = started(long)
    asked = time.monotonic()
    stopped = result_of(other, "jobs.cancel", job_id=long["id"], wait=True)
    assert stopped["status"] == "cancelled", stopped
    assert time.monotonic() - asked < 1 + 1  # cancel_grace + 1 s
    assert [e["status"] for e in result_of(other, "jobs.events", job_id=long["id"])][-1] == (
        "cancelled")
    assert a.stop() == 0 and b.stop() == 0


def test_a_jobs_log_is_read_through_either_node(
        make_pg_daemon: Callable[..., Daemon], dsn: str) -> None:
    a = make_pg_daemon(SHORT_LEASE)
    b = make_pg_daemon(SHORT_LEASE)
    job = result_of(a, "jobs.submit", type="command", options={
        "argv": ["sh", "-c", "for i in 1 2 3; do echo line $i; sleep 0.2; done"]})
    (a_node,) = [e["node_id"] for e in events_named(a, "node_registered")]
    wait_for(lambda: row(dsn, "SELECT status FROM jobs WHERE id = %s", job["id"]) != (
        "queued",), what="the job to start")
    (owner,) = row(dsn, "SELECT coalesce(node_id, 0) FROM jobs WHERE id = %s", job["id"])
    here, there = (a, b) if owner == a_node else (b, a)
    # while it runs, the other node follows its log from the database
    seen = wait_for(lambda: "line 1" in (p := result_of(there, "jobs.logs",
                                                           job_id=job["id"]))["data"] and p,
                    what="the first line on the other node")
    assert not seen["eof"]
    wait_for(lambda: result_of(there, "jobs.get", job_id=job["id"])["status"] == "completed",
             what="the end")
    mine = result_of(here, "jobs.logs", job_id=job["id"])
    theirs = result_of(there, "jobs.logs", job_id=job["id"])
    assert theirs == mine and theirs["eof"], (theirs, mine)
    assert "line 3" in theirs["data"] and "ended completed" in theirs["data"]
    # paged from a middle offset, as a file is
    middle = result_of(there, "jobs.logs", job_id=job["id"], offset=10, limit_bytes=7)
    assert middle["data"] == mine["data"][10:17] and middle["next_offset"] == 17
    assert a.stop() == 0 and b.stop() == 0


def test_progress_on_one_node_is_seen_on_the_other_at_once(
        make_pg_daemon: Callable[..., Daemon], dsn: str, tmp_path: Path) -> None:
    """Live progress goes through the database's unlogged table and a notification: the
    other node answers with it well before the owner's durable flush (every 0.5 s)."""
    a = make_pg_daemon(SHORT_LEASE)
    b = make_pg_daemon(SHORT_LEASE)
    (a_node,) = [e["node_id"] for e in events_named(a, "node_registered")]
    marker = tmp_path / "reported"
    job = result_of(a, "jobs.submit", type="command", options={"argv": [
        "sh", "-c", f"sleep 0.5; echo '{{\"progress\": 42, \"message\": \"half\"}}'; "
                    f"touch {marker}; sleep 30"]})
    wait_for(lambda: row(dsn, "SELECT status FROM jobs WHERE id = %s", job["id"]) == (
        "running",), what="the job to start")
    (owner,) = row(dsn, "SELECT node_id FROM jobs WHERE id = %s", job["id"])
    there = b if owner == a_node else a
    wait_for(marker.exists, interval=0.002, what="the progress line")
    reported = time.monotonic()
    seen = wait_for(lambda: (j := result_of(there, "jobs.get", job_id=job["id"]))[
        "progress"] >= 42 and j, interval=0.002, what="the progress on the other node")
    assert time.monotonic() - reported < 0.15
    assert seen["message"] == "half"
    result_of(there, "jobs.cancel", job_id=job["id"], wait=True)
    assert a.stop() == 0 and b.stop() == 0


def test_another_nodes_jobs_show_in_this_nodes_queue_counts_and_changes(
        make_pg_daemon: Callable[..., Daemon], dsn: str) -> None:
    """What a node knows of the queue (positions, admin.stats' queued count) and its
    jobs.changes follow the jobs another node submits and starts, not only its own."""
    slow_poll = SHORT_LEASE + 'poll = "5s"\n'  # notifications, not the poll, must carry it
    a = make_pg_daemon(slow_poll)
    b = make_pg_daemon(slow_poll)
    feed = result_of(b, "jobs.changes", timeout_s=0)
    running = [result_of(a, "jobs.submit", type="command", options={"argv": ["sleep", "60"]})
               for _ in range(3)]  # max_running_per_user: 3
    waiting = result_of(a, "jobs.submit", type="command", options={"argv": ["sleep", "60"]})
    wait_for(lambda: row(dsn, "SELECT count(*) FROM jobs WHERE status = 'running'") == (3,),
             what="three jobs running")
    seen = wait_for(lambda: (job := result_of(b, "jobs.get", job_id=waiting["id"])).get(
        "queue_position") == 1 and job, what="node b placing node a's queued job")
    wait_for(lambda: result_of(b, "admin.stats")["queued"] == 1, what="b counting it queued")
    changed = {j["id"] for j in result_of(b, "jobs.changes", after=feed["cursor"],
                                           timeout_s=5)["jobs"]}
    assert {j["id"] for j in running} | {waiting["id"]} <= changed, changed

    result_of(a, "jobs.cancel", job_id=running[0]["id"], wait=True)
    wait_for(lambda: row(dsn, "SELECT status FROM jobs WHERE id = %s", waiting["id"]) == (
        "running",), what="the waiting job to start")
    wait_for(lambda: result_of(b, "admin.stats")["queued"] == 0,
             what="b no longer counting it queued")
    for job in running[1:] + [waiting]:
        result_of(a, "jobs.cancel", job_id=job["id"], wait=True)
    assert a.stop() == 0 and b.stop() == 0


def test_a_job_forgotten_through_another_node_loses_its_log_on_the_node_that_ran_it(
        make_pg_daemon: Callable[..., Daemon], dsn: str) -> None:
    config = SHORT_LEASE + '\n[retention]\ncleanup_every = "1s"\n'
    a, b = make_pg_daemon(config), make_pg_daemon(config)
    logs = []
    for user in ("alice", "bob"):
        job = result_of(a, "jobs.submit", type="command", as_user=user,
                        options={"argv": ["echo", "hello"]})
        wait_for(lambda: result_of(a, "jobs.get", job_id=job["id"])["status"] == "completed",
                 what="the job's end")
        (log, there), = [(n.state / "logs" / f"{job['id']}.log", other)
                         for n, other in ((a, b), (b, a))
                         if (n.state / "logs" / f"{job['id']}.log").exists()]
        logs.append((log, there, user))
    (cleaned, there, _), (purged, elsewhere, bob) = logs
    assert result_of(elsewhere, "admin.purge", user_id=bob)["deleted"] == 1
    assert result_of(there, "admin.cleanup", older_than_s=0)["deleted"] == 1
    wait_for(lambda: not cleaned.exists() and not purged.exists(), timeout=10,
             what="the logs on the nodes that ran the jobs to go")
    assert a.stop() == 0 and b.stop() == 0


def test_an_asked_for_cleanup_waits_for_another_nodes_sweep_rather_than_skip_it(
        make_pg_daemon: Callable[..., Daemon], dsn: str) -> None:
    import threading

    from jobd.store.postgres import CLEANUP_KEY
    a = make_pg_daemon(SHORT_LEASE)
    job = result_of(a, "jobs.submit", type="noop")
    wait_for(lambda: result_of(a, "jobs.get", job_id=job["id"])["status"] == "completed",
             what="the job's end")
    answers: list[Any] = []
    with connect(dsn) as sweeping:  # as another node's sweep holds it
        sweeping.execute("SELECT pg_advisory_lock(%s)", (CLEANUP_KEY,))
        asked = [threading.Thread(target=lambda: answers.append(
            result_of(a, "admin.cleanup", older_than_s=0))) for _ in range(6)]
        for thread in asked:
            thread.start()
        time.sleep(1.5)
        assert all(t.is_alive() for t in asked) and not answers  # waiting, not skipped
        started = time.monotonic()  # and the node's reads are not held up meanwhile
        assert result_of(a, "jobs.get", job_id=job["id"])["status"] == "completed"
        assert time.monotonic() - started < 2
        sweeping.execute("SELECT pg_advisory_unlock(%s)", (CLEANUP_KEY,))
        for thread in asked:
            thread.join(20)
    assert sorted(answer["deleted"] for answer in answers) == [0] * 5 + [1]
    assert a.stop() == 0


def test_an_asked_for_cleanup_gives_up_on_a_sweep_that_does_not_end_and_the_node_stops(
        make_pg_daemon: Callable[..., Daemon], dsn: str) -> None:
    from jobd.store.postgres import CLEANUP_KEY, CLEANUP_WAIT_S
    a = make_pg_daemon(SHORT_LEASE)
    with connect(dsn) as sweeping:
        sweeping.execute("SELECT pg_advisory_lock(%s)", (CLEANUP_KEY,))
        started = time.monotonic()
        error = a.raw("admin.cleanup", older_than_s=0)["error"]
        assert CLEANUP_WAIT_S <= time.monotonic() - started < CLEANUP_WAIT_S + 5
        assert error["code"] == -32050 and "another node is cleaning up" in error["message"]
        assert a.stop(timeout=20) == 0  # the lock still held elsewhere


def test_a_job_running_on_one_node_keeps_every_node_from_saying_drained(
        make_pg_daemon: Callable[..., Daemon], dsn: str) -> None:
    a, b = make_pg_daemon(SHORT_LEASE), make_pg_daemon(SHORT_LEASE)
    job = result_of(a, "jobs.submit", type="command", as_user="alice",
                    options={"argv": ["sleep", "30"]})
    wait_for(lambda: result_of(a, "jobs.get", job_id=job["id"])["status"] == "running",
             what="the job to start")
    for node in (a, b):
        wait_for(lambda: result_of(node, "admin.stats")["running"] == 1,
                 what=f"{node.root.name} to count the running job")
        stats = result_of(node, "admin.stats")
        assert stats["per_user"]["alice"] == {"running": 1, "queued": 0}
        assert sum(n["running"] for n in stats["nodes"]) == 1
        told = result_of(node, "admin.maintenance", enabled=True)
        assert (told["running"], told["drained"]) == (1, False), node.root.name
    result_of(b, "jobs.cancel", job_id=job["id"], wait=True)
    for node in (a, b):
        assert result_of(node, "admin.maintenance")["drained"] is True
    result_of(a, "admin.maintenance", enabled=False)
    assert a.stop() == 0 and b.stop() == 0


#: an entry-point plugin that says ``exclusive`` and stores no ``options.repo_path``
PLUGIN = '''
from jobd.handlers.noop import NoopHandler


class Exclusive(NoopHandler):
    name = "exclusive_demo"
    exclusive = True
'''


def test_an_exclusive_plugin_without_a_repo_path_runs_one_at_a_time_across_nodes(
        make_pg_daemon: Callable[..., Daemon], dsn: str, tmp_path: Path) -> None:
    env = plugin_env(tmp_path / "site", "jobd_exclusive_demo", PLUGIN,
                     exclusive_demo="Exclusive")
    a, b = make_pg_daemon(SHORT_LEASE, env=env), make_pg_daemon(SHORT_LEASE, env=env)
    jobs = [result_of(node, "jobs.submit", type="exclusive_demo", project_id="proj",
                      options={"seconds": 0.6}) for node in (a, b, a)]
    most = 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        (running, left) = row(dsn, "SELECT count(*) FILTER (WHERE status = 'running'), "
                                   "count(*) FILTER (WHERE status IN ('queued', 'running')) "
                                   "FROM jobs WHERE type = 'exclusive_demo'")
        most = max(most, running)
        if not left:
            break
        time.sleep(0.02)
    assert [result_of(a, "jobs.get", job_id=j["id"])["status"] for j in jobs] == [
        "completed"] * 3
    assert most == 1
    assert a.stop() == 0 and b.stop() == 0


def test_a_reload_the_handlers_refuse_leaves_the_nodes_settings_as_they_were(
        make_pg_daemon: Callable[..., Daemon], dsn: str, tmp_path: Path) -> None:
    env = plugin_env(tmp_path / "site", "jobd_exclusive_demo", PLUGIN,
                     exclusive_demo="Exclusive")
    a = make_pg_daemon(SHORT_LEASE, env=env)
    (node,) = [e["node_id"] for e in events_named(a, "node_registered")]
    before = row(dsn, "SELECT settings_hash FROM nodes WHERE id = %s", node)
    # a [types] entry named as the plugin's type: refused by the handlers
    a.config.write_text(a.config.read_text() + '\n[types.exclusive_demo]\nargv = ["true"]\n')
    a.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "config_reload_failed" in a.log(), what="the reload to be refused")
    assert "a plugin job type has that name" in a.log()
    assert row(dsn, "SELECT settings_hash FROM nodes WHERE id = %s", node) == before
    assert a.stop() == 0
