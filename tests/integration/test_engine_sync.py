"""Sync through the real daemon: pulled changes and their index, each way a sync fails,
and hostile inputs (SPEC §3a, §5)."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Iterator

import pytest

from conftest import (FAST_CONFIG, Daemon, clone, commit_files, error_of, follow, git, joblog,
                      make_upstream, phases_of, result_of, wait_terminal)

PHASES = ["init", "git_sync", "indexing", "finalizing"]
_projects = itertools.count(1)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon for the module (starting one is the slow part); each test syncs its
    own project. Its socket is open to all, for a test as an unprivileged user."""
    d = Daemon(tmp_path_factory.mktemp("jobd"),
               config=FAST_CONFIG + '[server]\nsocket_mode = "0666"\n').start()
    d.socket.parent.chmod(0o755)  # the harness made it private
    yield d
    assert d.stop() == 0


@pytest.fixture
def project() -> str:
    return f"p{next(_projects)}"


def submit_sync(d: Daemon, project: str, **options: Any) -> dict[str, Any]:
    return result_of(d, "jobs.submit", type="sync", project_id=project, options=options)


def manifest(d: Daemon, project: str, user: str = "root") -> dict[str, Any]:
    return json.loads((d.state / "manifests" / user / f"{project}.json").read_text())


def head(repo: Path) -> str:
    return git("rev-parse", "HEAD", cwd=repo)


def checkout(d: Daemon, tmp_path: Path, project: str,
             files: dict[str, str] | None = None) -> tuple[Path, Path]:
    """(upstream, its clone at the project's template path ``<repos>/root/<project>``)."""
    upstream = make_upstream(tmp_path / "upstream", files)
    return upstream, clone(upstream, d.repos / "root" / project)


# -- a sync that works ---------------------------------------------------------------------

def test_sync_pulls_added_modified_and_deleted_files_and_indexes_them(
        daemon: Daemon, tmp_path: Path, project: str) -> None:
    upstream, repo = checkout(daemon, tmp_path, project)
    old = head(repo)
    new = commit_files(upstream, {"docs/new.md": "one\ntwo\n", "README.md": "hello again\n",
                                  "src/a.py": None})

    job = submit_sync(daemon, project)
    assert job["user_id"] == "root" and job["status"] == "queued"
    done, progress = follow(daemon, job["id"])

    assert done["status"] == "completed", done
    assert progress == sorted(progress) and progress[-1] == 100
    result = done["result"]
    assert (result["old_revision"], result["new_revision"]) == (old, new)
    assert (result["commits_pulled"], result["files_added"], result["files_modified"],
            result["files_deleted"], result["files_indexed"]) == (1, 1, 1, 1, 2)
    assert set(result["seconds"]) == set(PHASES)
    assert head(repo) == new and not (repo / "src" / "a.py").exists()

    files = manifest(daemon, project)["files"]
    assert set(files) == {"README.md", "docs/new.md"}
    assert files["docs/new.md"]["sha256"] == hashlib.sha256(b"one\ntwo\n").hexdigest()
    assert files["docs/new.md"]["lines"] == 2
    assert git("status", "--porcelain", "--ignored", cwd=repo) == ""

    assert phases_of(daemon, job["id"]) == PHASES
    statuses = [e["status"] for e in result_of(daemon, "jobs.events", job_id=job["id"])]
    assert statuses[:3] == ["created", "queued", "running"] and statuses[-1] == "completed"


def test_a_second_sync_by_repo_path_rehashes_only_what_changed(
        daemon: Daemon, tmp_path: Path, project: str) -> None:
    upstream = make_upstream(tmp_path / "upstream", {f"f{i}.txt": f"{i}\n" for i in range(5)})
    repo = clone(upstream, daemon.repos / "elsewhere" / "checkout")
    first = submit_sync(daemon, project, repo_path=str(repo))
    assert first["options"]["repo_path"] == str(repo)
    assert wait_terminal(daemon, first["id"])["result"]["index"]["rehashed"] == 5

    commit_files(upstream, {"f2.txt": "changed\n"})
    second = wait_terminal(daemon, submit_sync(daemon, project, repo_path=str(repo))["id"])
    assert second["status"] == "completed", second
    assert second["result"]["files_modified"] == 1
    assert second["result"]["index"] == {"files_indexed": 5, "added": 0, "changed": 1,
                                         "removed": 0, "rehashed": 1}
    # the manifest is kept by user and project, never in the repository
    assert manifest(daemon, project)["files"]["f2.txt"]["sha256"] == hashlib.sha256(
        b"changed\n").hexdigest()


# -- each way a sync fails -----------------------------------------------------------------

def test_ff_only_sync_of_a_diverged_branch_fails_and_keeps_local_work(
        daemon: Daemon, tmp_path: Path, project: str) -> None:
    upstream, repo = checkout(daemon, tmp_path, project)
    local = commit_files(repo, {"local.txt": "mine\n"})
    commit_files(upstream, {"remote.txt": "theirs\n"})

    done = wait_terminal(daemon, submit_sync(daemon, project)["id"])

    assert done["status"] == "failed"
    assert "diverged" in done["error"] and "strategy merge or reset" in done["error"]
    assert head(repo) == local and not (repo / "remote.txt").exists()


def test_merge_conflict_fails_and_leaves_the_work_tree_at_the_old_revision(
        daemon: Daemon, tmp_path: Path, project: str) -> None:
    upstream, repo = checkout(daemon, tmp_path, project)
    local = commit_files(repo, {"README.md": "local edit\n"})
    commit_files(upstream, {"README.md": "upstream edit\n"})

    done = wait_terminal(daemon, submit_sync(daemon, project, strategy="merge")["id"])

    assert done["status"] == "failed"
    assert "conflicts in README.md" in done["error"]
    assert head(repo) == local
    assert not (repo / ".git" / "MERGE_HEAD").exists()
    assert git("status", "--porcelain", cwd=repo) == ""
    assert (repo / "README.md").read_text() == "local edit\n"
    assert "work tree put back" in joblog(daemon, done["id"])


def test_a_merge_conflict_on_a_file_named_in_no_encoding_fails_naming_it(
        daemon: Daemon, tmp_path: Path, project: str) -> None:
    upstream, repo = checkout(daemon, tmp_path, project)
    name = os.fsdecode(b"caf\xe9.txt")  # Latin-1, not UTF-8
    local = commit_files(repo, {name: "local\n"})
    commit_files(upstream, {name: "upstream\n"})

    done = wait_terminal(daemon, submit_sync(daemon, project, strategy="merge")["id"])

    assert done["status"] == "failed", done
    assert done["error"] == (f"merging origin/main into main conflicts in caf\\xe9.txt; "
                             f"resolve them in {repo} or use strategy reset to take the "
                             "upstream version")
    assert head(repo) == local and git("status", "--porcelain", cwd=repo) == ""


def test_a_remote_that_cannot_be_reached_fails_the_fetch(
        daemon: Daemon, tmp_path: Path, project: str) -> None:
    upstream, repo = checkout(daemon, tmp_path, project)
    old = head(repo)
    upstream.rename(tmp_path / "moved")

    done = wait_terminal(daemon, submit_sync(daemon, project)["id"])

    assert done["status"] == "failed"
    assert done["error"].startswith("fetching main from origin failed")
    assert head(repo) == old


def test_a_remote_not_configured_in_the_repository_is_refused(
        daemon: Daemon, tmp_path: Path, project: str) -> None:
    checkout(daemon, tmp_path, project)
    err = error_of(daemon, "jobs.submit", type="sync", project_id=project,
                   options={"remote": "upstream"})
    assert err["code"] == -32602 and err["data"]["field"] == "options.remote"
    assert "not configured" in err["message"] and "origin" in err["message"]


def test_a_branch_missing_upstream_fails_and_keeps_the_checkout(
        daemon: Daemon, tmp_path: Path, project: str) -> None:
    _, repo = checkout(daemon, tmp_path, project)
    old = head(repo)

    done = wait_terminal(daemon, submit_sync(daemon, project, branch="no-such-branch")["id"])

    assert done["status"] == "failed"
    # git's own reason, not whatever line it printed last
    assert done["error"] == ("fetching no-such-branch from origin failed: git fetch exited "
                             "with status 128: fatal: couldn't find remote ref "
                             "refs/heads/no-such-branch")
    assert head(repo) == old
    assert git("symbolic-ref", "--short", "HEAD", cwd=repo) == "main"


def test_a_repository_that_stopped_being_a_git_repository_fails_when_run(
        daemon: Daemon, tmp_path: Path, project: str) -> None:
    _, repo = checkout(daemon, tmp_path, project)
    result_of(daemon, "admin.pause")
    try:
        job = submit_sync(daemon, project)
        shutil.rmtree(repo / ".git")
    finally:
        result_of(daemon, "admin.resume")

    done = wait_terminal(daemon, job["id"])

    assert done["status"] == "failed" and "is not a git work tree" in done["error"]


def test_a_project_never_cloned_fails_saying_so(daemon: Daemon, project: str) -> None:
    done = wait_terminal(daemon, submit_sync(daemon, project)["id"])
    assert done["status"] == "failed"
    assert "does not exist; clone it there first" in done["error"]


# -- hostile inputs ------------------------------------------------------------------------

HOSTILE_OPTIONS = [
    ({"branch": "--upload-pack=touch {marker}"}, "options.branch"),
    ({"branch": "main..x"}, "options.branch"),
    ({"remote": "{upstream}"}, "options.remote"),
    ({"remote": "../upstream"}, "options.remote"),
    ({"remote": "ext::sh -c touch% {marker}"}, "options.remote"),
    ({"strategy": "theirs"}, "options.strategy"),
    ({"full_reindex": "yes"}, "options.full_reindex"),
    ({"repo_path": "relative/path"}, "options.repo_path"),
    ({"repo_path": "{outside}"}, "options.repo_path"),
    ({"repo_path": "{link}"}, "options.repo_path"),
    ({"repo_path": "{plain}"}, "options.repo_path"),
    ({"unknown": "1"}, "options.unknown"),
]


def test_hostile_options_are_refused_at_submit(daemon: Daemon, tmp_path: Path,
                                               project: str) -> None:
    upstream, _ = checkout(daemon, tmp_path, project)
    outside = clone(upstream, tmp_path / "outside")
    link = daemon.repos / "root" / f"{project}-link"
    link.symlink_to(outside)
    plain = daemon.repos / "root" / f"{project}-plain"
    plain.mkdir()
    marker = tmp_path / "pwned"
    values = {"marker": str(marker), "upstream": str(upstream), "outside": str(outside),
              "link": str(link), "plain": str(plain)}
    before = result_of(daemon, "jobs.list", project_id=project)["jobs"]

    for options, field in HOSTILE_OPTIONS:
        options = {k: v.format(**values) for k, v in options.items()}
        err = error_of(daemon, "jobs.submit", type="sync", project_id=project, options=options)
        assert (err["code"], err["data"].get("field")) == (-32602, field), (options, err)

    assert not marker.exists()
    assert result_of(daemon, "jobs.list", project_id=project)["jobs"] == before == []


def test_hostile_project_ids_are_refused(daemon: Daemon) -> None:
    # "../etc", "..", "a/b" are valid ids, each one encoded folder (test_web_ids.py)
    for project in ["", "x" * 256, "p\n", " p", "p ", "p\u202e", "\u200b", "a\x00b"]:
        err = error_of(daemon, "jobs.submit", type="sync", project_id=project)
        assert (err["code"], err["data"].get("field")) == (-32602, "project_id"), project


def test_a_project_reached_through_a_symbolic_link_is_refused_at_submit_and_at_run(
        daemon: Daemon, tmp_path: Path, project: str) -> None:
    upstream, repo = checkout(daemon, tmp_path, project)
    outside = clone(upstream, tmp_path / "outside")
    linked = f"{project}-linked"
    (daemon.repos / "root" / linked).symlink_to(outside)
    err = error_of(daemon, "jobs.submit", type="sync", project_id=linked)
    assert err["code"] == -32602 and err["data"]["field"] == "project_id"
    assert "outside the allowed roots" in err["message"] and str(outside) in err["message"]

    # checked again when it runs: swapped for a link while the job waited
    result_of(daemon, "admin.pause")
    try:
        job = submit_sync(daemon, project)
        shutil.rmtree(repo)
        repo.symlink_to(outside)
        commit_files(upstream, {"new.txt": "x\n"})
        before = head(outside)
    finally:
        result_of(daemon, "admin.resume")

    done = wait_terminal(daemon, job["id"])
    assert done["status"] == "failed" and "outside the allowed roots" in done["error"]
    assert head(outside) == before


def run_as_nobody(code: str, *args: str) -> subprocess.CompletedProcess[str] | None:
    """Run Python ``code`` as the unprivileged user nobody; None when that is impossible."""
    for python in (sys.executable, "/usr/bin/python3"):
        try:
            return subprocess.run([python, "-c", code, *args], user=65534, group=65534,
                                  extra_groups=[], capture_output=True, text=True, timeout=10,
                                  cwd="/", check=False)
        except (PermissionError, FileNotFoundError):
            continue  # this interpreter lies where nobody may not go
    return None


def test_a_plain_user_may_not_pass_repo_path(daemon: Daemon, tmp_path: Path,
                                             project: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to act as another user")
    _, repo = checkout(daemon, tmp_path, project)
    request = {"jsonrpc": "2.0", "id": 1, "method": "jobs.submit",
               "params": {"type": "sync", "project_id": project,
                          "options": {"repo_path": str(repo)}}}
    client = textwrap.dedent("""
        import socket, sys
        s = socket.socket(socket.AF_UNIX)
        s.connect(sys.argv[1])
        s.sendall(sys.argv[2].encode() + b"\\n")
        print(s.makefile().readline())
    """)
    out = run_as_nobody(client, str(daemon.socket), json.dumps(request))
    if out is None:
        pytest.skip("no Python the nobody user may run")
    assert out.returncode == 0, out.stderr
    err = json.loads(out.stdout)["error"]
    assert err["code"] == -32003 and err["data"]["field"] == "options.repo_path"
    assert result_of(daemon, "jobs.list", user_id="nobody")["jobs"] == []


def test_git_hooks_and_fsmonitor_of_the_repository_never_run(
        daemon: Daemon, tmp_path: Path, project: str) -> None:
    upstream, repo = checkout(daemon, tmp_path, project)
    marker = tmp_path / "pwned"
    for hook in ("post-merge", "post-checkout", "reference-transaction", "pre-auto-gc"):
        path = repo / ".git" / "hooks" / hook
        path.write_text(f"#!/bin/sh\necho {hook} >> {marker}\n")
        path.chmod(0o755)
    git("config", "core.fsmonitor", f"echo fsmonitor >> {marker}; false", cwd=repo)
    commit_files(upstream, {"new.txt": "x\n"})

    done = wait_terminal(daemon, submit_sync(daemon, project)["id"])

    assert done["status"] == "completed", done
    assert head(repo) == head(upstream)
    assert not marker.exists(), marker.read_text()


def test_a_tracked_link_to_etc_is_recorded_as_a_link_and_never_read(
        daemon: Daemon, tmp_path: Path, project: str) -> None:
    upstream, repo = checkout(daemon, tmp_path, project)
    os.symlink("/etc", upstream / "etc")
    os.symlink("/etc/passwd", upstream / "passwd")
    git("add", "etc", "passwd", cwd=upstream)
    git("commit", "-q", "-m", "links", cwd=upstream)

    done = wait_terminal(daemon, submit_sync(daemon, project)["id"])

    assert done["status"] == "completed", done
    assert (repo / "etc").is_symlink()
    files = manifest(daemon, project)["files"]
    assert files["etc"] == {"type": "link", "target": "/etc"}
    assert files["passwd"] == {"type": "link", "target": "/etc/passwd"}
    assert set(files) == {"README.md", "src/a.py", "etc", "passwd"}


def test_a_retried_sync_starts_over_from_the_work_tree_as_it_is_now(
        daemon: Daemon, tmp_path: Path, project: str) -> None:
    upstream, repo = checkout(daemon, tmp_path, project)
    commit_files(repo, {"local.txt": "mine\n"})
    commit_files(upstream, {"remote.txt": "theirs\n"})
    job = submit_sync(daemon, project)
    assert wait_terminal(daemon, job["id"])["status"] == "failed"

    # the owner sorts out the divergence by hand and goes on working, then retries
    git("reset", "-q", "--hard", "origin/main", cwd=repo)
    fixed = commit_files(repo, {"more.txt": "more work\n"})
    (repo / "README.md").write_text("an edit not yet committed\n")
    result_of(daemon, "jobs.retry", job_id=job["id"])
    done = wait_terminal(daemon, job["id"])

    # the earlier attempt's view of the repository must not be replayed onto it
    assert head(repo) == fixed
    assert (repo / "README.md").read_text() == "an edit not yet committed\n"
    assert done["status"] == "failed" and "uncommitted changes to README.md" in done["error"]
