"""The ``index`` job type, and the indexing phase it shares with ``sync``.

Which repository a sync or index job acts on (options ``repo_path`` and
``full_reindex``, checked at submit and again when the job runs) and how the
configured indexer is run (``builtin:manifest``, or an argv with ``{repo}``,
``{user_id}`` and ``{project_id}`` filled in, reporting progress by SPEC §5's protocol)
live here; ``sync.py`` adds fetching and merging in front.

An external indexer runs with its working directory in the repository folder as
opened and checked (``git.Repository.cwd``), so a folder swapped after the check cannot
move it. ``{repo}`` is the checked path as text, for the indexer's own records (CIDX
stores it), not a way into the folder: an indexer that opens ``{repo}`` rather than its
working directory follows the path as it is then, which jobd's descriptor does not cover.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobd import errors
from jobd.auth import check_argv_ids
from jobd.handlers import (Aftermath, Handler, JobContext, JobFailed, git, manifest,
                           progress_between, reject_unknown)
from jobd.models import Phase
from jobd.progress import Passes

if TYPE_CHECKING:
    from jobd.config import Config

__all__ = ["IndexHandler", "index_repository", "repository", "validate_repository"]

#: the placeholders an index command's argv may contain
_PLACEHOLDER = re.compile(r"\{(repo|user_id|project_id)\}")


def validate_repository(options: dict[str, Any], *, type: str, user_id: str,
                        project_id: str | None, trusted: bool, config: Config,
                        may_be_missing: bool = False
                        ) -> tuple[dict[str, Any], git.Repository | None]:
    """Check ``project_id``, ``repo_path`` and ``full_reindex``: (normalised options, the
    repository opened and checked, or None when it does not exist yet).

    The caller closes the repository. A ``repo_path`` must already be a git work tree; a
    repository from the template may not exist yet (the job then fails when it runs
    unless it has been cloned by then). With ``may_be_missing`` (a sync that clones it),
    a ``repo_path`` need not exist yet either.
    """
    if project_id is None:
        raise errors.InvalidParams(
            f"project_id is required for {type} jobs, also with options.repo_path: it names "
            "the job's project, a repo_path only where its work tree is", field="project_id")
    out: dict[str, Any] = {}
    full = options.get("full_reindex", False)
    if not isinstance(full, bool):
        raise errors.InvalidParams("full_reindex must be true or false",
                                   field="options.full_reindex")
    out["full_reindex"] = full
    repo_path = options.get("repo_path")
    if repo_path is not None and not trusted:
        raise errors.InvalidParams(
            "only admins and services may pass repo_path; omit it to use the project's "
            "repository", field="options.repo_path")
    path = git.locate(config, user_id=user_id, project_id=project_id, repo_path=repo_path)
    # the resolved path is stored whoever names it: the key of exclusivity and dedupe
    out["repo_path"] = str(path)
    if (repo_path is None or may_be_missing) and not os.path.lexists(path):
        return out, None
    try:
        return out, git.open_repository(path)
    except JobFailed as e:
        raise errors.InvalidParams(str(e), field="options.repo_path" if repo_path is not None
                                   else "project_id") from None


def repository_path(ctx: JobContext | Aftermath) -> Path:
    """The job's repository as a real path under the allowed roots (not opened)."""
    job = ctx.job
    try:
        return git.locate(ctx.config, user_id=job.user_id, project_id=job.project_id,
                          repo_path=job.options.get("repo_path"))
    except errors.InvalidParams as e:
        raise JobFailed(e.message) from None


def repository(ctx: JobContext | Aftermath) -> git.Repository:
    """The job's repository, checked again as it runs and opened (the caller closes it):
    under the allowed roots, a work tree jobd owns."""
    return git.open_repository(repository_path(ctx))


def check_indexer_ids(config: Config, *, user_id: str, project_id: str | None) -> None:
    """Refuse ids that would begin an argument of either indexer command (SPEC §3a): a
    sync or index may run either one."""
    check_argv_ids((config.sync.index_command, config.sync.full_index_command),
                   user_id=user_id, project_id=project_id)


def check_ids(ctx: JobContext) -> None:
    """The job's ids checked again as it starts, before anything runs: a reload may have
    put one first in an argument of the indexer since the job was accepted (SPEC §3a)."""
    try:
        check_indexer_ids(ctx.config, user_id=ctx.job.user_id, project_id=ctx.job.project_id)
    except errors.InvalidParams as e:
        raise JobFailed(f"{e.message} (checked again as the job starts)") from None


def index_repository(ctx: JobContext, repo: git.Repository, *, full: bool, low: float,
                     high: float) -> dict[str, Any]:
    """Run the configured indexer over ``repo``; return its summary.

    The summary of ``builtin:manifest`` counts files; an external indexer's summary is
    its argv, exit status, the passes it made and the files it indexed (its last
    ``total``; its own output is in the job's log). It runs with ``index_env`` added to
    the environment, its progress spread over ``index_passes`` passes (SPEC §5).
    """
    sync = ctx.config.sync
    command = sync.full_index_command if full else sync.index_command
    if command == "builtin:manifest":
        return manifest.build(ctx, repo, full=full, low=low, high=high)
    if isinstance(command, str):
        raise JobFailed(f"index command {command!r} is not known; configure "
                        "\"builtin:manifest\" or an argv list")
    values = {"repo": str(repo.path), "user_id": ctx.job.user_id,
              "project_id": ctx.job.project_id or ""}
    argv = [_PLACEHOLDER.sub(lambda m: values[m.group(1)], arg) for arg in command]
    passes = Passes(progress_between(ctx, low, high), sync.index_passes)
    # run in the opened folder: its path may have been swapped since it was checked
    # ({repo} is that path, for the indexer's records; its cwd is the folder itself)
    ctx.run(argv, cwd=repo.cwd, env=dict(sync.index_env) or None, on_progress=passes)
    files = None if passes.total is None else int(passes.total)
    return {"command": argv, "returncode": 0, "files_indexed": files, "passes": passes.number}


class IndexHandler(Handler):
    """Re-index a project's repository without fetching (SPEC §5: the indexing phase alone)."""

    name = "index"
    resumable = True  # indexing again is safe
    exclusive = True

    def validate(self, options: dict[str, Any], *, user_id: str, project_id: str | None,
                 trusted: bool, config: Config) -> dict[str, Any]:
        reject_unknown(options, ("repo_path", "full_reindex"))
        check_indexer_ids(config, user_id=user_id, project_id=project_id)
        out, repo = validate_repository(options, type="index", user_id=user_id,
                                        project_id=project_id,
                                        trusted=trusted, config=config)
        if repo is not None:
            repo.close()
        return out

    def run(self, ctx: JobContext) -> dict[str, Any]:
        check_ids(ctx)
        with repository(ctx) as repo:
            return self._run(ctx, repo)

    def _run(self, ctx: JobContext, repo: git.Repository) -> dict[str, Any]:
        done = ctx.load_checkpoints().get(Phase.INDEXING)
        if done is None:
            ctx.set_phase(Phase.INDEXING, f"indexing {repo}")
            started = time.monotonic()
            summary = index_repository(ctx, repo, full=bool(ctx.job.options.get("full_reindex")),
                                       low=0.0, high=95.0)
            done = {"index": summary, "seconds": round(time.monotonic() - started, 3)}
            ctx.save_checkpoint(Phase.INDEXING, done)
        ctx.set_phase(Phase.FINALIZING, "writing the summary")
        started = time.monotonic()
        summary = done["index"]
        result = {
            "revision": git.revision(repo),
            "files_indexed": summary.get("files_indexed"),
            "index": summary,
            "seconds": {"indexing": done["seconds"],
                        "finalizing": round(time.monotonic() - started, 3)},
        }
        ctx.set_progress(100.0, f"indexed {repo}")
        return result

