"""A job's log files go with the job (SPEC §6): retention cleanup and max_stored_per_user
remove its log, its ``.base`` and what an interrupted trim left, through the store's
``Listeners.deleted`` in a real daemon."""

from __future__ import annotations

from typing import Any, Callable

from conftest import FAST_CONFIG, Daemon, result_of, wait_for, wait_terminal

#: small enough that a chatty job's log is trimmed (and so gets a ``.base``)
SMALL_LOGS = FAST_CONFIG.replace("[execution]", "[execution]\nmax_log_bytes = 4096")


def chatty(d: Daemon, user: str = "alice") -> dict[str, Any]:
    """A finished job whose log was trimmed, with the files a trim cut short by a crash
    leaves beside it."""
    job = result_of(d, "jobs.submit", type="command", as_user=user, options={
        "argv": ["sh", "-c", "i=0; while [ $i -lt 500 ]; do echo line $i of a chatty job; "
                 "i=$((i+1)); done"]})
    assert wait_terminal(d, job["id"])["status"] == "completed"
    logs = d.state / "logs"
    (logs / f"{job['id']}.log.tmp").write_bytes(b"half a trim")
    (logs / f"{job['id']}.log.base.tmp").write_text("4096")
    assert files_of(d, job["id"]) == [f"{job['id']}.log{suffix}" for suffix in
                                      ("", ".base", ".base.tmp", ".tmp")]
    return job


def files_of(d: Daemon, job_id: str) -> list[str]:
    return sorted(p.name for p in (d.state / "logs").iterdir() if p.name.startswith(job_id))


def test_retention_cleanup_leaves_none_of_a_job_s_log_files(
        make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon(config=SMALL_LOGS)
    old, kept = chatty(d), result_of(d, "jobs.submit", type="noop", options={"seconds": 30})
    assert result_of(d, "admin.cleanup", older_than_s=0)["deleted"] == 1
    wait_for(lambda: files_of(d, old["id"]) == [], what="the job's log files to go")
    assert result_of(d, "jobs.get", job_id=kept["id"])["status"] in ("queued", "running")


def test_a_job_forgotten_past_max_stored_per_user_leaves_none_of_its_log_files(
        make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon(config=SMALL_LOGS.replace("[execution]",
                                              "[execution]\nmax_stored_per_user = 1"))
    first = chatty(d)
    second = chatty(d)
    wait_for(lambda: files_of(d, first["id"]) == [], what="the forgotten job's log files to go")
    assert f"{second['id']}.log" in files_of(d, second["id"])


def test_after_a_crash_the_logs_of_jobs_already_forgotten_are_swept(
        make_daemon: Callable[..., Daemon]) -> None:
    """A cleanup deletes a job's rows, then its files: a crash in between leaves them. The
    start after an unclean stop removes every log file of a job the store does not know,
    and none of a job it knows."""
    d = make_daemon(config=SMALL_LOGS)
    kept = chatty(d)
    logs = d.state / "logs"
    gone = "0b7e8a52-1f4c-4c47-9e0e-5d3c1a2b9f00"  # a job a cleanup forgot just before
    for suffix in ("", ".base", ".tmp", ".base.tmp"):
        (logs / f"{gone}.log{suffix}").write_text("left by a crash")
    (logs / "README").write_text("not a job's log")  # not one of jobd's names: left alone
    d.kill()
    d.start()
    wait_for(lambda: files_of(d, gone) == [], what="the forgotten job's log files to go")
    assert files_of(d, kept["id"]) == [f"{kept['id']}.log{suffix}" for suffix in
                                       ("", ".base", ".base.tmp", ".tmp")]
    assert (logs / "README").exists()
    swept = [e for e in d.log_events() if e.get("event") == "stray_logs_removed"]
    assert [e["jobs"] for e in swept] == [1]
