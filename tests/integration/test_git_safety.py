"""git through the real daemon, where the repository or the moment is hostile (SPEC §3a, §5):
repositories jobd does not own, transports and commands a repository's config must not
choose, a repository swapped for a link mid-run, and a daemon killed during a checkout."""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from conftest import (FAST_CONFIG, Daemon, LocalAccounts, clone, commit_files, error_of,
                      git, joblog, make_upstream, result_of, wait_for, wait_terminal)

_projects = itertools.count(1)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("jobd")).start()
    yield d
    assert d.stop() == 0


@pytest.fixture
def project() -> str:
    return f"g{next(_projects)}"


def checkout(d: Daemon, tmp_path: Path, project: str) -> tuple[Path, Path]:
    """(upstream, its clone at the project's template path)."""
    upstream = make_upstream(tmp_path / "upstream")
    return upstream, clone(upstream, d.repos / "root" / project)


def submit_sync(d: Daemon, project: str, **options: Any) -> dict[str, Any]:
    return result_of(d, "jobs.submit", type="sync", project_id=project, options=options)


def submitted_while_paused(d: Daemon, project: str, then: Callable[[], None],
                           **options: Any) -> dict[str, Any]:
    """Submit a sync, then (before it can run) do ``then``; the job once it ended."""
    result_of(d, "admin.pause")
    try:
        job = submit_sync(d, project, **options)
        then()
    finally:
        result_of(d, "admin.resume")
    return wait_terminal(d, job["id"])


def head(repo: Path) -> str:
    return git("rev-parse", "HEAD", cwd=repo)


# -- repositories jobd does not own ---------------------------------------------------------

def test_a_repository_writable_by_others_is_refused_at_submit_and_when_it_runs(
        daemon: Daemon, tmp_path: Path, project: str) -> None:
    upstream, repo = checkout(daemon, tmp_path, project)
    old = head(repo)
    commit_files(upstream, {"new.txt": "x\n"})

    repo.chmod(0o777)
    err = error_of(daemon, "jobs.submit", type="sync", project_id=project)
    assert (err["code"], err["data"]["field"]) == (-32602, "project_id")
    assert err["message"] == (f"repository {repo} is writable by its group and others; jobd "
                              f"runs git only in repositories it owns (chmod go-w {repo})")

    repo.chmod(0o755)
    (repo / ".git").chmod(0o775)
    err = error_of(daemon, "jobs.submit", type="sync", project_id=project)
    assert err["data"]["field"] == "project_id"
    assert err["message"].startswith(f"the git dir {repo}/.git is writable by its group;")

    # made writable after the submit: the job fails when it runs, before any fetch
    (repo / ".git").chmod(0o755)
    done = submitted_while_paused(daemon, project, lambda: (repo / ".git" / "config").chmod(0o666))
    assert done["status"] == "failed"
    assert done["error"].startswith(f"the git config {repo}/.git/config is writable by its "
                                    "group and others; jobd runs git only in repositories it owns")
    assert head(repo) == old and "fetch" not in joblog(daemon, done["id"])


def hostile_config(repo: Path, marker: Path) -> None:
    """Settings that make git run a program, each leaving a line in ``marker`` if obeyed."""
    included = repo.parent / f"{repo.name}-included.cfg"
    included.write_text(f'[remote "origin"]\n\tuploadpack = "echo uploadpack >> {marker}; '
                        'git-upload-pack"\n')
    with (repo / ".git" / "config").open("a") as f:
        f.write(f'[include]\n\tpath = {included}\n'
                f'[filter "evil"]\n\tsmudge = "echo smudge >> {marker}; cat"\n'
                f'\tclean = "echo clean >> {marker}; cat"\n'
                f'[core]\n\tsshCommand = "echo ssh >> {marker}; false"\n')
    (repo / ".git" / "info").mkdir(exist_ok=True)
    (repo / ".git" / "info" / "attributes").write_text("* filter=evil\n")


def test_a_repository_of_another_user_with_a_hostile_config_never_runs_git(
        daemon: Daemon, tmp_path: Path, project: str, local_accounts: LocalAccounts) -> None:
    other = local_accounts.user("jt7git1")
    upstream, repo = checkout(daemon, tmp_path, project)
    old = head(repo)
    commit_files(upstream, {"new.txt": "x\n"})
    marker = tmp_path / "pwned"
    hostile_config(repo, marker)

    def give_away() -> None:
        for path in (repo, *repo.rglob("*")):
            os.lchown(path, other.pw_uid, other.pw_gid)

    # owned by the other user at submit: refused, naming both uids
    give_away()
    err = error_of(daemon, "jobs.submit", type="sync", project_id=project)
    assert (err["code"], err["data"]["field"]) == (-32602, "project_id")
    assert err["message"] == (
        f"repository {repo} is owned by uid {other.pw_uid} (jt7git1), not by jobd's uid "
        f"{os.geteuid()} (root); jobd runs git only in repositories it owns (chown it to "
        "jobd's user, or sync a copy jobd owns)")

    # given away after the submit: the job fails when it runs
    for path in (repo, *repo.rglob("*")):
        os.lchown(path, 0, 0)
    done = submitted_while_paused(daemon, project, give_away)
    assert done["status"] == "failed", done
    assert done["error"].startswith(f"repository {repo} is owned by uid {other.pw_uid}")
    assert git("-c", f"safe.directory={repo}", "rev-parse", "HEAD", cwd=repo) == old
    assert not marker.exists(), marker.read_text()


def test_an_ext_remote_never_runs_even_in_a_repository_jobd_owns(
        daemon: Daemon, tmp_path: Path, project: str) -> None:
    _, repo = checkout(daemon, tmp_path, project)
    marker = tmp_path / "pwned"
    # the repository's own config may not allow what the command line forbids
    git("config", "protocol.ext.allow", "always", cwd=repo)
    git("config", "protocol.allow", "always", cwd=repo)
    git("config", "remote.origin.url", f"ext::sh -c touch% {marker}", cwd=repo)

    done = wait_terminal(daemon, submit_sync(daemon, project)["id"])

    assert done["status"] == "failed"
    assert done["error"] == ("fetching main from origin failed: git fetch exited with status "
                             "128: fatal: transport 'ext' not allowed")
    assert not marker.exists()


def test_the_repositorys_ssh_command_is_not_used(
        daemon: Daemon, tmp_path: Path, project: str) -> None:
    _, repo = checkout(daemon, tmp_path, project)
    marker = tmp_path / "pwned"
    git("config", "core.sshCommand", f"echo ssh >> {marker}; false", cwd=repo)
    # nothing listens on port 1: the real ssh fails at once
    git("config", "remote.origin.url", "ssh://127.0.0.1:1/repo.git", cwd=repo)

    done = wait_terminal(daemon, submit_sync(daemon, project)["id"])

    assert done["status"] == "failed"
    assert done["error"].startswith("fetching main from origin failed: git fetch exited with "
                                    "status 128:")
    assert not marker.exists(), marker.read_text()


def test_auto_gc_after_a_fetch_runs_in_the_foreground(
        daemon: Daemon, tmp_path: Path, project: str) -> None:
    upstream, repo = checkout(daemon, tmp_path, project)
    # keep each fetch as a pack, and repack as soon as there are two
    git("repack", "-q", "-a", "-d", cwd=repo)
    git("config", "transfer.unpackLimit", "1", cwd=repo)
    git("config", "gc.autoPackLimit", "1", cwd=repo)
    commit_files(upstream, {"new.txt": "x\n"})

    done = wait_terminal(daemon, submit_sync(daemon, project)["id"])

    assert done["status"] == "completed", done
    log = joblog(daemon, done["id"])
    assert "Auto packing the repository for optimum performance." in log
    assert "in background" not in log
    # it finished within the job: one pack left, and no gc still holding its lock
    assert len(list((repo / ".git" / "objects" / "pack").glob("*.pack"))) == 1
    assert not (repo / ".git" / "gc.pid").exists()


# -- the repository swapped mid-run ---------------------------------------------------------

def test_a_repository_swapped_for_a_link_mid_run_never_moves_git_outside(
        daemon: Daemon, tmp_path: Path, project: str) -> None:
    upstream = make_upstream(tmp_path / "upstream")
    shared = daemon.repos / "shared" / project
    shared.mkdir(parents=True)
    shared.chmod(0o777)  # anyone may rename what is in it
    repo = clone(upstream, shared / "repo")
    outside = clone(upstream, tmp_path / "outside")
    outside_state = (head(outside), git("reflog", cwd=outside),
                     sorted(p.name for p in (outside / ".git").iterdir()))
    # the fetch stops until the test has swapped the folder
    started, go = tmp_path / "fetch-started", tmp_path / "go"
    slow = tmp_path / "slow-upload-pack"
    slow.write_text(f'#!/bin/sh\ntouch {started}\nwhile [ ! -e {go} ]; do sleep 0.01; done\n'
                    'exec git-upload-pack "$@"\n')
    slow.chmod(0o755)
    git("config", "remote.origin.uploadpack", str(slow), cwd=repo)
    new = commit_files(upstream, {"new.txt": "x\n"})

    job = submit_sync(daemon, project, repo_path=str(repo))
    wait_for(started.exists, what="the fetch to start")
    repo.rename(shared / "moved")
    repo.symlink_to(outside)
    go.touch()
    done = wait_terminal(daemon, job["id"])

    # the phase that had opened the repository finished in it; the next one refused the link
    assert done["status"] == "failed", done
    assert "outside the allowed roots" in done["error"] and str(outside) in done["error"]
    assert head(shared / "moved") == new
    assert (head(outside), git("reflog", cwd=outside),
            sorted(p.name for p in (outside / ".git").iterdir())) == outside_state


# -- a daemon killed during a checkout ------------------------------------------------------

def _git_processes(args: tuple[bytes, ...]) -> list[int]:
    """The pids of running git commands whose argv holds ``args`` in a row."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            argv = Path(entry.path, "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[:1] == [b"git"] and any(tuple(argv[i:i + len(args)]) == args
                                        for i in range(len(argv))):
            pids.append(int(entry.name))
    return pids


def _killed_during_a_checkout(d: Daemon, tmp_path: Path) -> tuple[dict[str, Any], Path,
                                                                  Path, str, str, int]:
    """A sync whose checkout of 300 new files the daemon's crash stopped halfway (its git
    killed with it), and the daemon started again: (job, upstream, repo, old revision,
    new revision, files in the new commit)."""
    upstream = make_upstream(tmp_path / "upstream")
    repo = clone(upstream, d.repos / "root" / "big")
    old = head(repo)
    many = [upstream / f"d{i // 100}" / f"f{i}.txt" for i in range(300)]
    for path in many:
        path.parent.mkdir(exist_ok=True)
        path.write_text(f"{path.name}\n")
    git("add", ".", cwd=upstream)
    git("commit", "-q", "-m", "many files", cwd=upstream)
    new = head(upstream)
    # the checkout writes each file slowly while `slow` exists (the repository's own filter)
    slow = tmp_path / "slow"
    slow.touch()
    git("config", "filter.slow.smudge", f"[ -e {slow} ] && sleep 0.05; cat", cwd=repo)
    (repo / ".git" / "info" / "attributes").write_text("*.txt filter=slow\n")
    job = submit_sync(d, "big")

    # crash the daemon, and kill its git, once the checkout has written some files
    wait_for((repo / "d0" / "f0.txt").exists, timeout=20, interval=0.002,
             what="the checkout to write files")
    pids = _git_processes((b"merge", b"--ff-only"))
    assert pids, "the checkout ended before it could be stopped"
    groups = {os.getpgid(pid) for pid in pids}
    for pgid in groups:
        os.killpg(pgid, signal.SIGSTOP)
    d.kill()
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError):  # its supervisor may have killed it
            os.killpg(pgid, signal.SIGKILL)
    slow.unlink()
    # the wedge: HEAD still old, the new files left untracked
    assert head(repo) == old
    status = git("status", "--porcelain", "--untracked-files=all", cwd=repo).splitlines()
    assert any(line.startswith("?? d") for line in status)
    assert len(status) < len(many)
    d.start()
    return job, upstream, repo, old, new, len(many)


def _later_syncs_work(d: Daemon, upstream: Path, repo: Path) -> None:
    """The repository is not wedged for the ff-only syncs after it."""
    newer = commit_files(upstream, {"d0/f0.txt": "changed\n", "late.txt": "late\n"})
    later = wait_terminal(d, submit_sync(d, "big")["id"], timeout=30)
    assert later["status"] == "completed", later
    assert head(repo) == newer


def test_a_daemon_killed_during_a_checkout_resumes_and_later_syncs_work(
        make_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    d = make_daemon()
    job, upstream, repo, _, new, _ = _killed_during_a_checkout(d, tmp_path)
    done = wait_terminal(d, job["id"], timeout=60)
    assert done["status"] == "completed", done
    assert done["attempts"] == 2 and done["result"]["new_revision"] == new
    # the restore said what it took away
    assert "a stopped checkout had written (d0/f0.txt" in joblog(d, job["id"])
    assert git("status", "--porcelain", "--untracked-files=all", cwd=repo) == ""
    _later_syncs_work(d, upstream, repo)


def test_a_checkout_a_crash_stopped_is_undone_when_the_sync_is_not_resumed(
        make_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    """SPEC §5: a git_sync that fails leaves the work tree at the old revision, also when
    the failure is the recovery's (max_recoveries reached): what the killed checkout
    wrote is taken away as the job fails, not left for the next sync to trip over."""
    d = make_daemon(config=FAST_CONFIG + "max_recoveries = 1\n")
    job, upstream, repo, old, _, _ = _killed_during_a_checkout(d, tmp_path)
    done = wait_terminal(d, job["id"], timeout=30)
    assert (done["status"], done["attempts"]) == ("failed", 1), done
    assert "max_recoveries = 1" in done["error"]
    assert head(repo) == old
    assert git("status", "--porcelain", "--untracked-files=all", cwd=repo) == ""
    assert not (repo / ".git" / "index.lock").exists()
    assert "a stopped checkout had written (d0/f0.txt" in joblog(d, job["id"])
    assert wait_terminal(d, result_of(d, "jobs.retry", job_id=job["id"])["id"],
                         timeout=30)["status"] == "completed"
    _later_syncs_work(d, upstream, repo)


def test_a_users_own_untracked_file_in_the_way_is_kept_and_named(
        daemon: Daemon, tmp_path: Path, project: str) -> None:
    upstream, repo = checkout(daemon, tmp_path, project)
    old = head(repo)
    commit_files(upstream, {"notes.txt": "upstream notes\n"})
    (repo / "notes.txt").write_text("my own notes\n")

    done = wait_terminal(daemon, submit_sync(daemon, project)["id"])

    assert done["status"] == "failed"
    assert done["error"] == (f"{repo} has untracked files that origin/main would overwrite: "
                             "notes.txt; move or remove them, then sync again")
    assert (repo / "notes.txt").read_text() == "my own notes\n" and head(repo) == old
    shutil.move(repo / "notes.txt", tmp_path / "notes.txt")
    assert wait_terminal(daemon, submit_sync(daemon, project)["id"])["status"] == "completed"
