"""The ``command`` job type: run any program as the daemon's user (admins only).

Options: ``argv`` (the program and its arguments, never through a shell), ``cwd`` and
``env`` (added to the daemon's environment). The program may report progress by SPEC
§5's protocol, and hand back the job's result as a last ``{"result": {...}}`` line.
``run_program`` is how ``[types]`` jobs run too (``jobd.handlers.program``). It is not resumable: a command interrupted by a daemon crash fails and
can be retried, since running it twice might not be safe.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from jobd import errors
from jobd.handlers import (ADMINS, Handler, JobContext, JobFailed, progress_between,
                           reject_unknown)

if TYPE_CHECKING:
    from jobd.config import Config

__all__ = ["CommandHandler", "run_program"]


class CommandHandler(Handler):
    """Run one program with the job's log, cancellation and progress."""

    name = "command"
    roles = ADMINS

    def validate(self, options: dict[str, Any], *, user_id: str, project_id: str | None,
                 trusted: bool, config: Config) -> dict[str, Any]:
        reject_unknown(options, ("argv", "cwd", "env"))
        argv = options.get("argv")
        if (not isinstance(argv, list) or not argv
                or not all(isinstance(a, str) and "\0" not in a for a in argv) or not argv[0]):
            raise errors.InvalidParams(
                'argv must be a non-empty list of strings naming the program first, '
                'e.g. ["ls", "-l"]', field="options.argv")
        out: dict[str, Any] = {"argv": argv}
        cwd = options.get("cwd")
        if cwd is not None:
            if not isinstance(cwd, str) or "\0" in cwd or not os.path.isabs(cwd):
                raise errors.InvalidParams("cwd must be an absolute path", field="options.cwd")
            if not os.path.isdir(cwd):
                raise errors.InvalidParams(f"cwd {cwd} is not an existing directory",
                                           field="options.cwd")
            out["cwd"] = cwd
        env = options.get("env")
        if env is not None:
            if not isinstance(env, dict) or not all(
                    isinstance(k, str) and k and "=" not in k and "\0" not in k
                    and isinstance(v, str) and "\0" not in v for k, v in env.items()):
                raise errors.InvalidParams(
                    "env must be an object of variable names (without '=') to string values",
                    field="options.env")
            out["env"] = env
        return out

    def run(self, ctx: JobContext) -> dict[str, Any]:
        opts = ctx.job.options
        return run_program(ctx, opts["argv"], cwd=opts.get("cwd"), env=opts.get("env"))


def run_program(ctx: JobContext, argv: list[str], *, cwd: str | None,
                env: dict[str, str] | None) -> dict[str, Any]:
    """Run a job's one program (``command`` and ``[types]`` jobs); the job's result: the
    program's last ``{"result": {...}}`` line, else its exit status."""
    if cwd is not None and not os.path.isdir(cwd):
        raise JobFailed(f"working directory {cwd} no longer exists")
    ctx.set_message(f"running {argv[0]}")
    try:
        done = ctx.run(argv, cwd=cwd, env=env, on_progress=progress_between(ctx, 0, 100),
                       whole=True)
    except OSError as e:
        raise JobFailed(str(e) if isinstance(e, FileNotFoundError)
                        else f"cannot run {argv[0]}: {e.strerror or e}") from None
    return done.result if done.result is not None else {"returncode": 0}
