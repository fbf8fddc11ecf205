"""The ``sync`` job type: fetch and merge a project's repository, then re-index it.

Phases (SPEC §5), with their share of the whole job's progress:

- ``init`` (0–5): the repository is where the rules allow and is a clean work tree;
  the remote is configured there; which branch, and the revision before the sync.
- ``git_sync`` (5–40): ``git fetch`` of the branch into ``refs/remotes/<remote>/``
  (git's own percentages drive the progress), a switch to the branch if another one is
  checked out, then the merge by strategy: ``ff-only``, ``merge`` or ``reset``. If
  anything fails, the job is cancelled or the daemon dies, the work tree is put back
  where it was, including the untracked files a stopped checkout had written (a user's
  own untracked file in the way is refused before git writes anything).
- ``indexing`` (40–95): the configured indexer (see ``index.py``).
- ``finalizing`` (95–100): the result.

Each finished phase saves a checkpoint with what the later ones need; a job resumed
after a restart skips the phases it finished (an interrupted indexing does not fetch
again), but the repository's location is checked again every time.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from jobd import errors
from jobd.handlers import (Aftermath, Cancelled, Handler, JobContext, JobFailed, git, index,
                           reject_unknown)
from jobd.models import Phase, readable

if TYPE_CHECKING:
    from jobd.config import Config

__all__ = ["PHASES", "STRATEGIES", "SyncHandler"]

#: each phase's share of the whole job's progress, in percent
PHASES: dict[str, tuple[float, float]] = {
    Phase.INIT: (0.0, 5.0),
    Phase.GIT_SYNC: (5.0, 40.0),
    Phase.INDEXING: (40.0, 95.0),
    Phase.FINALIZING: (95.0, 100.0),
}
#: how a fetched branch is brought into the work tree
STRATEGIES = ("ff-only", "merge", "reset")

_OPTIONS = ("branch", "remote", "full_reindex", "strategy", "repo_path", "url")
_MAX_URL = 4096
#: what follows ``.<name>`` in the folder a clone into ``<name>`` is made in
_CLONE_TEMP = re.compile(r"\.clone-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_FETCH_END = 35.0  # of git_sync's 5–40, the fetch takes 5–35; merge and diff the rest
# the stages git fetch reports, each 0–100%, as parts of the whole fetch
_FETCH_STAGES = (
    ("counting objects", 0.0, 0.05),
    ("compressing objects", 0.05, 0.15),
    ("receiving objects", 0.15, 0.9),
    ("resolving deltas", 0.9, 1.0),
)
_SHOWN_FILES = 10
#: the checkpoint saved as a sync begins to change the work tree (not a phase)
_WRITING = "git_sync.writing"
_CLEAN_BATCH = 500  # paths per `git clean` command line


class SyncHandler(Handler):
    """Bring a project's repository up to date with its remote, then re-index it."""

    name = "sync"
    resumable = True  # a checkpoint after each phase
    exclusive = True

    def validate(self, options: dict[str, Any], *, user_id: str, project_id: str | None,
                 trusted: bool, config: Config) -> dict[str, Any]:
        reject_unknown(options, _OPTIONS)
        index.check_indexer_ids(config, user_id=user_id, project_id=project_id)
        url = _check_url(options.get("url"), trusted)
        common, repo = index.validate_repository(options, type="sync", user_id=user_id,
                                                 project_id=project_id, trusted=trusted,
                                                 config=config, may_be_missing=url is not None)
        with repo if repo is not None else contextlib.nullcontext():
            branch = options.get("branch")
            if branch is not None and (problem := git.branch_problem(branch)):
                raise errors.InvalidParams(problem, field="options.branch")
            remote = options.get("remote")
            if remote is None:
                remote = config.sync.remote
            if problem := git.remote_problem(remote):
                raise errors.InvalidParams(problem, field="options.remote")
            strategy = options.get("strategy", "ff-only")
            if strategy not in STRATEGIES:
                raise errors.InvalidParams(
                    f"strategy must be one of {', '.join(STRATEGIES)}, not {strategy!r}",
                    field="options.strategy")
            # a repository that exists already must have the remote; one that does not
            # yet is checked when the job runs
            if repo is not None:
                try:
                    _require_remote(repo, remote)
                except JobFailed as e:
                    raise errors.InvalidParams(str(e), field="options.remote") from None
        return {"branch": branch, "remote": remote, "full_reindex": common["full_reindex"],
                "strategy": strategy, "repo_path": common["repo_path"],
                **({"url": url} if url is not None else {})}

    def run(self, ctx: JobContext) -> dict[str, Any]:
        index.check_ids(ctx)
        opts = ctx.job.options
        done = ctx.load_checkpoints()
        finished = [phase for phase in PHASES if phase in done]
        if finished:
            ctx.joblog.note(f"resuming after the finished phases {', '.join(finished)}")
        path = index.repository_path(ctx)
        if Phase.INIT not in done and opts.get("url") and not os.path.lexists(path):
            ctx.set_phase(Phase.INIT, f"cloning {opts['url']} into {path}")
            _clone(ctx, opts["url"], opts["remote"], path)
        init = _phase(ctx, done, Phase.INIT, f"checking {path}",
                      lambda repo: _init(ctx, repo, opts))
        pulled = _phase(ctx, done, Phase.GIT_SYNC,
                        f"fetching {init['branch']} from {init['remote']}",
                        lambda repo: _git_sync(ctx, repo, init, opts["strategy"],
                                               resumed=Phase.INIT in done,
                                               writing=done.get(_WRITING)))
        indexed = _phase(ctx, done, Phase.INDEXING, f"indexing {path}",
                         lambda repo: {"index": index.index_repository(
                             ctx, repo, full=bool(opts.get("full_reindex")),
                             low=PHASES[Phase.INDEXING][0], high=PHASES[Phase.INDEXING][1])})

        ctx.set_phase(Phase.FINALIZING, "writing the summary")
        started = time.monotonic()
        summary = indexed["index"]
        result = {
            "old_revision": init["old_revision"],
            "new_revision": pulled["new_revision"],
            "commits_pulled": pulled["commits_pulled"],
            "files_added": pulled["files_added"],
            "files_modified": pulled["files_modified"],
            "files_deleted": pulled["files_deleted"],
            "files_indexed": summary.get("files_indexed"),
            "index": summary,
            "seconds": {
                "init": init["seconds"],
                "git_sync": pulled["seconds"],
                "indexing": indexed["seconds"],
                "finalizing": round(time.monotonic() - started, 3),
            },
        }
        ctx.set_progress(100.0, f"synced {init['branch']}: "
                                f"{_plural(pulled['commits_pulled'], 'commit')} pulled")
        return result


    def abandon(self, ctx: Aftermath, checkpoints: dict[str, dict[str, Any]]) -> None:
        """A crash stopped its ``git_sync`` and it will not resume: put the work tree back
        at the old revision as the attempt would have (SPEC §5), the stopped git's locks
        and what a half-done checkout wrote included."""
        init, writing = checkpoints.get(Phase.INIT), checkpoints.get(_WRITING) or {}
        if init is None or Phase.GIT_SYNC in checkpoints:
            return  # it had not begun to sync, or the merge was done
        with index.repository(ctx) as repo:
            _restore(ctx, repo, init, git_was_stopped=True,
                     incoming=writing.get("incoming", []))


def _phase(ctx: JobContext, done: dict[str, dict[str, Any]], phase: str, message: str,
           work: Callable[[git.Repository], dict[str, Any]]) -> dict[str, Any]:
    """Run one phase unless an earlier attempt finished it; checkpoint what it returns.

    The repository is located, checked and opened afresh for each phase, and the phase's
    git commands all run in the folder so opened (SPEC §3a).
    """
    end = PHASES[phase][1]
    if phase in done:
        ctx.set_progress(end)
        return done[phase]
    if ctx.cancelled:
        raise Cancelled(f"cancelled before {phase}")
    ctx.set_phase(phase, message)
    started = time.monotonic()
    with index.repository(ctx) as repo:
        data = work(repo)
    data["seconds"] = round(time.monotonic() - started, 3)
    ctx.save_checkpoint(phase, data)
    ctx.set_progress(end)
    return data


def _init(ctx: JobContext, repo: git.Repository, opts: dict[str, Any]) -> dict[str, Any]:
    remote = opts["remote"]
    _require_remote(repo, remote)
    if git.revision(repo, "MERGE_HEAD"):
        raise JobFailed(f"a merge is in progress in {repo}; finish it or run "
                        "`git merge --abort` there, then sync again")
    old_branch = _current_branch(repo)
    branch = opts.get("branch") or old_branch
    if branch is None:
        raise JobFailed(f"{repo} has a detached HEAD; pass options.branch to say which "
                        "branch to sync")
    old_revision = git.revision(repo)
    # a failed sync resets the work tree to where it was, which must not lose edits
    if opts["strategy"] != "reset" and old_revision is not None:
        if dirty := _uncommitted(repo):
            raise JobFailed(f"{repo} has uncommitted changes to {_names(dirty)}; commit or "
                            "discard them, or use strategy reset to overwrite them")
    return {"repo": str(repo), "remote": remote, "branch": branch, "old_branch": old_branch,
            "old_revision": old_revision}


def _git_sync(ctx: JobContext, repo: git.Repository, init: dict[str, Any], strategy: str, *,
              resumed: bool, writing: dict[str, Any] | None) -> dict[str, Any]:
    """Fetch and merge; whatever stops it leaves the work tree at the old revision.

    ``writing`` is the checkpoint an interrupted attempt saved as it began to change the
    work tree (its ``incoming`` revisions), None when none got that far.
    """
    incoming: list[str] = []  # filled as this attempt begins to change the work tree
    try:
        # an attempt interrupted by a crash may have left a merge, a moved HEAD or a
        # half-done checkout
        earlier = (writing or {}).get("incoming", [])
        _restore(ctx, repo, init, git_was_stopped=resumed, incoming=earlier)
        if earlier:
            ctx.save_checkpoint(_WRITING, {"incoming": []})  # that one is undone now
        if resumed:  # the repository may have been worked on while the daemon was down
            _refuse_changed_since_init(repo, init, strategy)
        return _fetch_and_merge(ctx, repo, init, strategy, incoming)
    except BaseException:
        _restore(ctx, repo, init, git_was_stopped=ctx.cancelled, incoming=incoming)
        raise


def _fetch_and_merge(ctx: JobContext, repo: git.Repository, init: dict[str, Any],
                     strategy: str, incoming: list[str]) -> dict[str, Any]:
    remote, branch, old = init["remote"], init["branch"], init["old_revision"]
    _require_remote(repo, remote)
    ref = f"refs/remotes/{remote}/{branch}"
    upstream = f"{remote}/{branch}"
    try:
        git.run_in_job(ctx, repo, "fetch", "--progress", "--no-recurse-submodules", "--",
                       remote, f"+refs/heads/{branch}:{ref}", on_progress=_fetch_progress(ctx))
    except JobFailed as e:
        raise JobFailed(f"fetching {branch} from {remote} failed: {e}") from None
    fetched = git.revision(repo, ref)
    if fetched is None:
        raise JobFailed(f"fetching {branch} from {remote} left no {ref}")
    if ctx.cancelled:
        raise Cancelled("cancelled after fetching")
    ctx.set_progress(_FETCH_END, f"merging {upstream} into {branch} ({strategy})")

    # first decide, by queries alone, what will change the work tree
    switch: tuple[str, ...] = ()
    head = git.revision(repo)
    if branch != init["old_branch"]:
        local = git.revision(repo, f"refs/heads/{branch}")
        switch = ("checkout", "-q", branch, "--") if local else (
            "checkout", "-q", "-b", branch, ref, "--")
        head = local or fetched
    step: tuple[str, ...] = ()
    if strategy == "reset":
        step = ("reset", "--hard", fetched, "--")
    elif strategy == "ff-only":
        if head is not None and not _is_ancestor(repo, head, fetched):
            if not _is_ancestor(repo, fetched, head):
                ahead = _count(repo, f"{fetched}..{head}")
                behind = _count(repo, f"{head}..{fetched}")
                raise JobFailed(
                    f"{branch} has diverged from {upstream} ({ahead} local and {behind} "
                    f"upstream commits not in the other); use strategy merge or reset")
            # only local commits are new: nothing to fast-forward
        else:
            step = ("merge", "--ff-only", "--", ref)
    else:
        step = ("merge", "--no-edit", "--", ref)

    if switch or step:
        revisions = list(dict.fromkeys(r for r in (head if switch else None, fetched) if r))
        _refuse_changed_since_init(repo, init, strategy)
        if strategy != "reset":
            _refuse_untracked_in_the_way(repo, old, revisions, upstream)
        # from here on a stopped git may leave files behind; the restore, in this attempt
        # or after a crash, takes away exactly those
        ctx.save_checkpoint(_WRITING, {"incoming": revisions})
        incoming.extend(revisions)
    if switch:
        git.run_in_job(ctx, repo, *switch)
    if step and strategy == "merge":
        _merge(ctx, repo, step, upstream, branch)
    elif step:
        git.run_in_job(ctx, repo, *step)

    # a cancel that arrived while git ran still undoes the sync: the phase is not over
    if ctx.cancelled:
        raise Cancelled("cancelled while merging")
    new = git.revision(repo)
    added, modified, deleted = _changes(repo, old, new)
    # what came from upstream: not a merge commit made here
    commits = 0 if new == old else _count(repo, f"{old}..{fetched}" if old else fetched)
    ctx.set_progress(PHASES[Phase.GIT_SYNC][1],
                     f"pulled {_plural(commits, 'commit')}: {len(added)} added, "
                     f"{len(modified)} modified, {len(deleted)} deleted")
    return {"new_revision": new, "commits_pulled": commits, "files_added": len(added),
            "files_modified": len(modified), "files_deleted": len(deleted)}


def _refuse_changed_since_init(repo: git.Repository, init: dict[str, Any],
                               strategy: str) -> None:
    """Before the sync first writes to the work tree: refuse if someone moved its branch
    or HEAD, or (but for strategy reset) edited tracked files, since ``init`` looked (while
    the fetch ran, or while the daemon was down between two attempts). The restore after
    a failed write resets to ``init``'s revision, which would take that work away."""
    moved = []
    if (branch := _current_branch(repo)) != init["old_branch"]:
        moved.append(f"its branch is {branch or 'a detached HEAD'}, not {init['old_branch']}")
    if (head := git.revision(repo)) != init["old_revision"]:
        moved.append(f"HEAD is at {head}, not {init['old_revision']}")
    if strategy != "reset" and head is not None and (dirty := _uncommitted(repo)):
        moved.append(f"it has uncommitted changes to {_names(dirty)}")
    if moved:
        raise JobFailed(f"{repo} changed since this sync began ({'; '.join(moved)}); the sync "
                        "left it as it is: submit it again to sync from there")


def _uncommitted(repo: git.Repository) -> list[bytes]:
    """The tracked files whose work tree or index differs from HEAD."""
    return _split(git.run(repo, "diff", "--name-only", "-z", "HEAD", "--").stdout)


def _merge(ctx: JobContext, repo: git.Repository, step: tuple[str, ...], upstream: str,
           branch: str) -> None:
    """A real merge, whose conflicts are named file by file."""
    try:
        git.run_in_job(ctx, repo, *step, config=_identity(repo))
    except JobFailed as e:
        conflicts = _split(git.run(repo, "diff", "--name-only", "-z", "--diff-filter=U",
                                   check=False).stdout)
        if conflicts:
            raise JobFailed(f"merging {upstream} into {branch} conflicts in "
                            f"{_names(conflicts)}; resolve them in {repo} or use "
                            "strategy reset to take the upstream version") from None
        raise JobFailed(f"merging {upstream} into {branch} failed: {e}") from None


def _refuse_untracked_in_the_way(repo: git.Repository, old: str | None,
                                 revisions: list[str], upstream: str) -> None:
    """Fail before git writes anything if the user's own untracked files are in the way.

    git would refuse too, but only once it runs; checking first means that every untracked
    file at a path the incoming revisions add, found after the merge began, is git's.
    """
    in_way = _untracked_added(repo, old, revisions)
    if in_way:
        raise JobFailed(f"{repo} has untracked files that {upstream} would overwrite: "
                        f"{_names(in_way)}; move or remove them, then sync again")


def _untracked_added(repo: git.Repository, old: str | None, revisions: list[str]
                     ) -> list[bytes]:
    """Untracked (and not ignored) files at paths that ``revisions`` add to ``old``."""
    added: set[bytes] = set()
    for rev in revisions:
        added.update(_changes(repo, old, rev)[0])
    if not added:
        return []
    untracked = _split(git.run(repo, "ls-files", "-z", "--others", "--exclude-standard",
                               "--").stdout)
    return [p for p in untracked if p in added]


def _restore(ctx: JobContext | Aftermath, repo: git.Repository, init: dict[str, Any], *,
             git_was_stopped: bool, incoming: list[str]) -> None:
    """Put the work tree back on the branch and revision it had before the sync.

    Runs git directly rather than through the context: it must work while the job is
    being cancelled. Safe to repeat: it only changes what differs. ``git_was_stopped``:
    a git of this job may have been killed (cancel, or a crash of the daemon), so a
    lock it left is stale. ``incoming``: the revisions a checkout or merge had begun to
    write: their tracked files are reset and the untracked files they added are removed,
    so that a half-done checkout cannot block the next one. With none (empty), the sync
    had written nothing, and nothing but a stopped git's locks is touched.
    """
    old_branch, old = init["old_branch"], init["old_revision"]
    done: list[str] = []
    try:
        if git_was_stopped:
            # nothing else works on this repository while the job runs (one sync per
            # project), so the lock is the stopped git's; removed in the git dir as opened,
            # so a path swapped since the check cannot point the unlink elsewhere
            _, git_dir = git.open_git_dir(repo)
            try:
                stale = _remove_locks(git_dir)
            finally:
                os.close(git_dir)
            if stale:
                done.append(f"removed the {', '.join(stale)} left by the stopped git")
        # with no checkout or merge begun, what differs from where the sync began is
        # someone else's work, and stays (``_refuse_changed_since_init``)
        if incoming and old is not None:
            if git.revision(repo, "MERGE_HEAD"):
                git.run(repo, "merge", "--abort", check=False)
                done.append("aborted the merge")
            if _current_branch(repo) != old_branch:
                if old_branch is not None:
                    git.run(repo, "checkout", "-q", "-f", old_branch, "--")
                else:
                    git.run(repo, "checkout", "-q", "-f", "--detach", old, "--")
                done.append(f"checked out {old_branch or old} again")
            git.run(repo, "reset", "--hard", "-q", old, "--")
            done.append(f"reset to {old}")
            left = _untracked_added(repo, old, incoming)
            for batch in range(0, len(left), _CLEAN_BATCH):
                git.run(repo, "clean", "-f", "-q", "--",
                        *(":(literal)" + os.fsdecode(p)
                          for p in left[batch:batch + _CLEAN_BATCH]))
            if left:
                done.append(f"removed {_plural(len(left), 'file')} a stopped checkout had "
                            f"written ({_names(left)})")
    except (JobFailed, OSError) as e:
        ctx.log.error("sync_restore_failed", repo=str(repo), error=str(e))
        ctx.joblog.note(f"could not put {repo} back at {old}: {e}")
        return
    if done:
        ctx.joblog.note(f"work tree put back: {'; '.join(done)}")
        ctx.log.info("sync_work_tree_restored", repo=str(repo), revision=old)


def _remove_locks(git_dir: int) -> list[str]:
    """Remove the ``*.lock`` files a stopped git left in the git dir (the index, HEAD,
    ORIG_HEAD, refs and the rest), all relative to its open descriptor; their names."""
    removed = []
    for top, _, files, top_fd in os.fwalk(".", dir_fd=git_dir):
        if top.startswith(("./objects", "./modules", "./worktrees")):
            continue  # no lock of this job's there could block the sync
        for name in files:
            if name.endswith(".lock"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=top_fd)
                    removed.append(os.path.normpath(os.path.join(top, name)))
    return sorted(removed)


def _fetch_progress(ctx: JobContext, low: float = PHASES[Phase.GIT_SYNC][0],
                    high: float = _FETCH_END) -> Callable[[float | None, str | None], None]:
    """Map git fetch's (or clone's) per-stage percentages onto ``low``–``high`` of the job."""

    def report(percent: float | None, message: str | None) -> None:
        text = (message or "").lower()
        if percent is not None:
            for stage, start, end in _FETCH_STAGES:
                if stage in text:
                    share = start + (end - start) * percent / 100.0
                    ctx.set_progress(low + (high - low) * share, message)
                    return
        if message:
            ctx.set_message(message)
    return report


def _check_url(url: Any, trusted: bool) -> str | None:
    """``options.url``, where a missing repository is cloned from (admins and services)."""
    if url is None:
        return None
    if not trusted:
        raise errors.Forbidden("only admins and services may pass options.url; ask one to "
                               "clone the repository", field="options.url")
    if (not isinstance(url, str) or not url or len(url) > _MAX_URL
            or any(ord(c) < 32 or ord(c) == 127 for c in url)):
        raise errors.InvalidParams("url must be a repository URL git accepts (at most 4096 "
                                   "characters, no control characters)", field="options.url")
    if url.startswith("-"):
        raise errors.InvalidParams("url must not start with '-' (git would read it as an "
                                   "option)", field="options.url")
    # git's protocol config refuses it too (protocol.ext.allow=never); saying so at submit
    # spares a job that can only fail
    if url.lower().startswith("ext::"):
        raise errors.InvalidParams("url: the ext:: transport runs a program and is refused; "
                                   "give an https, ssh, git or file URL", field="options.url")
    return url


def _clone(ctx: JobContext, url: str, remote: str, path: Path) -> None:
    """Clone ``url`` to ``path`` (missing, under the allowed roots) with progress, its
    remote named ``remote`` (the one the sync then fetches from).

    git clones into a folder beside it, renamed into place once complete: a clone
    stopped by a cancel or a crash leaves no half-made repository (the next clone into
    the same place removes what a crashed one left). ``protocol.allow=user`` and
    ``protocol.ext.allow=never`` (git.argv) refuse ``ext::`` and other unsafe transports.
    """
    roots = ctx.config.allowed_roots
    # the configured root itself may not exist yet (a fresh state folder): it is the
    # daemon's own to make; below it, only what lies under a root is created
    for root in roots:
        if root in path.parents and not os.path.lexists(root):
            root.mkdir(parents=True, exist_ok=True)
    existing = path.parent
    while not existing.exists():
        existing = existing.parent
    existing = Path(os.path.realpath(existing))
    if not any(existing == root or root in existing.parents for root in roots):
        raise JobFailed(f"cannot clone into {path}: its deepest existing folder {existing} is "
                        f"outside the allowed roots ({', '.join(map(str, roots))})")
    path.parent.mkdir(parents=True, exist_ok=True)
    # what crashed clones into the same place left, this job's or another's that never
    # ran again: no other clone of it runs now (a sync is exclusive on its repository)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.clone-*"):
        if _CLONE_TEMP.fullmatch(stale.name[len(path.name) + 1:]):
            shutil.rmtree(stale, ignore_errors=True)
            ctx.joblog.note(f"removed {stale}, what an interrupted clone left")
    temp = path.with_name(f".{path.name}.clone-{ctx.job.id}")
    try:
        git.run_in_job(ctx, None, "clone", "--progress", "--origin", remote, "--", url,
                       str(temp), cwd=str(path.parent),
                       on_progress=_fetch_progress(ctx, *PHASES[Phase.INIT]))
        os.rename(temp, path)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    ctx.joblog.note(f"cloned {url} into {path}")


def _require_remote(repo: git.Repository, remote: str) -> None:
    configured = git.remotes(repo)
    if remote not in configured:
        raise JobFailed(
            f"remote {remote!r} is not configured in {repo} (configured: "
            f"{', '.join(configured) or 'none'}); add it with `git remote add` or pass "
            "options.remote")


def _current_branch(repo: git.Repository) -> str | None:
    name = git.run(repo, "symbolic-ref", "-q", "--short", "HEAD", check=False).stdout.strip()
    try:
        return name.decode("utf-8") or None
    except UnicodeDecodeError:
        # it would be stored with the job and shown in its messages
        raise JobFailed(f"the branch checked out in {repo}, {readable(name)}, is not "
                        "named in UTF-8; check out another one or pass options.branch"
                        ) from None


def _is_ancestor(repo: git.Repository, older: str, newer: str) -> bool:
    done = git.run(repo, "merge-base", "--is-ancestor", older, newer, check=False)
    if done.returncode not in (0, 1):
        raise git.GitError(f"git merge-base in {repo} exited with status {done.returncode}: "
                           f"{git.error_line(done.stderr)}")
    return done.returncode == 0


def _count(repo: git.Repository, revisions: str) -> int:
    return int(git.output(repo, "rev-list", "--count", revisions, "--"))


def _changes(repo: git.Repository, old: str | None, new: str | None
             ) -> tuple[list[bytes], list[bytes], list[bytes]]:
    """(added, modified, deleted) paths between two revisions."""
    if new is None or old == new:
        return [], [], []
    if old is None:
        tree = git.run(repo, "ls-tree", "-r", "-z", "--name-only", new, "--").stdout
        return _split(tree), [], []
    fields = _split(git.run(repo, "diff", "--name-status", "-z", "--no-renames", old, new,
                            "--").stdout)
    added: list[bytes] = []
    modified: list[bytes] = []
    deleted: list[bytes] = []
    for status, path in zip(fields[::2], fields[1::2]):
        {b"A": added, b"D": deleted}.get(status[:1], modified).append(path)
    return added, modified, deleted


def _identity(repo: git.Repository) -> list[str]:
    """Fallback committer settings for a merge commit, for whatever the repository lacks."""
    return [f"{key}={value}" for key, value in (("user.name", "jobd"),
                                                ("user.email", "jobd@localhost"))
            if git.run(repo, "config", "--get", key, check=False).returncode != 0]


def _split(data: bytes) -> list[bytes]:
    """git's NUL-separated paths, as the bytes they are (a name need not be UTF-8)."""
    return [p for p in data.split(b"\0") if p]


def _names(paths: list[bytes]) -> str:
    shown = ", ".join(readable(p) for p in paths[:_SHOWN_FILES])
    more = len(paths) - _SHOWN_FILES
    return f"{shown} and {more} more" if more > 0 else shown


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"
