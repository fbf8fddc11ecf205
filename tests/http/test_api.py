"""The router of SPEC §10 against a real jobd: every endpoint and status code, a web
user's rights (as_role "user": no repo_path, no priority above 0, no admin endpoints),
camelCase and snake_case input, and the one error shape — FastAPI's own validation
errors included. The router is mounted as the CIDX server would mount it, served by a
real uvicorn; only the login dependency is overridden."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

import served
from served import Served, WEB_CONFIG, WEB_ENV, as_user, web_app
from served import daemon  # noqa: F401 - the fixture: a jobd for this module

import httpx  # noqa: E402  (after served: skips without the http extra)
from fastapi import FastAPI  # noqa: E402

import jobd.http  # noqa: E402

from conftest import Daemon, clone, make_upstream, wait_for  # noqa: E402

ALICE, BOB, ADMIN = as_user("alice"), as_user("bob"), as_user("ada", admin=True)
ERROR_KEYS = {"code", "message", "field", "jobId"}


@pytest.fixture(scope="module")
def web(daemon: Daemon) -> Iterator[httpx.Client]:
    with Served(web_app(daemon.socket)) as server, httpx.Client(base_url=server.url,
                                                               timeout=30) as client:
        yield client


@pytest.fixture
def project(daemon: Daemon, tmp_path: Path) -> Callable[[str, str], str]:
    """A real repository for ``user``'s ``project`` where jobd's template puts it."""
    def make(user: str, name: str) -> str:
        clone(make_upstream(tmp_path / f"upstream-{user}-{name}"), daemon.repos / user / name)
        return name
    return make


def error(response: httpx.Response, status: int, code: int) -> dict[str, Any]:
    """The error of a response that must have failed with ``status``: the one shape."""
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) <= ERROR_KEYS, body
    assert body["error"]["code"] == code and body["error"]["message"], body
    return body["error"]


def steps(web: httpx.Client, who: dict[str, str], **body: Any) -> dict[str, Any]:
    """A ``steps`` job (about a second of rising progress) submitted over HTTP."""
    response = web.post("/api/jobs", json={"type": "steps", **body}, headers=who)
    assert response.status_code == 202, response.text
    return response.json()


def ended(web: httpx.Client, job_id: str, who: dict[str, str]) -> dict[str, Any]:
    def done() -> Any:
        job = web.get(f"/api/jobs/{job_id}", headers=who).json()
        return job if job["status"] in ("completed", "failed", "cancelled") else None
    return wait_for(done, timeout=20, interval=0.05, what=f"job {job_id} to end")


def test_post_sync_is_202_with_location_and_an_idempotency_key_returns_the_same_job(
        web: httpx.Client, project: Callable[[str, str], str]) -> None:
    name = project("alice", "seed")
    body = {"projectId": name, "options": {"fullReindex": True}}
    first = web.post("/api/sync", json=body, headers={**ALICE, "Idempotency-Key": "k-1"})

    assert first.status_code == 202, first.text
    answer = first.json()
    assert set(answer) == {"jobId", "status", "deduplicated"}
    assert answer["status"] == "queued" and answer["deduplicated"] is False
    assert first.headers["Location"] == f"/api/jobs/{answer['jobId']}"
    job = web.get(first.headers["Location"], headers=ALICE).json()
    assert job["type"] == "sync" and job["user_id"] == "alice"
    assert job["options"]["full_reindex"] is True
    again = web.post("/api/sync", json=body, headers={**ALICE, "Idempotency-Key": "k-1"})
    assert again.status_code == 202 and again.json()["jobId"] == answer["jobId"]
    assert ended(web, answer["jobId"], ALICE)["status"] == "completed"


def test_snake_case_input_is_read_as_camel_case_is(
        web: httpx.Client, project: Callable[[str, str], str]) -> None:
    name = project("alice", "snake")
    answer = web.post("/api/sync", json={"project_id": name, "options": {"full_reindex": True}},
                      headers=ALICE)
    assert answer.status_code == 202, answer.text
    job = web.get(f"/api/jobs/{answer.json()['jobId']}", headers=ALICE).json()
    assert job["project_id"] == name and job["options"]["full_reindex"] is True
    listed = {j["id"] for j in web.get("/api/jobs", params={"project_id": name},
                                       headers=ALICE).json()["jobs"]}
    assert listed == {j["id"] for j in web.get("/api/jobs", params={"projectId": name},
                                               headers=ALICE).json()["jobs"]} == {job["id"]}
    both = web.post("/api/sync", json={"projectId": name, "project_id": name}, headers=ALICE)
    assert error(both, 422, -32602)["field"] == "project_id"
    ended(web, job["id"], ALICE)


def test_status_is_camel_case_and_the_job_has_progress_percentage(
        web: httpx.Client) -> None:
    job = steps(web, ALICE, description="status")
    status = web.get(f"/api/jobs/{job['id']}/status", headers=ALICE)

    assert status.status_code == 200
    assert set(status.json()) == {"jobId", "status", "progress", "phase", "message", "error",
                                  "queuePosition", "waitReason", "etaS", "startedAt",
                                  "completedAt"}
    assert status.json()["jobId"] == job["id"]
    done = ended(web, job["id"], ALICE)
    assert done["status"] == "completed" and done["progress_percentage"] == done["progress"]
    assert done["result"] == {"steps": 5} and done["description"] == "status"
    final = web.get(f"/api/jobs/{job['id']}/status", headers=ALICE).json()
    assert final["status"] == "completed" and final["completedAt"] == done["completed_at"]


def test_a_web_user_cannot_name_a_repository_path_or_raise_priority(
        web: httpx.Client, daemon: Daemon, project: Callable[[str, str], str]) -> None:
    name = project("alice", "paths")
    for options in ({"repoPath": str(daemon.repos / "alice" / name)},
                    {"repo_path": str(daemon.repos / "bob")}):
        refused = web.post("/api/jobs", json={"type": "sync", "projectId": name,
                                              "options": options}, headers=ALICE)
        assert error(refused, 422, -32602)["field"] == "options.repo_path"
        refused = web.post("/api/sync", json={"projectId": name, "options": options},
                           headers=ALICE)
        assert error(refused, 422, -32602)["field"] == "options.repo_path"

    assert steps(web, ALICE, priority=50)["priority"] == 0
    assert steps(web, ALICE, priority=-5)["priority"] == -5
    assert steps(web, ADMIN, priority=50)["priority"] == 50
    # only what jobd opens to plain users: command and noop are admin types
    refused = web.post("/api/jobs", json={"type": "noop", "options": {"seconds": 0}},
                       headers=ALICE)
    error(refused, 403, -32003)


def test_someone_elses_job_is_403_an_unknown_one_404_and_no_login_401(
        web: httpx.Client) -> None:
    job = steps(web, ALICE)
    for path in ("", "/status", "/events", "/logs"):
        error(web.get(f"/api/jobs/{job['id']}{path}", headers=BOB), 403, -32003)
        error(web.get(f"/api/jobs/{job['id']}{path}"), 401, -32001)
    error(web.delete(f"/api/jobs/{job['id']}", headers=BOB), 403, -32003)
    error(web.post(f"/api/jobs/{job['id']}/retry", headers=BOB), 403, -32003)
    unknown = "00000000-0000-4000-8000-000000000000"
    error(web.get(f"/api/jobs/{unknown}", headers=ALICE), 404, -32004)
    assert web.get(f"/api/jobs/{job['id']}", headers=ADMIN).status_code == 200
    unauthenticated = web.post("/api/sync", json={"projectId": "x"})
    error(unauthenticated, 401, -32001)
    assert unauthenticated.headers["WWW-Authenticate"] == "Bearer"
    ended(web, job["id"], ALICE)


def test_cancel_is_200_waits_when_asked_409_once_completed_and_retry_is_200(
        web: httpx.Client) -> None:
    running = steps(web, ALICE)
    wait_for(lambda: web.get(f"/api/jobs/{running['id']}", headers=ALICE).json()["status"]
             == "running", timeout=10, what="the job to start")
    cancelled = web.delete(f"/api/jobs/{running['id']}", params={"wait": "true"},
                           headers=ALICE)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    again = web.delete(f"/api/jobs/{running['id']}", headers=ALICE)
    assert again.status_code == 200 and again.json()["status"] == "cancelled"

    retried = web.post(f"/api/jobs/{running['id']}/retry", headers=ALICE)
    assert retried.status_code == 200 and retried.json()["status"] == "queued"
    assert ended(web, running["id"], ALICE)["status"] == "completed"
    conflict = error(web.delete(f"/api/jobs/{running['id']}", headers=ALICE), 409, -32009)
    assert "completed" in conflict["message"]
    error(web.post(f"/api/jobs/{running['id']}/retry", headers=ALICE), 409, -32009)


def test_a_retry_of_work_already_queued_is_409_naming_that_job(
        web: httpx.Client, project: Callable[[str, str], str]) -> None:
    name = project("alice", "twice")
    web.post("/api/admin/pause", headers=ADMIN)
    try:
        first = web.post("/api/sync", json={"projectId": name}, headers=ALICE).json()["jobId"]
        web.delete(f"/api/jobs/{first}", headers=ALICE)
        second = web.post("/api/sync", json={"projectId": name}, headers=ALICE).json()
        assert second["deduplicated"] is False
        refused = error(web.post(f"/api/jobs/{first}/retry", headers=ALICE), 409, -32009)
        assert refused["jobId"] == second["jobId"]
    finally:
        web.post("/api/admin/resume", headers=ADMIN)
    ended(web, second["jobId"], ALICE)


def test_list_filters_pages_and_user_id_is_for_admins(web: httpx.Client) -> None:
    mine = [steps(web, as_user("carol"), description=f"list {k}")["id"] for k in range(3)]
    page = web.get("/api/jobs", params={"type": "steps", "limit": 2, "withTotal": "true"},
                   headers=as_user("carol"))
    assert page.status_code == 200, page.text
    body = page.json()
    assert len(body["jobs"]) == 2 and body["total"] == 3 and body["next_cursor"]
    rest = web.get("/api/jobs", params={"type": "steps", "limit": 2,
                                        "cursor": body["next_cursor"]},
                   headers=as_user("carol")).json()
    assert {j["id"] for j in body["jobs"] + rest["jobs"]} == set(mine)
    prefix = web.get("/api/jobs", params={"idPrefix": mine[0][:8]},
                     headers=as_user("carol")).json()
    assert [j["id"] for j in prefix["jobs"]] == [mine[0]]
    several = web.get("/api/jobs?status=queued&status=running&status=completed&type=steps",
                      headers=as_user("carol")).json()
    assert {j["id"] for j in several["jobs"]} == set(mine)

    error(web.get("/api/jobs", params={"userId": "carol"}, headers=BOB), 403, -32003)
    theirs = web.get("/api/jobs", params={"userId": "carol", "type": "steps"}, headers=ADMIN)
    assert {j["id"] for j in theirs.json()["jobs"]} == set(mine)
    assert error(web.get("/api/jobs", params={"limit": "many"}, headers=BOB),
                 422, -32602)["field"] == "limit"
    assert error(web.get("/api/jobs", params={"limit": 5000}, headers=BOB),
                 422, -32602)["field"] == "limit"
    assert error(web.get("/api/jobs", params={"colour": "red"}, headers=BOB),
                 422, -32602)["field"] == "colour"
    for job_id in mine:
        ended(web, job_id, as_user("carol"))


def test_events_and_logs_tell_the_jobs_story(web: httpx.Client) -> None:
    job = steps(web, ALICE)
    ended(web, job["id"], ALICE)
    history = web.get(f"/api/jobs/{job['id']}/events", headers=ALICE)
    assert history.status_code == 200
    assert [e["status"] for e in history.json()][:3] == ["created", "queued", "running"]
    assert history.json()[-1]["status"] == "completed"
    log = web.get(f"/api/jobs/{job['id']}/logs", headers=ALICE).json()
    assert "attempt 1 started" in log["data"] and log["eof"] is True
    part = web.get(f"/api/jobs/{job['id']}/logs", params={"offset": 5, "limit": 10},
                   headers=ALICE).json()
    assert part["data"] == log["data"][5:15] and part["next_offset"] == 15
    refused = error(web.get(f"/api/jobs/{job['id']}/logs", params={"limit": -1}, headers=ALICE),
                    422, -32602)
    # named as the query names it, its bound in full
    assert refused["field"] == "limit" and "limit_bytes" not in refused["message"], refused
    assert refused["message"].startswith("limit must be an integer from 1 to 1048576"), refused
    twice = error(web.post("/api/sync", json={"projectId": "p", "options": {
        "fullReindex": True, "full_reindex": True}}, headers=ALICE), 422, -32602)
    assert twice["field"] == "options.full_reindex", twice


def test_admin_endpoints_are_403_for_users_and_answer_admins(web: httpx.Client) -> None:
    calls = [("GET", "/api/admin/jobs/stats", None), ("POST", "/api/admin/pause", None),
             ("POST", "/api/admin/resume", None), ("GET", "/api/admin/maintenance", None),
             ("POST", "/api/admin/maintenance", {"enabled": False})]
    for method, path, body in calls:
        refused = error(web.request(method, path, json=body, headers=ALICE), 403, -32003)
        assert "for admins" in refused["message"]

    since = time.strftime("%Y-%m-%dT%H:00:00Z", time.gmtime(time.time() - 2 * 86400))
    stats = web.get("/api/admin/jobs/stats", params={"since": since}, headers=ADMIN)
    assert stats.status_code == 200 and "by_type" in stats.json()
    assert web.post("/api/admin/pause", headers=ADMIN).json() == {"paused": True}
    try:
        queued = steps(web, ALICE)
        status = web.get(f"/api/jobs/{queued['id']}/status", headers=ALICE).json()
        assert status["waitReason"] == "paused" and status["queuePosition"] == 1
    finally:
        assert web.post("/api/admin/resume", headers=ADMIN).json() == {"paused": False}
    on = web.post("/api/admin/maintenance", json={"enabled": True, "reason": "upgrade"},
                  headers=ADMIN)
    try:
        assert on.status_code == 200 and on.json()["maintenance"] is True
        refused = web.post("/api/jobs", json={"type": "steps"}, headers=ALICE)
        assert "upgrade" in error(refused, 503, -32050)["message"]
        report = web.get("/api/admin/maintenance", headers=ADMIN).json()
        assert report["maintenance"] is True and report["reason"] == "upgrade"
    finally:
        off = web.post("/api/admin/maintenance", json={"enabled": False}, headers=ADMIN)
        assert off.json()["maintenance"] is False
    ended(web, queued["id"], ALICE)


def test_too_many_queued_jobs_is_429(web: httpx.Client) -> None:
    web.post("/api/admin/pause", headers=ADMIN)
    dave = as_user("dave")
    try:
        queued = [steps(web, dave)["id"] for _ in range(3)]  # max_queued_per_user = 3
        error(web.post("/api/jobs", json={"type": "steps"}, headers=dave), 429, -32029)
    finally:
        web.post("/api/admin/resume", headers=ADMIN)
    for job_id in queued:
        web.delete(f"/api/jobs/{job_id}", headers=dave)


@pytest.mark.parametrize("body, field", [
    (b"{\"projectId\": ", "body"),             # not JSON: FastAPI's own error
    (b"[\"projectId\"]", "body"),              # not an object: FastAPI's own error
    (b"{}", "project_id"),                      # missing
    (b"{\"projectId\": \"p\", \"branch\": \"x\"}", "branch"),  # unknown key
    (b"{\"projectId\": 7}", "project_id"),       # wrong type
    (b"{\"projectId\": \"p\", \"options\": []}", "options"),
    (b"{\"projectId\": [\"p\"]}", "project_id"),
    (b"[" * 100_000, "body"),                  # nested past Python's recursion limit
    (b"{\"projectId\": " + b"1" * 5000 + b"}", "body"),  # past Python's 4,300 digits
], ids=["not-json", "array", "missing", "unknown", "wrong-type", "options-array",
        "list-for-text", "deep", "huge-int"])
def test_invalid_input_is_422_in_the_one_error_shape(web: httpx.Client, body: bytes,
                                                     field: str) -> None:
    response = web.post("/api/sync", content=body,
                        headers={**ALICE, "Content-Type": "application/json"})
    assert error(response, 422, -32602)["field"] == field


@pytest.mark.parametrize("path, body, field", [
    ("/api/admin/maintenance", {"enabled": "yes"}, "enabled"),
    ("/api/admin/maintenance", {"enabled": 1}, "enabled"),
    ("/api/jobs", {"type": "steps", "priority": "7"}, "priority"),
    ("/api/jobs", {"type": "steps", "priority": True}, "priority"),
], ids=["yes-for-true", "one-for-true", "text-priority", "bool-priority"])
def test_a_body_value_jobd_would_refuse_is_422_and_changes_nothing(
        web: httpx.Client, path: str, body: dict[str, Any], field: str) -> None:
    """A body's values are taken as jobd takes them, not converted: ``"yes"`` switching
    maintenance on would be a typo changing the daemon's state."""
    assert error(web.post(path, json=body, headers=ADMIN), 422, -32602)["field"] == field
    assert web.get("/api/admin/maintenance", headers=ADMIN).json()["maintenance"] is False


def test_a_body_is_json_only_by_its_content_type(web: httpx.Client) -> None:
    """A form a cross-site page may post (text/plain, no preflight) is not read as JSON."""
    for kind in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {**ALICE, **({"Content-Type": kind} if kind else {})}
        refused = web.post("/api/jobs", content=b'{"type": "steps"}', headers=headers)
        assert error(refused, 422, -32602)["field"] == "body", kind
    for kind in ("application/json; charset=utf-8", "application/merge-patch+json"):
        taken = web.post("/api/jobs", content=b'{"type": "steps"}',
                         headers={**ALICE, "Content-Type": kind})
        assert taken.status_code == 202, (kind, taken.text)
        ended(web, taken.json()["id"], ALICE)


def test_no_token_is_401_whatever_the_body(web: httpx.Client) -> None:
    for path in ("/api/sync", "/api/jobs", "/api/admin/maintenance"):
        for body in (b"{bad", b"[]", b"\xff"):
            error(web.post(path, content=body, headers={"Content-Type": "application/json"}),
                  401, -32001)
    error(web.post("/api/sync", content=b"\xff", headers={**ALICE, "Content-Type":
                                                          "application/json"}), 422, -32602)


def test_a_body_past_the_limit_is_413_before_it_reaches_jobd(web: httpx.Client) -> None:
    big = {"type": "steps", "metadata": {"x": "y" * 300_000}}
    refused = error(web.post("/api/jobs", json=big, headers=ALICE), 413, -32600)
    assert "300" in refused["message"] and "bytes" in refused["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the body is counted as read
        yield json.dumps(big).encode()

    chunked = web.post("/api/jobs", content=chunks(),
                       headers={**ALICE, "Content-Type": "application/json"})
    error(chunked, 413, -32600)

    def small() -> Iterator[bytes]:  # counted as read, then the route reads what was kept
        yield json.dumps({"type": "steps"}).encode()

    taken = web.post("/api/jobs", content=small(),
                     headers={**ALICE, "Content-Type": "application/json"})
    assert taken.status_code == 202 and taken.json()["type"] == "steps", taken.text
    web.delete(f"/api/jobs/{taken.json()['id']}", headers=ALICE)
    # jobd itself still answers, and names what is too big below the HTTP limit
    near = {"type": "steps", "metadata": {"x": "y" * 100_000}}
    assert error(web.post("/api/jobs", json=near, headers=ALICE), 422, -32602)[
        "field"] == "metadata"


def test_a_chunked_body_is_read_no_further_than_the_limit() -> None:
    """Without a Content-Length, the gateway stops reading at the bound, whoever sends it
    (it once read a body of any size before counting it)."""
    from starlette.exceptions import HTTPException
    from starlette.requests import Request

    from jobd.http.api import MAX_BODY_BYTES, _bounded
    sent = 0

    async def receive() -> dict[str, Any]:  # a body of 6.4 MB, 64 KiB a message
        nonlocal sent
        sent += 1
        return {"type": "http.request", "body": b"x" * 65536, "more_body": sent < 100}

    request = Request({"type": "http", "method": "POST", "path": "/api/jobs",
                       "headers": []}, receive)
    with pytest.raises(HTTPException) as refused:
        asyncio.run(_bounded(request))
    assert refused.value.status_code == 413
    assert sent == MAX_BODY_BYTES // 65536 + 1


def test_jobd_stopped_is_503(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon(config=WEB_CONFIG, env=WEB_ENV)
    with Served(web_app(d.socket)) as server, httpx.Client(base_url=server.url) as web:
        job = steps(web, ALICE)
        assert d.stop() == 0
        for response in (web.get(f"/api/jobs/{job['id']}", headers=ALICE),
                         web.get(f"/api/jobs/{job['id']}/stream", headers=ALICE),
                         web.post("/api/jobs", json={"type": "steps"}, headers=ALICE)):
            refused = error(response, 503, -32050)
            assert "not reachable" in refused["message"]
            assert str(d.socket) not in refused["message"]


def test_streams_and_waiting_cancels_past_max_streams_are_503(daemon: Daemon) -> None:
    with Served(web_app(daemon.socket, max_streams=1, heartbeat_s=0.2)) as server, \
            httpx.Client(base_url=server.url, timeout=30) as web:
        # queued while dispatch is paused, so the held stream cannot end by itself
        web.post("/api/admin/pause", headers=ADMIN)
        try:
            job = steps(web, ALICE)
            with web.stream("GET", f"/api/jobs/{job['id']}/stream", headers=ALICE) as held:
                assert held.status_code == 200
                with web.stream("GET", f"/api/jobs/{job['id']}/stream",
                                headers=ALICE) as second:
                    # a stream that was let through would never end: only its status is read
                    assert second.status_code == 503, "a second stream was let through"
                    second.read()
                    error(second, 503, -32050)
                error(web.delete(f"/api/jobs/{job['id']}", params={"wait": "true"},
                                 headers=ALICE), 503, -32050)
                # short calls have their own pool, whatever the streams hold
                assert web.get(f"/api/jobs/{job['id']}", headers=ALICE).status_code == 200
            # the stream's connection is given back when its client goes away
            deadline = time.monotonic() + 10
            while True:
                response = web.delete(f"/api/jobs/{job['id']}", params={"wait": "true"},
                                      headers=ALICE)
                if response.status_code != 503 or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert response.status_code == 200 and response.json()["status"] == "cancelled"
        finally:
            web.post("/api/admin/resume", headers=ADMIN)


def test_mounted_under_a_prefix_the_location_names_the_prefixed_path(
        daemon: Daemon, project: Callable[[str, str], str]) -> None:
    name = project("alice", "prefixed")
    app = FastAPI()

    @app.get("/cidx/repos/{job_id}")  # the host's own route of the same name and parameter
    def get_job(job_id: str) -> dict[str, str]:
        return {"repo": job_id}

    app.include_router(jobd.http.router(principal=served.cidx_login, socket=str(daemon.socket)),
                       prefix="/jobd")
    app.dependency_overrides[served.cidx_login] = served.header_login
    with Served(app) as server, httpx.Client(base_url=server.url) as web:
        submitted = web.post("/jobd/api/sync", json={"projectId": name}, headers=ALICE)
        assert submitted.status_code == 202, submitted.text
        location = submitted.headers["Location"]
        assert location == f"/jobd/api/jobs/{submitted.json()['jobId']}"
        assert web.get(location, headers=ALICE).json()["project_id"] == name


def test_the_router_keeps_the_host_apps_own_errors(daemon: Daemon) -> None:
    app = web_app(daemon.socket)

    @app.get("/cidx/own")
    def own(limit: int) -> dict[str, int]:
        return {"limit": limit}

    with Served(app) as server, httpx.Client(base_url=server.url) as web:
        response = web.get("/cidx/own", params={"limit": "x"})
        assert response.status_code == 422 and "detail" in response.json()
        assert served.header_login is app.dependency_overrides[served.cidx_login]
