"""The job types: sync, index (with builtin:manifest), command, noop, and the registry.

Real git repositories in tmp_path (an upstream and a clone under the allowed root),
real subprocesses through ``jobd.process`` (see ``handler_context.py``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import structlog.testing

from jobd import errors
from jobd.config import Config, Sync
from jobd.handlers import Cancelled, Handler, JobFailed, load_handlers
from jobd.handlers.command import CommandHandler
from jobd.handlers.index import IndexHandler
from jobd.handlers.manifest import manifest_path
from jobd.handlers.noop import NoopHandler
from jobd.handlers.sync import PHASES, SyncHandler

from handler_context import Context, make_job

_GIT_ENV = {**os.environ, "GIT_AUTHOR_NAME": "Test", "GIT_AUTHOR_EMAIL": "test@example.invalid",
            "GIT_COMMITTER_NAME": "Test", "GIT_COMMITTER_EMAIL": "test@example.invalid",
            "GIT_CONFIG_NOSYSTEM": "1"}


def git(cwd: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, env=_GIT_ENV, capture_output=True,
                          text=True, check=True)
    return done.stdout.strip()


def commit(repo: Path, message: str, *, write: dict[str, str] | None = None,
           delete: tuple[str, ...] = ()) -> str:
    for name, text in (write or {}).items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(text)
        git(repo, "add", "--", name)
    for name in delete:
        git(repo, "rm", "-q", "--", name)
    git(repo, "commit", "-q", "-m", message)
    return head(repo)


def head(repo: Path) -> str:
    return git(repo, "rev-parse", "HEAD")


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return Config(socket=tmp_path / "jobd.sock", db=tmp_path / "state" / "jobd.db")


@pytest.fixture
def upstream(tmp_path: Path) -> Path:
    repo = tmp_path / "upstream"
    git(tmp_path, "init", "-q", "-b", "main", str(repo))
    commit(repo, "first", write={"a.txt": "alpha\n", "b.txt": "beta\nbeta\n",
                                 "d.txt": "doomed\n", "sub/c.txt": "gamma"})
    return repo


@pytest.fixture
def clone(config: Config, upstream: Path) -> Path:
    path = config.state_dir / "repos" / "alice" / "proj"
    path.parent.mkdir(parents=True)
    git(upstream.parent, "clone", "-q", str(upstream), str(path))
    return path


def run_sync(config: Config, options: dict[str, Any] | None = None, *, trusted: bool = False,
             project_id: str = "proj", **context: Any) -> tuple[dict[str, Any], Context]:
    handler = SyncHandler()
    opts = handler.validate(options or {}, user_id="alice", project_id=project_id,
                            trusted=trusted, config=config)
    ctx = Context(make_job("sync", opts, project_id=project_id), config, **context)
    return handler.run(ctx), ctx


def manifest(config: Config, project_id: str = "proj") -> dict[str, Any]:
    data = json.loads(manifest_path(config, "alice", project_id).read_text())
    return data["files"]


def invalid(handler: Handler, options: dict[str, Any], config: Config, *,
            trusted: bool = False, project_id: str | None = "proj") -> errors.InvalidParams:
    with pytest.raises(errors.InvalidParams) as info:
        handler.validate(options, user_id="alice", project_id=project_id, trusted=trusted,
                         config=config)
    return info.value


# ------------------------------------------------------------------------------- sync

def test_sync_pulls_changes_and_indexes_them(config: Config, upstream: Path,
                                             clone: Path) -> None:
    old = head(clone)
    commit(upstream, "add and change", write={"new.txt": "one\ntwo\nthree", "a.txt": "ALPHA\n"})
    new = commit(upstream, "delete", delete=("d.txt",))

    result, ctx = run_sync(config)

    assert head(clone) == new
    assert (clone / "new.txt").read_text() == "one\ntwo\nthree"
    assert not (clone / "d.txt").exists()
    assert result["old_revision"] == old and result["new_revision"] == new
    assert (result["commits_pulled"], result["files_added"], result["files_modified"],
            result["files_deleted"]) == (2, 1, 1, 1)
    assert result["files_indexed"] == 4
    assert result["index"] == {"files_indexed": 4, "added": 4, "changed": 0, "removed": 0,
                               "rehashed": 4}
    assert set(result["seconds"]) == {"init", "git_sync", "indexing", "finalizing"}

    files = manifest(config)
    assert set(files) == {"a.txt", "b.txt", "new.txt", "sub/c.txt"}
    assert files["new.txt"]["lines"] == 3 and files["new.txt"]["size"] == 13
    assert files["b.txt"]["lines"] == 2
    assert files["a.txt"]["sha256"] == hashlib.sha256(b"ALPHA\n").hexdigest()
    # the manifest lives under the state directory, never in the repository
    assert manifest_path(config, "alice", "proj") == (
        config.state_dir / "manifests" / "alice" / "proj.json")
    assert git(clone, "status", "--porcelain", "--ignored") == ""


def test_second_sync_rehashes_only_what_changed(config: Config, upstream: Path,
                                                clone: Path) -> None:
    run_sync(config)
    commit(upstream, "change b, drop d, add e",
           write={"b.txt": "beta changed\n", "e.txt": "epsilon\n"}, delete=("d.txt",))

    result, _ = run_sync(config)

    assert result["index"] == {"files_indexed": 4, "added": 1, "changed": 1, "removed": 1,
                               "rehashed": 2}
    assert manifest(config)["b.txt"]["sha256"] == hashlib.sha256(b"beta changed\n").hexdigest()
    # nothing new upstream: nothing pulled, nothing hashed again
    result, _ = run_sync(config)
    assert result["commits_pulled"] == 0 and result["old_revision"] == result["new_revision"]
    assert result["index"]["rehashed"] == 0 and result["index"]["changed"] == 0


def test_full_reindex_rehashes_every_file(config: Config, upstream: Path, clone: Path) -> None:
    run_sync(config)
    result, _ = run_sync(config, {"full_reindex": True})
    assert result["index"]["rehashed"] == result["files_indexed"] == 4
    assert result["index"]["changed"] == 0


def test_progress_rises_through_the_phases(config: Config, upstream: Path,
                                           clone: Path) -> None:
    commit(upstream, "more", write={f"f{i}.txt": f"{i}\n" * i for i in range(40)})

    _, ctx = run_sync(config)

    assert ctx.phases == ["init", "git_sync", "indexing", "finalizing"]
    # the writing checkpoint marks where a stopped checkout must be undone from
    assert ctx.saved == ["init", "git_sync.writing", "git_sync", "indexing"]
    reported = [(r.phase, r.percent) for r in ctx.reports if r.percent is not None]
    for phase, percent in reported:
        low, high = PHASES[phase]
        assert low <= percent <= high, (phase, percent)
    percents = [p for _, p in reported]
    assert percents == sorted(percents)
    assert percents[-1] == 100.0
    # git's own percentages moved the progress inside the fetch's share
    assert any(5.0 < p < 35.0 for p in percents)
    assert "Counting objects" in ctx.log_text()


def test_sync_switches_to_the_requested_branch(config: Config, upstream: Path,
                                               clone: Path) -> None:
    git(upstream, "checkout", "-q", "-b", "feature")
    tip = commit(upstream, "feature work", write={"feature.txt": "f\n"})
    git(upstream, "checkout", "-q", "main")

    result, _ = run_sync(config, {"branch": "feature"})

    assert git(clone, "symbolic-ref", "--short", "HEAD") == "feature"
    assert head(clone) == tip == result["new_revision"]
    assert result["files_added"] == 1


def test_ff_only_refuses_a_diverged_branch(config: Config, upstream: Path, clone: Path) -> None:
    commit(upstream, "upstream change", write={"a.txt": "upstream\n"})
    local = commit(clone, "local change", write={"local.txt": "mine\n"})

    with pytest.raises(JobFailed, match=r"diverged .*use strategy merge or reset"):
        run_sync(config)
    assert head(clone) == local


def test_merge_strategy_merges_a_diverged_branch(config: Config, upstream: Path,
                                                 clone: Path) -> None:
    theirs = commit(upstream, "upstream change", write={"a.txt": "upstream\n"})
    local = commit(clone, "local change", write={"local.txt": "mine\n"})

    result, _ = run_sync(config, {"strategy": "merge"})

    merged = head(clone)
    assert result["new_revision"] == merged
    assert git(clone, "rev-parse", "HEAD^1", "HEAD^2").split() == [local, theirs]
    assert (clone / "a.txt").read_text() == "upstream\n"
    assert result["files_modified"] == 1
    assert result["commits_pulled"] == 1  # upstream's one, not the merge made here


def test_merge_conflict_fails_and_leaves_the_old_revision(config: Config, upstream: Path,
                                                          clone: Path) -> None:
    commit(upstream, "theirs", write={"a.txt": "upstream version\n"})
    local = commit(clone, "ours", write={"a.txt": "local version\n"})

    with pytest.raises(JobFailed, match=r"conflicts in a\.txt"):
        run_sync(config, {"strategy": "merge"})

    assert head(clone) == local
    assert (clone / "a.txt").read_text() == "local version\n"
    assert not (clone / ".git" / "MERGE_HEAD").exists()
    assert git(clone, "status", "--porcelain") == ""


def test_reset_strategy_takes_upstream(config: Config, upstream: Path, clone: Path) -> None:
    theirs = commit(upstream, "theirs", write={"a.txt": "upstream version\n"})
    commit(clone, "ours", write={"a.txt": "local version\n"})
    (clone / "b.txt").write_text("uncommitted edit\n")

    result, _ = run_sync(config, {"strategy": "reset"})

    assert head(clone) == theirs == result["new_revision"]
    assert (clone / "b.txt").read_text() == "beta\nbeta\n"


def test_uncommitted_changes_stop_a_merging_sync(config: Config, upstream: Path,
                                                 clone: Path) -> None:
    commit(upstream, "theirs", write={"e.txt": "e\n"})
    (clone / "b.txt").write_text("uncommitted edit\n")
    with pytest.raises(JobFailed, match=r"uncommitted changes to b\.txt"):
        run_sync(config)
    assert (clone / "b.txt").read_text() == "uncommitted edit\n"


def test_cancel_during_git_sync_leaves_the_old_revision(config: Config, upstream: Path,
                                                        clone: Path) -> None:
    old = head(clone)
    git(upstream, "checkout", "-q", "-b", "feature")
    commit(upstream, "feature work", write={"a.txt": "feature version\n"})

    # cancelled when the merge starts, after the switch to the new branch
    with pytest.raises(Cancelled):
        run_sync(config, {"branch": "feature"}, cancel_when=lambda argv: "merge" in argv)

    assert git(clone, "symbolic-ref", "--short", "HEAD") == "main"
    assert head(clone) == old
    assert (clone / "a.txt").read_text() == "alpha\n"


def test_cancel_removes_the_lock_a_stopped_git_left(config: Config, upstream: Path,
                                                    clone: Path) -> None:
    old = head(clone)
    commit(upstream, "theirs", write={"a.txt": "upstream version\n"})
    lock = clone / ".git" / "index.lock"

    def killed_midway(argv: list[str]) -> bool:
        if "merge" in argv:
            lock.touch()  # what a git killed while writing the index leaves
        return "merge" in argv

    with pytest.raises((Cancelled, JobFailed)):
        run_sync(config, cancel_when=killed_midway)
    assert not lock.exists()
    assert head(clone) == old and git(clone, "status", "--porcelain") == ""
    # the repository works again: the next sync goes through
    run_sync(config)
    assert (clone / "a.txt").read_text() == "upstream version\n"


def test_missing_remote_is_refused(config: Config, upstream: Path, clone: Path) -> None:
    error = invalid(SyncHandler(), {"remote": "backup"}, config)
    assert error.field == "options.remote" and "not configured" in error.message

    # removed between submit and run: the job fails in init, before any fetch
    opts = SyncHandler().validate({}, user_id="alice", project_id="proj", trusted=False,
                                  config=config)
    git(clone, "remote", "rename", "origin", "elsewhere")
    ctx = Context(make_job("sync", opts), config)
    with pytest.raises(JobFailed, match=r"remote 'origin' is not configured .*elsewhere"):
        SyncHandler().run(ctx)
    assert not ctx.ran("fetch")


def test_bad_branch_names_are_refused(config: Config, tmp_path: Path, clone: Path) -> None:
    for branch in ("a..b", "HEAD", "-x", "with space", "@{-1}", "", 7):
        assert invalid(SyncHandler(), {"branch": branch}, config).field == "options.branch"
    pwned = tmp_path / "pwned"
    error = invalid(SyncHandler(), {"branch": f"--upload-pack=touch {pwned}"}, config)
    assert error.field == "options.branch"
    assert not pwned.exists()


def test_a_branch_missing_upstream_fails_without_changes(config: Config, clone: Path) -> None:
    old = head(clone)
    with pytest.raises(JobFailed, match=r"fetching nope from origin failed"):
        run_sync(config, {"branch": "nope"})
    assert head(clone) == old
    assert git(clone, "symbolic-ref", "--short", "HEAD") == "main"


def test_not_a_git_repository(config: Config) -> None:
    plain = config.state_dir / "repos" / "alice" / "plain"
    plain.mkdir(parents=True)
    (plain / "file.txt").write_text("x")
    assert invalid(SyncHandler(), {}, config, project_id="plain").field == "project_id"

    ctx = Context(make_job("sync", {"remote": "origin", "strategy": "ff-only", "branch": None,
                                    "full_reindex": False}, project_id="plain"), config)
    with pytest.raises(JobFailed, match="not a git work tree"):
        SyncHandler().run(ctx)

    # not there yet: accepted at submit, fails clearly when it runs
    opts = SyncHandler().validate({}, user_id="alice", project_id="later", trusted=False,
                                  config=config)
    with pytest.raises(JobFailed, match="does not exist; clone it"):
        SyncHandler().run(Context(make_job("sync", opts, project_id="later"), config))


def test_a_path_is_never_taken_as_a_remote(config: Config, upstream: Path, clone: Path) -> None:
    for remote in (str(upstream), "../upstream", "./x", "file:///tmp/x", "-x", "a b"):
        assert invalid(SyncHandler(), {"remote": remote}, config).field == "options.remote"
    # a name that could be a path, given to a project not cloned yet, is still only a name
    assert invalid(SyncHandler(), {"remote": str(upstream)}, config,
                   project_id="later").field == "options.remote"

    # even if such options reach the runner, git never fetches from the path
    old = head(clone)
    commit(upstream, "theirs", write={"z.txt": "z\n"})
    (clone.parent / "upstream").symlink_to(upstream)
    ctx = Context(make_job("sync", {"remote": "../upstream", "branch": "main",
                                    "strategy": "ff-only", "full_reindex": False}), config)
    with pytest.raises(JobFailed, match="not configured"):
        SyncHandler().run(ctx)
    assert head(clone) == old and not ctx.ran("fetch")


def test_repo_path_rules(config: Config, tmp_path: Path, upstream: Path, clone: Path) -> None:
    handler = SyncHandler()
    # not for ordinary users
    error = invalid(handler, {"repo_path": str(clone)}, config, trusted=False)
    assert error.field == "options.repo_path" and "admins and services" in error.message
    # trusted, under the allowed root: accepted and stored as its real path
    opts = handler.validate({"repo_path": str(clone) + "/"}, user_id="alice",
                            project_id="proj", trusted=True, config=config)
    assert opts["repo_path"] == str(clone)
    # outside the allowed roots
    error = invalid(handler, {"repo_path": str(upstream)}, config, trusted=True)
    assert error.field == "options.repo_path" and "outside the allowed roots" in error.message
    # inside the root by name, outside through a symbolic link
    link = config.state_dir / "repos" / "alice" / "sneaky"
    link.symlink_to(upstream)
    error = invalid(handler, {"repo_path": str(link)}, config, trusted=True)
    assert "outside the allowed roots" in error.message and str(upstream) in error.message
    # the same link reached through the template
    assert invalid(handler, {}, config, project_id="sneaky").field == "project_id"
    # relative, or not a repository
    assert invalid(handler, {"repo_path": "repos/x"}, config,
                   trusted=True).field == "options.repo_path"
    (config.state_dir / "repos" / "empty").mkdir()
    assert invalid(handler, {"repo_path": str(config.state_dir / "repos" / "empty")}, config,
                   trusted=True).field == "options.repo_path"


def test_repository_is_checked_again_when_the_job_runs(config: Config, upstream: Path,
                                                       clone: Path) -> None:
    opts = SyncHandler().validate({}, user_id="alice", project_id="proj", trusted=False,
                                  config=config)
    # between submit and run the project's directory is swapped for a link outside
    clone.rename(clone.with_name("moved"))
    clone.symlink_to(upstream)
    ctx = Context(make_job("sync", opts), config)
    with pytest.raises(JobFailed, match="outside the allowed roots"):
        SyncHandler().run(ctx)
    assert ctx.argvs == []


def test_unknown_options_are_named(config: Config, clone: Path) -> None:
    assert invalid(SyncHandler(), {"brnach": "main"}, config).field == "options.brnach"
    assert invalid(IndexHandler(), {"branch": "main"}, config).field == "options.branch"
    assert invalid(SyncHandler(), {"strategy": "rebase"}, config).field == "options.strategy"
    assert invalid(SyncHandler(), {"full_reindex": "yes"},
                   config).field == "options.full_reindex"
    assert invalid(SyncHandler(), {}, config, project_id=None).field == "project_id"
    assert SyncHandler().validate({}, user_id="alice", project_id="proj", trusted=False,
                                  config=config) == {
        "branch": None, "remote": "origin", "full_reindex": False, "strategy": "ff-only",
        "repo_path": os.path.realpath(clone)}


def test_resume_after_git_sync_does_not_fetch_again(config: Config, upstream: Path,
                                                    clone: Path) -> None:
    commit(upstream, "change", write={"a.txt": "ALPHA\n"})
    first, ctx = run_sync(config)
    finished = {p: ctx.checkpoints[p] for p in ("init", "git_sync")}
    pulled = head(clone)
    manifest_path(config, "alice", "proj").unlink()
    commit(upstream, "later", write={"late.txt": "late\n"})

    # as if the daemon crashed during indexing: init and git_sync are checkpointed
    resumed = Context(make_job("sync", ctx.job.options), config, checkpoints=finished)
    result = SyncHandler().run(resumed)

    assert not resumed.ran("fetch") and not resumed.ran("merge")
    assert resumed.phases == ["indexing", "finalizing"]
    assert head(clone) == pulled == result["new_revision"]
    assert result["commits_pulled"] == first["commits_pulled"] == 1
    assert result["files_indexed"] == 4 and manifest_path(config, "alice", "proj").exists()
    percents = [r.percent for r in resumed.reports if r.percent is not None]
    assert percents == sorted(percents) and percents[-1] == 100.0
    assert min(r.percent for r in resumed.reports
               if r.percent is not None and r.phase == "indexing") >= 40.0


def test_resume_after_init_starts_from_the_recorded_revision(config: Config, upstream: Path,
                                                             clone: Path) -> None:
    old = head(clone)
    commit(upstream, "change", write={"a.txt": "ALPHA\n"})
    _, first = run_sync(config)
    # as if the daemon crashed after merging but before git_sync's checkpoint: the merge
    # had said what it began to write
    resumed = Context(make_job("sync", first.job.options), config,
                      checkpoints={"init": first.checkpoints["init"],
                                   "git_sync.writing": first.checkpoints["git_sync.writing"]})
    result = SyncHandler().run(resumed)
    assert result["old_revision"] == old
    assert result["commits_pulled"] == 1 and result["files_modified"] == 1
    assert resumed.phases == ["git_sync", "indexing", "finalizing"]


@pytest.mark.parametrize("meanwhile", ["commit", "edit"])
def test_a_resumed_sync_keeps_work_done_while_it_was_down_and_fails_saying_so(
        config: Config, upstream: Path, clone: Path, meanwhile: str) -> None:
    old = head(clone)
    commit(upstream, "change", write={"a.txt": "ALPHA\n"})
    _, first = run_sync(config)
    # as if the daemon died during the first attempt's fetch (init checkpointed, nothing
    # written yet), and the user worked on the repository before it came back
    git(clone, "reset", "-q", "--hard", old)
    if meanwhile == "commit":
        mine = commit(clone, "mine", write={"mine.txt": "mine\n"})
    else:
        (clone / "a.txt").write_text("my edit\n")
        mine = old
    resumed = Context(make_job("sync", first.job.options), config,
                      checkpoints={"init": first.checkpoints["init"]})
    with pytest.raises(JobFailed, match="changed since this sync began"):
        SyncHandler().run(resumed)
    assert head(clone) == mine
    if meanwhile == "edit":
        assert (clone / "a.txt").read_text() == "my edit\n"


# ---------------------------------------------------------------------------- manifest

def test_manifest_never_follows_symbolic_links(config: Config, tmp_path: Path,
                                               upstream: Path, clone: Path) -> None:
    os.symlink("/etc/passwd", upstream / "passwd")
    os.symlink("/etc", upstream / "etc")
    git(upstream, "add", "passwd", "etc")
    git(upstream, "commit", "-q", "-m", "links")
    run_sync(config)

    files = manifest(config)
    assert files["passwd"] == {"type": "link", "target": "/etc/passwd"}
    assert files["etc"] == {"type": "link", "target": "/etc"}

    # a tracked directory replaced in the work tree by a link to a secret: not read
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "c.txt").write_text("top secret\n")
    for p in (clone / "sub").iterdir():
        p.unlink()
    (clone / "sub").rmdir()
    (clone / "sub").symlink_to(secret)
    opts = IndexHandler().validate({}, user_id="alice", project_id="proj", trusted=False,
                                   config=config)
    result = IndexHandler().run(Context(make_job("index", opts), config))
    files = manifest(config)
    assert "sub/c.txt" not in files
    assert result["index"]["removed"] == 1
    assert hashlib.sha256(b"top secret\n").hexdigest() not in manifest_path(
        config, "alice", "proj").read_text()


def test_manifest_is_replaced_atomically_and_kept_on_cancel(config: Config, upstream: Path,
                                                            clone: Path) -> None:
    run_sync(config)
    path = manifest_path(config, "alice", "proj")
    before = path.read_text()
    opts = IndexHandler().validate({"full_reindex": True}, user_id="alice", project_id="proj",
                                   trusted=False, config=config)
    ctx = Context(make_job("index", opts), config)
    ctx.stop.set()
    with pytest.raises(Cancelled):
        IndexHandler().run(ctx)
    assert path.read_text() == before
    assert [p.name for p in path.parent.iterdir()] == ["proj.json"]


def test_index_job_and_an_external_indexer(config: Config, tmp_path: Path,
                                           clone: Path) -> None:
    result = IndexHandler().run(Context(make_job("index", {"full_reindex": False}), config))
    assert result["files_indexed"] == 4 and result["revision"] == head(clone)

    record = tmp_path / "indexer-args.json"
    script = ("import json, os, sys\n"
              "json.dump(sys.argv[1:] + [os.environ.get('INDEX_KEY')],"
              f" open({str(record)!r}, 'w'))\n"
              "for i in range(1, 5): print(json.dumps({'current': i, 'total': 4, 'info': 'f'}),"
              " flush=True)\n")
    external = dataclasses.replace(config, sync=Sync(
        index_command=(sys.executable, "-c", script, "{repo}", "{user_id}", "{project_id}",
                       "--x={repo}"), index_env={"INDEX_KEY": "secret"}))
    ctx = Context(make_job("index", {"full_reindex": False}), external)
    result = IndexHandler().run(ctx)
    assert json.loads(record.read_text()) == [str(clone), "alice", "proj", f"--x={clone}",
                                              "secret"]
    percents = [r.percent for r in ctx.reports if r.phase == "indexing" and r.percent]
    assert percents == [23.75, 47.5, 71.25, 95.0]
    # the indexer's total is the files it indexed
    assert result["index"]["returncode"] == 0 and result["files_indexed"] == 4

    failing = dataclasses.replace(config, sync=Sync(
        index_command=(sys.executable, "-c", "import sys; print('no index'); sys.exit(3)")))
    with pytest.raises(JobFailed, match="exited with 3: no index"):
        IndexHandler().run(Context(make_job("index", {"full_reindex": False}), failing))


# ----------------------------------------------------------------------- command, noop

def test_command_validation(config: Config, tmp_path: Path) -> None:
    handler = CommandHandler()
    assert handler.roles == {"admin"} and not handler.resumable and not handler.exclusive
    for options, field in [
        ({}, "options.argv"), ({"argv": []}, "options.argv"), ({"argv": "ls -l"}, "options.argv"),
        ({"argv": ["ls", 3]}, "options.argv"), ({"argv": [""]}, "options.argv"),
        ({"argv": ["ls"], "cwd": "relative"}, "options.cwd"),
        ({"argv": ["ls"], "cwd": str(tmp_path / "missing")}, "options.cwd"),
        ({"argv": ["ls"], "env": {"A=B": "x"}}, "options.env"),
        ({"argv": ["ls"], "env": {"A": 1}}, "options.env"),
        ({"argv": ["ls"], "shell": True}, "options.shell"),
    ]:
        assert invalid(handler, options, config, project_id=None).field == field, options
    opts = {"argv": ["ls"], "cwd": str(tmp_path), "env": {"A": "b"}}
    assert handler.validate(opts, user_id="root", project_id=None, trusted=True,
                            config=config) == opts


def test_command_runs_with_progress_env_and_cwd(config: Config, tmp_path: Path) -> None:
    script = ("import json, os\n"
              "print(json.dumps({'progress': 50, 'message': os.environ['GREETING']}))\n"
              "open('here', 'w').close()\n")
    options = {"argv": [sys.executable, "-c", script], "cwd": str(tmp_path),
               "env": {"GREETING": "hello"}}
    ctx = Context(make_job("command", options, project_id=None), config)
    assert CommandHandler().run(ctx) == {"returncode": 0}
    assert (tmp_path / "here").exists()
    assert any(r.percent == 50 and r.message == "hello" for r in ctx.reports)

    failing = {"argv": [sys.executable, "-c", "import sys; sys.exit(4)"]}
    with pytest.raises(JobFailed, match="exited with 4"):
        CommandHandler().run(Context(make_job("command", failing, project_id=None), config))
    missing = {"argv": ["no-such-program-jobd-test"]}
    with pytest.raises(JobFailed, match="no-such-program-jobd-test"):
        CommandHandler().run(Context(make_job("command", missing, project_id=None), config))


def test_noop_validation(config: Config) -> None:
    handler = NoopHandler()
    assert handler.roles == {"admin"} and handler.resumable
    for seconds in (-1, 86401, "5", True, float("nan"), None):
        assert invalid(handler, {"seconds": seconds}, config).field == "options.seconds"
    assert invalid(handler, {"sleep": 1}, config).field == "options.sleep"
    assert handler.validate({}, user_id="root", project_id=None, trusted=True,
                            config=config) == {"seconds": 0}
    assert handler.validate({"seconds": 1.5}, user_id="root", project_id=None, trusted=True,
                            config=config) == {"seconds": 1.5}


def test_noop_is_cheap_sleeps_and_stops_on_cancel(config: Config) -> None:
    handler = NoopHandler()
    ctx = Context(make_job("noop", {"seconds": 0}, project_id=None), config)
    started = time.perf_counter()
    for _ in range(2000):
        assert handler.run(ctx) == {"slept_s": 0.0}
    assert time.perf_counter() - started < 0.5

    ctx = Context(make_job("noop", {"seconds": 0.2}, project_id=None), config)
    result = handler.run(ctx)
    assert 0.2 <= result["slept_s"] < 1.0 and ctx.progress == 100.0

    ctx = Context(make_job("noop", {"seconds": 30}, project_id=None), config)
    threading.Timer(0.1, ctx.stop.set).start()
    started = time.monotonic()
    with pytest.raises(Cancelled):
        handler.run(ctx)
    assert time.monotonic() - started < 1.0


# ---------------------------------------------------------------------------- registry

class _Plugin(Handler):
    name = "plugin-demo"


class _Impostor(Handler):
    name = "sync"


def test_load_handlers_adds_plugins_and_skips_broken_ones(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    dist = tmp_path / "site" / "jobd_demo_plugin-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: jobd-demo-plugin\n"
                                   "Version: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[jobd.handlers]\n"
        f"demo = {__name__}:_Plugin\n"
        "broken = jobd_no_such_module:Handler\n"
        f"impostor = {__name__}:_Impostor\n"
        "notahandler = os:getcwd\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))

    with structlog.testing.capture_logs() as logs:
        handlers = load_handlers()

    failed = {e["entry_point"] for e in logs if e["event"] == "handler_plugin_failed"}
    assert failed == {"broken", "notahandler"}
    assert [e["entry_point"] for e in logs if e["event"] == "handler_plugin_skipped"] == [
        "impostor"]
    assert set(handlers) == {"sync", "index", "command", "noop", "plugin-demo"}
    assert isinstance(handlers["sync"], SyncHandler)
    assert isinstance(handlers["plugin-demo"], _Plugin)
    assert handlers["sync"].exclusive and handlers["index"].exclusive
    assert not handlers["noop"].exclusive
