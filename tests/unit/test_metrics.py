"""The metrics' text (SPEC §10), read back by Prometheus' own parser (prometheus_client,
a test dependency only): every family typed, counters and histograms as counted, label
values only from their closed sets."""

from __future__ import annotations

import threading
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from jobd.metrics import JOB_BUCKETS, RPC_BUCKETS, Metrics

GAUGES = {"jobd_jobs": {"queued": 2, "completed": 5}, "jobd_running": 1, "jobd_queued": 2,
          "jobd_workers": 4, "jobd_paused": False, "jobd_maintenance": True,
          "jobd_db_bytes": 123456}


def parsed(text: str) -> dict[str, Any]:
    """Family name -> (type, {(sample name, labels as sorted tuple): value})."""
    out = {}
    for family in text_string_to_metric_families(text):
        out[family.name] = (family.type, {
            (s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples})
    return out


def metrics(types: frozenset[str] = frozenset({"sync", "noop"})) -> Metrics:
    return Metrics(lambda: types, [-32602, -32003])


def test_the_text_parses_and_holds_what_was_counted() -> None:
    m = metrics()
    m.rpc("ping", 0, 0.0002)
    m.rpc("ping", 0, 0.003)
    m.rpc("jobs.submit", -32602, 0.0004)
    m.submitted("sync")
    m.submitted("sync")
    m.started("sync", 0.05)
    m.finished("sync", "completed", 2.5)
    m.finished("noop", "cancelled", None)  # never ran: no run time
    got = parsed(m.text(GAUGES))

    kind, samples = got["jobd_jobs"]
    assert kind == "gauge" and samples == {("jobd_jobs", (("status", "completed"),)): 5,
                                           ("jobd_jobs", (("status", "queued"),)): 2}
    assert got["jobd_paused"][1] == {("jobd_paused", ()): 0}
    assert got["jobd_maintenance"][1] == {("jobd_maintenance", ()): 1}
    assert got["jobd_jobs_submitted"] == ("counter", {
        ("jobd_jobs_submitted_total", (("type", "sync"),)): 2})
    assert got["jobd_jobs_finished"][1] == {
        ("jobd_jobs_finished_total", (("status", "completed"), ("type", "sync"))): 1,
        ("jobd_jobs_finished_total", (("status", "cancelled"), ("type", "noop"))): 1}
    assert got["jobd_rpc_requests"][1] == {
        ("jobd_rpc_requests_total", (("code", "0"), ("method", "ping"))): 2,
        ("jobd_rpc_requests_total", (("code", "-32602"), ("method", "jobs.submit"))): 1}

    kind, rpc = got["jobd_rpc_seconds"]
    assert kind == "histogram"
    ping = {dict(labels)["le"]: v for (name, labels), v in rpc.items()
            if name == "jobd_rpc_seconds_bucket" and dict(labels)["method"] == "ping"}
    assert len(ping) == len(RPC_BUCKETS) + 1
    assert (ping["0.0001"], ping["0.00025"], ping["0.0025"], ping["0.005"], ping["+Inf"]) == (
        0, 1, 1, 2, 2)  # cumulative, as the format says
    assert rpc[("jobd_rpc_seconds_count", (("method", "ping"),))] == 2
    assert abs(rpc[("jobd_rpc_seconds_sum", (("method", "ping"),))] - 0.0032) < 1e-9

    run = got["jobd_job_run_seconds"][1]
    assert run[("jobd_job_run_seconds_count", (("type", "sync"),))] == 1
    assert ("jobd_job_run_seconds_count", (("type", "noop"),)) not in run
    assert len([k for k in run if k[0].endswith("_bucket")]) == len(JOB_BUCKETS) + 1
    assert got["jobd_job_queue_wait_seconds"][1][
        ("jobd_job_queue_wait_seconds_sum", (("type", "sync"),))] == 0.05


def test_label_values_come_only_from_closed_sets() -> None:
    """Types and codes are checked here (the method, by the RPC layer: test_metrics_rpc)."""
    types = {"sync"}
    m = Metrics(lambda: types, [-32602])
    m.rpc("ping", 12345, 0.001)  # a code outside SPEC §4's table is counted as internal
    m.submitted('a"type\nwith{braces}')
    types.add("golden")  # a reload registered a type: it is counted by its name from now
    m.submitted("golden")
    got = parsed(m.text({}))
    assert set(got["jobd_rpc_requests"][1]) == {
        ("jobd_rpc_requests_total", (("code", "-32603"), ("method", "ping")))}
    assert set(got["jobd_jobs_submitted"][1]) == {
        ("jobd_jobs_submitted_total", (("type", "other"),)),
        ("jobd_jobs_submitted_total", (("type", "golden"),))}


def test_records_from_many_threads_are_all_counted() -> None:
    m = metrics()

    def work() -> None:
        for _ in range(2000):
            m.rpc("ping", 0, 0.0001)
            m.finished("sync", "completed", 1.0)
    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = parsed(m.text({}))
    assert got["jobd_rpc_requests"][1][
        ("jobd_rpc_requests_total", (("code", "0"), ("method", "ping")))] == 16000
    assert got["jobd_job_run_seconds"][1][
        ("jobd_job_run_seconds_count", (("type", "sync"),))] == 16000


def test_the_store_s_write_transactions_are_a_histogram_of_their_times(tmp_path: Any) -> None:
    """``jobd_store_write_seconds``: each write transaction of the real store, timed from
    its begin to its commit, so that a transaction past SPEC §9's 50 ms shows as one."""
    import time

    from jobd.metrics import WRITE_BUCKETS
    from jobd.store.sqlite import SqliteStore

    store = SqliteStore(tmp_path / "jobd.db").open()
    try:
        for _ in range(3):
            store.write(lambda tx: None)
        store.write(lambda tx: time.sleep(0.06))  # one write holds its transaction 60 ms
        got = parsed(metrics().text(GAUGES, store.write_times()))
    finally:
        store.close()
    kind, samples = got["jobd_store_write_seconds"]
    buckets = {dict(labels)["le"]: v for (name, labels), v in samples.items()
               if name.endswith("_bucket")}
    assert kind == "histogram" and len(buckets) == len(WRITE_BUCKETS) + 1
    # cumulative: the slow one is past 50 ms and within 100 ms (its commit is fast)
    assert (buckets["0.05"], buckets["0.1"], buckets["+Inf"]) == (3, 4, 4), buckets
    assert samples[("jobd_store_write_seconds_count", ())] == 4
    assert 0.06 <= samples[("jobd_store_write_seconds_sum", ())] < 0.1 + 0.05
    assert "jobd_store_write_seconds" not in parsed(metrics().text(GAUGES))  # no store
