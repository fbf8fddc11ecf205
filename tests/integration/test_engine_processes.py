"""Jobs' programs through the real daemon: indexer progress, cancel (SIGTERM, then SIGKILL,
to the whole process group), timeout, retry, and the running limits (SPEC §5).

One daemon serves the module. Its indexer is ``<repo>/indexer.sh``, an untracked script
each test writes into its own repository, so every test picks the indexer it needs.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from conftest import (Daemon, clone, commit_files, error_of, follow, git, group_alive, joblog,
                      make_upstream, phases_of, pid_alive, result_of, wait_for, wait_terminal)

GRACE = 1.0
CONFIG = f"""
[execution]
cancel_grace = "{GRACE}s"
shutdown_grace = "5s"
workers = 2
max_running_per_user = 1

[sync]
index_command = ["sh", "{{repo}}/indexer.sh"]
full_index_command = ["sh", "{{repo}}/indexer.sh"]
"""
_projects = itertools.count(1)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("jobd"), config=CONFIG).start()
    yield d
    assert d.stop() == 0


@pytest.fixture
def project() -> str:
    return f"p{next(_projects)}"


def repo_with_indexer(d: Daemon, tmp_path: Path, project: str, script: str) -> tuple[Path, Path]:
    """(upstream, the project's clone with ``script`` as its indexer)."""
    upstream = make_upstream(tmp_path / "upstream")
    repo = clone(upstream, d.repos / "root" / project)
    (repo / "indexer.sh").write_text(script)
    return upstream, repo


def read_pids(path: Path) -> list[int]:
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def submit(d: Daemon, type: str, project: str | None = None, **params: Any) -> dict[str, Any]:
    return result_of(d, "jobs.submit", type=type, project_id=project, **params)


# -- progress --------------------------------------------------------------------------------

def test_indexer_progress_rises_through_the_phases(daemon: Daemon, tmp_path: Path,
                                                   project: str) -> None:
    upstream, _ = repo_with_indexer(daemon, tmp_path, project, """
        for i in 1 2 3 4 5 6; do
            echo "{\\"current\\": $i, \\"total\\": 6, \\"info\\": \\"file $i\\"}"
            sleep 0.15
        done
    """)
    commit_files(upstream, {"b.txt": "b\n"})

    job = submit(daemon, "sync", project)
    done, progress = follow(daemon, job["id"])

    assert done["status"] == "completed", done
    assert progress == sorted(progress), f"progress went backwards: {progress}"
    in_indexing = {p for p in progress if 40 < p < 95}
    assert len(in_indexing) >= 3, f"the indexer's steps were not seen rising: {progress}"
    assert done["result"]["commits_pulled"] == 1
    assert done["result"]["index"]["command"][:1] == ["sh"]
    assert phases_of(daemon, job["id"]) == ["init", "git_sync", "indexing", "finalizing"]


# -- cancel ----------------------------------------------------------------------------------

def test_cancel_kills_an_indexer_that_ignores_sigterm_after_the_grace(
        daemon: Daemon, tmp_path: Path, project: str) -> None:
    pids = tmp_path / "pids"
    repo_with_indexer(daemon, tmp_path, project, f"""
        trap '' TERM
        echo $$ > {pids}
        while :; do sleep 0.05; done
    """)
    job = submit(daemon, "index", project)
    (pgid,) = wait_for(lambda: read_pids(pids), what="the indexer to start")
    assert group_alive(pgid)

    started = time.monotonic()
    stopped = result_of(daemon, "jobs.cancel", job_id=job["id"], wait=True)
    took = time.monotonic() - started

    assert stopped["status"] == "cancelled", stopped
    # SIGTERM was ignored, so only SIGKILL after the grace ended it
    assert GRACE * 0.9 <= took <= GRACE + 2.0, took
    assert group_alive(pgid) == []
    # the daemon's own line says whose group it was
    assert any(e.get("event") == "process_group_killed" and e.get("pgid") == pgid
               and e.get("job_id") == job["id"] for e in daemon.log_events())
    events = result_of(daemon, "jobs.events", job_id=job["id"])
    assert [e["message"] for e in events if e["status"] == "running"][-1] == "cancel requested"
    assert events[-1]["status"] == "cancelled" and events[-1]["actor"] == "jobd"


def test_cancel_kills_the_indexers_children_and_grandchildren(
        daemon: Daemon, tmp_path: Path, project: str) -> None:
    pids = tmp_path / "pids"
    # a child that ignores SIGTERM, with its own child, and an orphaned grandchild whose
    # parent already exited (re-parented away from the indexer)
    repo_with_indexer(daemon, tmp_path, project, f"""
        sh -c 'trap "" TERM; sleep 61 & echo $! >> {pids}; wait' &
        echo $! >> {pids}
        (sleep 62 & echo $! >> {pids})
        echo $$ >> {pids}
        wait
    """)
    job = submit(daemon, "index", project)
    spawned = wait_for(lambda: len(read_pids(pids)) == 4 and read_pids(pids),
                       what="the indexer and its descendants to start")
    assert all(pid_alive(p) for p in spawned)

    assert result_of(daemon, "jobs.cancel", job_id=job["id"])["cancel_requested"] is True
    assert wait_terminal(daemon, job["id"], timeout=GRACE + 5)["status"] == "cancelled"

    assert [p for p in spawned if pid_alive(p)] == []
    assert group_alive(spawned[-1]) == []


def test_cancel_of_a_queued_job_is_immediate(daemon: Daemon) -> None:
    result_of(daemon, "admin.pause")
    try:
        job = submit(daemon, "noop", options={"seconds": 5})
        assert job["wait_reason"] == "paused" and job["queue_position"] >= 1
        cancelled = result_of(daemon, "jobs.cancel", job_id=job["id"])
    finally:
        result_of(daemon, "admin.resume")
    assert cancelled["status"] == "cancelled" and cancelled["attempts"] == 0
    again = result_of(daemon, "jobs.cancel", job_id=job["id"])  # harmless
    assert again["status"] == "cancelled" and again["version"] == cancelled["version"]


# -- timeout and retry -------------------------------------------------------------------------

def test_a_job_past_its_timeout_is_killed_and_fails(daemon: Daemon, tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    job = submit(daemon, "command", options={
        "argv": ["sh", "-c", f"trap '' TERM; echo $$ > {pids}; while :; do sleep 0.05; done"]},
        timeout_s=1)
    (pgid,) = wait_for(lambda: read_pids(pids), what="the command to start")

    done = wait_terminal(daemon, job["id"], timeout=1 + GRACE + 5)

    assert done["status"] == "failed"
    assert done["error"] == "timed out after 1s"
    assert group_alive(pgid) == []


def test_a_retried_failure_quotes_its_own_program_not_the_attempt_before(
        daemon: Daemon, tmp_path: Path) -> None:
    script = "if [ -e flag ]; then exit 4; else touch flag; echo boom >&2; exit 3; fi"
    job = submit(daemon, "command", options={"argv": ["sh", "-c", script],
                                              "cwd": str(tmp_path)})
    assert wait_terminal(daemon, job["id"])["error"] == "sh exited with status 3: boom"
    result_of(daemon, "jobs.retry", job_id=job["id"])
    # the second attempt printed nothing: its error says only how it ended
    assert wait_terminal(daemon, job["id"])["error"] == "sh exited with status 4"


def test_a_failed_job_retried_keeps_its_id_and_completes(daemon: Daemon, tmp_path: Path) -> None:
    script = "if [ -e flag ]; then echo second try; else touch flag; echo boom >&2; exit 3; fi"
    job = submit(daemon, "command", options={"argv": ["sh", "-c", script],
                                              "cwd": str(tmp_path)})
    failed = wait_terminal(daemon, job["id"])
    assert failed["status"] == "failed"
    assert failed["error"] == "sh exited with status 3: boom"
    err = error_of(daemon, "jobs.retry", job_id="0" * 8 + "-0000-0000-0000-" + "0" * 12)
    assert err["code"] == -32004

    retried = result_of(daemon, "jobs.retry", job_id=job["id"])
    assert (retried["id"], retried["status"], retried["error"]) == (job["id"], "queued", None)
    done = wait_terminal(daemon, job["id"])

    assert done["status"] == "completed" and done["attempts"] == 2
    assert "second try" in joblog(daemon, job["id"])
    events = result_of(daemon, "jobs.events", job_id=job["id"])
    assert [e["status"] for e in events] == ["created", "queued", "running", "failed",
                                             "queued", "running", "completed"]
    assert any(e["message"] == "retried" and e["actor"] == "admin:root" for e in events)
    assert error_of(daemon, "jobs.retry", job_id=job["id"])["code"] == -32009


# -- limits ----------------------------------------------------------------------------------

def test_workers_and_per_user_limits_are_never_exceeded(daemon: Daemon) -> None:
    users = ["alice", "bob", "carol"]
    result_of(daemon, "admin.pause")
    try:
        jobs = [submit(daemon, "noop", options={"seconds": 0.3}, as_user=u)
                for u in users for _ in range(2)]
        queued = result_of(daemon, "jobs.get", job_id=jobs[-1]["id"])
        assert queued["wait_reason"] == "paused"
        assert queued["queue_position"] == len(jobs)  # carol's second: last in turn order
    finally:
        result_of(daemon, "admin.resume")

    most = 0
    reasons = set()
    ids = {j["id"] for j in jobs}
    while True:
        stats = result_of(daemon, "admin.stats")
        running = result_of(daemon, "jobs.list", status="running")["jobs"]
        assert stats["running"] <= 2 and len(running) <= 2, (stats, running)
        assert all(v["running"] <= 1 for v in stats["per_user"].values()), stats
        assert len({j["user_id"] for j in running}) == len(running), running
        # (a job being handed to a worker has no reason left, though not yet running)
        reasons |= {j["wait_reason"] for j in result_of(daemon, "jobs.list",
                                                        status="queued")["jobs"]
                    if j["id"] in ids} - {None}
        most = max(most, stats["running"])
        ended = [result_of(daemon, "jobs.get", job_id=i)["status"] for i in ids]
        if all(s == "completed" for s in ended):
            break
        assert "failed" not in ended and "cancelled" not in ended
        time.sleep(0.02)
    assert most == 2, "two workers should have run at once"
    assert reasons <= {"slots", "user_limit"} and "user_limit" in reasons, reasons


def test_cancel_during_fetch_stops_git_and_leaves_the_work_tree(
        daemon: Daemon, tmp_path: Path, project: str) -> None:
    pids, release = tmp_path / "pids", tmp_path / "release"
    upstream, repo = repo_with_indexer(daemon, tmp_path, project, "exit 0\n")
    old = git("rev-parse", "HEAD", cwd=repo)
    commit_files(upstream, {"new.txt": "x\n"})
    # git fetch runs the remote side through this: a stand-in for a slow server that
    # holds the fetch (and ignores SIGTERM) until released
    git("config", "remote.origin.uploadpack",
        f"trap '' TERM; echo $$ > {pids}; while [ ! -e {release} ]; do sleep 0.05; done; "
        "git-upload-pack", cwd=repo)
    job = submit(daemon, "sync", project)
    (server,) = wait_for(lambda: read_pids(pids), what="the fetch to start")
    assert result_of(daemon, "jobs.get", job_id=job["id"])["phase"] == "git_sync"

    stopped = result_of(daemon, "jobs.cancel", job_id=job["id"], wait=True)

    assert stopped["status"] == "cancelled", stopped
    assert not pid_alive(server)
    assert git("rev-parse", "HEAD", cwd=repo) == old
    assert not (repo / "new.txt").exists()
    assert "fetch" in joblog(daemon, job["id"])
