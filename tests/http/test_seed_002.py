"""Seed 002's manual test procedures (12.1.1–12.1.4), automated: a sync submitted over
HTTP to a real ``jobd-http`` with a bearer JWT, then followed with ``GET
/api/jobs/{job_id}`` in a loop as the seed's ``while true; curl …; sleep 5`` does (at a
test's pace), against a real jobd syncing a real git repository with a CIDX-like
two-pass indexer."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from served import Gateway, WEB_CONFIG, WEB_ENV

import httpx  # noqa: E402  (after served: skips without the http extra)
import jwt  # noqa: E402

from conftest import Daemon, clone, commit_files, git, make_upstream  # noqa: E402

SECRET = b"seed-002 secret, long enough for HS256 (32+ bytes)"
PHASES = ["init", "git_sync", "indexing", "finalizing"]
#: the seed polls every 5 s; a test's sync takes about a second
POLL_S = 0.02


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[tuple[Daemon, str]]:
    d = Daemon(tmp_path / "jobd", WEB_CONFIG, WEB_ENV).start()
    (tmp_path / "secret").write_bytes(SECRET)
    (tmp_path / "jobd.toml").write_text(f'[http]\njwt_secret_file = "{tmp_path / "secret"}"\n')
    try:
        with Gateway(tmp_path, "--config", str(tmp_path / "jobd.toml"),
                     "--socket", str(d.socket)) as g:
            yield d, g.url
    finally:
        assert d.stop() == 0


def token(user: str) -> dict[str, str]:
    claims = {"username": user, "exp": int(time.time()) + 600}
    return {"Authorization": f"Bearer {jwt.encode(claims, SECRET, algorithm='HS256')}"}


def test_seed_002_a_sync_submitted_over_http_is_tracked_to_its_completion(
        gateway: tuple[Daemon, str], tmp_path: Path) -> None:
    d, url = gateway
    # a repository with changes to synchronise (the seed's test environment set-up)
    upstream = make_upstream(tmp_path / "upstream",
                             {f"src/m{k}.py": f"print({k})\n" for k in range(8)})
    repo = clone(upstream, d.repos / "alice" / "myproject")
    old = git("rev-parse", "HEAD", cwd=repo)
    new = commit_files(upstream, {"src/new.py": "print('new')\n", "src/m0.py": "print(0.5)\n",
                                  "src/m1.py": None}, "upstream work")
    headers = token("alice")

    with httpx.Client(base_url=url, headers=headers, timeout=30) as web:
        # 12.1.1: the job is submitted and a tracking id returned at once
        submitted = web.post("/api/sync", json={"projectId": "myproject"})
        assert submitted.status_code == 202, submitted.text
        job_id = submitted.json()["jobId"]
        assert submitted.headers["Location"] == f"/api/jobs/{job_id}"

        # 12.1.2 and 12.1.3: the status, polled in a loop while the job runs
        seen: list[dict[str, Any]] = []
        deadline = time.monotonic() + 30
        while True:
            response = web.get(f"/api/jobs/{job_id}")
            assert response.status_code == 200, response.text
            job = response.json()
            seen.append(job)
            if job["status"] in ("completed", "failed", "cancelled"):
                break
            assert time.monotonic() < deadline, f"still {job['status']} after 30 s: {job}"
            time.sleep(POLL_S)

        # 12.1.4: the completed job's information
        final = web.get(f"/api/jobs/{job_id}").json()
        listed = web.get("/api/jobs", params={"projectId": "myproject"}).json()["jobs"]

    statuses = [j["status"] for j in seen]
    assert statuses[-1] == "completed", seen[-1]
    assert "running" in statuses, "the loop never saw the job running"
    order = {"queued": 0, "running": 1, "completed": 2}
    assert [order[s] for s in statuses] == sorted(order[s] for s in statuses), statuses
    phases = [j["phase"] for j in seen if j["phase"]]
    polled = [p for k, p in enumerate(phases) if k == 0 or phases[k - 1] != p]
    assert polled == [p for p in PHASES if p in polled], f"phases out of order: {polled}"
    assert {"git_sync", "indexing"} <= set(polled), polled
    progress = [j["progress_percentage"] for j in seen]
    assert progress == sorted(progress), f"progress went backwards: {progress}"
    assert len(set(progress)) >= 4 and progress[-1] == 100, progress
    assert all(j["progress_percentage"] == j["progress"] for j in seen)
    assert any(j["message"] for j in seen if j["status"] == "running")

    # completion: revisions, files processed and changes applied, timing, history kept
    result = final["result"]
    assert (result["old_revision"], result["new_revision"]) == (old, new)
    assert (result["files_added"], result["files_modified"], result["files_deleted"]) == (1, 1, 1)
    assert result["files_indexed"] == 8 and result["index"]["passes"] == 2  # 8 - 1 + 1
    assert set(result["seconds"]) == set(PHASES)
    assert final["started_at"] <= final["completed_at"] and final["error"] is None
    assert git("rev-parse", "HEAD", cwd=repo) == new, "the work tree was not synchronised"
    assert [j["id"] for j in listed] == [job_id]
