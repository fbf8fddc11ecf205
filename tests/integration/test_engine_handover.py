"""A start that shares its submit's transaction (issue 9): a job submitted while a worker
is free and nothing waits is created, queued and running in one commit. Read from the
daemon's own database. (When it would not be next, ``test_dispatch`` shows it queued.)
And a job's life costs one line of the daemon's log at info, at its end."""

from __future__ import annotations

import sqlite3
from typing import Any

from conftest import Daemon, wait_for


def events(d: Daemon, job_id: str) -> list[tuple[str, int]]:
    """(status, when) of each of the job's events, in order, as stored."""
    with sqlite3.connect(f"file:{d.db}?mode=ro", uri=True) as conn:
        return conn.execute(
            "SELECT e.status, e.at FROM job_events e JOIN jobs j ON j.seq = e.job "
            "WHERE j.id = ? ORDER BY e.rowid", (job_id,)).fetchall()


def submit(d: Daemon, **params: Any) -> dict[str, Any]:
    resp = d.raw("jobs.submit", **params)
    assert "result" in resp, resp
    return resp["result"]


def done(d: Daemon, job_id: str) -> None:
    wait_for(lambda: d.raw("jobs.get", job_id=job_id)["result"]["status"] == "completed",
             what=f"{job_id} completed")


def test_a_job_submitted_to_a_free_worker_starts_in_its_submit_commit(daemon: Daemon) -> None:
    job = submit(daemon, type="noop")
    assert job["status"] == "queued"  # the answer is the job as submitted
    done(daemon, job["id"])
    told = events(daemon, job["id"])
    assert [s for s, _ in told] == ["created", "queued", "running", "completed"]
    assert len({at for s, at in told if s != "completed"}) == 1, told



def test_a_job_leaves_one_line_in_the_daemons_log_at_its_end(daemon: Daemon) -> None:
    job = submit(daemon, type="noop")
    done(daemon, job["id"])
    wait_for(lambda: any(e.get("job_id") == job["id"] for e in daemon.log_events()),
             what="the job's log line")
    lines = [e for e in daemon.log_events() if e.get("job_id") == job["id"]
             and e.get("level") in ("info", "warning", "error")]
    assert [e["event"] for e in lines] == ["job_completed"], lines
