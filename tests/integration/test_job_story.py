"""The job log tells the story of the job (SPEC §5): jobd's own stamped lines for each
attempt's start, a cancel and by whom, a timeout, and the end; told from the events for a
job that never ran a program."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from conftest import FAST_CONFIG, Daemon, joblog, result_of, wait_for, wait_terminal

MARK = r"\[jobd \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\] "


def story(d: Daemon, job_id: str) -> list[str]:
    """jobd's own lines of a job's log, without their stamps."""
    return [line[len("[jobd 2026-11-22T10:00:00Z] "):] for line in joblog(d, job_id).splitlines()
            if re.match(MARK, line)]


def command(d: Daemon, argv: list[str], **params: Any) -> dict[str, Any]:
    return result_of(d, "jobs.submit", type="command", options={"argv": argv}, **params)


def test_a_cancelled_job_says_who_cancelled_it_and_the_end_is_told_before_eof(
        daemon: Daemon) -> None:
    job = command(daemon, ["sh", "-c", "echo working; sleep 30"])
    wait_for(lambda: "working" in joblog(daemon, job["id"]), what="the program to start")
    result_of(daemon, "jobs.cancel", job_id=job["id"], wait=True)
    page = result_of(daemon, "jobs.logs", job_id=job["id"])
    assert page["eof"] is True
    lines = story(daemon, job["id"])
    assert lines[0] == "attempt 1 started"
    assert lines[-2:] == ["cancelled by admin:root: sending SIGTERM", "ended cancelled"]
    assert all(re.match(MARK, ln) for ln in page["data"].splitlines() if ln != "working")


def test_a_retried_job_tells_its_attempts_apart(daemon: Daemon) -> None:
    job = command(daemon, ["sh", "-c", "echo nope; exit 3"])
    wait_terminal(daemon, job["id"])
    result_of(daemon, "jobs.retry", job_id=job["id"])
    wait_terminal(daemon, job["id"])
    told = [ln for ln in story(daemon, job["id"]) if not ln.startswith("$ ")]
    assert told == ["attempt 1 started", "ended failed: sh exited with status 3: nope",
                    "attempt 2 started", "ended failed: sh exited with status 3: nope"]


def test_a_timed_out_job_says_so_before_it_is_stopped(daemon: Daemon) -> None:
    job = command(daemon, ["sleep", "30"], timeout_s=1)
    assert wait_terminal(daemon, job["id"])["error"] == "timed out after 1s"
    assert story(daemon, job["id"])[-2:] == ["timed out after 1s: sending SIGTERM",
                                             "ended failed: timed out after 1s"]


def test_a_job_without_a_program_has_no_file_and_its_story_comes_from_its_events(
        daemon: Daemon) -> None:
    job = result_of(daemon, "jobs.submit", type="noop", options={"seconds": 30})
    wait_for(lambda: result_of(daemon, "jobs.get", job_id=job["id"])["status"] == "running",
             what="the noop to run")
    result_of(daemon, "jobs.cancel", job_id=job["id"], wait=True)
    result_of(daemon, "jobs.retry", job_id=job["id"])
    wait_for(lambda: result_of(daemon, "jobs.get", job_id=job["id"])["attempts"] == 2,
             what="the second attempt")
    result_of(daemon, "jobs.cancel", job_id=job["id"], wait=True)
    assert not (daemon.state / "logs" / f"{job['id']}.log").exists()
    assert story(daemon, job["id"]) == [
        "attempt 1 started", "cancelled by admin:root", "ended cancelled",
        "attempt 2 started", "cancelled by admin:root", "ended cancelled"]
    # paged like a file, to the end
    whole = joblog(daemon, job["id"]).encode()
    first = result_of(daemon, "jobs.logs", job_id=job["id"], limit_bytes=10)
    rest = result_of(daemon, "jobs.logs", job_id=job["id"], offset=first["next_offset"],
                     limit_bytes=1 << 20)
    assert (first["eof"], rest["eof"]) == (False, True)
    assert (first["data"] + rest["data"]).encode() == whole


def test_a_job_cancelled_while_queued_after_an_attempt_says_so_in_its_log(
        daemon: Daemon) -> None:
    job = command(daemon, ["sh", "-c", "echo nope; exit 3"])
    wait_terminal(daemon, job["id"])
    result_of(daemon, "admin.pause")
    result_of(daemon, "jobs.retry", job_id=job["id"])
    assert result_of(daemon, "jobs.cancel", job_id=job["id"])["status"] == "cancelled"
    assert result_of(daemon, "jobs.logs", job_id=job["id"])["eof"] is True
    assert story(daemon, job["id"])[-1] == "ended cancelled: cancelled by admin:root while queued"
    result_of(daemon, "admin.resume")


def test_a_job_a_crash_interrupted_tells_how_its_attempt_ended(make_daemon: Any) -> None:
    d = make_daemon(config=FAST_CONFIG + '\n[types.again]\nargv = ["sleep", "30"]\n'
                    "resumable = true\n")
    once = command(d, ["sh", "-c", "echo started; sleep 30"])
    again = result_of(d, "jobs.submit", type="again")
    for job in (once, again):
        wait_for(lambda: result_of(d, "jobs.get", job_id=job["id"])["status"] == "running",
                 what="the jobs to run")
    wait_for(lambda: "started" in joblog(d, once["id"]), what="the program's output")
    d.kill()
    d.start()
    assert wait_terminal(d, once["id"])["status"] == "failed"
    assert result_of(d, "jobs.logs", job_id=once["id"])["eof"] is True
    assert story(d, once["id"])[-1] == "ended failed: interrupted by daemon restart"
    wait_for(lambda: "attempt 2 started" in story(d, again["id"]), what="the resumed attempt")
    told = [ln for ln in story(d, again["id"]) if not ln.startswith("$ ")]
    assert told[:3] == ["attempt 1 started", "recovered after restart; queued again",
                        "attempt 2 started"]


def test_a_log_first_made_by_a_later_attempt_begins_with_the_earlier_ones(
        daemon: Daemon, tmp_path: Path) -> None:
    """Attempt 1 failed before it ran anything (no log: ``jobs.logs`` told it from the
    events); attempt 2 makes the log, which begins with those same bytes, so a follower
    that read attempt 1's story goes on at its offset with attempt 2's."""
    folder = tmp_path / "gone"
    folder.mkdir()
    result_of(daemon, "admin.pause")
    try:
        job = result_of(daemon, "jobs.submit", type="command", options={
            "argv": ["echo", "hello from attempt 2"], "cwd": str(folder)})
        folder.rmdir()
    finally:
        result_of(daemon, "admin.resume")
    assert wait_terminal(daemon, job["id"])["status"] == "failed"
    first = result_of(daemon, "jobs.logs", job_id=job["id"])
    assert first["eof"] and first["data"].count("\n") == 2  # started, ended failed
    folder.mkdir()
    result_of(daemon, "jobs.retry", job_id=job["id"])
    assert wait_terminal(daemon, job["id"])["status"] == "completed"
    whole = result_of(daemon, "jobs.logs", job_id=job["id"])["data"]
    assert whole.startswith(first["data"]), whole
    rest = result_of(daemon, "jobs.logs", job_id=job["id"], offset=first["next_offset"])
    assert rest["data"] == whole[len(first["data"]):]
    told = [ln for ln in story(daemon, job["id"]) if not ln.startswith("$ ")]
    assert told[0] == "attempt 1 started" and told[1].startswith("ended failed: ")
    assert told[2:] == ["attempt 2 started", "ended completed"]
    assert "hello from attempt 2" in whole
