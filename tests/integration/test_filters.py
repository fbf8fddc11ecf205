"""jobs.cancel and jobs.retry with a filter (SPEC §4): every matching job in scope, in one
transaction, against a real daemon."""

from __future__ import annotations

from typing import Any

import pytest

from conftest import Daemon, error_of, result_of, wait_for, wait_terminal

CONFIG = """
[execution]
workers = 1
max_running_per_user = 1
max_queued_per_user = 3
cancel_grace = "1s"
shutdown_grace = "5s"
"""


@pytest.fixture
def jd(make_daemon: Any) -> Daemon:
    return make_daemon(CONFIG)


def noop(d: Daemon, user: str, seconds: float = 30) -> dict[str, Any]:
    return result_of(d, "jobs.submit", type="noop", options={"seconds": seconds}, as_user=user)


def failing(d: Daemon, user: str) -> dict[str, Any]:
    job = result_of(d, "jobs.submit", type="command", options={"argv": ["false"]}, as_user=user)
    assert wait_terminal(d, job["id"])["status"] == "failed"
    return job


def status(d: Daemon, job_id: str) -> str:
    return result_of(d, "jobs.get", job_id=job_id)["status"]


def test_a_filtered_cancel_stops_every_active_job_it_matches_and_no_other(jd: Daemon) -> None:
    running = noop(jd, "alice")
    wait_for(lambda: status(jd, running["id"]) == "running", what="the first job to run")
    queued = [noop(jd, "alice") for _ in range(2)]
    other = noop(jd, "bob")
    ids = [running["id"], *(j["id"] for j in queued)]

    dry = result_of(jd, "jobs.cancel", filter={"user_id": "alice"}, dry_run=True)
    assert (sorted(dry["jobs"]), dry["count"], dry["more"], dry["dry_run"]) == (
        sorted(ids), 3, False, True)
    assert [status(jd, i) for i in ids] == ["running", "queued", "queued"]

    done = result_of(jd, "jobs.cancel", filter={"user_id": "alice"})
    assert (sorted(done["jobs"]), done["count"], done["dry_run"]) == (sorted(ids), 3, False)
    assert [status(jd, j["id"]) for j in queued] == ["cancelled", "cancelled"]
    assert wait_terminal(jd, running["id"])["status"] == "cancelled"
    assert status(jd, other["id"]) in ("queued", "running")
    # nothing of alice's is active any more: a second call matches nothing
    assert result_of(jd, "jobs.cancel", filter={"user_id": "alice"})["count"] == 0
    cancelled_by = [e["actor"] for e in result_of(jd, "jobs.events", job_id=queued[0]["id"])
                    if e["status"] == "cancelled"]
    assert cancelled_by == ["admin:root"]


def test_a_filter_takes_status_type_project_and_time(jd: Daemon) -> None:
    blocker = noop(jd, "carol")
    wait_for(lambda: status(jd, blocker["id"]) == "running", what="the blocker to run")
    first = noop(jd, "carol")
    later = noop(jd, "carol")
    cut = later["created_at"]
    answer = result_of(jd, "jobs.cancel", filter={"status": "queued", "type": "noop",
                                                  "user_id": "carol", "created_before": cut})
    assert answer["jobs"] == [first["id"]]
    assert status(jd, later["id"]) == "queued" and status(jd, blocker["id"]) == "running"
    result_of(jd, "jobs.cancel", filter={"user_id": "carol"})


def test_a_filtered_retry_queues_failed_jobs_again_within_the_user_limit(jd: Daemon) -> None:
    failed = [failing(jd, "dave") for _ in range(4)]
    # four back to queued would pass max_queued_per_user (3): none goes
    err = error_of(jd, "jobs.retry", filter={"user_id": "dave", "status": "failed"})
    assert err["code"] == -32029 and "max_queued_per_user" in err["message"]
    assert [status(jd, j["id"]) for j in failed] == ["failed"] * 4

    three = result_of(jd, "jobs.retry", filter={"user_id": "dave",
                                                "created_before": failed[3]["created_at"]})
    assert sorted(three["jobs"]) == sorted(j["id"] for j in failed[:3])
    for job in failed[:3]:
        assert wait_terminal(jd, job["id"])["attempts"] == 2
    assert status(jd, failed[3]["id"]) == "failed"


@pytest.mark.parametrize("params, field", [
    ({"job_id": "0000000000000000", "filter": {}}, "filter"),
    ({}, "job_id"),
    ({"filter": {"owner": "x"}}, "filter.owner"),
    ({"filter": {"status": "done"}}, "filter.status"),
    ({"filter": {"created_after": "yesterday"}}, "filter.created_after"),
    ({"filter": ["queued"]}, "filter"),
    ({"filter": {}, "dry_run": "yes"}, "dry_run"),
])
@pytest.mark.parametrize("method", ["jobs.cancel", "jobs.retry"])
def test_exactly_one_of_job_id_and_filter_and_a_checked_filter(
        jd: Daemon, method: str, params: dict[str, Any], field: str) -> None:
    err = error_of(jd, method, **params)
    assert (err["code"], err["data"].get("field")) == (-32602, field), err


@pytest.mark.parametrize("method", ["jobs.cancel", "jobs.retry"])
def test_a_filter_is_for_admins_and_stays_in_scope(jd: Daemon, method: str) -> None:
    job = noop(jd, "erin")
    if method == "jobs.retry":
        result_of(jd, "jobs.cancel", job_id=job["id"], wait=True)
    # an admin with a plain user's rights
    err = error_of(jd, method, filter={}, as_user="erin", as_role="user")
    assert err["code"] == -32003 and "admins" in err["message"]
    # an admin acting for one user reaches that user's jobs only
    err = error_of(jd, method, filter={"user_id": "frank"}, as_user="erin")
    assert err["code"] == -32003
    assert result_of(jd, method, filter={"user_id": "erin"}, as_user="erin",
                     dry_run=True)["jobs"] == [job["id"]]
    result_of(jd, "jobs.cancel", filter={})


def test_the_single_form_is_unchanged(jd: Daemon) -> None:
    job = noop(jd, "gina", seconds=0)
    done = wait_terminal(jd, job["id"])
    assert done["status"] == "completed"
    assert error_of(jd, "jobs.cancel", job_id=job["id"])["code"] == -32009
    assert error_of(jd, "jobs.retry", job_id=job["id"])["code"] == -32009
    err = error_of(jd, "jobs.cancel", job_id=job["id"], dry_run=True)
    assert err["data"]["field"] == "dry_run"
