"""The worked example of docs/cidx.md: a CIDX-like web server on jobd, end to end.

A real jobd runs with ``examples/cidx_like/jobd.toml`` (its paths moved into a temp
folder, ``cidx index`` replaced by ``tests/fake_cidx_index.py``, which prints CIDX's exact
``--progress-json`` lines), and ``examples/cidx_like/server.py`` runs as a real service
account (``useradd`` + ``setpriv``) listed in ``[auth] services``. The tests speak HTTP to
it as CIDX's web users do and read CIDX's answers. The config quoted in docs/cidx.md is
the example's file, and every TOML block of the doc loads with jobd's own loader.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from conftest import (OTHER_UID_PYTHON, Daemon, LocalAccounts, commit_files, git,
                      make_upstream, wait_for)
from jobd import config

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "cidx_like"
DOC = ROOT / "docs" / "cidx.md"
FAKE_CIDX = ROOT / "tests" / "fake_cidx_index.py"
SERVICE = "jobdt_cidxsvc"
ALICE, BOB, ADMIN = "alice@example.com", "Bob Example", "admin@example.com"
FILES = 8


def example_config(data: Path) -> str:
    """The example's jobd.toml with its paths in ``data`` and stand-ins for CIDX's programs."""
    q = json.dumps
    text = (EXAMPLE / "jobd.toml").read_text()
    for old, new in [
            ("/srv/cidx/data", str(data)),
            ('"cidx", "index"', f"{q(sys.executable)}, {q(str(FAKE_CIDX))}"),
            ('"cidx-server-op"', f"{q(sys.executable)}, {q(str(EXAMPLE / 'cidx_server_op.py'))}"),
            ('services = ["cidx"]', f'services = ["{SERVICE}"]')]:
        assert old in text, old
        text = text.replace(old, new)
    # the service connects as another uid
    return '[server]\nsocket_mode = "0666"\n' + text


class Cidx:
    """The example server, run as the service account; HTTP calls as CIDX's web users."""

    def __init__(self, url: str) -> None:
        self.url = url

    def call(self, method: str, path: str, user: str | None, body: Any = None,
             admin: bool = False) -> tuple[int, Any]:
        headers = {"X-Cidx-User": user} if user else {}
        if admin:
            headers["X-Cidx-Admin"] = "1"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def ok(self, method: str, path: str, user: str, body: Any = None,
           admin: bool = False) -> Any:
        status, answer = self.call(method, path, user, body, admin)
        assert status in (200, 202), (status, answer)
        return answer

    def job(self, job_id: str, user: str, admin: bool = False) -> dict[str, Any]:
        return self.ok("GET", f"/api/jobs/{job_id}", user, admin=admin)

    def follow(self, job_id: str, user: str, admin: bool = False) -> list[dict[str, Any]]:
        """Every state the example's stream sends, to the job's end."""
        request = urllib.request.Request(f"{self.url}/api/jobs/{job_id}/stream",
                                         headers={"X-Cidx-User": user,
                                                  **({"X-Cidx-Admin": "1"} if admin else {})})
        with urllib.request.urlopen(request, timeout=60) as answer:
            return [json.loads(line) for line in answer]

    def done(self, job_id: str, user: str, admin: bool = False) -> dict[str, Any]:
        job = self.follow(job_id, user, admin)[-1]
        assert job["status"] in ("completed", "failed", "cancelled"), job
        return job


@pytest.fixture(scope="module")
def service_account(local_accounts: LocalAccounts) -> str:
    local_accounts.user(SERVICE)
    return SERVICE


@pytest.fixture(scope="module")
def readable_example(readable_jobd: dict[str, str]) -> Iterator[Path]:
    """The example's files where the service account may read them."""
    top = Path(tempfile.mkdtemp(prefix="jobd-cidx-example-"))
    try:
        top.chmod(0o755)
        shutil.copytree(EXAMPLE, top / "cidx_like",
                        ignore=shutil.ignore_patterns("__pycache__"))
        for path in top.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        yield top / "cidx_like"
    finally:
        shutil.rmtree(top, ignore_errors=True)


@pytest.fixture
def cidx(make_daemon: Callable[..., Daemon], tmp_path: Path, service_account: str,
         readable_example: Path, readable_jobd: dict[str, str]
         ) -> Iterator[tuple[Cidx, Daemon, Path]]:
    data = tmp_path / "data"
    (data / "golden-repos").mkdir(parents=True)
    (data / "activated-repos").mkdir()
    d = make_daemon(config=example_config(data), start=False,
                    env={"FAKE_CIDX_DELAY": "0.1"})
    d.socket.parent.chmod(0o755)
    d.start()
    proc = subprocess.Popen(
        ["setpriv", f"--reuid={service_account}", f"--regid={service_account}",
         "--init-groups", "--", OTHER_UID_PYTHON, str(readable_example / "server.py"),
         "--data-dir", str(data), "--socket", str(d.socket), "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=(tmp_path / "server.stderr").open("w"), text=True,
        cwd="/", env={"PATH": "/usr/bin:/bin", "HOME": "/", **readable_jobd})
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("listening on "), (tmp_path / "server.stderr").read_text()
        yield Cidx(line.split()[-1]), d, data
    finally:
        proc.terminate()
        proc.wait(10)


def golden(data: Path, tmp_path: Path, alias: str) -> Path:
    """An upstream repository and its golden clone at CIDX's path."""
    files = {f"src/m{k}.py": f"print({k})\n" for k in range(FILES - 1)}
    files["README.md"] = "hello\n"
    upstream = make_upstream(tmp_path / f"upstream-{alias}", files)
    git("clone", "-q", str(upstream), str(data / "golden-repos" / alias), cwd=tmp_path)
    return upstream


@pytest.mark.root
def test_alice_activates_and_syncs_org_repo_and_sees_both_passes(
        cidx: tuple[Cidx, Daemon, Path], tmp_path: Path) -> None:
    server, d, data = cidx
    upstream = make_upstream(tmp_path / "upstream", {
        **{f"src/m{k}.py": f"print({k})\n" for k in range(FILES - 1)}, "README.md": "hi\n"})
    added = server.ok("POST", "/api/admin/golden-repos", ADMIN,
                      {"alias": "org-repo", "repo_url": str(upstream)}, admin=True)
    assert server.done(added["job_id"], ADMIN, admin=True)["status"] == "completed"

    activated = server.ok("POST", "/api/repos/activate", ALICE,
                          {"golden_repo_alias": "org-repo", "user_alias": "org/repo"})
    assert server.done(activated["job_id"], ALICE)["status"] == "completed"
    work_tree = data / "activated-repos" / ALICE / "org" / "repo"  # CIDX's raw layout
    assert (work_tree / "README.md").read_text() == "hi\n"

    commit_files(upstream, {"src/new.py": "print('new')\n"})
    refresh = server.ok("POST", "/api/admin/golden-repos/org-repo/refresh", ADMIN, admin=True)
    refreshed = server.done(refresh["job_id"], ADMIN, admin=True)
    assert refreshed["status"] == "completed", refreshed
    assert refreshed["result"]["new_revision"] != refreshed["result"]["old_revision"]

    sync = server.ok("POST", "/api/repos/sync", ALICE, {"repository_alias": "org/repo"})
    states = server.follow(sync["job_id"], ALICE)
    done = states[-1]
    assert {k: done[k] for k in ("job_id", "operation_type", "status", "progress", "username",
                                 "repo_alias", "error", "actor_username")} == {
        "job_id": sync["job_id"], "operation_type": "sync_repository", "status": "completed",
        "progress": 100, "username": ALICE, "repo_alias": "org/repo", "error": None,
        "actor_username": ALICE}
    assert all(done[k].endswith("+00:00") for k in ("created_at", "started_at", "completed_at"))
    assert done["result"]["files_indexed"] == FILES + 1
    assert (work_tree / "src" / "new.py").exists()
    progress = [s["progress"] for s in states]
    assert progress == sorted(progress), "progress went backwards"
    details = [(s["progress"], s["phase_detail"] or "") for s in states
               if s["current_phase"] == "indexing"]
    first = {p for p, m in details if m.startswith("pass 1/2: ")}
    second = {p for p, m in details if m.startswith("pass 2/2: ")}
    # the embedding pass moves the bar on its own, after the hashing pass
    assert len(first) >= 3 and len(second) >= 3 and max(first) <= min(second), details
    assert any("\U0001f4ca" in m for _, m in details), details


@pytest.mark.root
def test_a_refresh_waits_for_a_branch_change_of_the_same_golden_repo_only(
        cidx: tuple[Cidx, Daemon, Path], tmp_path: Path) -> None:
    server, d, data = cidx
    upstream = golden(data, tmp_path, "busy")
    git("branch", "next", cwd=upstream)
    golden(data, tmp_path, "other")
    change = server.ok("POST", "/api/admin/golden-repos/busy/change-branch", ADMIN,
                       {"branch": "next"}, admin=True)
    wait_for(lambda: server.job(change["job_id"], ADMIN, admin=True)["status"] == "running",
             what="the branch change to run")
    refresh = server.ok("POST", "/api/admin/golden-repos/busy/refresh", ADMIN, admin=True)
    other = server.ok("POST", "/api/admin/golden-repos/other/refresh", ADMIN, admin=True)
    waiting = server.job(refresh["job_id"], ADMIN, admin=True)
    assert (waiting["status"], waiting["wait_reason"]) == ("pending", "project_busy"), waiting
    # the same refresh again is CIDX's DuplicateJobError: 409 naming the waiting job
    status, answer = server.call("POST", "/api/admin/golden-repos/busy/refresh", ADMIN,
                                 admin=True)
    assert status == 409 and refresh["job_id"] in answer["detail"], answer
    elsewhere = server.done(other["job_id"], ADMIN, admin=True)
    changed = server.done(change["job_id"], ADMIN, admin=True)
    refreshed = server.done(refresh["job_id"], ADMIN, admin=True)
    assert changed["status"] == refreshed["status"] == elsewhere["status"] == "completed"
    # another golden repository did not wait
    assert elsewhere["completed_at"] < changed["completed_at"]
    assert changed["operation_type"] == "change_branch"
    assert refreshed["started_at"] >= changed["completed_at"]
    assert git("branch", "--show-current", cwd=data / "golden-repos" / "busy") == "next"


def _alices_repository(server: Cidx, data: Path, tmp_path: Path) -> Path:
    """Alice's activation of golden ``shared`` as ``org/repo``: its work tree."""
    golden(data, tmp_path, "shared")
    activated = server.ok("POST", "/api/repos/activate", ALICE,
                          {"golden_repo_alias": "shared", "user_alias": "org/repo"})
    assert server.done(activated["job_id"], ALICE)["status"] == "completed"
    return data / "activated-repos" / ALICE / "org" / "repo"


@pytest.mark.root
def test_a_deactivation_waits_for_a_sync_of_the_same_activated_tree_only(
        cidx: tuple[Cidx, Daemon, Path], tmp_path: Path) -> None:
    """The activated tree is the job's work tree (options.repo_path): a deactivation and a
    sync of it never overlap, while another user's activation of the same golden
    repository runs meanwhile."""
    server, d, data = cidx
    work_tree = _alices_repository(server, data, tmp_path)
    sync = server.ok("POST", "/api/repos/sync", ALICE, {"repository_alias": "org/repo"})
    wait_for(lambda: server.job(sync["job_id"], ALICE)["status"] == "running",
             what="the sync to run")
    gone = server.ok("DELETE", "/api/repos/org%2Frepo", ALICE)
    bobs = server.ok("POST", "/api/repos/activate", BOB,
                     {"golden_repo_alias": "shared", "user_alias": "org/repo"})
    waiting = server.job(gone["job_id"], ALICE)
    assert (waiting["status"], waiting["wait_reason"]) == ("pending", "project_busy"), waiting
    # the same deactivation again is the one already waiting (the tree is the work key)
    status, answer = server.call("DELETE", "/api/repos/org%2Frepo", ALICE)
    assert status == 409 and gone["job_id"] in answer["detail"], answer
    activated = server.done(bobs["job_id"], BOB)
    synced = server.done(sync["job_id"], ALICE)
    removed = server.done(gone["job_id"], ALICE)
    assert activated["status"] == synced["status"] == removed["status"] == "completed"
    assert activated["completed_at"] < synced["completed_at"], "Bob's activation waited"
    assert removed["started_at"] >= synced["completed_at"]
    assert removed["operation_type"] == "deactivate_repository"
    assert removed["result"] == {"removed": str(work_tree)}
    assert not work_tree.exists()
    assert (data / "activated-repos" / BOB / "org" / "repo" / "README.md").exists()


@pytest.mark.root
def test_another_user_gets_404_and_cancel_gives_cancelled(
        cidx: tuple[Cidx, Daemon, Path], tmp_path: Path) -> None:
    server, d, data = cidx
    _alices_repository(server, data, tmp_path)
    sync = server.ok("POST", "/api/repos/sync", ALICE, {"repository_alias": "org/repo"})
    wait_for(lambda: server.job(sync["job_id"], ALICE)["current_phase"] == "indexing",
             what="the sync to index")
    # CIDX answers a job that is not the caller's as one that does not exist
    assert server.call("GET", f"/api/jobs/{sync['job_id']}", BOB) == (
        404, {"detail": f"Job not found: {sync['job_id']}"})
    assert server.call("DELETE", f"/api/jobs/{sync['job_id']}", BOB) == (
        403, {"detail": "Job not found or not authorized"})
    assert server.ok("GET", "/api/jobs", BOB)["total"] == 0
    assert server.job(sync["job_id"], ADMIN, admin=True)["username"] == ALICE
    assert server.call("GET", "/api/jobs/not-a-job", ALICE)[0] == 404

    assert server.ok("DELETE", f"/api/jobs/{sync['job_id']}", ALICE) == {
        "success": True, "message": "Job cancelled successfully"}
    cancelled = server.done(sync["job_id"], ALICE)
    assert cancelled["status"] == "cancelled", cancelled
    # a finished job cannot be cancelled: CIDX's 400
    activation = server.ok("GET", "/api/jobs?status=completed", ALICE)["jobs"][0]
    assert server.call("DELETE", f"/api/jobs/{activation['job_id']}", ALICE) == (
        400, {"detail": "Cannot cancel job in completed status"})


@pytest.mark.root
def test_list_pages_by_offset_with_a_total(cidx: tuple[Cidx, Daemon, Path],
                                           tmp_path: Path) -> None:
    server, d, data = cidx
    golden(data, tmp_path, "shared")
    ids = []
    for k in range(3):
        job = server.ok("POST", "/api/repos/activate", ALICE,
                        {"golden_repo_alias": "shared", "user_alias": f"copy-{k}"})
        assert server.done(job["job_id"], ALICE)["status"] == "completed"
        ids.append(job["job_id"])
    first = server.ok("GET", "/api/jobs?limit=2", ALICE)
    rest = server.ok("GET", "/api/jobs?limit=2&offset=2", ALICE)
    assert (first["total"], first["limit"], first["offset"]) == (3, 2, 0)
    assert (rest["total"], rest["offset"]) == (3, 2)
    assert [j["job_id"] for j in first["jobs"] + rest["jobs"]] == ids[::-1]  # newest first
    assert {j["operation_type"] for j in first["jobs"]} == {"activate_repository"}
    assert server.ok("GET", "/api/jobs?status=pending", ALICE)["total"] == 0
    assert server.ok("GET", "/api/jobs?status=completed", ALICE)["total"] == 3
    # CIDX's admins see every user's jobs
    assert server.ok("GET", "/api/jobs", ADMIN, admin=True)["total"] == 3
    assert server.call("GET", "/api/jobs?status=done", ALICE)[0] == 422


def _toml_blocks(text: str) -> list[str]:
    return re.findall(r"^```toml\n(.*?)^```$", text, flags=re.S | re.M)


def test_the_docs_config_is_the_examples_and_every_toml_block_loads(tmp_path: Path) -> None:
    blocks = _toml_blocks(DOC.read_text())
    assert (EXAMPLE / "jobd.toml").read_text() in blocks, \
        "docs/cidx.md must quote examples/cidx_like/jobd.toml whole"
    for k, block in enumerate(blocks):
        path = tmp_path / f"block{k}.toml"
        path.write_text(block)
        try:
            config.load(path, env={})
        except config.ConfigError as e:
            pytest.fail(f"docs/cidx.md's TOML block {k + 1} does not load: {e}")
    loaded = config.load(EXAMPLE / "jobd.toml", env={})
    assert loaded.sync.index_passes == 2 and loaded.execution.default_timeout is None
    assert all(t.timeout is None for t in loaded.types.values())
    assert {n for n, t in loaded.types.items() if t.exclusive} == set(loaded.types)
    # an activated tree is a project's work tree that CIDX names by options.repo_path
    assert {n for n, t in loaded.types.items() if t.project == "required" and not t.repo} == {
        "activate_repository", "deactivate_repository"}
