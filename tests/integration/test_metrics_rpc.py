"""admin.metrics through a real daemon (SPEC §10): what its clients and jobs did, read back
by Prometheus' own parser; method labels only from the RPC table; admins only."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from conftest import Daemon, error_of, result_of, wait_terminal


def samples(d: Daemon) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = result_of(d, "admin.metrics")["text"]
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_count_calls_and_jobs_as_they_happen(daemon: Daemon) -> None:
    d = daemon
    before = samples(d)  # the fixture's own calls (its start pings) came first
    result_of(d, "ping")
    for name in ("no.such.method", "x" * 500):
        assert error_of(d, name)["code"] == -32601
    assert error_of(d, "jobs.get", job_id="nope")["code"] == -32602
    ran = result_of(d, "jobs.submit", type="noop", options={"seconds": 0})
    assert wait_terminal(d, ran["id"])["status"] == "completed"
    failed = result_of(d, "jobs.submit", type="command", options={"argv": ["false"]})
    assert wait_terminal(d, failed["id"])["status"] == "failed"
    result_of(d, "admin.pause")
    try:
        waiting = result_of(d, "jobs.submit", type="noop", options={"seconds": 0})
        result_of(d, "jobs.cancel", job_id=waiting["id"])
        # a retried job cancelled while queued again never ran in its last attempt
        result_of(d, "jobs.retry", job_id=failed["id"])
        assert result_of(d, "jobs.get", job_id=failed["id"])["started_at"] is None
        result_of(d, "jobs.cancel", job_id=failed["id"])
    finally:
        result_of(d, "admin.resume")
    got = samples(d)

    def one(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        counted = name.endswith(("_total", "_count"))
        return got[key] - (before.get(key, 0) if counted else 0)

    assert one("jobd_rpc_requests_total", method="ping", code="0") == 1
    assert one("jobd_rpc_requests_total", method="other", code="-32601") == 2
    assert one("jobd_rpc_requests_total", method="jobs.get", code="-32602") == 1
    assert one("jobd_rpc_requests_total", method="jobs.submit", code="0") == 3
    assert not [k for k in got if ("method", "x" * 500) in k[1]]
    assert one("jobd_rpc_seconds_count", method="jobs.submit") == 3
    assert one("jobd_jobs_submitted_total", type="noop") == 2  # a retry is no submit
    assert one("jobd_jobs_submitted_total", type="command") == 1
    for type, status in (("noop", "completed"), ("noop", "cancelled"), ("command", "failed"),
                         ("command", "cancelled")):
        assert one("jobd_jobs_finished_total", type=type, status=status) == 1, (type, status)
    for type in ("noop", "command"):  # the cancels while queued never ran
        assert one("jobd_job_run_seconds_count", type=type) == 1
        assert one("jobd_job_queue_wait_seconds_count", type=type) == 1
    assert one("jobd_jobs", status="cancelled") == 2
    assert one("jobd_workers") >= 1 and one("jobd_paused") == 0
    assert one("jobd_db_bytes") > 0
    # every write transaction timed: the 3 submits, 2 ends, a retry, 2 cancels at least
    writes = one("jobd_store_write_seconds_count")
    assert writes >= 8 and got[("jobd_store_write_seconds_bucket", (("le", "+Inf"),))] == (
        got[("jobd_store_write_seconds_count", ())])


def test_metrics_are_for_admins(daemon: Daemon) -> None:
    err: dict[str, Any] = error_of(daemon, "admin.metrics", as_user="alice", as_role="user")
    assert err["code"] == -32003 and "admin.metrics" in err["message"]
