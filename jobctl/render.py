"""How jobctl shows answers: tables, a job's details, status lines, live progress, JSON.

Pure functions of their input (and of ``now`` where an age is shown), so the output
can be checked without a daemon. Everything goes through a rich ``Console`` made by
``console()``, which honours ``NO_COLOR`` and never interprets text from the daemon
as markup.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
from typing import Any, Iterable, Mapping

from rich.console import Console, Group, RenderableType
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Column, Table
from rich.text import Text

from jobd.models import from_iso

__all__ = [
    "Follow", "cleanup_line", "console", "events_table", "human_duration", "job_detail",
    "job_note", "job_table", "percent", "ping_line", "result_line", "short_id", "stats_view",
    "status_line", "submitted_line", "to_json",
]

STATUS_STYLE = {
    "created": "dim",
    "queued": "yellow",
    "running": "cyan",
    "completed": "green",
    "failed": "bold red",
    "cancelled": "magenta",
}

#: the counts in a message, which alone do not make a new line when not on a terminal
_COUNTS = re.compile(r"\s*\d+")

WAIT_REASONS = {
    "slots": "waiting for a free worker",
    "user_limit": "its user runs as many jobs as allowed",
    "project_busy": "another sync or index of this project runs",
    "paused": "dispatching is paused",
}


def console(*, stderr: bool = False, env: Mapping[str, str] | None = None) -> Console:
    """A Console for jobctl's output; colourless when ``NO_COLOR`` is set to anything."""
    env = os.environ if env is None else env
    out = Console(stderr=stderr, highlight=False, no_color=bool(env.get("NO_COLOR")))
    if not out.is_terminal and not env.get("COLUMNS"):
        # piped into a file or grep: no screen to fit, so never cut a row short
        out.width = 1000
    return out


def to_json(value: Any) -> str:
    """JSON for scripts: indented, UTF-8 left as it is."""
    return json.dumps(value, indent=2, ensure_ascii=False)


def short_id(job_id: str) -> str:
    return job_id[:8]


def human_duration(seconds: float, parts: int = 1) -> str:
    """``42s``, ``5m``, ``3h``, ``2d``; with ``parts=2``: ``2h 5m``."""
    seconds = max(0, int(seconds))
    out = []
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)):
        if seconds >= size or (unit == "s" and not out):
            out.append(f"{seconds // size}{unit}")
            seconds %= size
            if len(out) == parts:
                break
    return " ".join(out)


def _age(iso_text: str | None, now_us: int) -> str:
    if not iso_text:
        return "-"
    return human_duration((now_us - from_iso(iso_text)) / 1e6)


def _local_time(iso_text: str | None) -> str:
    if not iso_text:
        return "-"
    t = _dt.datetime.fromtimestamp(from_iso(iso_text) / 1e6)
    return t.strftime("%Y-%m-%d %H:%M:%S")


def percent(progress: float | None) -> str:
    """Whole percent, rounded down: a job at 99.6 % has not finished."""
    return f"{math.floor(progress or 0)}%"


def job_note(job: Mapping[str, Any]) -> str | None:
    """The one thing worth saying about the job beside its status."""
    if job.get("status") == "failed" and job.get("error"):
        return str(job["error"])
    if job.get("status") == "queued":
        where = f"#{job['queue_position']} in queue" if job.get("queue_position") else None
        why = WAIT_REASONS.get(job.get("wait_reason") or "", job.get("wait_reason"))
        return ", ".join(p for p in (where, why) if p) or None
    if job.get("cancel_requested") and job.get("status") == "running":
        return "cancel requested, stopping"
    return job.get("message")


def status_line(job: Mapping[str, Any]) -> str:
    """``<id8> <status> <progress>% <phase> <note>``: one line per change when not on a terminal."""
    parts = [short_id(job["id"]), job["status"], percent(job.get("progress")),
             job.get("phase") or "-"]
    note = job_note(job)
    if note:
        parts.append(note)
    return " ".join(parts)


def _styled_status(status: str) -> Text:
    return Text(status, style=STATUS_STYLE.get(status, ""))


def job_table(jobs: Iterable[Mapping[str, Any]], now_us: int) -> Table:
    """The jobs, one row each: id, type, user, project, status, progress, phase, age."""
    table = Table(box=None, pad_edge=False, header_style="bold")
    for name in ("ID", "TYPE", "USER", "PROJECT", "STATUS"):
        table.add_column(name, no_wrap=True)
    table.add_column("PROGRESS", justify="right", no_wrap=True)
    table.add_column("PHASE", no_wrap=True)
    table.add_column("AGE", justify="right", no_wrap=True)
    for job in jobs:
        table.add_row(
            Text(short_id(job["id"])), Text(job["type"]), Text(job["user_id"]),
            Text(job.get("project_id") or "-"), _styled_status(job["status"]),
            Text(percent(job.get("progress"))), Text(job.get("phase") or "-"),
            Text(_age(job.get("created_at"), now_us)))
    return table


def _value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(", ", ": "), ensure_ascii=False)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def job_detail(job: Mapping[str, Any], now_us: int) -> Table:
    """Everything about one job, a field per line, the way ``jobctl status`` shows it."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()

    def row(name: str, value: Any) -> None:
        grid.add_row(name, value if isinstance(value, Text) else Text(_value(value)))

    row("id", job["id"])
    row("type", job["type"])
    row("user", job["user_id"])
    row("project", job.get("project_id"))
    status = _styled_status(job["status"])
    if job.get("attempts", 0) > 1:
        status.append(f"  (attempt {job['attempts']})")
    row("status", status)
    progress = percent(job.get("progress"))
    if job.get("phase"):
        progress += f"  {job['phase']}"
    if job.get("eta_s") is not None and job["status"] == "running":
        progress += f"  about {human_duration(job['eta_s'], 2)} left"
    row("progress", progress)
    if job.get("message"):
        row("message", job["message"])
    if job.get("error"):
        row("error", job["error"])
    if job["status"] == "queued":
        row("queue", job_note(job))
    if job.get("cancel_requested") and job["status"] == "running":
        row("cancel", "requested, stopping")
    row("priority", job.get("priority", 0))
    for name in ("created_at", "started_at", "completed_at"):
        if job.get(name):
            row(name.removesuffix("_at"),
                f"{_local_time(job[name])}  ({_age(job[name], now_us)} ago)")
    if job.get("started_at"):
        end = from_iso(job["completed_at"]) if job.get("completed_at") else now_us
        row("ran", human_duration((end - from_iso(job["started_at"])) / 1e6, 2))
    if job.get("timeout_s") is not None:
        row("timeout", human_duration(job["timeout_s"], 2))
    if job.get("description"):
        row("description", job["description"])
    for name in ("options", "metadata"):
        if job.get(name):
            row(name, job[name])
    for key, value in (job.get("result") or {}).items():
        row(f"result.{key}", value)
    return grid


def result_line(result: Mapping[str, Any]) -> str:
    """A finished job's result on one line: ``result: files_indexed=120, ...``."""
    return "result: " + ", ".join(f"{k}={_value(v)}" for k, v in result.items())


def submitted_line(job: Mapping[str, Any], verb: str = "submitted") -> str:
    """What ``sync``, ``submit`` and ``retry`` say about the job they queued."""
    verb = "already queued" if job.get("deduplicated") else verb
    project = f" {job['project_id']}" if job.get("project_id") else ""
    line = f"{verb}: {job['type']}{project} {job['id']} ({job['status']}"
    note = job_note(job)
    return line + (f", {note})" if note else ")")


def events_table(events: Iterable[Mapping[str, Any]]) -> Table:
    """A job's history, oldest first: when, status, phase, progress, who, message."""
    table = Table(box=None, pad_edge=False, header_style="bold")
    for name in ("AT", "STATUS", "PHASE"):
        table.add_column(name, no_wrap=True)
    table.add_column("PROGRESS", justify="right", no_wrap=True)
    table.add_column("ACTOR", no_wrap=True)
    table.add_column("MESSAGE")
    for event in events:
        table.add_row(
            Text(_local_time(event.get("at"))), _styled_status(event.get("status") or "-"),
            Text(event.get("phase") or "-"), Text(percent(event.get("progress"))),
            Text(event.get("actor") or "-"), Text(event.get("message") or ""))
    return table


def stats_view(stats: Mapping[str, Any]) -> RenderableType:
    """``admin.stats`` for people: counts, workers, dispatch state, then the busy users."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    counts = Text()
    for status, count in (stats.get("jobs") or {}).items():
        if len(counts):
            counts.append("  ")
        counts.append(status, style=STATUS_STYLE.get(status, ""))
        counts.append(f" {count}")
    grid.add_row("jobs", counts if len(counts) else Text("none"))
    grid.add_row("workers", Text(f"{stats.get('running', 0)} of {stats.get('workers', 0)} busy, "
                                 f"{stats.get('queued', 0)} queued"))
    grid.add_row("dispatch", Text("paused (running jobs go on)" if stats.get("paused")
                                  else "running"))
    if stats.get("db_bytes") is not None:
        grid.add_row("database", Text(f"{stats['db_bytes'] / 1e6:.1f} MB"))
    if stats.get("uptime_s") is not None:
        grid.add_row("uptime", Text(human_duration(stats["uptime_s"], 2)))
    per_user = stats.get("per_user") or {}
    if not per_user:
        return grid
    users = Table(box=None, pad_edge=False, header_style="bold")
    users.add_column("USER", no_wrap=True)
    users.add_column("RUNNING", justify="right")
    users.add_column("QUEUED", justify="right")
    for user, n in sorted(per_user.items()):
        users.add_row(Text(user), Text(str(n.get("running", 0))), Text(str(n.get("queued", 0))))
    return Group(grid, Text(""), users)


def ping_line(result: Mapping[str, Any], socket_path: object) -> str:
    caller = result.get("caller") or {}
    return (f"jobd {result.get('version')} at {socket_path}, up "
            f"{human_duration(result.get('uptime_s') or 0, 2)}; you are {caller.get('user')} "
            f"(uid {caller.get('uid')}, {caller.get('role')})")


def cleanup_line(result: Mapping[str, Any], dry_run: bool) -> str:
    cutoffs = result.get("cutoffs") or {}
    verb = "would delete" if dry_run else "deleted"
    n = result.get("deleted", 0)
    return (f"{verb} {n} job{'' if n == 1 else 's'} (finished before {cutoffs.get('keep')}; "
            f"failed before {cutoffs.get('keep_failed')})")


class _NoteColumn(TextColumn):
    """The job's note: plain text (never markup), cut short to fit the line."""

    def __init__(self) -> None:
        super().__init__("{task.fields[note]}", markup=False,
                         table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1))


class Follow:
    """Shows a job as it changes: a live bar on a terminal, else a line per visible change.

    With ``json_lines`` every new version of the job is printed as one line of JSON.
    """

    def __init__(self, out: Console, *, json_lines: bool = False) -> None:
        self._out = out
        self._json = json_lines
        self._last: str | None = None
        self._bar: Progress | None = None
        self._task: Any = None

    def __enter__(self) -> Follow:
        if not self._json and self._out.is_terminal and not self._out.is_dumb_terminal:
            self._bar = Progress(
                SpinnerColumn(), TextColumn("{task.description}", markup=False), BarColumn(),
                TextColumn("{task.fields[pct]:>4}", markup=False),
                TextColumn("{task.fields[state]}", markup=False), _NoteColumn(),
                TimeElapsedColumn(), console=self._out)
            self._bar.start()
        return self

    def update(self, job: Mapping[str, Any]) -> None:
        if self._json:
            line = seen = json.dumps(job, separators=(",", ":"), ensure_ascii=False)
        else:
            line = status_line(job)
            # git repeats one message with rising counts ("Counting objects:  12% (20/161)"):
            # a line for each would bury the rest, so a line needs more than new counts
            seen = line if self._bar is not None or not job.get("message") else status_line(
                {**job, "message": _COUNTS.sub("#", job["message"])})
        if seen == self._last:
            return
        self._last = seen
        if self._bar is None:
            self._out.out(line, highlight=False)
            return
        state = job["status"] + (f" {job['phase']}" if job.get("phase") else "")
        fields = dict(pct=percent(job.get("progress")), state=state, note=job_note(job) or "")
        if self._task is None:
            description = " ".join(p for p in (short_id(job["id"]), job["type"],
                                               job.get("project_id")) if p)
            self._task = self._bar.add_task(description, total=100, **fields)
        self._bar.update(self._task, completed=job.get("progress") or 0, **fields)
        if job["status"] in ("completed", "failed", "cancelled"):
            self._bar.stop_task(self._task)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()
