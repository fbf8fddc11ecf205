"""admin.stats for a UI (SPEC §4): ``by_type``, ``finished`` since ``since`` (success rate,
mean/p50/p95 run time) and ``per_user`` top 100, against a real daemon."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from conftest import Daemon, error_of, result_of, wait_terminal

CONFIG = """
[execution]
workers = 4
max_running_per_user = 4
max_queued_per_user = 5
shutdown_grace = "5s"
"""


@pytest.fixture
def jd(make_daemon: Any) -> Daemon:
    return make_daemon(CONFIG)


def ago(**delta: float) -> str:
    when = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(**delta)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def test_stats_count_by_type_and_the_finished_since_with_their_run_times(jd: Daemon) -> None:
    done = [result_of(jd, "jobs.submit", type="noop", options={"seconds": 0.3}, as_user="ann")
            for _ in range(2)]
    bad = result_of(jd, "jobs.submit", type="command", options={"argv": ["false"]},
                    as_user="ann")
    for job in (*done, bad):
        wait_terminal(jd, job["id"])
    result_of(jd, "admin.pause")
    waiting = result_of(jd, "jobs.submit", type="noop", as_user="bob")
    queued = result_of(jd, "jobs.submit", type="noop", as_user="bob")
    result_of(jd, "jobs.cancel", job_id=waiting["id"])
    stats = result_of(jd, "admin.stats")
    assert stats["by_type"] == {"noop": {"completed": 2, "cancelled": 1, "queued": 1},
                                "command": {"failed": 1}}
    noop, command = stats["finished"]["noop"], stats["finished"]["command"]
    assert (noop["completed"], noop["failed"], noop["cancelled"]) == (2, 0, 1)
    assert noop["success_rate"] == 1.0 and command["success_rate"] == 0.0
    # the cancelled-while-queued job has no run time: the two 0.3 s runs alone
    assert 0.3 <= noop["duration_s"]["mean"] < 0.5
    assert 0.25 <= noop["duration_s"]["p50"] <= noop["duration_s"]["p95"] <= 0.5
    assert command["duration_s"]["p50"] < 0.25
    assert stats["per_user"] == {"bob": {"running": 0, "queued": 1}}
    assert stats["per_user_truncated"] is False
    # a later ``since`` (rounded down to the hour) may leave them out; not an earlier one
    assert result_of(jd, "admin.stats", since=ago(days=34))["finished"] == stats["finished"]
    assert result_of(jd, "admin.stats", since=ago(days=-2))["finished"] == {}
    for bad_since in (ago(days=36), "yesterday", 5):
        err = error_of(jd, "admin.stats", since=bad_since)
        assert err["code"] == -32602 and err["data"]["field"] == "since", bad_since
    result_of(jd, "jobs.cancel", job_id=queued["id"])
    result_of(jd, "admin.resume")


def test_per_user_lists_the_100_busiest_users(jd: Daemon) -> None:
    result_of(jd, "admin.pause")
    try:
        for n in range(101):
            result_of(jd, "jobs.submit", type="noop", as_user=f"user{n:03d}")
        for _ in range(2):
            result_of(jd, "jobs.submit", type="noop", as_user="user100")
        stats = result_of(jd, "admin.stats")
        assert len(stats["per_user"]) == 100 and stats["per_user_truncated"] is True
        assert stats["per_user"]["user100"] == {"running": 0, "queued": 3}
        assert stats["queued"] == 103
    finally:
        result_of(jd, "admin.resume")
