"""sync with ``options.url`` (SPEC §5): a missing repository is cloned in the ``init``
phase, with progress, into its checked place; a stopped clone leaves nothing half made."""

from __future__ import annotations

import itertools
import socket
from pathlib import Path
from typing import Any, Iterator

import pytest

from conftest import (FAST_CONFIG, Daemon, commit_files, error_of, follow, git, joblog,
                      make_upstream, phases_of, result_of, wait_for, wait_terminal)

_projects = itertools.count(1)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("jobd"), config=FAST_CONFIG).start()
    yield d
    assert d.stop() == 0


@pytest.fixture
def project() -> str:
    return f"c{next(_projects)}"


def sync(d: Daemon, project: str, **params: Any) -> dict[str, Any]:
    return result_of(d, "jobs.submit", type="sync", project_id=project, **params)


def test_a_missing_repository_is_cloned_from_url_then_synced(
        daemon: Daemon, tmp_path: Path, project: str) -> None:
    upstream = make_upstream(tmp_path / "upstream", {"a.txt": "one\n", "b/c.txt": "two\n"})
    job = sync(daemon, project, options={"url": str(upstream)})
    done, seen = follow(daemon, job["id"])
    assert done["status"] == "completed", done
    target = daemon.repos / "root" / project
    assert git("rev-parse", "HEAD", cwd=target) == git("rev-parse", "HEAD", cwd=upstream)
    assert (target / "b" / "c.txt").read_text() == "two\n"
    assert phases_of(daemon, job["id"]) == ["init", "git_sync", "indexing", "finalizing"]
    assert done["result"]["files_indexed"] == 2
    assert seen == sorted(seen)
    text = joblog(daemon, job["id"])
    # the clone runs with every git command's hardened config (ext:: refused by git too)
    assert "git -c core.hooksPath=/dev/null" in text
    assert " clone --progress --origin origin -- " in text
    assert "-c protocol.allow=user -c protocol.ext.allow=never" in text
    assert f"cloned {upstream} into {target}" in text
    # nothing left beside it
    assert sorted(p.name for p in target.parent.iterdir()) == [project]
    # a repository that exists is fetched, not cloned again
    commit_files(upstream, {"a.txt": "changed\n"})
    again = wait_terminal(daemon, sync(daemon, project, options={"url": str(upstream)})["id"])
    assert again["status"] == "completed" and again["result"]["commits_pulled"] == 1


def test_a_failed_clone_leaves_no_half_made_repository(
        daemon: Daemon, tmp_path: Path, project: str) -> None:
    job = sync(daemon, project, options={"url": str(tmp_path / "nowhere")})
    done = wait_terminal(daemon, job["id"])
    assert done["status"] == "failed" and "git clone exited" in done["error"]
    assert not (daemon.repos / "root" / project).exists()
    assert not any((daemon.repos / "root").glob(f".{project}.clone-*"))


def test_a_clone_names_its_remote_as_the_sync_fetches_from_it(
        daemon: Daemon, tmp_path: Path, project: str) -> None:
    upstream = make_upstream(tmp_path / "upstream", {"a.txt": "one\n"})
    job = sync(daemon, project, options={"url": str(upstream), "remote": "upstream"})
    done = wait_terminal(daemon, job["id"])
    assert done["status"] == "completed", done
    assert git("remote", cwd=daemon.repos / "root" / project) == "upstream"


@pytest.mark.parametrize("url", ["ext::sh -c touch% {marker}", "EXT::sh -c touch% {marker}"])
def test_ext_urls_are_refused_at_submit(daemon: Daemon, tmp_path: Path, project: str,
                                        url: str) -> None:
    marker = tmp_path / "ran"
    err = error_of(daemon, "jobs.submit", type="sync", project_id=project,
                   options={"url": url.format(marker=marker)})
    assert (err["code"], err["data"]["field"]) == (-32602, "options.url")
    assert not marker.exists()


def test_a_cancelled_clone_leaves_nothing(daemon: Daemon, project: str) -> None:
    # a server that accepts and never answers: the clone hangs mid-way, as a slow one does
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        job = sync(daemon, project, options={"url": f"http://127.0.0.1:{port}/r.git"})
        parent = daemon.repos / "root"
        wait_for(lambda: list(parent.glob(f".{project}.clone-*")) if parent.exists() else [],
                 what="the clone to begin in its folder beside the repository")
        result_of(daemon, "jobs.cancel", job_id=job["id"], wait=True)
    assert wait_terminal(daemon, job["id"])["status"] == "cancelled"
    assert list(parent.glob(f".{project}.clone-*")) == []
    assert not (parent / project).exists()
    assert "cancelled by admin:root: sending SIGTERM" in joblog(daemon, job["id"])


@pytest.mark.parametrize("params, code, field", [
    ({"as_user": "alice", "as_role": "user"}, -32003, "options.url"),
    ({"url": "--upload-pack=touch /tmp/x"}, -32602, "options.url"),
    ({"url": ""}, -32602, "options.url"),
    ({"url": "a\nb"}, -32602, "options.url"),
])
def test_url_is_for_admins_and_services_and_never_option_like(
        daemon: Daemon, project: str, params: dict[str, Any], code: int, field: str) -> None:
    options = {"url": params.pop("url", "https://example.invalid/r.git")}
    err = error_of(daemon, "jobs.submit", type="sync", project_id=project, options=options,
                   **params)
    assert (err["code"], err["data"].get("field")) == (code, field), err


def test_a_repo_path_under_the_roots_may_be_cloned_into(
        daemon: Daemon, tmp_path: Path) -> None:
    upstream = make_upstream(tmp_path / "upstream")
    target = daemon.repos / "deep" / "er" / "here"
    job = sync(daemon, "rp", options={"url": str(upstream), "repo_path": str(target)})
    assert wait_terminal(daemon, job["id"])["status"] == "completed"
    assert git("rev-parse", "HEAD", cwd=target) == git("rev-parse", "HEAD", cwd=upstream)
    err = error_of(daemon, "jobs.submit", type="sync", project_id="rp2",
                   options={"url": str(upstream), "repo_path": str(tmp_path / "outside")})
    assert err["data"]["field"] == "options.repo_path"


def kill_mid_clone(d: Daemon, project: str, before_kill: Any = None) -> dict[str, Any]:
    """A sync of ``project`` cloning from a socket that never answers, the daemon killed
    with SIGKILL once the clone began (git cannot clean up after itself): the job."""
    parent = d.repos / "root"
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        job = sync(d, project, options={"url": f"http://127.0.0.1:{port}/r.git"})
        wait_for(lambda: list(parent.glob(f".{project}.clone-*")) if parent.exists() else [],
                 what="the clone to begin")
        if before_kill is not None:
            before_kill()
        d.kill()
    return job


def test_a_clone_killed_by_a_crash_is_cleared_by_the_next_attempt(
        make_daemon: Any, tmp_path: Path) -> None:
    d = make_daemon()
    parent = d.repos / "root"
    job = kill_mid_clone(d, "crashed")
    assert list(parent.glob(".crashed.clone-*"))
    # nothing listens on the port now: the resumed clone fails at once
    d.start()
    done = wait_terminal(d, job["id"])
    assert done["status"] == "failed" and done["attempts"] == 2
    assert list(parent.glob(".crashed.clone-*")) == []
    assert not (parent / "crashed").exists()


def test_what_a_crashed_clone_left_is_cleared_by_the_next_clone_into_the_same_place(
        make_daemon: Any, tmp_path: Path) -> None:
    # the crashed clone's job never runs again (cancelled while queued): the next sync
    # that clones the same repository, another job, clears what it left
    d = make_daemon()
    parent = d.repos / "root"
    # the pause is kept over the restart: the job waits, queued
    job = kill_mid_clone(d, "again", before_kill=lambda: result_of(d, "admin.pause"))
    d.start()
    left = list(parent.glob(".again.clone-*"))
    assert [p.name for p in left] == [f".again.clone-{job['id']}"]
    assert result_of(d, "jobs.cancel", job_id=job["id"])["status"] == "cancelled"
    result_of(d, "admin.resume")
    upstream = make_upstream(tmp_path / "upstream", {"a.txt": "one\n"})
    other = wait_terminal(d, sync(d, "again", options={"url": str(upstream)})["id"])
    assert other["status"] == "completed", other
    assert sorted(p.name for p in parent.iterdir()) == ["again"]
    assert f"removed {left[0]}, what an interrupted clone left" in joblog(d, other["id"])
