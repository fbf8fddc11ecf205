"""The ``jobctl`` command (SPEC §7): each command parses, calls ``jobd.client``, renders.

This module owns the command line itself: the options, how a job prefix or a
project path is understood, how long a ``--wait`` lasts, and which exit code ends
each command.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import time
from typing import Any, Iterable, NoReturn

import click
from rich.console import Console

from jobctl import render
from jobd import errors
from jobd.client import Client
from jobd.config import parse_duration
from jobd.models import TERMINAL, JobStatus, iso

__all__ = [
    "EXIT_CANCELLED", "EXIT_FAILED", "EXIT_OK", "EXIT_TIMEOUT", "EXIT_UNREACHABLE",
    "EXIT_USAGE", "build_options", "exit_code", "main", "parse_option", "resolve_job",
    "since", "sync_target",
]

EXIT_OK = 0            #: done; for cancel: the job ended cancelled
EXIT_FAILED = 1        #: the job failed, or the daemon refused the call
EXIT_USAGE = 2         #: click's own, for a bad command line
EXIT_CANCELLED = 3     #: a waited-for job was cancelled (by someone else)
EXIT_TIMEOUT = 4       #: --wait/--timeout ran out
EXIT_UNREACHABLE = 69  #: no daemon answers (sysexits' EX_UNAVAILABLE)
EXIT_INTERRUPTED = 130  #: Ctrl-C while watching; the job goes on

#: the longest single long poll; short enough that --timeout is kept closely
_POLL_S = 30.0
#: how long logs --follow waits for new output before asking again
_LOG_POLL_S = 1.0
#: how long --wait/--follow keep trying while the daemon restarts (jobs survive it)
_RECONNECT_S = 30.0

_FULL_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_PREFIX = re.compile(r"^[0-9a-f-]{4,36}$")


def exit_code(status: str, *, cancelling: bool = False) -> int:
    """How a command that waited for a job ends, given the job's last status.

    ``cancelling``: the command was ``cancel``, for which ending cancelled is success.
    """
    if status not in TERMINAL:
        return EXIT_TIMEOUT
    if cancelling:
        return EXIT_OK if status == JobStatus.CANCELLED else EXIT_FAILED
    return {JobStatus.COMPLETED: EXIT_OK, JobStatus.FAILED: EXIT_FAILED,
            JobStatus.CANCELLED: EXIT_CANCELLED}[status]


def parse_option(text: str) -> tuple[str, Any]:
    """``-o KEY=VALUE``: the value as JSON if it parses (``5``, ``true``, ``["a"]``), else text."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise click.BadParameter(f"{text!r} is not KEY=VALUE (e.g. -o branch=main)",
                                 param_hint="-o")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return key.strip(), value


def build_options(pairs: Iterable[str], options_json: str | None) -> dict[str, Any] | None:
    """The job's options: ``--options-json`` first, each ``-o`` on top; None when none given."""
    options: dict[str, Any] = {}
    if options_json is not None:
        try:
            options = json.loads(options_json)
        except ValueError as e:
            raise click.BadParameter(f"not valid JSON: {e}", param_hint="--options-json") from None
        if not isinstance(options, dict):
            raise click.BadParameter('must be a JSON object, e.g. \'{"branch": "main"}\'',
                                     param_hint="--options-json")
    options.update(parse_option(p) for p in pairs)
    return options or None


def sync_target(project: str, repo: str | None) -> tuple[str, str | None]:
    """(project id, repo_path) for ``jobctl sync PROJECT [--repo PATH]``.

    A PROJECT that is a path (contains ``/``, or is ``.``) is the repository itself:
    its real path is the repo_path and its folder's name the project id.
    """
    if "/" in project or project == ".":
        if repo is not None:
            raise click.UsageError(f"PROJECT {project!r} is already a path; drop --repo, or "
                                   "give a project id with --repo PATH")
        path = os.path.realpath(os.path.expanduser(project))
        name = os.path.basename(path)
        if not name:
            raise click.BadParameter(f"{path} has no folder name to use as the project id",
                                     param_hint="PROJECT")
        return name, path
    return project, os.path.realpath(os.path.expanduser(repo)) if repo is not None else None


def since(seconds: float, now_us: int) -> str:
    """``--since 2h`` as the ISO 8601 instant that ``created_after`` takes."""
    return iso(now_us - int(seconds * 1_000_000)) or ""


def resolve_job(client: Client, ref: str) -> str:
    """The full id of the job that ``ref`` (an id, or a unique prefix of ≥ 4 characters) names."""
    ref = ref.strip().lower()
    if _FULL_ID.match(ref):
        return ref
    if not _PREFIX.match(ref):
        raise click.BadParameter(f"{ref!r} is not a job id; give the id or at least its first "
                                 "4 characters (0-9, a-f)", param_hint="JOB")
    jobs = client.list(id_prefix=ref, limit=2)["jobs"]
    if not jobs:
        raise errors.NotFound(f"no job matches {ref!r}; `jobctl list` shows the jobs you may see")
    if len(jobs) > 1:
        raise click.BadParameter(f"ambiguous prefix {ref!r}: it matches {jobs[0]['id']}, "
                                 f"{jobs[1]['id']} and maybe more; give more characters",
                                 param_hint="JOB")
    return str(jobs[0]["id"])


def _now_us() -> int:
    return time.time_ns() // 1000


class _Duration(click.ParamType):
    name = "DURATION"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> float:
        if isinstance(value, float):
            return value
        try:
            return parse_duration(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


DURATION = _Duration()


@dataclasses.dataclass
class _State:
    """What every command works with; the client connects at its first call."""

    out: Console
    json: bool = False
    socket: str | None = None
    as_user: str | None = None
    _client: Client | None = None

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = Client(socket=self.socket, as_user=self.as_user)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def _set_global(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """A global option's callback: record it, wherever it stood on the line."""
    st = ctx.find_object(_State)
    if st is not None and param.name and value not in (None, False):
        setattr(st, param.name, value)
    return value


def global_options(fn: Any) -> Any:
    """SPEC §7: ``--socket``, ``--json``, ``--as-user`` before or after the command."""
    for option in reversed([
        click.option("--socket", type=click.Path(dir_okay=False), default=None,
                     metavar="PATH", expose_value=False, callback=_set_global,
                     help="The daemon's socket (else $JOBD_SOCKET, else the user socket if "
                          "it exists, else /run/jobd/jobd.sock)."),
        click.option("--json", "json", is_flag=True, expose_value=False, callback=_set_global,
                     help="Print JSON for scripts: a job object, an array of them, or the "
                          "call's result."),
        click.option("--as-user", "as_user", default=None, metavar="USER",
                     expose_value=False, callback=_set_global,
                     help="Act for this user (admins and services); scopes what is seen and "
                          "who owns what is submitted."),
    ]):
        fn = option(fn)
    return fn


def _fail(message: str) -> None:
    click.echo(f"jobctl: {message}", err=True)


class _Group(click.Group):
    """Turns the client's errors into SPEC §7's exit codes: 69 unreachable, else 1.

    Every command it makes also takes the global options (``jobctl list --json``).
    """

    def command(self, *args: Any, **kwargs: Any) -> Any:
        make = super().command(*args, **kwargs)

        def decorate(fn: Any) -> click.Command:
            cmd = make(global_options(fn))
            # the command's own options first in its --help, the global ones after them
            shared = [p for p in cmd.params if p.callback is _set_global]
            cmd.params = [p for p in cmd.params if p.callback is not _set_global] + shared
            return cmd
        return decorate

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except errors.Unreachable as e:
            _fail(e.message)
            ctx.exit(EXIT_UNREACHABLE)
        except errors.JobdError as e:
            _fail(e.message + (f" (field: {e.field})" if e.field else ""))
            ctx.exit(EXIT_FAILED)


def _show_json(value: Any) -> None:
    click.echo(render.to_json(value))


def _say(st: _State, line: str) -> None:
    """One line for people on stdout, printed as it is (no markup, no wrapping)."""
    st.out.out(line, highlight=False)


def _show(st: _State, result: Any, people: Any) -> None:
    """A call's answer: ``result`` as JSON with --json, else ``people`` (a line or a table)."""
    if st.json:
        _show_json(result)
    elif isinstance(people, str):
        _say(st, people)
    else:
        st.out.print(people)


def _finish(st: _State, job: dict[str, Any], *, cancelling: bool = False,
            show_job: bool = True) -> NoReturn:
    """End a command that waited for ``job``: say how it ended and exit with its code.

    ``show_job``: print the final job on stdout (as JSON, or its result for people);
    off where stdout carries something else (JSON lines, the job's log).
    """
    code = exit_code(job["status"], cancelling=cancelling)
    if show_job and st.json:
        _show_json(job)
    elif show_job and job["status"] == JobStatus.COMPLETED and job.get("result"):
        _say(st, render.result_line(job["result"]))
    ref = render.short_id(job["id"])
    if code == EXIT_TIMEOUT:
        _fail(f"gave up waiting: job {ref} is still {job['status']} "
              f"({render.percent(job.get('progress'))}) and goes on; "
              f"`jobctl status {ref} --follow` to watch it")
    elif job["status"] == JobStatus.FAILED:
        _fail(f"job {ref} failed: {job.get('error') or 'no reason given'}; "
              f"`jobctl logs {ref}` shows its output")
    elif job["status"] == JobStatus.CANCELLED and not cancelling:
        _fail(f"job {ref} was cancelled; `jobctl events {ref}` says by whom")
    elif cancelling and code != EXIT_OK:
        _fail(f"job {ref} ended {job['status']} before the cancel took effect")
    raise click.exceptions.Exit(code)


def _follow(st: _State, job: dict[str, Any], timeout: float | None, *,
            stream_json: bool = False, cancelling: bool = False) -> NoReturn:
    """Watch ``job`` until it ends or ``timeout`` runs out, then exit with SPEC §7's code.

    People get a live bar (or a line per change when not on a terminal). With
    ``--json`` only the final job is printed, unless ``stream_json`` asks for every
    change as a line of JSON.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    view = render.Follow(st.out, json_lines=stream_json) if stream_json or not st.json else None
    lost_at = None
    try:
        with view or contextlib.nullcontext():
            if view:
                view.update(job)
            while job["status"] not in TERMINAL:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                try:
                    job = st.client.wait(job["id"], after_version=job["version"],
                                         timeout_s=_POLL_S if left is None
                                         else min(_POLL_S, left))
                except (errors.Unreachable, errors.Unavailable):
                    # a restarting daemon keeps its jobs: keep watching once it is back
                    lost_at = lost_at or time.monotonic()
                    if time.monotonic() - lost_at > _RECONNECT_S:
                        raise
                    time.sleep(1.0)
                    continue
                lost_at = None
                if view:
                    view.update(job)
    except KeyboardInterrupt:
        ref = render.short_id(job["id"])
        _fail(f"stopped watching; job {ref} goes on (`jobctl status {ref} --follow` to watch "
              f"again, `jobctl cancel {ref}` to stop it)")
        raise click.exceptions.Exit(EXIT_INTERRUPTED) from None
    _finish(st, job, cancelling=cancelling, show_job=not stream_json)


_WAIT = click.option("--wait", is_flag=True, help="Watch the job until it ends; exit 0 if it "
                     "completed, 1 if it failed, 3 if it was cancelled.")
_TIMEOUT = click.option("--timeout", type=DURATION, default=None, metavar="DURATION",
                        help="Stop waiting after this long (30s, 10m, 2h) and exit 4; the job "
                             "goes on.")
_PRIORITY = click.option("--priority", type=click.IntRange(-100, 100), default=None,
                         help="-100..100, higher runs first (above 0: admins and services).")
_JOB_TIMEOUT = click.option("--job-timeout", type=DURATION, default=None, metavar="DURATION",
                            help="The job's own run-time limit (else the daemon's "
                                 "default_timeout).")
_JOB = click.argument("job", metavar="JOB")


def _state(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """Made before any global option is read (an eager option's callback runs first)."""
    if ctx.obj is None:
        ctx.obj = _State(out=render.console())
        ctx.call_on_close(ctx.obj.close)
    return value


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"],
                                           "max_content_width": 100})
@click.option("--state", hidden=True, is_eager=True, expose_value=False, callback=_state,
              default=None)
@global_options
@click.version_option(None, "--version", package_name="jobd", prog_name="jobctl",
                      message="%(prog)s %(version)s")
def main() -> None:
    """Control jobd, the job manager of the CIDX server.

    \b
    Examples:
      jobctl ping                        is the daemon there, and who am I to it?
      jobctl sync myproject --wait       sync a project, watch it until it ends
      jobctl sync ~/src/myrepo --wait    (admin) sync the repository at that path
      jobctl submit noop -o seconds=5    (admin) a job that only sleeps
      jobctl list --status running       what runs now
      jobctl list --since 2h --all       everything from the last two hours
      jobctl status 3f2a --follow        watch one job (its id, or 4+ characters of it)
      jobctl logs 3f2a --follow          its output as it comes
      jobctl cancel 3f2a --wait          stop it, and wait until it has stopped
      jobctl --json list | jq -r '.[].id'

    \b
    Exit codes: 0 done (cancel: the job ended cancelled); 1 the job failed or the
    daemon refused; 2 usage; 3 the waited-for job was cancelled; 4 --wait/--timeout
    ran out; 69 the daemon cannot be reached. NO_COLOR=1 turns colours off.
    """


@main.command()
@click.pass_obj
def ping(st: _State) -> None:
    """Check that the daemon answers, and how it sees you."""
    result = st.client.ping()
    _show(st, result, render.ping_line(result, st.client.socket_path))


def _submitted(st: _State, job: dict[str, Any], wait: bool, timeout: float | None,
               verb: str = "submitted") -> None:
    """Say what was queued; with ``wait``, watch it to the end (and exit from there)."""
    if st.json and not wait:
        _show_json(job)
        return
    if not st.json:
        _say(st, render.submitted_line(job, verb))
    if wait:
        _follow(st, job, timeout)


@main.command()
@click.argument("project")
@click.option("--branch", default=None, help="Merge this branch (else the repository's current).")
@click.option("--full-reindex", is_flag=True, help="Rebuild the index from scratch.")
@click.option("--repo", default=None, metavar="PATH",
              help="The repository's work tree (admins and services; under allowed_roots).")
@_PRIORITY
@_JOB_TIMEOUT
@_WAIT
@_TIMEOUT
@click.pass_obj
def sync(st: _State, project: str, branch: str | None, full_reindex: bool, repo: str | None,
         priority: int | None, job_timeout: float | None, wait: bool,
         timeout: float | None) -> None:
    """Fetch and merge PROJECT's repository, then re-index it.

    PROJECT is a project id, or a path (containing "/", or "."): then that
    repository is synced and its folder's name is the project id.

    \b
      jobctl sync myproject --branch main --wait
      jobctl sync . --full-reindex --wait --timeout 30m
    """
    project_id, repo_path = sync_target(project, repo)
    options = {"branch": branch, "full_reindex": full_reindex or None, "repo_path": repo_path}
    job = st.client.submit("sync", project_id,
                           options={k: v for k, v in options.items() if v is not None} or None,
                           priority=priority, timeout_s=job_timeout)
    _submitted(st, job, wait, timeout)


@main.command()
@click.argument("type_", metavar="TYPE")
@click.option("--project", default=None, metavar="P", help="The project the job acts on.")
@click.option("-o", "option_pairs", multiple=True, metavar="KEY=VALUE",
              help="A handler option; VALUE is read as JSON when it parses (5, true, "
                   "'[\"make\", \"all\"]'), else as text. Repeat for more.")
@click.option("--options-json", default=None, metavar="JSON",
              help="All options as one JSON object; -o values go on top.")
@_PRIORITY
@_JOB_TIMEOUT
@_WAIT
@_TIMEOUT
@click.pass_obj
def submit(st: _State, type_: str, project: str | None, option_pairs: tuple[str, ...],
           options_json: str | None, priority: int | None, job_timeout: float | None,
           wait: bool, timeout: float | None) -> None:
    """Submit a job of TYPE (sync, index, command, noop, or a plugin's).

    \b
      jobctl submit index --project myproject --wait
      jobctl submit noop -o seconds=30
      jobctl submit command -o argv='["make", "-C", "/srv/docs"]' --wait
    """
    job = st.client.submit(type_, project, options=build_options(option_pairs, options_json),
                           priority=priority, timeout_s=job_timeout)
    _submitted(st, job, wait, timeout)


@main.command("list")
@click.option("--status", "statuses", multiple=True,
              type=click.Choice([s.value for s in JobStatus if s != JobStatus.CREATED]),
              help="Only jobs in this status; repeat for several.")
@click.option("--type", "type_", default=None, metavar="T", help="Only jobs of this type.")
@click.option("--user", default=None, metavar="U", help="Only this user's jobs.")
@click.option("--project", default=None, metavar="P", help="Only jobs of this project.")
@click.option("--since", "since_s", type=DURATION, default=None, metavar="DURATION",
              help="Only jobs created within this long (30m, 2h, 7d).")
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True,
              help="How many jobs, newest first.")
@click.option("--all", "every", is_flag=True, help="Every matching job, page after page.")
@click.pass_obj
def list_(st: _State, statuses: tuple[str, ...], type_: str | None, user: str | None,
          project: str | None, since_s: float | None, limit: int, every: bool) -> None:
    """List jobs, newest first.

    \b
      jobctl list --status queued --status running
      jobctl list --user alice --since 1d --all
    """
    filters = dict(status=list(statuses) or None, type=type_, user_id=user, project_id=project,
                   created_after=since(since_s, _now_us()) if since_s is not None else None,
                   limit=limit)
    jobs: list[dict[str, Any]] = []
    cursor = None
    while True:
        page = st.client.list(**filters, cursor=cursor)
        jobs.extend(page["jobs"])
        cursor = page.get("next_cursor")
        if not (every and cursor):
            break
    if st.json:
        _show_json(jobs)
        return
    if not jobs:
        _say(st, "no jobs match")
        return
    st.out.print(render.job_table(jobs, _now_us()))
    if cursor:
        _fail(f"showing the newest {len(jobs)}; --all (or --limit) for more")


@main.command()
@_JOB
@click.option("--follow", is_flag=True, help="Watch the job until it ends (exit codes as "
                                               "--wait); with --json, one line of JSON per change.")
@_TIMEOUT
@click.pass_obj
def status(st: _State, job: str, follow: bool, timeout: float | None) -> None:
    """Show one job: status, progress, timings, result.

    JOB is the job's id or a unique prefix of at least 4 characters.
    """
    found = st.client.get(resolve_job(st.client, job))
    if follow:
        _follow(st, found, timeout, stream_json=st.json)
    _show(st, found, render.job_detail(found, _now_us()))


@main.command()
@_JOB
@click.option("--wait", is_flag=True, help="Wait until the job has stopped; exit 0 once it is "
                                             "cancelled.")
@_TIMEOUT
@click.pass_obj
def cancel(st: _State, job: str, wait: bool, timeout: float | None) -> None:
    """Cancel a queued or running job.

    A running job's processes get SIGTERM, then SIGKILL after the daemon's
    cancel_grace. Without --wait the command returns once the cancel is asked for.
    """
    found = st.client.cancel(resolve_job(st.client, job), wait=wait)
    if wait:
        _follow(st, found, timeout, cancelling=True)
    if st.json:
        _show_json(found)
        return
    ref = render.short_id(found["id"])
    if found["status"] == JobStatus.CANCELLED:
        _say(st, f"cancelled {ref}")
    else:
        _say(st, f"cancel requested for {ref}; it is stopping "
                 f"(`jobctl status {ref} --follow` to watch)")


@main.command()
@_JOB
@_WAIT
@_TIMEOUT
@click.pass_obj
def retry(st: _State, job: str, wait: bool, timeout: float | None) -> None:
    """Queue a failed or cancelled job again (same id)."""
    found = st.client.retry(resolve_job(st.client, job))
    _submitted(st, found, wait, timeout, verb="queued again")


@main.command()
@_JOB
@click.pass_obj
def events(st: _State, job: str) -> None:
    """Show a job's history, oldest first.

    Every status and phase change, cancel request, retry and recovery, with who
    acted.
    """
    history = st.client.events(resolve_job(st.client, job))
    _show(st, history, render.events_table(history))


@main.command()
@_JOB
@click.option("--follow", is_flag=True, help="Keep printing new output until the job ends "
                                               "(exit codes as --wait).")
@_TIMEOUT
@click.pass_obj
def logs(st: _State, job: str, follow: bool, timeout: float | None) -> None:
    """Print a job's captured output.

    The stdout and stderr of its processes, oldest output dropped first past
    max_log_bytes.

    With --json: one object {data, next_offset, eof}; with --follow, one line of
    JSON per page.
    """
    job_id = resolve_job(st.client, job)
    deadline = None if timeout is None else time.monotonic() + timeout
    offset, version, data = 0, None, []
    try:
        while True:
            page = st.client.logs(job_id, offset=offset)
            offset = page["next_offset"]
            if page["data"]:
                if not st.json:
                    click.echo(page["data"], nl=False)
                elif follow:
                    click.echo(json.dumps(page, ensure_ascii=False))
                else:
                    data.append(page["data"])
            if page["eof"]:
                break
            if page["data"]:
                continue  # the next page may be there already
            if not follow:
                break
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                _finish(st, st.client.get(job_id), show_job=False)
            # no new output yet: a short long poll, so that the job's end is seen at once
            version = st.client.wait(job_id, after_version=version,
                                     timeout_s=_LOG_POLL_S if left is None
                                     else min(_LOG_POLL_S, left))["version"]
    except KeyboardInterrupt:
        raise click.exceptions.Exit(EXIT_INTERRUPTED) from None
    if follow:
        _finish(st, st.client.get(job_id), show_job=False)
    if st.json:
        _show_json({"data": "".join(data), "next_offset": offset, "eof": page["eof"]})


@main.command()
@click.pass_obj
def stats(st: _State) -> None:
    """Show job counts and load (admins)."""
    result = st.client.stats()
    _show(st, result, render.stats_view(result))


@main.command()
@click.pass_obj
def pause(st: _State) -> None:
    """Stop starting queued jobs; running jobs go on (admins)."""
    _set_paused(st, True)


@main.command()
@click.pass_obj
def resume(st: _State) -> None:
    """Start queued jobs again after a pause (admins)."""
    _set_paused(st, False)


def _set_paused(st: _State, paused: bool) -> None:
    result = st.client.pause() if paused else st.client.resume()
    _show(st, result, "dispatching paused; running jobs go on (`jobctl resume` to restart)"
          if paused else "dispatching resumed")


@main.command()
@click.option("--older-than", type=DURATION, default=None, metavar="DURATION",
              help="Delete finished jobs older than this (7d), overriding both retentions.")
@click.option("--dry-run", is_flag=True, help="Only count what would be deleted.")
@click.pass_obj
def cleanup(st: _State, older_than: float | None, dry_run: bool) -> None:
    """Delete finished jobs past retention now (admins).

    Their events, checkpoints and log files go with them; active jobs are never
    touched.
    """
    result = st.client.cleanup(older_than_s=older_than, dry_run=dry_run)
    _show(st, result, render.cleanup_line(result, dry_run))
