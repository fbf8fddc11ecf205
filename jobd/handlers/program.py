"""The job types of the config's ``[types.NAME]`` entries (SPEC §5): a program, run as
``command`` runs it, its argv built from the entry's template.

At submit, ``validate`` checks the job's options against the entry (only its string
options, each at most 1 KiB, the required ones present, none starting with ``-`` unless
``allow_dash`` says so), its ``project_id`` against the entry's ``project``, and
resolves its repository (``repo``, or the project's: an admin's or a service's
``options.repo_path``, else the template's), which is stored with the job as
``options.repo_path``: the key of its exclusivity. When the job runs, the argv is
rendered from the entry as defined then (a reload meanwhile applies), each ``{name}``
element replaced by one argument or, for an optional option left out, dropped: no
shell ever reads it. The repository is resolved and checked again then.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jobd import errors
from jobd.config import Config, TypeSpec, placeholder
from jobd.handlers import Handler, JobContext, JobFailed, git, reject_unknown
from jobd.handlers.command import run_program
from jobd.params import text

__all__ = ["MAX_OPTION_BYTES", "ProgramHandler"]

#: the longest value of a ``[types]`` option, as UTF-8
MAX_OPTION_BYTES = 1024


class ProgramHandler(Handler):
    """One ``[types.NAME]`` entry as a job type."""

    def __init__(self, name: str, spec: TypeSpec) -> None:
        self.name = name
        self.spec = spec
        self.roles = frozenset(spec.roles)
        self.resumable = spec.resumable
        self.exclusive = spec.exclusive

    def default_timeout(self, config: Config) -> float | None:
        return self.spec.timeout

    def validate(self, options: dict[str, Any], *, user_id: str, project_id: str | None,
                 trusted: bool, config: Config) -> dict[str, Any]:
        spec = self.spec
        if spec.project == "none" and project_id is not None:
            raise errors.InvalidParams(f"{self.name} jobs take no project_id; leave it out",
                                       field="project_id")
        if spec.project == "required" and project_id is None:
            raise errors.InvalidParams(f"project_id is required for {self.name} jobs",
                                       field="project_id")
        repo_path = None
        if "repo_path" in options and "repo_path" not in spec.names:
            repo_path = self._given_repo_path(options["repo_path"])
            options = {k: v for k, v in options.items() if k != "repo_path"}
        reject_unknown(options, spec.names)
        for name in spec.options:
            if name not in options:
                raise errors.InvalidParams(
                    f"options.{name} is required for {self.name} jobs (its options: "
                    f"{', '.join(spec.names)})", field=f"options.{name}")
        out: dict[str, Any] = {}
        for name, value in options.items():
            text(value, f"options.{name}", max_bytes=MAX_OPTION_BYTES)
            if problem := self._problem(name, value):
                raise errors.InvalidParams(problem, field=f"options.{name}")
            if not value and f"{{{name}}}" in (spec.repo or ""):
                raise errors.InvalidParams(
                    f"options.{name} must not be empty: it names the repository "
                    f"(types.{self.name}.repo)", field=f"options.{name}")
            out[name] = value
        for name, value in (("user_id", user_id), ("project_id", project_id)):
            if problem := self._problem(name, value):
                raise errors.InvalidParams(problem, field=name)
        if spec.has_repository:
            out["repo_path"] = str(self._repository(config, out, user_id=user_id,
                                                    project_id=project_id,
                                                    repo_path=repo_path))
        return out

    def _given_repo_path(self, value: Any) -> Any:
        """A submitter's ``options.repo_path`` (the manager lets only admins and services
        pass one, as for ``sync``): only for a type that works on its project's repository."""
        if self.spec.repo or self.spec.project != "required":
            why = (f"its repository comes from types.{self.name}.repo" if self.spec.repo
                   else "they work on no project's repository")
            raise errors.InvalidParams(f"{self.name} jobs take no options.repo_path: {why}",
                                       field="options.repo_path")
        return value

    def _problem(self, name: str, value: str | None) -> str | None:
        """Why ``value`` may not go into the argv as ``{name}``, or None."""
        if value is None or f"{{{name}}}" not in self.spec.argv:
            return None
        if "\0" in value:
            return f"{_field(name)} must not hold a NUL character"
        if value.startswith("-") and name not in self.spec.allow_dash:
            return (f"{_field(name)} must not start with '-': {self.name} would read it as "
                    "an option")
        return None

    def _repository(self, config: Config, options: dict[str, Any], *, user_id: str,
                    project_id: str | None, repo_path: str | None) -> Path:
        """The job's repository, a real path under the allowed roots (it need not exist
        yet): from the type's ``repo``, else ``repo_path`` or the project's template;
        InvalidParams naming the option or id it was built from."""
        spec = self.spec
        if not spec.repo:
            return git.locate(config, user_id=user_id, project_id=project_id,
                              repo_path=repo_path)
        values = {name: options[name] for name in spec.options}
        if project_id is not None:
            values["project_id"] = project_id
        raw = config.expand(spec.repo, user_id=user_id, **values)
        try:
            return git.locate(config, user_id=user_id, project_id=project_id, repo_path=raw)
        except errors.InvalidParams as e:
            used = [name for name in (*spec.options, "user_id", "project_id")
                    if f"{{{name}}}" in spec.repo]
            field = _field(used[0]) if used else "options"
            raise errors.InvalidParams(f"{field}: {e.message} (types.{self.name}.repo)",
                                       field=field) from None

    def run(self, ctx: JobContext) -> dict[str, Any]:
        job, spec = ctx.job, self.spec
        options = job.options
        for name in spec.options:
            if name not in options:
                raise JobFailed(f"type {self.name} now requires options.{name}, which this "
                                "job was submitted without; submit it again")
        values: dict[str, str | None] = {
            **{name: options.get(name) for name in spec.names},
            "user_id": job.user_id, "project_id": job.project_id, "job_id": job.id}
        for name, value in values.items():
            if problem := self._problem(name, value):
                raise JobFailed(f"{problem} (checked again as the job starts)")
        cwd = spec.cwd or None
        if spec.has_repository:
            try:
                # a project's repository as stored at submit (a given repo_path, or the
                # template's), checked again; a ``repo`` template is rendered again
                repo = self._repository(ctx.config, options, user_id=job.user_id,
                                        project_id=job.project_id,
                                        repo_path=(None if spec.repo
                                                   else options.get("repo_path")))
            except errors.InvalidParams as e:
                raise JobFailed(e.message) from None
            values["repo_path"] = str(repo)
        if cwd is not None:
            # {repo_path} is a whole path here, not a segment to encode
            cwd = cwd.format(state_dir=str(ctx.config.state_dir),
                             repo_path=values.get("repo_path") or "")
        argv = []
        for element in spec.argv:
            name = placeholder(element)
            if name is None:
                argv.append(element)
            elif values.get(name) is not None:
                argv.append(values[name])
            elif name not in spec.optional_options and name != "project_id":
                raise JobFailed(f"type {self.name} now uses {{{name}}}, which this job has "
                                "no value for; submit it again")
        return run_program(ctx, argv, cwd=cwd, env=dict(spec.env) or None)


def _field(name: str) -> str:
    """The request field a value of the argv came from."""
    return name if name in ("user_id", "project_id") else f"options.{name}"
