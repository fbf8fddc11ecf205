"""Running git on a repository safely, and finding which repository a job may touch.

Every git command jobd runs is built by ``argv`` and gets ``ENV`` added to its
environment (SPEC §3a): hooks and fsmonitor off, only the transports a user may name
(never ``ext::``), the plain ``ssh`` whatever the repository configures, auto-gc in the
foreground (no git left behind a job), the repository marked safe by its real path, no
terminal or password prompt. ``run`` executes such a command directly and is for short
local operations (queries, and putting a work tree back after a failed merge even when the
job is being cancelled); long operations go through the job context (``run_in_job``) so
that they are logged and cancellable. A failing git is quoted by its own ``error:`` or
``fatal:`` line (``error_line``), decoded so that it is always valid UTF-8.

``locate`` applies the path rules: the template (or a trusted ``repo_path``), resolved
with realpath, must lie under one of ``allowed_roots``. ``open_repository`` then opens
that folder (no symbolic link followed) and makes the ownership check that
``safe.directory`` switches off in git: the work tree, its git dir and the git dir's
config must belong to the daemon's uid and be writable by no one else, so no one else can
plant a configuration that makes git run programs. Git then runs *in the opened folder*
(``Repository.cwd``, a ``/proc`` path of the held descriptor), so a folder renamed or
replaced by a symbolic link after the check cannot move the job outside the allowed roots.
"""

from __future__ import annotations

import errno
import itertools
import os
import pwd
import re
import stat
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from jobd import errors, joblogs
from jobd.handlers import JobFailed
from jobd.models import is_note, readable

if TYPE_CHECKING:
    from jobd.config import Config
    from jobd.handlers import JobContext
    from jobd.process import Completed

__all__ = ["ENV", "GitError", "Repository", "argv", "branch_problem", "error_line", "locate",
           "open_git_dir", "open_repository", "output", "readable", "remote_problem", "remotes", "revision",
           "run", "run_in_job"]

#: local git commands (queries, abort, reset) get this long before they count as hung
LOCAL_TIMEOUT = 300.0

_REMOTE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._/-]{0,99}$")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: settings every git command gets (SPEC §3a), before ``safe.directory``
_SAFE_CONFIG = ("core.hooksPath=/dev/null", "core.fsmonitor=false", "color.ui=false",
                "protocol.allow=user", "protocol.ext.allow=never", "core.sshCommand=ssh",
                "gc.autoDetach=false", "maintenance.autoDetach=false")
_TAIL_BYTES = 65536   # of a job's log, read to find a failed git's error line
_ERROR_CHARS = 400    # an error line quoted in a message is cut to this
_LISTED = 10          # names git lists under its error line that a message repeats


class GitError(JobFailed):
    """A git command failed, or a repository may not be used; the message says why."""


#: added to the environment of every git command: no prompt for a password or a
#: passphrase (a job has no terminal), no editor, messages that do not depend on locale
ENV: dict[str, str] = {
    "GIT_TERMINAL_PROMPT": "0",
    "GIT_ASKPASS": "/bin/false",
    "SSH_ASKPASS": "/bin/false",
    "GIT_MERGE_AUTOEDIT": "no",
    "LC_ALL": "C",
    # the environment would win over core.sshCommand=ssh: plain ssh, whatever jobd inherited
    "GIT_SSH_COMMAND": "ssh",
}


class Repository:
    """A checked repository: its real path, and its folder held open for git to run in."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd

    @property
    def cwd(self) -> str:
        """The opened folder as a path any of the daemon's children can enter.

        ``/proc/<pid>/fd/<n>`` leads to the folder the descriptor holds, wherever it has
        been moved and whatever now lies at its old path.
        """
        return f"/proc/{os.getpid()}/fd/{self.fd}"

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Repository:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __str__(self) -> str:
        return str(self.path)


def argv(repo: Repository | None, *args: str, config: Sequence[str] = ()) -> list[str]:
    """``git -c core.hooksPath=/dev/null ... -c safe.directory=<repo> <args>``.

    ``config`` adds more ``key=value`` settings for this one command.
    """
    out = ["git"]
    for item in (*_SAFE_CONFIG,
                 *((f"safe.directory={repo.path}",) if repo is not None else ()), *config):
        out += ["-c", item]
    out.extend(args)
    return out


def run(repo: Repository | None, *args: str, check: bool = True,
        timeout: float = LOCAL_TIMEOUT) -> subprocess.CompletedProcess[bytes]:
    """Run one short git command in ``repo`` (or in ``/`` when None) and wait for it."""
    cmd = argv(repo, *args)
    where = f" in {repo}" if repo is not None else ""
    try:
        done = subprocess.run(cmd, cwd=repo.cwd if repo is not None else "/",
                              env={**os.environ, **ENV}, stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise GitError(f"git {args[0]}{where} did not finish within {timeout:.0f}s") from None
    except OSError as e:
        raise GitError(f"cannot run git: {e.strerror}; is git installed and on PATH?") from None
    if check and done.returncode != 0:
        raise GitError(f"git {args[0]}{where} exited with {_status(done.returncode)}: "
                       f"{error_line(done.stderr or done.stdout)}")
    return done


def run_in_job(ctx: JobContext, repo: Repository | None, *args: str,
               config: Sequence[str] = (),
               on_progress: Callable[[float | None, str | None], None] | None = None,
               check: bool = True, cwd: str | None = None) -> Completed:
    """Run a long git command through the job (logged, cancellable) in ``repo`` (or, for
    a clone, in the folder ``cwd``).

    A failure raises GitError quoting git's own error line from the job's log.
    """
    start = joblogs.end(ctx.joblog.path)
    done = ctx.run(argv(repo, *args, config=config), cwd=repo.cwd if repo is not None else cwd,
                   env=ENV, on_progress=on_progress, check=False)
    if check and done.returncode != 0:
        raise GitError(f"git {args[0]} exited with {_status(done.returncode)}: "
                       f"{error_line(joblogs.since(ctx.joblog.path, start, _TAIL_BYTES))}")
    return done


def output(repo: Repository | None, *args: str) -> str:
    """The stdout of a short git command, decoded and stripped (for names git made up)."""
    return readable(run(repo, *args).stdout).strip()


def revision(repo: Repository, name: str = "HEAD") -> str | None:
    """The commit ``name`` points to, or None when there is none (an unborn branch)."""
    done = run(repo, "rev-parse", "-q", "--verify", "--end-of-options", f"{name}^{{commit}}",
               check=False)
    return readable(done.stdout).strip() or None


def error_line(data: bytes) -> str:
    """Why git failed, from its output: its first ``error:`` or ``fatal:`` line (with the
    names it lists under it), else the last line. jobd's own lines are skipped.
    """
    lines = [ln.rstrip() for ln in readable(data).replace("\r", "\n").split("\n")
             if not is_note(ln)]
    for i, line in enumerate(lines):
        if line.startswith(("error:", "fatal:")):
            listed = [ln.strip() for ln in itertools.takewhile(
                lambda ln: ln.startswith(("\t", "  ")), lines[i + 1:])]
            if listed:
                more = len(listed) - _LISTED
                line += " " + ", ".join(listed[:_LISTED]) + (f" and {more} more"
                                                             if more > 0 else "")
            return readable(line, _ERROR_CHARS)
    shown = [ln.strip() for ln in lines if ln.strip()]
    return readable(shown[-1], _ERROR_CHARS) if shown else "no output"


def _status(code: int) -> str:
    return f"signal {-code}" if code < 0 else f"status {code}"


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


def remotes(repo: Repository) -> list[str]:
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
        try:
            repo_path.encode("utf-8")
        except UnicodeEncodeError:
            raise errors.InvalidParams("repo_path must be valid Unicode text",
                                       field=field) from None
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
            f"repository {_shown(shown)} is outside the allowed roots "
            f"({', '.join(map(str, roots))}); move it under one or change sync.allowed_roots",
            field=field)
    return real


def open_repository(path: Path) -> Repository:
    """Open the work tree at the real path ``path`` for git to run in, after checking it.

    Raises GitError when it does not exist, is not the top of a git work tree, was moved
    while being opened, or is not the daemon's own (see the module docstring).
    """
    if not os.path.lexists(path):
        raise GitError(f"repository {_shown(path)} does not exist; clone it there first")
    try:
        fd = os.open(path, _DIR_FLAGS)
    except OSError as e:
        if e.errno == errno.ENOTDIR:
            raise GitError(f"repository {_shown(path)} is not a directory") from None
        if e.errno == errno.ELOOP:
            raise GitError(f"repository {_shown(path)} became a symbolic link while it was "
                           "checked; sync again") from None
        raise GitError(f"cannot open repository {_shown(path)}: {e.strerror}") from None
    repo = Repository(path, fd)
    try:
        # a folder on the way may have been swapped since realpath: what was opened counts
        opened = os.readlink(f"/proc/self/fd/{fd}")
        if opened != str(path):
            raise GitError(f"repository {_shown(path)} was moved while it was checked (it "
                           f"is now {_shown(opened)}); sync again")
        _check_owner(f"repository {_shown(path)}", os.fstat(fd), path)
        _check_git_dir(repo)
        _check_work_tree(repo)
    except BaseException:
        repo.close()
        raise
    return repo


def open_git_dir(repo: Repository) -> tuple[Path, int]:
    """The git dir of ``repo`` (``.git`` in the opened folder, or where a ``.git`` link or
    file leads), opened without following a symbolic link: its path and a descriptor,
    which the caller closes."""
    try:
        st = os.stat(".git", dir_fd=repo.fd, follow_symlinks=False)
    except FileNotFoundError:
        raise GitError(f"{_shown(repo.path)} is not a git work tree (it has no .git)") from None
    if stat.S_ISDIR(st.st_mode):
        where, dir_fd, name = repo.path / ".git", repo.fd, ".git"
    else:
        where = Path(os.path.realpath(repo.path / _git_file_target(repo)))
        dir_fd, name = None, str(where)
    try:
        return where, os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as e:
        raise GitError(f"the git dir {_shown(where)} of {_shown(repo.path)} cannot be "
                       f"opened: {e.strerror}") from None


def _check_git_dir(repo: Repository) -> None:
    """The git dir and its config."""
    where, fd = open_git_dir(repo)
    try:
        _check_owner(f"the git dir {_shown(where)}", os.fstat(fd), where)
        try:
            config = os.stat("config", dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if not stat.S_ISREG(config.st_mode):
            raise GitError(f"the git config {_shown(where / 'config')} is not a plain file; "
                           "jobd runs git only in repositories it owns")
        _check_owner(f"the git config {_shown(where / 'config')}", config, where / "config")
    finally:
        os.close(fd)


def _git_file_target(repo: Repository) -> str:
    """Where a ``.git`` that is not a folder leads: a link's target or a ``gitdir:`` file."""
    try:
        return os.readlink(".git", dir_fd=repo.fd)
    except OSError as e:
        if e.errno != errno.EINVAL:  # EINVAL: not a link
            raise GitError(f"cannot read {_shown(repo.path / '.git')}: {e.strerror}") from None
    try:
        fd = os.open(".git", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                     dir_fd=repo.fd)
        with os.fdopen(fd, "rb") as f:
            first = f.read(4096).split(b"\n", 1)[0]
    except OSError as e:
        raise GitError(f"cannot read {_shown(repo.path / '.git')}: {e.strerror}") from None
    if not first.startswith(b"gitdir: "):
        raise GitError(f"{_shown(repo.path)} is not a git work tree (its .git is neither a "
                       "folder nor a gitdir: file)")
    return os.fsdecode(first[len(b"gitdir: "):].strip())


def _check_owner(what: str, st: os.stat_result, path: Path) -> None:
    """Refuse what another uid owns or may write: its git config could run anything."""
    mine = os.geteuid()
    if st.st_uid != mine:
        raise GitError(f"{what} is owned by uid {st.st_uid}{_user(st.st_uid)}, not by jobd's "
                       f"uid {mine}{_user(mine)}; jobd runs git only in repositories it owns "
                       "(chown it to jobd's user, or sync a copy jobd owns)")
    writers = [who for who, bit in (("its group", stat.S_IWGRP), ("others", stat.S_IWOTH))
               if st.st_mode & bit]
    if writers:
        raise GitError(f"{what} is writable by {' and '.join(writers)}; jobd runs git only in "
                       f"repositories it owns (chmod go-w {_shown(path)})")


def _user(uid: int) -> str:
    try:
        return f" ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return ""


def _shown(path: Path | str) -> str:
    """A path for a message: valid UTF-8 even when the name is not."""
    return readable(os.fsencode(path))


def _check_work_tree(repo: Repository) -> None:
    """Raise GitError unless ``repo`` is the top directory of a git work tree."""
    done = run(repo, "rev-parse", "--is-inside-work-tree", "--show-toplevel", check=False)
    lines = os.fsdecode(done.stdout).split("\n")
    if done.returncode != 0 or lines[0] != "true" or len(lines) < 2:
        raise GitError(f"{_shown(repo.path)} is not a git work tree ({error_line(done.stderr)})")
    if os.path.realpath(lines[1]) != str(repo.path):
        raise GitError(f"{_shown(repo.path)} is inside the git work tree {_shown(lines[1])}, "
                       "not the top of one; give the repository's top directory")
