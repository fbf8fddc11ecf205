"""Running git on a repository safely, and finding which repository a job may touch.

Every git command jobd runs is built by ``argv`` and gets ``ENV`` added to its
environment (SPEC §3a): hooks and fsmonitor off, the repository marked safe by its real
path, no terminal or password prompt. ``run`` executes such a command directly and is for
short local operations (queries, and putting a work tree back after a failed merge even
when the job is being cancelled); long operations go through the job context with the
same argv so that they are logged and cancellable.

``locate`` applies the path rules: the template (or a trusted ``repo_path``), resolved
with realpath, must lie under one of ``allowed_roots``.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from jobd import errors
from jobd.handlers import JobFailed

if TYPE_CHECKING:
    from jobd.config import Config

__all__ = ["ENV", "GitError", "argv", "branch_problem", "check_work_tree", "last_line",
           "locate", "output", "remote_problem", "remotes", "revision", "run"]

#: local git commands (queries, abort, reset) get this long before they count as hung
LOCAL_TIMEOUT = 300.0

_REMOTE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._/-]{0,99}$")


class GitError(JobFailed):
    """A git command failed; the message says which and why."""


#: added to the environment of every git command: no prompt for a password or a
#: passphrase (a job has no terminal), no editor, messages that do not depend on locale
ENV: dict[str, str] = {
    "GIT_TERMINAL_PROMPT": "0",
    "GIT_ASKPASS": "/bin/false",
    "SSH_ASKPASS": "/bin/false",
    "GIT_MERGE_AUTOEDIT": "no",
    "LC_ALL": "C",
}


def argv(repo: Path | None, *args: str, config: Sequence[str] = ()) -> list[str]:
    """``git -c core.hooksPath=/dev/null -c core.fsmonitor=false -c safe.directory=<repo> ...``.

    ``config`` adds more ``key=value`` settings for this one command.
    """
    out = ["git", "-c", "core.hooksPath=/dev/null", "-c", "core.fsmonitor=false",
           "-c", "color.ui=false"]
    if repo is not None:
        out += ["-c", f"safe.directory={repo}"]
    for item in config:
        out += ["-c", item]
    out.extend(args)
    return out


def run(repo: Path | None, *args: str, check: bool = True,
        timeout: float = LOCAL_TIMEOUT) -> subprocess.CompletedProcess[bytes]:
    """Run one short git command in ``repo`` (or in ``/`` when None) and wait for it."""
    cmd = argv(repo, *args)
    try:
        done = subprocess.run(cmd, cwd=str(repo) if repo is not None else "/",
                              env={**os.environ, **ENV}, stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise GitError(f"git {args[0]} in {repo} did not finish within {timeout:.0f}s") from None
    except OSError as e:
        raise GitError(f"cannot run git: {e.strerror}; is git installed and on PATH?") from None
    if check and done.returncode != 0:
        raise GitError(f"git {args[0]} in {repo} exited with {done.returncode}: "
                       f"{last_line(done.stderr or done.stdout)}")
    return done


def output(repo: Path | None, *args: str) -> str:
    """The stdout of a short git command, decoded and stripped."""
    return os.fsdecode(run(repo, *args).stdout).strip()


def revision(repo: Path, name: str = "HEAD") -> str | None:
    """The commit ``name`` points to, or None when there is none (an unborn branch)."""
    done = run(repo, "rev-parse", "-q", "--verify", "--end-of-options", f"{name}^{{commit}}",
               check=False)
    return os.fsdecode(done.stdout).strip() or None


def last_line(data: bytes) -> str:
    """The last non-empty line of some output (git's error is usually there)."""
    lines = [ln.strip() for ln in data.decode("utf-8", "replace").splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"


def branch_problem(branch: object) -> str | None:
    """Why ``branch`` cannot be used as a branch name, or None when it can."""
    if not isinstance(branch, str) or not branch:
        return "branch must be a non-empty string"
    if branch.startswith("-"):
        return f"branch {branch!r} must not start with '-'"
    if len(branch) > 255 or "\0" in branch:
        return "branch is too long or contains a NUL byte"
    if run(None, "check-ref-format", "--branch", branch, check=False).returncode != 0:
        return f"{branch!r} is not a valid branch name (git check-ref-format --branch)"
    return None


def remote_problem(remote: object) -> str | None:
    """Why ``remote`` cannot even be a remote's name, or None when it may be one.

    Whether it is configured in the repository is checked by the caller with ``remotes``:
    git would take an unknown name as a path or URL, which must never happen.
    """
    if not isinstance(remote, str) or not _REMOTE_NAME.match(remote) or ".." in remote:
        return (f"remote {remote!r} is not a remote's name (letters, digits, '._/-'; "
                "not a path or URL)")
    return None


def remotes(repo: Path) -> list[str]:
    """The remotes configured in ``repo``."""
    return output(repo, "remote").split()


def locate(config: Config, *, user_id: str, project_id: str | None,
           repo_path: str | None) -> Path:
    """The real path of the job's repository, checked against ``allowed_roots``.

    Raises ``errors.InvalidParams`` naming ``options.repo_path`` or ``project_id``.
    """
    if repo_path is not None:
        field = "options.repo_path"
        if not isinstance(repo_path, str) or not os.path.isabs(repo_path) or "\0" in repo_path:
            raise errors.InvalidParams("repo_path must be an absolute path", field=field)
        raw = repo_path
    else:
        field = "project_id"
        if project_id is None:
            raise errors.InvalidParams("project_id is required: it names the repository",
                                       field=field)
        raw = config.expand(config.sync.repo_path_template, user_id=user_id,
                            project_id=project_id)
    real = Path(os.path.realpath(raw))
    roots = config.allowed_roots
    if not any(real == root or root in real.parents for root in roots):
        shown = raw if os.path.normpath(raw) == str(real) else f"{raw} (really {real})"
        raise errors.InvalidParams(
            f"repository {shown} is outside the allowed roots "
            f"({', '.join(map(str, roots))}); move it under one or change sync.allowed_roots",
            field=field)
    return real


def check_work_tree(repo: Path) -> None:
    """Raise GitError unless ``repo`` is the top directory of a git work tree."""
    if not repo.exists():
        raise GitError(f"repository {repo} does not exist; clone it there first")
    if not repo.is_dir():
        raise GitError(f"repository {repo} is not a directory")
    done = run(repo, "rev-parse", "--is-inside-work-tree", "--show-toplevel", check=False)
    lines = os.fsdecode(done.stdout).split("\n")
    if done.returncode != 0 or lines[0] != "true" or len(lines) < 2:
        raise GitError(f"{repo} is not a git work tree ({last_line(done.stderr)})")
    if os.path.realpath(lines[1]) != str(repo):
        raise GitError(f"{repo} is inside the git work tree {lines[1]}, not the top of one; "
                       "give the repository's top directory")
