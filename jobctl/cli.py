"""The ``jobctl`` command (SPEC §7): each command parses, calls ``jobd.client``, renders.

This module owns the command line itself: the options, how a job prefix or a
project path is understood, how long a ``--wait`` lasts, and which exit code ends
each command.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import os
import select
import sys
import termios
import time
import tty
from typing import Any, Callable, Iterable, Iterator, NoReturn

import click
from click.shell_completion import CompletionItem, get_completion_class
from rich.console import Console
from rich.live import Live

from jobctl import render
from jobd import errors
from jobd.client import Client
from jobd.config import parse_duration
from jobd.models import TERMINAL, JobStatus, is_note, iso

__all__ = [
    "EXIT_CANCELLED", "EXIT_FAILED", "EXIT_OK", "EXIT_TIMEOUT", "EXIT_UNAVAILABLE",
    "EXIT_UNREACHABLE", "EXIT_USAGE", "build_options", "exit_code", "is_path", "main",
    "parse_option", "since", "sync_target", "worst",
]

EXIT_OK = 0            #: done; for cancel: the job ended cancelled
EXIT_FAILED = 1        #: the job failed, or the daemon refused the call
EXIT_USAGE = 2         #: click's own, for a bad command line
EXIT_CANCELLED = 3     #: a waited-for job was cancelled (by someone else)
EXIT_TIMEOUT = 4       #: --wait/--timeout ran out
EXIT_UNREACHABLE = 69  #: no daemon answers (sysexits' EX_UNAVAILABLE)
EXIT_UNAVAILABLE = 75  #: -32050: shutting down, storage full, maintenance (EX_TEMPFAIL)
EXIT_INTERRUPTED = 130  #: Ctrl-C (128 + SIGINT); a job watched goes on
#: stdout closed by its reader (128 + SIGPIPE): what the shell reports for any program cut
#: short by ``| head``, so ``set -o pipefail`` scripts see jobctl as they see cat or grep
EXIT_PIPE = 141

#: SPEC §7: of several jobs' codes the worst wins, in this order
_SEVERITY = (EXIT_FAILED, EXIT_TIMEOUT, EXIT_CANCELLED, EXIT_OK)
#: how often ``top`` and ``list --watch`` redraw
_REFRESH_S = 1.0
#: how many recent jobs the completion of a JOB argument offers
_COMPLETE_LIMIT = 50


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


def worst(codes: Iterable[int]) -> int:
    """The exit code of a command about several jobs: 1 > 4 > 3 > 0 (others, e.g. 75, first)."""
    codes = list(codes)
    return min(codes, key=lambda c: _SEVERITY.index(c) if c in _SEVERITY else -1,
               default=EXIT_OK)


def _loads(text: str) -> Any:
    """``json.loads``; JSON nested past Python's recursion limit is a ValueError too."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def parse_option(text: str) -> tuple[str, Any]:
    """``-o KEY=VALUE``: the value as JSON if it parses (``5``, ``true``, ``["a"]``), else text."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise click.BadParameter(f"{text!r} is not KEY=VALUE (e.g. -o branch=main)",
                                 param_hint="-o")
    try:
        value = _loads(raw)
    except ValueError:
        value = raw
    return key.strip(), value


def build_options(pairs: Iterable[str], options_json: str | None) -> dict[str, Any] | None:
    """The job's options: ``--options-json`` first, each ``-o`` on top; None when none given."""
    options: dict[str, Any] = {}
    if options_json is not None:
        try:
            options = _loads(options_json)
        except ValueError as e:
            raise click.BadParameter(f"not valid JSON: {e}", param_hint="--options-json") from None
        if not isinstance(options, dict):
            raise click.BadParameter('must be a JSON object, e.g. \'{"branch": "main"}\'',
                                     param_hint="--options-json")
    options.update(parse_option(p) for p in pairs)
    return options or None


def is_path(project: str) -> bool:
    """SPEC §7: PROJECT is a path only when it starts ``/``, ``./``, ``../`` or ``~``,
    or is ``.`` or ``..``; anything else (``org/repo``) is a project id."""
    return project in (".", "..") or project.startswith(("/", "./", "../", "~"))


def sync_target(project: str, repo: str | None,
                project_id: str | None = None) -> tuple[str, str | None]:
    """(project id, repo_path) for ``jobctl sync PROJECT [--repo PATH] [--project-id ID]``.

    A PROJECT that is a path is the repository itself: its real path is the repo_path
    and its folder's name the project id, unless ``project_id`` names one.
    """
    if is_path(project):
        if repo is not None:
            raise click.UsageError(f"PROJECT {project!r} is already a path; drop --repo, or "
                                   "give a project id with --repo PATH")
        path = os.path.realpath(os.path.expanduser(project))
        name = project_id or os.path.basename(path)
        if not name:
            raise click.BadParameter(f"{path} has no folder name to use as the project id; "
                                     "give one with --project-id", param_hint="PROJECT")
        return name, path
    if project_id is not None:
        raise click.UsageError("--project-id is for a PROJECT given as a path; here "
                               f"{project!r} is the project id already")
    return project, os.path.realpath(os.path.expanduser(repo)) if repo is not None else None


def since(seconds: float, now_us: int) -> str:
    """``--since 2h`` as the ISO 8601 instant that ``created_after`` takes."""
    return iso(now_us - int(seconds * 1_000_000)) or ""


def _resolve(st: _State, ref: str) -> str:
    """The id that JOB names; a malformed or ambiguous JOB is a usage error (exit 2), said
    in JSON on stderr with --json."""
    try:
        return str(st.client.resolve(ref))
    except errors.InvalidParams as e:
        if st.json:
            _refused(st, e)
            raise click.exceptions.Exit(EXIT_USAGE) from None
        raise click.BadParameter(e.message, param_hint="JOB") from None


def _now_us() -> int:
    return time.time_ns() // 1000


class _Duration(click.ParamType):
    """A duration (``30s``, ``2h``); with ``none``, also the word ``none`` (no limit, as
    SPEC §1's limits write it), read as that number of seconds."""

    name = "DURATION"

    def __init__(self, none: float | None = None) -> None:
        self.none = none

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> float:
        if isinstance(value, float):
            return value
        if self.none is not None and isinstance(value, str) and value.strip() == "none":
            return self.none
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
    _state(ctx, param, None)  # --json, eager, may come before the state is made
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
        # eager: read before any other option, so that its usage error is JSON too
        click.option("--json", "json", is_flag=True, is_eager=True, expose_value=False,
                     callback=_set_global,
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


def _error_exit(ctx: click.Context, e: errors.JobdError) -> NoReturn:
    """Say what the daemon refused (JSON on stderr with --json) and exit with its code."""
    ctx.exit(_refused(ctx.find_object(_State), e))


def _refused(st: _State | None, e: errors.JobdError, ref: str | None = None) -> int:
    """Say what the daemon refused (of job ``ref``, when several are asked for): JSON on
    stderr with --json; the exit code it calls for."""
    if st is not None and st.json:
        click.echo(render.error_json(e.code, e.message, e.data()), err=True)
    else:
        _fail((f"{ref}: " if ref else "") + e.message
              + (f" (field: {e.field})" if e.field else ""))
    return _error_code(e)


def _error_code(e: errors.JobdError) -> int:
    if isinstance(e, errors.Unreachable):
        return EXIT_UNREACHABLE
    if isinstance(e, errors.Unavailable):
        return EXIT_UNAVAILABLE
    return EXIT_FAILED


def _json_usage_error(e: click.UsageError) -> NoReturn:
    """SPEC §7: with --json a usage error is JSON on stderr too (exit 2)."""
    refused = errors.InvalidParams(e.format_message())
    click.echo(render.error_json(refused.code, refused.message, refused.data()), err=True)
    raise click.exceptions.Exit(EXIT_USAGE)


class _JsonUsage:
    """A command whose line is refused while parsing (an unknown option, a bad value)
    before its --json was read says so in JSON when the line asks for JSON anywhere
    before ``--`` (``jobctl list --bogus --json``)."""

    def make_context(self, info_name: str | None, args: list[str],
                     parent: click.Context | None = None, **extra: Any) -> click.Context:
        wants_json = "--json" in (args[:args.index("--")] if "--" in args else args)
        try:
            return super().make_context(info_name, args, parent=parent,  # type: ignore[misc]
                                        **extra)
        except click.UsageError as e:
            if not wants_json:
                raise
            _json_usage_error(e)


class _Command(_JsonUsage, click.Command):
    pass


class _Group(_JsonUsage, click.Group):
    """Turns the client's errors into SPEC §7's exit codes: 69 unreachable, 75 unavailable,
    else 1; with --json, a usage error is said in JSON too. Ctrl-C ends with 130 and a
    closed stdout with 141, both quietly.

    Every command it makes also takes the global options (``jobctl list --json``).
    """

    def command(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("cls", _Command)
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
        except errors.JobdError as e:
            _error_exit(ctx, e)
        except KeyboardInterrupt:
            ctx.exit(EXIT_INTERRUPTED)
        except BrokenPipeError:
            # the reader has gone (`| head -1`): end quietly, as SIGPIPE would end the
            # program; what is still buffered goes to /dev/null, not to a failing flush
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            ctx.exit(EXIT_PIPE)
        except click.UsageError as e:
            st = ctx.find_object(_State)
            if st is None or not st.json:
                raise
            _json_usage_error(e)


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
        render.print_plain(st.out, people)


def _has_output(st: _State, job_id: str) -> bool:
    """Whether the job's log holds more than jobd's own lines (``[jobd …] …``, SPEC §5)."""
    with contextlib.suppress(errors.JobdError):
        data = st.client.logs(job_id)["data"]
        return any(ln.strip() and not is_note(ln) for ln in data.splitlines())
    return True


def _finish(st: _State, job: dict[str, Any], *, cancelling: bool = False,
            show_job: bool = True) -> NoReturn:
    """End a command that waited for ``job``: say how it ended and exit with its code.

    ``show_job``: print the final job on stdout (as JSON, or its result for people);
    off where stdout carries something else (JSON lines, the job's log).
    """
    code = _report(st, job, cancelling=cancelling, show_job=show_job)
    raise click.exceptions.Exit(code)


def _report(st: _State, job: dict[str, Any], *, cancelling: bool = False,
            show_job: bool = True) -> int:
    """Say how a waited-for job ended (stdout, and stderr when not well); its exit code."""
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
        where = (f"; `jobctl logs {ref}` shows its output" if _has_output(st, job["id"])
                 else "; it wrote no output")
        _fail(f"job {ref} failed: {job.get('error') or 'no reason given'}{where}")
    elif job["status"] == JobStatus.CANCELLED and not cancelling:
        _fail(f"job {ref} was cancelled; `jobctl events {ref}` says by whom")
    elif cancelling and code != EXIT_OK:
        _fail(f"job {ref} ended {job['status']} before the cancel took effect")
    return code


def _watched(st: _State, job: dict[str, Any], timeout: float | None,
             view: render.Follow | None) -> dict[str, Any]:
    """Follow ``job`` through the client's ``watch`` until it ends or ``timeout``; the last job.

    Ctrl-C stops watching (exit 130); the job goes on.
    """
    def lost(e: errors.JobdError) -> None:
        if view:
            view.reconnecting(job["id"], e.message.split(";")[0])
    try:
        for job in st.client.watch(job["id"], timeout, on_reconnect=lost):
            if view:
                view.update(job)
    except KeyboardInterrupt:
        ref = render.short_id(job["id"])
        _fail(f"stopped watching; job {ref} goes on (`jobctl status {ref} --follow` to watch "
              f"again, `jobctl cancel {ref}` to stop it)")
        raise click.exceptions.Exit(EXIT_INTERRUPTED) from None
    return job


def _follow(st: _State, job: dict[str, Any], timeout: float | None, *,
            stream_json: bool = False, cancelling: bool = False) -> NoReturn:
    """Watch ``job`` until it ends or ``timeout`` runs out, then exit with SPEC §7's code.

    People get a live bar (or a line per change when not on a terminal). With
    ``--json`` only the final job is printed, unless ``stream_json`` asks for every
    change as a line of JSON.
    """
    view = render.Follow(st.out, json_lines=stream_json) if stream_json or not st.json else None
    with view or contextlib.nullcontext():
        job = _watched(st, job, timeout, view)
    _finish(st, job, cancelling=cancelling, show_job=not stream_json)


_WAIT = click.option("--wait", is_flag=True, help="Watch the job until it ends; exit 0 if it "
                     "completed, 1 if it failed, 3 if it was cancelled.")
_TIMEOUT = click.option("--timeout", type=DURATION, default=None, metavar="DURATION",
                        help="Stop waiting after this long (30s, 10m, 2h) and exit 4; the job "
                             "goes on.")
_PRIORITY = click.option("--priority", type=click.IntRange(-100, 100), default=None,
                         help="-100..100, higher runs first (above 0: admins and services).")
_REJECT = click.option("--reject-duplicate", "on_duplicate", flag_value="reject", default=None,
                       help="Refuse (exit with the job's id named) rather than fold into a "
                            "queued or running job of the same work.")
_JOB_TIMEOUT = click.option("--job-timeout", type=_Duration(none=0.0), default=None,
                            metavar="DURATION",
                            help="The job's own run-time limit (else the daemon's "
                                 "default_timeout); none: no limit (services and admins).")


def _complete_job(ctx: click.Context, param: click.Parameter,
                  incomplete: str) -> list[CompletionItem]:
    """Recent job ids from ``jobs.list`` for a JOB argument (none when the daemon is away)."""
    st = ctx.find_object(_State)
    client = st.client if st is not None else Client()
    prefix = incomplete.strip().lower()
    try:
        page = client.list(limit=_COMPLETE_LIMIT, fields=["id", "type", "status"],
                           id_prefix=prefix if len(prefix) >= 4 else None)
    except (errors.JobdError, OSError):
        return []
    return [CompletionItem(j["id"], help=f"{j['type']} {j['status']}") for j in page["jobs"]
            if j["id"].startswith(prefix)]


_JOB = click.argument("job", metavar="JOB", shell_complete=_complete_job)
_JOBS = click.argument("jobs", metavar="JOB...", nargs=-1, shell_complete=_complete_job)


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
      jobctl top                         a live view of running and queued jobs
      jobctl status 3f2a --follow        watch one job (its id, or 4+ characters of it)
      jobctl logs 3f2a --follow          its output as it comes
      jobctl cancel 3f2a --wait          stop it, and wait until it has stopped
      jobctl --json list | jq -r '.[].id'
      source <(jobctl completion bash)   complete commands, options and job ids

    \b
    Exit codes: 0 done (cancel: the job ended cancelled); 1 the job failed or the
    daemon refused; 2 usage; 3 the waited-for job was cancelled; 4 --wait/--timeout
    ran out; 69 the daemon cannot be reached; 75 the daemon is unavailable for now
    (shutting down, storage full, maintenance). NO_COLOR=1 turns colours off.
    """


@main.command()
@click.pass_obj
def ping(st: _State) -> None:
    """Check that the daemon answers, and how it sees you.

    \b
      jobctl ping
      jobctl --socket /run/user/1000/jobd/jobd.sock ping --json
    """
    result = st.client.ping()
    _show(st, result, render.ping_line(result, st.client.socket_path))


@main.command()
@click.pass_obj
def version(st: _State) -> None:
    """Print jobctl's version, and the daemon's when one answers.

    \b
      jobctl version
    """
    mine = importlib.metadata.version("jobd")
    try:
        daemon: dict[str, Any] | None = st.client.ping()
    except errors.JobdError as e:
        daemon, why = None, e.message.split(";")[0]
    if st.json:
        _show_json({"jobctl": mine, "jobd": daemon and daemon.get("version")})
        return
    _say(st, f"jobctl {mine}")
    _say(st, f"jobd {daemon.get('version')} at {st.client.socket_path}" if daemon
         else f"jobd: not reached ({why})")


@main.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the completion script for SHELL: commands, options and job ids.

    \b
      source <(jobctl completion bash)              (in ~/.bashrc)
      jobctl completion zsh > "${fpath[1]}/_jobctl"
      jobctl completion fish > ~/.config/fish/completions/jobctl.fish
    """
    cls = get_completion_class(shell)
    assert cls is not None  # the choices are click's own shells
    click.echo(cls(main, {}, "jobctl", "_JOBCTL_COMPLETE").source())


def _timeout_bounds(timeout: float | None, waits: bool, flag: str) -> None:
    """--timeout bounds a wait: without the flag that waits, a usage error (exit 2) before
    anything is asked of the daemon, rather than a bound silently ignored."""
    if timeout is not None and not waits:
        raise click.UsageError(f"--timeout bounds the wait of {flag}: give {flag} too")


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
@click.option("--strategy", type=click.Choice(["ff-only", "merge", "reset"]), default=None,
              help="How to bring in the fetched branch (else the daemon's default).")
@click.option("--full-reindex", is_flag=True, help="Rebuild the index from scratch.")
@click.option("--repo", default=None, metavar="PATH",
              help="The repository's work tree (admins and services; under allowed_roots).")
@click.option("--project-id", default=None, metavar="ID",
              help="The project id when PROJECT is a path (else the folder's name).")
@click.option("--url", default=None, metavar="URL",
              help="Clone the repository from here when it is missing (admins and services).")
@_PRIORITY
@_REJECT
@_JOB_TIMEOUT
@_WAIT
@_TIMEOUT
@click.pass_obj
def sync(st: _State, project: str, branch: str | None, strategy: str | None,
         full_reindex: bool, repo: str | None, project_id: str | None, url: str | None,
         priority: int | None, on_duplicate: str | None, job_timeout: float | None,
         wait: bool, timeout: float | None) -> None:
    """Fetch and merge PROJECT's repository, then re-index it.

    PROJECT is a project id (org/repo stays one), or a path when it starts with
    /, ./, ../ or ~, or is . or ..: then that repository is synced and its
    folder's name is the project id.

    \b
      jobctl sync myproject --branch main --wait
      jobctl sync org/repo --strategy reset --wait
      jobctl sync . --full-reindex --wait --timeout 30m
      jobctl sync newproj --url https://git.example.com/newproj.git --wait
    """
    _timeout_bounds(timeout, wait, "--wait")
    pid, repo_path = sync_target(project, repo, project_id)
    options = {"branch": branch, "strategy": strategy, "full_reindex": full_reindex or None,
               "repo_path": repo_path, "url": url}
    job = st.client.submit("sync", pid,
                           options={k: v for k, v in options.items() if v is not None} or None,
                           priority=priority, timeout_s=job_timeout,
                           on_duplicate=on_duplicate)
    _submitted(st, job, wait, timeout)


def _json_object(text: str | None, hint: str) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = _loads(text)
    except ValueError as e:
        raise click.BadParameter(f"not valid JSON: {e}", param_hint=hint) from None
    if not isinstance(value, dict):
        raise click.BadParameter('must be a JSON object, e.g. \'{"ticket": "OPS-12"}\'',
                                 param_hint=hint)
    return value


@main.command()
@click.argument("type_", metavar="TYPE")
@click.option("--project", default=None, metavar="P", help="The project the job acts on.")
@click.option("-o", "option_pairs", multiple=True, metavar="KEY=VALUE",
              help="A handler option; VALUE is read as JSON when it parses (5, true, "
                   "'[\"make\", \"all\"]'), else as text. Repeat for more.")
@click.option("--options-json", default=None, metavar="JSON",
              help="All options as one JSON object; -o values go on top.")
@click.option("--description", default=None, metavar="TEXT",
              help="Free text shown with the job (up to 1 KiB).")
@click.option("--metadata-json", default=None, metavar="JSON",
              help="Free client data as one JSON object, stored and returned as given.")
@_PRIORITY
@_REJECT
@_JOB_TIMEOUT
@_WAIT
@_TIMEOUT
@click.pass_obj
def submit(st: _State, type_: str, project: str | None, option_pairs: tuple[str, ...],
           options_json: str | None, description: str | None, metadata_json: str | None,
           priority: int | None, on_duplicate: str | None, job_timeout: float | None,
           wait: bool, timeout: float | None) -> None:
    """Submit a job of TYPE (sync, index, command, noop, or a plugin's).

    \b
      jobctl submit index --project myproject --wait
      jobctl submit noop -o seconds=30 --description "try the queue"
      jobctl submit command -o argv='["make", "-C", "/srv/docs"]' --wait
      jobctl submit index --project p --metadata-json '{"ticket": "OPS-12"}'
    """
    _timeout_bounds(timeout, wait, "--wait")
    job = st.client.submit(type_, project, options=build_options(option_pairs, options_json),
                           priority=priority, timeout_s=job_timeout, description=description,
                           metadata=_json_object(metadata_json, "--metadata-json"),
                           on_duplicate=on_duplicate)
    _submitted(st, job, wait, timeout)


_STATUS_CHOICE = click.Choice([s.value for s in JobStatus if s != JobStatus.CREATED])


@main.command("list")
@click.option("--status", "statuses", multiple=True, type=_STATUS_CHOICE,
              help="Only jobs in this status; repeat for several.")
@click.option("--type", "type_", default=None, metavar="T", help="Only jobs of this type.")
@click.option("--user", default=None, metavar="U", help="Only this user's jobs.")
@click.option("--project", default=None, metavar="P", help="Only jobs of this project.")
@click.option("--since", "since_s", type=DURATION, default=None, metavar="DURATION",
              help="Only jobs created within this long (30m, 2h, 7d).")
@click.option("--until", "until_s", type=DURATION, default=None, metavar="DURATION",
              help="Only jobs created longer ago than this (1h).")
@click.option("--order", type=click.Choice(["created", "started", "completed"]), default=None,
              help="Newest first by this time (default: created).")
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True,
              help="How many jobs, newest first.")
@click.option("--all", "every", is_flag=True, help="Every matching job, page after page.")
@click.option("--watch", is_flag=True, help="Redraw the list every second; q or Ctrl-C quits. "
                                             "Off a terminal, or with --json, print it each "
                                             "second (a line of JSON with --json).")
@click.pass_obj
def list_(st: _State, statuses: tuple[str, ...], type_: str | None, user: str | None,
          project: str | None, since_s: float | None, until_s: float | None,
          order: str | None, limit: int, every: bool, watch: bool) -> None:
    """List jobs, newest first, with the wait reason, run time and a failure's first line.

    \b
      jobctl list --status queued --status running
      jobctl list --user alice --since 1d --all
      jobctl list --order completed --until 1h
      jobctl list --status running --watch
    """
    def jobs_now() -> tuple[list[dict[str, Any]], str | None]:
        now = _now_us()
        filters = dict(status=list(statuses) or None, type=type_, user_id=user,
                       project_id=project, order=order, limit=limit,
                       created_after=since(since_s, now) if since_s is not None else None,
                       created_before=since(until_s, now) if until_s is not None else None)
        jobs: list[dict[str, Any]] = []
        cursor = None
        while True:
            page = st.client.list(**filters, cursor=cursor)
            jobs.extend(page["jobs"])
            cursor = page.get("next_cursor")
            if not (every and cursor):
                return jobs, cursor

    if watch:
        _live(st, lambda frame: render.job_table(jobs_now()[0], _now_us()),
              lambda: jobs_now()[0])
    jobs, cursor = jobs_now()
    if st.json:
        _show_json(jobs)
        return
    if not jobs:
        _say(st, "no jobs match")
        return
    render.print_plain(st.out, render.job_table(jobs, _now_us()))
    if cursor:
        _fail(f"showing the newest {len(jobs)}; --all (or --limit) for more")


@contextlib.contextmanager
def _keys() -> Iterator[Any]:
    """Single key presses from the terminal on stdin (none when stdin is no terminal)."""
    if not sys.stdin.isatty():
        yield lambda timeout: (time.sleep(timeout), "")[1]
        return
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)  # keys at once, Ctrl-C still a signal

    def read(timeout: float) -> str:
        ready, _, _ = select.select([fd], [], [], timeout)
        return os.read(fd, 32).decode(errors="replace") if ready else ""
    try:
        yield read
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _live(st: _State, draw: Any, data: Callable[[], Any]) -> NoReturn:
    """Redraw ``draw(frame)`` every second until q or Ctrl-C (exit 0). Off a terminal, or
    with --json, each second's view is printed after the last instead: the frame as
    plain text, or ``data()`` as one line of JSON."""
    frame = 0
    if st.json or not st.out.is_terminal:
        try:
            while True:
                if st.json:
                    click.echo(json.dumps(data(), separators=(",", ":"), ensure_ascii=False))
                else:
                    render.print_plain(st.out, draw(frame))
                    _say(st, "")
                sys.stdout.flush()
                frame += 1
                time.sleep(_REFRESH_S)
        except KeyboardInterrupt:
            raise click.exceptions.Exit(EXIT_OK) from None
    try:
        with _keys() as key, Live(draw(frame), console=st.out, auto_refresh=False,
                                  screen=True) as live:
            while True:
                deadline = time.monotonic() + _REFRESH_S
                while (left := deadline - time.monotonic()) > 0:
                    if "q" in key(left).lower():
                        raise click.exceptions.Exit(EXIT_OK)
                frame += 1
                live.update(draw(frame), refresh=True)
    except KeyboardInterrupt:
        raise click.exceptions.Exit(EXIT_OK) from None


@main.command()
@click.pass_obj
def top(st: _State) -> None:
    """A live view: running jobs with bars, the queue with wait reasons, per-user counts.

    Redrawn every second; q or Ctrl-C quits. Off a terminal, a view is printed each
    second (with --json, one line of JSON: running, queued, total, total_capped,
    per_user). The queue is shown in dispatch order, its first 1,000 jobs; the counts
    are of all of them.

    \b
      jobctl top
      jobctl --as-user alice top
    """
    may_stats = True  # admin.stats counts every user's jobs; refused, the scope is one user

    def stats() -> dict[str, Any] | None:
        nonlocal may_stats
        if may_stats:
            try:
                return dict(st.client.stats())
            except errors.Forbidden:
                may_stats = False
        return None

    def now() -> dict[str, Any]:
        counts = stats()
        pages = [st.client.list(status="running", limit=1000, with_total=counts is None),
                 st.client.list(status="queued", order="queue", limit=1000,
                                with_total=counts is None)]
        view = {"running": pages[0]["jobs"], "queued": pages[1]["jobs"]}
        if counts is not None:  # exact, however long the queue
            return {**view, "total": {"running": counts["running"], "queued": counts["queued"]},
                    "total_capped": False, "per_user": counts["per_user"]}
        total = {"running": pages[0]["total"], "queued": pages[1]["total"]}
        users = {j["user_id"] for j in view["running"] + view["queued"]}  # the scope's one
        return {**view, "total": total,
                "total_capped": any(p.get("total_capped") for p in pages),
                "per_user": {user: total for user in users}}

    def draw(frame: int) -> Any:
        view = now()  # first: the title names the socket that call connected to
        title = f"jobd at {st.client.socket_path}  {time.strftime('%H:%M:%S')}  (q quits)"
        return render.top_view(view, _now_us(), frame=frame, title=title)
    _live(st, draw, now)


@main.command()
@_JOB
@click.option("--follow", is_flag=True, help="Watch the job until it ends (exit codes as "
                                               "--wait); with --json, one line of JSON per change.")
@_TIMEOUT
@click.pass_obj
def status(st: _State, job: str, follow: bool, timeout: float | None) -> None:
    """Show one job: status, progress, timings, result.

    JOB is the job's id or a unique prefix of at least 4 characters.

    \b
      jobctl status 3f2a
      jobctl status 3f2a --follow --timeout 10m
    """
    _timeout_bounds(timeout, follow, "--follow")
    found = st.client.get(_resolve(st, job))
    if follow:
        _follow(st, found, timeout, stream_json=st.json)
    _show(st, found, render.job_detail(found, _now_us()))


def _filter(statuses: tuple[str, ...], user: str | None, project: str | None,
            since_s: float | None) -> dict[str, Any] | None:
    """The jobs.cancel/jobs.retry ``filter`` of the options, None when none was given."""
    found = dict(status=list(statuses) or None, user_id=user, project_id=project,
                 created_after=since(since_s, _now_us()) if since_s is not None else None)
    return {k: v for k, v in found.items() if v is not None} or None


def _bulk_options(fn: Any) -> Any:
    for option in reversed([
        _JOBS,
        click.option("--status", "statuses", multiple=True, type=_STATUS_CHOICE,
                     help="Every job in this status (admins); repeat for several."),
        click.option("--user", default=None, metavar="U", help="Only this user's jobs."),
        click.option("--project", default=None, metavar="P", help="Only this project's jobs."),
        click.option("--since", "since_s", type=DURATION, default=None, metavar="DURATION",
                     help="Only jobs created within this long (2h)."),
        click.option("--yes", "-y", is_flag=True,
                     help="Do not ask before touching more than one job."),
    ]):
        fn = option(fn)
    return fn


_DONE = {"cancel": "cancelled", "retry": "retried"}


def _confirm(st: _State, verb: str, ids: list[str], yes: bool, more: bool = False) -> None:
    """Ask before touching more than one job (``more``: ``ids`` are the first of the
    matching ones); without a terminal (and --yes) refuse, exit 2."""
    if (len(ids) <= 1 and not more) or yes:
        return
    count = f"{len(ids)}{' or more' if more else ''}"
    shown = ", ".join(render.short_id(i) for i in ids[:10]) + (" …" if len(ids) > 10 else "")
    _ask(st, f"{verb} {count} jobs ({shown})?", f"{count} jobs would be {_DONE[verb]} "
         f"({shown}); nothing done: add --yes to {verb} them all")


def _ask(st: _State, question: str, refusal: str) -> None:
    """Ask ``question`` on a terminal; a no, or no terminal (``refusal`` said, as JSON with
    --json), exits 2."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        _refused(st, errors.InvalidParams(refusal))
        raise click.exceptions.Exit(EXIT_USAGE)
    try:
        agreed = click.confirm(question, err=True)
    except click.Abort:  # Ctrl-C (or Ctrl-D) at the question: nothing done, quietly
        click.echo(err=True)
        raise click.exceptions.Exit(EXIT_INTERRUPTED) from None
    if not agreed:
        raise click.exceptions.Exit(EXIT_USAGE)


def _bulk(st: _State, verb: str, refs: tuple[str, ...], where: dict[str, Any] | None,
          yes: bool, wait: bool, timeout: float | None) -> NoReturn:
    """``cancel``/``retry`` of several jobs, or of a filter in one call; exit with the worst."""
    _timeout_bounds(timeout, wait, "--wait")
    if refs and where:
        raise click.UsageError(f"give jobs or filters (--status, --user, --project, --since) "
                               f"to {verb}, not both")
    if not refs and not where:
        raise click.UsageError(f"name the jobs to {verb} (JOB...), or filter them with "
                               "--status, --user, --project or --since")
    call = st.client.cancel if verb == "cancel" else st.client.retry
    single = len(refs) == 1  # one job named: its answer is that job, not a list
    codes: list[int] = []
    done: list[dict[str, Any]] = []
    ids: list[str] = []
    if where:
        # only jobs there when the command began: none submitted meanwhile is caught, in
        # the preview's call or in any call after it
        where = {**where, "created_before": since(0, _now_us())}
        if not yes:
            preview = call(filter=where, dry_run=True)
            _confirm(st, verb, preview["jobs"], yes, more=preview["more"])
        while True:  # the daemon touches at most 1,000 a call, and says if there are more
            try:
                answer = call(filter=where)
            except errors.JobdError as e:
                if not ids:
                    raise
                codes.append(_refused(st, e))  # the jobs already done still get a line
                break
            ids += answer["jobs"]
            # more may match that no call will touch: a retry leaves out jobs whose work is
            # queued already
            if not answer["more"] or not answer["jobs"]:
                break
        if not ids and not codes:
            _say(st, "no jobs match") if not st.json else _show_json([])
            raise click.exceptions.Exit(EXIT_OK)
        done = [_as_now(st, i) for i in ids]
    else:
        for ref in refs:
            try:
                ids.append(str(st.client.resolve(ref)))
            except errors.JobdError as e:  # each job's own: the others are still done
                code = _refused(st, e, ref)
                codes.append(EXIT_USAGE if isinstance(e, errors.InvalidParams) else code)
        ids = list(dict.fromkeys(ids))  # a job named twice is one job
        _confirm(st, verb, ids, yes)
        for job_id in ids:
            try:
                done.append(st.client.cancel(job_id) if verb == "cancel"
                            else st.client.retry(job_id))
            except errors.JobdError as e:
                codes.append(_refused(st, e))
    shown = []
    until = None if timeout is None else time.monotonic() + timeout  # for all of them
    for job in done:
        if wait and job["status"] != "unknown":
            left = None if until is None else max(0.0, until - time.monotonic())
            with render.Follow(st.out) if not st.json else contextlib.nullcontext() as view:
                job = _watched(st, job, left, view)
            codes.append(_report(st, job, cancelling=verb == "cancel", show_job=False))
        else:
            codes.append(EXIT_OK)
        shown.append(job)
        if not st.json:
            _say(st, _done_line(verb, job))
    if st.json and not (single and not shown):  # one refused: its error says all
        # one job named: that job, as before; several, or a filter: the list of them
        _show_json(shown[0] if single else shown)
    raise click.exceptions.Exit(worst(codes))


def _as_now(st: _State, job_id: str) -> dict[str, Any]:
    """A job a filtered call touched, as it is now; if the daemon cannot say (it went away
    meanwhile), its id alone, so that the job still gets its line."""
    try:
        return dict(st.client.get(job_id))
    except errors.JobdError:
        return {"id": job_id, "status": "unknown"}


def _done_line(verb: str, job: dict[str, Any]) -> str:
    ref = render.short_id(job["id"])
    if job["status"] == "unknown":
        return f"{_DONE[verb]} {ref} (its state now unknown)"
    if verb == "retry":
        return render.submitted_line(job, "queued again")
    if job["status"] == JobStatus.CANCELLED:
        return f"cancelled {ref}"
    if job["status"] == JobStatus.RUNNING:
        return (f"cancel requested for {ref}; it is stopping "
                f"(`jobctl status {ref} --follow` to watch)")
    return f"{ref} is {job['status']}"


@main.command()
@_bulk_options
@click.option("--wait", is_flag=True, help="Wait until each job has stopped; exit 0 once "
                                             "they are cancelled.")
@_TIMEOUT
@click.pass_obj
def cancel(st: _State, jobs: tuple[str, ...], statuses: tuple[str, ...], user: str | None,
           project: str | None, since_s: float | None, yes: bool, wait: bool,
           timeout: float | None) -> None:
    """Cancel queued or running jobs: those named, or every one a filter matches.

    A running job's processes get SIGTERM, then SIGKILL after the daemon's
    cancel_grace. Without --wait the command returns once the cancel is asked for.
    A filter goes to the daemon as one call per 1,000 jobs (admins), matching only
    jobs submitted before the command began; more than one job is only touched after
    you confirm, or with --yes. --timeout bounds the wait for all of them together.

    \b
      jobctl cancel 3f2a --wait
      jobctl cancel 3f2a 77b0 9c1d
      jobctl cancel --status queued --user alice --yes
    """
    _bulk(st, "cancel", jobs, _filter(statuses, user, project, since_s), yes, wait, timeout)


@main.command()
@_bulk_options
@_WAIT
@_TIMEOUT
@click.pass_obj
def retry(st: _State, jobs: tuple[str, ...], statuses: tuple[str, ...], user: str | None,
          project: str | None, since_s: float | None, yes: bool, wait: bool,
          timeout: float | None) -> None:
    """Queue failed or cancelled jobs again (same ids): those named, or a filter's.

    \b
      jobctl retry 3f2a --wait
      jobctl retry --status failed --since 2h --yes
    """
    _bulk(st, "retry", jobs, _filter(statuses, user, project, since_s), yes, wait, timeout)


@main.command()
@_JOB
@click.pass_obj
def events(st: _State, job: str) -> None:
    """Show a job's history, oldest first.

    Every status and phase change, cancel request, retry and recovery, with who
    acted.

    \b
      jobctl events 3f2a
    """
    history = st.client.events(_resolve(st, job))
    _show(st, history, render.events_table(history))


@main.command()
@_JOB
@click.option("--follow", is_flag=True, help="Keep printing new output until the job ends "
                                               "(exit codes as --wait).")
@click.option("--tail", "tail_n", type=click.IntRange(0), default=None, metavar="N",
              help="Only the last N lines of what is there now.")
@_TIMEOUT
@click.pass_obj
def logs(st: _State, job: str, follow: bool, tail_n: int | None,
         timeout: float | None) -> None:
    """Print a job's captured output.

    The stdout and stderr of its processes, oldest output dropped first past
    max_log_bytes.

    With --json: one object {data, next_offset, eof}; with --follow, one line of
    JSON per page, the --tail first.

    \b
      jobctl logs 3f2a
      jobctl logs 3f2a --tail 20 --follow
    """
    _timeout_bounds(timeout, follow, "--follow")
    job_id = _resolve(st, job)
    offset, eof, data = 0, False, []

    def show(page: dict[str, Any]) -> None:
        """A page as it comes: for people, or (following) a line of JSON; else kept for one."""
        nonlocal offset, eof
        offset, eof = page["next_offset"], page["eof"]
        if not st.json:
            click.echo(page["data"], nl=False)
        elif follow:
            click.echo(json.dumps(page, ensure_ascii=False))
        else:
            data.append(page["data"])
    try:
        if tail_n is not None:
            pages = list(st.client.tail(job_id))
            lines = "".join(p["data"] for p in pages).splitlines(keepends=True)
            last = pages[-1] if pages else {"next_offset": 0, "eof": False}
            show({"data": "".join(lines[len(lines) - tail_n:] if tail_n else []),
                  "next_offset": last["next_offset"], "eof": last["eof"]})
        if follow or tail_n is None:
            for page in st.client.tail(job_id, follow=follow, offset=offset, timeout=timeout):
                show(page)
    except KeyboardInterrupt:
        raise click.exceptions.Exit(EXIT_INTERRUPTED) from None
    if follow:
        try:
            now = st.client.get(job_id)
        except (errors.Unreachable, errors.Unavailable) as e:
            if eof:
                raise
            # the follow's --timeout ran out while jobd was away: a timeout, as for status
            _fail(f"{render.short_id(job_id)}: --timeout ran out while jobd was away "
                  f"({e.message})")
            raise click.exceptions.Exit(EXIT_TIMEOUT) from None
        _finish(st, now, show_job=False)
    if st.json:
        _show_json({"data": "".join(data), "next_offset": offset, "eof": eof})


@main.command()
@click.option("--since", "since_s", type=DURATION, default=None, metavar="DURATION",
              help="Count finished jobs from this long ago (default 24h, at most 35d).")
@click.pass_obj
def stats(st: _State, since_s: float | None) -> None:
    """Show job counts and load (admins).

    \b
      jobctl stats
      jobctl stats --since 7d --json
    """
    result = st.client.stats(since=since(since_s, _now_us()) if since_s is not None else None)
    _show(st, result, render.stats_view(result, since_s))


@main.command()
@click.pass_obj
def metrics(st: _State) -> None:
    """Print the Prometheus text of jobd's metrics (admins).

    \b
      jobctl metrics
      jobctl metrics | grep jobd_jobs_finished_total
    """
    result = st.client.metrics()
    if st.json:
        _show_json(result)
    else:
        click.echo(result["text"], nl=False)


@main.command()
@click.pass_obj
def pause(st: _State) -> None:
    """Stop starting queued jobs; running jobs go on (admins).

    \b
      jobctl pause
    """
    _set_paused(st, True)


@main.command()
@click.pass_obj
def resume(st: _State) -> None:
    """Start queued jobs again after a pause (admins).

    \b
      jobctl resume
    """
    _set_paused(st, False)


def _set_paused(st: _State, paused: bool) -> None:
    result = st.client.pause() if paused else st.client.resume()
    _show(st, result, "dispatching paused; running jobs go on (`jobctl resume` to restart)"
          if paused else "dispatching resumed")


@main.command()
@click.argument("switch", type=click.Choice(["on", "off"]), required=False)
@click.option("--reason", default=None, metavar="TEXT",
              help="Why, told to everyone whose submit is refused meanwhile.")
@click.option("--wait-drained", is_flag=True,
              help="Then wait until no job runs and none can start.")
@_TIMEOUT
@click.pass_obj
def maintenance(st: _State, switch: str | None, reason: str | None, wait_drained: bool,
                timeout: float | None) -> None:
    """Refuse new submits and retries (on), or take them again (off); alone, report (admins).

    \b
      jobctl maintenance on --reason "upgrade to 2.1" --wait-drained
      jobctl maintenance off
    """
    _timeout_bounds(timeout, wait_drained, "--wait-drained")
    result = st.client.maintenance(None if switch is None else switch == "on", reason)
    deadline = None if timeout is None else time.monotonic() + timeout
    waiting = wait_drained and not result.get("drained")
    with render.Waiting(st.out) if waiting and not st.json else contextlib.nullcontext() as view:
        while waiting and not result.get("drained"):
            if view:
                view.update(render.drain_line(result))
            if deadline is not None and time.monotonic() >= deadline:
                break
            time.sleep(_REFRESH_S)
            result = st.client.maintenance()
    state = "on" if result.get("maintenance") else "off"
    if waiting and not result.get("drained"):
        _fail(f"gave up waiting: {result.get('running')} running, {result.get('queued')} "
              f"queued; maintenance stays {state}"
              + (" (`jobctl maintenance off` ends it)" if state == "on" else ""))
        raise click.exceptions.Exit(EXIT_TIMEOUT)
    why = f" ({result['reason']})" if result.get("reason") else ""
    _show(st, result, f"maintenance {state}{why}: {result.get('running', 0)} running, "
          f"{result.get('queued', 0)} queued{', drained' if result.get('drained') else ''}")


@main.command()
@click.argument("user")
@click.option("--yes", "-y", is_flag=True, help="Do not ask before deleting.")
@click.pass_obj
def purge(st: _State, user: str, yes: bool) -> None:
    """Delete every job of a removed account (admins).

    Its queued and running jobs are cancelled first (running ones waited for), then
    all its jobs go with their events, logs and manifests. Asks first unless --yes.

    \b
      jobctl purge alice@example.com --yes
    """
    if not yes:
        _ask(st, f"cancel and delete every job of {user!r}?",
             f"purge deletes every job of {user!r}; nothing done: add --yes to purge them")
    result = st.client.purge(user)
    _show(st, result, f"purged {user}: {result['deleted']} jobs deleted")


@main.command()
@click.option("--older-than", type=DURATION, default=None, metavar="DURATION",
              help="Delete finished jobs older than this (7d), overriding both retentions.")
@click.option("--status", "statuses", multiple=True,
              type=click.Choice(["completed", "failed", "cancelled"]),
              help="Only finished jobs in this status; repeat for several.")
@click.option("--dry-run", is_flag=True, help="Only count what would be deleted.")
@click.pass_obj
def cleanup(st: _State, older_than: float | None, statuses: tuple[str, ...],
            dry_run: bool) -> None:
    """Delete finished jobs past retention now (admins).

    Their events, checkpoints and log files go with them; active jobs are never
    touched.

    \b
      jobctl cleanup --dry-run
      jobctl cleanup --older-than 7d --status failed
    """
    result = st.client.cleanup(older_than_s=older_than, dry_run=dry_run,
                               status=list(statuses) or None)
    _show(st, result, render.cleanup_line(result, dry_run))
