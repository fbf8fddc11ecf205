"""``GET /api/jobs/{id}/stream`` (SPEC §10): server-sent events from the ``jobs.wait`` long
poll through a real uvicorn — rising progress, the job's end as the last event,
``Last-Event-ID`` resuming, heartbeat comments, proxy-friendly headers."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from served import Served, WEB_CONFIG, WEB_ENV, as_user, events, web_app
from served import daemon  # noqa: F401 - the fixture: a jobd for this module

import httpx  # noqa: E402  (after served: skips without the http extra)

from conftest import Daemon, clone, make_upstream  # noqa: E402

ALICE = as_user("alice")
#: short, so that a test sees heartbeats without waiting 15 s
HEARTBEAT_S = 0.1


@pytest.fixture(scope="module")
def web(daemon: Daemon) -> Iterator[httpx.Client]:
    with Served(web_app(daemon.socket, heartbeat_s=HEARTBEAT_S)) as server, \
            httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def stream(web: httpx.Client, job_id: str, **headers: str) -> list[dict[str, Any]]:
    """Every event and comment of a job's stream, read as it comes, to its end."""
    with web.stream("GET", f"/api/jobs/{job_id}/stream", headers={**ALICE, **headers}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache"
        assert r.headers["x-accel-buffering"] == "no"
        return list(events(r))


def jobs_of(seen: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e["data"] for e in seen if e.get("event") == "job"]


def test_a_sync_streams_rising_progress_and_ends_with_the_job(
        web: httpx.Client, daemon: Daemon, tmp_path: Path) -> None:
    files = {f"src/m{k}.py": f"print({k})\n" for k in range(10)}
    clone(make_upstream(tmp_path / "upstream", files), daemon.repos / "alice" / "live")
    job_id = web.post("/api/sync", json={"projectId": "live"}, headers=ALICE).json()["jobId"]

    seen = stream(web, job_id)

    jobs = jobs_of(seen)
    progress = [j["progress"] for j in jobs]
    assert progress == sorted(progress) and len(set(progress)) >= 5, progress
    assert [e["id"] for e in seen if "id" in e] == [str(j["version"]) for j in jobs]
    assert [j["version"] for j in jobs] == sorted({j["version"] for j in jobs})
    assert jobs[-1]["status"] == "completed" and jobs[-1]["progress"] == 100
    assert seen[-1].get("event") == "job", "the stream goes on after the job's end"
    phases = [j["phase"] for j in jobs if j["phase"]]
    assert {"git_sync", "indexing", "finalizing"} <= set(phases), phases


def test_last_event_id_resumes_after_that_version(web: httpx.Client) -> None:
    job = web.post("/api/jobs", json={"type": "steps"}, headers=ALICE).json()
    first = jobs_of(stream(web, job["id"]))
    middle = first[len(first) // 2]

    resumed = jobs_of(stream(web, job["id"], **{"Last-Event-ID": str(middle["version"])}))

    assert resumed and all(j["version"] > middle["version"] for j in resumed), resumed
    assert resumed[-1]["status"] == "completed"
    # resuming after the last event there is nothing more to send: the stream just ends
    assert jobs_of(stream(web, job["id"], **{"Last-Event-ID": str(first[-1]["version"])})) == []
    # an id this stream never sent starts it over: the job as it is, its end
    made_up = jobs_of(stream(web, job["id"], **{"Last-Event-ID": str(2**63 - 1)}))
    assert [j["version"] for j in made_up] == [first[-1]["version"]]
    bad = web.get(f"/api/jobs/{job['id']}/stream", headers={**ALICE, "Last-Event-ID": "x"})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "Last-Event-ID"


def test_a_job_that_does_not_change_gets_heartbeats(web: httpx.Client) -> None:
    admin = as_user("ada", admin=True)
    web.post("/api/admin/pause", headers=admin)
    try:
        job = web.post("/api/jobs", json={"type": "steps"}, headers=ALICE).json()
        with web.stream("GET", f"/api/jobs/{job['id']}/stream", headers=ALICE) as r:
            seen = []
            for item in events(r):
                seen.append(item)
                if sum(1 for e in seen if e.get("comment") == "heartbeat") >= 3:
                    break
        assert jobs_of(seen) and jobs_of(seen)[0]["status"] == "queued"
        assert len(jobs_of(seen)) == 1, "an unchanged job was sent again"
    finally:
        web.post("/api/admin/resume", headers=admin)
    web.delete(f"/api/jobs/{job['id']}", headers=ALICE)


def test_a_resumed_stream_of_an_unchanged_job_starts_at_once(daemon: Daemon) -> None:
    """Its headers and a first heartbeat go out now, not after a long poll of the
    heartbeat's length (a proxy, or the user, saw nothing for 15 s)."""
    admin = as_user("ada", admin=True)
    with Served(web_app(daemon.socket, heartbeat_s=5)) as server, \
            httpx.Client(base_url=server.url, timeout=30) as web:
        web.post("/api/admin/pause", headers=admin)
        try:
            job = web.post("/api/jobs", json={"type": "steps"}, headers=ALICE).json()
            started = time.monotonic()
            with web.stream("GET", f"/api/jobs/{job['id']}/stream",
                            headers={**ALICE, "Last-Event-ID": str(job["version"])}) as r:
                assert r.status_code == 200
                first = next(iter(events(r)))
                took = time.monotonic() - started
            assert first.get("comment") == "heartbeat" and took < 2, (first, took)
        finally:
            web.post("/api/admin/resume", headers=admin)
            web.delete(f"/api/jobs/{job['id']}", headers=ALICE)


def test_a_stream_of_an_unknown_or_foreign_job_is_an_error_not_a_stream(
        web: httpx.Client) -> None:
    job = web.post("/api/jobs", json={"type": "steps"}, headers=ALICE).json()
    foreign = web.get(f"/api/jobs/{job['id']}/stream", headers=as_user("bob"))
    assert foreign.status_code == 403 and foreign.json()["error"]["code"] == -32003
    unknown = web.get("/api/jobs/00000000-0000-4000-8000-000000000000/stream", headers=ALICE)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == -32004
    stream(web, job["id"])


def test_a_stream_whose_jobd_goes_away_ends_with_an_error_event(
        make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon(config=WEB_CONFIG, env=WEB_ENV)
    with Served(web_app(d.socket, heartbeat_s=HEARTBEAT_S)) as server, \
            httpx.Client(base_url=server.url, timeout=30) as web:
        job = web.post("/api/jobs", json={"type": "steps"}, headers=ALICE).json()
        with web.stream("GET", f"/api/jobs/{job['id']}/stream", headers=ALICE) as r:
            seen = []
            for item in events(r):
                seen.append(item)
                if len(seen) == 1:
                    d.kill()  # a crash: the long poll's connection breaks
        assert seen[0]["event"] == "job"
        last = seen[-1]
        assert last["event"] == "error" and last["data"]["error"]["code"] == -32050, seen
        assert str(d.socket) not in json.dumps(last)
