"""How jobctl shows answers: tables, a job's details, status lines, live progress, JSON.

Pure functions of their input (and of ``now`` where an age is shown), so the output
can be checked without a daemon. Everything goes through a rich ``Console`` made by
``console()``, which honours ``NO_COLOR`` and never interprets text from the daemon
as markup.
"""

from __future__ import annotations

import datetime as _dt
import errno
import json
import math
import os
import re
from typing import Any, Iterable, Mapping

from rich.cells import cell_len, set_cell_size
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.live import Live
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from jobd.models import from_iso

__all__ = [
    "Follow", "Waiting", "bar_line", "cleanup_line", "console", "drain_line", "elapsed",
    "error_json", "events_table", "first_line", "human_duration", "job_detail", "job_note",
    "job_table", "percent", "ping_line", "print_plain", "result_lines", "short_id",
    "stats_view", "status_line", "submitted_line", "to_json", "top_view",
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


class _Console(Console):
    """rich's Console, but a closed output is the caller's to end on (rich exits 1)."""

    def on_broken_pipe(self) -> None:
        self.quiet = True  # nothing more to write to it
        raise BrokenPipeError(errno.EPIPE, "output closed by its reader")


def console(*, stderr: bool = False, env: Mapping[str, str] | None = None) -> Console:
    """A Console for jobctl's output; colourless when ``NO_COLOR`` is set to anything."""
    env = os.environ if env is None else env
    out = _Console(stderr=stderr, highlight=False, no_color=bool(env.get("NO_COLOR")))
    if not out.is_terminal and not env.get("COLUMNS"):
        # piped into a file or grep: no screen to fit, so never cut a row short
        out.width = 1000
    return out


def to_json(value: Any) -> str:
    """JSON for scripts: indented, UTF-8 left as it is."""
    return json.dumps(value, indent=2, ensure_ascii=False)


def short_id(job_id: str) -> str:
    return job_id[:8]


def error_json(code: int, message: str, data: Mapping[str, Any]) -> str:
    """SPEC §7: an error for scripts, one line on stderr."""
    return json.dumps({"error": {"code": code, "message": message, "data": dict(data)}},
                      ensure_ascii=False)


def print_plain(out: Console, renderable: RenderableType) -> None:
    """Print ``renderable``; off a terminal without the spaces that pad a table's last column."""
    if out.is_terminal:
        out.print(renderable)
        return
    with out.capture() as captured:
        out.print(renderable)
    for line in captured.get().splitlines():
        out.out(line.rstrip(), highlight=False)


def first_line(text: str | None) -> str:
    return (text or "").strip().split("\n", 1)[0].rstrip()


def elapsed(job: Mapping[str, Any], now_us: int) -> float | None:
    """Seconds the job has run: from its ``started_at`` to its end, or to now."""
    if not job.get("started_at"):
        return None
    end = from_iso(job["completed_at"]) if job.get("completed_at") else now_us
    return max(0.0, (end - from_iso(job["started_at"])) / 1e6)


def clock_time(seconds: float | None) -> str:
    """``0:01:05``; ``-`` before the job started."""
    if seconds is None:
        return "-:--:--"
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def human_duration(seconds: float, parts: int = 1) -> str:
    """``42s``, ``5m``, ``3h``, ``2d``; with ``parts=2``: ``2h 5m``; below a second its
    fraction (``0.4s``, ``0.0012s``), which would otherwise read as no time at all, and
    below a millisecond ``<1ms`` (not ``4e-05s``)."""
    if 0 < seconds < 0.001:
        return "<1ms"
    if 0 < seconds < 1:
        return f"{seconds:.2g}s"
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
        return first_line(job["error"])
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
    """The jobs, one row each: id, type, user, project, status, progress, phase, age, run
    time, and the note: where and why a queued job waits, the first line of a failure."""
    table = Table(box=None, pad_edge=False, header_style="bold")
    for name in ("ID", "TYPE", "USER", "PROJECT", "STATUS"):
        table.add_column(name, no_wrap=True)
    table.add_column("PROGRESS", justify="right", no_wrap=True)
    table.add_column("PHASE", no_wrap=True)
    table.add_column("AGE", justify="right", no_wrap=True)
    table.add_column("RAN", justify="right", no_wrap=True)
    # the one column that may shrink: the others keep their width, the note gets the rest
    table.add_column("NOTE")
    for job in jobs:
        ran = elapsed(job, now_us)
        note = _list_note(job)
        table.add_row(
            Text(short_id(job["id"])), Text(job["type"]), Text(job["user_id"]),
            Text(job.get("project_id") or "-"), _styled_status(job["status"]),
            Text(percent(job.get("progress"))), Text(job.get("phase") or "-"),
            Text(_age(job.get("created_at"), now_us)),
            Text("-" if ran is None else human_duration(ran, 2)), _Fitted(note))
    return table


class _Fitted:
    """Text cut (``_cut``) to the width the table gives it, never wrapped to more lines."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        width = cell_len(self.text)
        return Measurement(min(1, width), width)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield Text(_cut(self.text, options.max_width))


def _list_note(job: Mapping[str, Any]) -> str:
    """A list row's note: the short wait reason of a queued job, a failure's first line."""
    if job.get("status") == "queued":
        where = f"#{job['queue_position']}" if job.get("queue_position") else ""
        return " ".join(p for p in (where, job.get("wait_reason") or "") if p)
    if job.get("status") == "failed":
        return first_line(job.get("error"))
    return job_note(job) or ""


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
        row("timeout", human_duration(job["timeout_s"], 2) if job["timeout_s"]
            else "none (no limit)")
    if job.get("description"):
        row("description", job["description"])
    for name in ("options", "metadata"):
        if job.get(name):
            row(name, job[name])
    if job.get("result"):
        row("result", "\n".join(result_lines(job["result"])))
    return grid


def result_lines(value: Any, indent: str = "") -> list[str]:
    """A result as ``key: value`` lines, nested objects and lists of them indented."""
    lines = []
    items = value.items() if isinstance(value, Mapping) else enumerate(value)
    for key, item in items:
        name = f"{indent}{key}:" if isinstance(value, Mapping) else f"{indent}-"
        if isinstance(item, Mapping) and item or (
                isinstance(item, list) and any(isinstance(i, (dict, list)) for i in item)):
            lines.append(name)
            lines.extend(result_lines(item, indent + "  "))
        elif isinstance(item, list):
            lines.append(f"{name} {', '.join(_value(i) for i in item) or '-'}")
        else:
            lines.append(f"{name} {_value(item)}")
    return lines


def result_line(result: Mapping[str, Any]) -> str:
    """A finished job's result on one line: its plain values (``result: files_indexed=120,
    ...``); nested ones are left to ``jobctl status``, which shows the whole result."""
    plain = [f"{k}={_value(v)}" for k, v in result.items()
             if not isinstance(v, (Mapping, list))]
    nested = len(result) - len(plain)
    return "result: " + ", ".join(plain) + (f" (+{nested} more: jobctl status)" if nested else "")


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


def stats_view(stats: Mapping[str, Any], since_s: float | None = None) -> RenderableType:
    """``admin.stats`` for people: counts, workers, dispatch and maintenance, then the jobs
    finished within ``since_s`` (None: the daemon's default, 24 h) by type, then the busy
    users."""
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
    grid.add_row("maintenance", Text("on (submits and retries refused)"
                                     if stats.get("maintenance") else "off"))
    if stats.get("db_bytes") is not None:
        grid.add_row("database", Text(f"{stats['db_bytes'] / 1e6:.1f} MB"))
    if stats.get("uptime_s") is not None:
        grid.add_row("uptime", Text(human_duration(stats["uptime_s"], 2)))
    parts: list[RenderableType] = [grid, Text(""), _finished_table(stats.get("finished") or {},
                                                                   since_s)]
    per_user = stats.get("per_user") or {}
    if per_user:
        users = Table(box=None, pad_edge=False, header_style="bold")
        users.add_column("USER", no_wrap=True)
        users.add_column("RUNNING", justify="right")
        users.add_column("QUEUED", justify="right")
        for user, n in sorted(per_user.items()):
            users.add_row(Text(user), Text(str(n.get("running", 0))),
                          Text(str(n.get("queued", 0))))
        parts += [Text(""), users]
    return Group(*parts)


def _finished_table(finished: Mapping[str, Mapping[str, Any]],
                    since_s: float | None) -> RenderableType:
    """``admin.stats``' ``finished``: by type, how the jobs ended and how long they ran."""
    heading = f"finished in the last {human_duration(86_400 if since_s is None else since_s, 2)}"
    if not finished:
        return Text(f"{heading}: none")
    table = Table(box=None, pad_edge=False, header_style="bold", title=heading,
                  title_justify="left", title_style="bold")
    table.add_column("TYPE", no_wrap=True)
    for name in ("COMPLETED", "FAILED", "CANCELLED", "SUCCESS", "P50", "P95"):
        table.add_column(name, justify="right", no_wrap=True)
    for type_, n in sorted(finished.items()):
        rate, ran = n.get("success_rate"), n.get("duration_s") or {}
        table.add_row(Text(type_), *(Text(str(n.get(end, 0)))
                                     for end in ("completed", "failed", "cancelled")),
                      Text("-" if rate is None else f"{rate:.0%}"),
                      *(Text("-" if ran.get(q) is None else human_duration(ran[q], 2))
                        for q in ("p50", "p95")))
    return table


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


_SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"
_BAR_MAX = 30
_BAR_MIN = 6


def _cut(text: str, width: int) -> str:
    """``text`` in at most ``width`` terminal columns (a wide character takes two)."""
    if width <= 0:
        return ""
    if cell_len(text) <= width:
        return text
    # a wide character that would straddle the cut leaves a space: not kept before the …
    return set_cell_size(text, max(0, width - 1)).rstrip(" ") + "…"


def bar_line(job: Mapping[str, Any], width: int, now_us: int, *, frame: int = 0,
             note: str | None = None) -> Text:
    """The live bar of one job, fitted to ``width`` columns without wrapping.

    What always stays: id, percentage, status (with phase) and the time it has run
    (from its ``started_at``), then the ETA when known. Room left goes to the bar,
    then the type and project, then the message, cut first; a ``note`` in the message's
    place (``reconnecting…``) keeps its room ahead of the bar, and drops the ETA.
    """
    status = str(job["status"])
    active = status not in ("completed", "failed", "cancelled")
    state = status + (f" {job['phase']}" if job.get("phase") else "")
    head = f"{_SPINNER[frame % len(_SPINNER)] if active else ' '} {short_id(job['id'])}"
    tail = [percent(job.get("progress")).rjust(4), state, clock_time(elapsed(job, now_us))]
    if active and job.get("eta_s") is not None and note is None:  # stale while jobd is away
        tail.append(f"eta {human_duration(job['eta_s'], 2)}")
    fixed = cell_len(head) + sum(cell_len(p) + 1 for p in tail)
    # a note is read whole: its room is kept before the bar and the type take theirs
    kept = cell_len(note) + 1 if note else 0
    room = width - 1 - fixed - kept  # the last column stays free: writing it can wrap the line
    bar_w = max(0, min(_BAR_MAX, room // 3))
    if bar_w < _BAR_MIN:
        bar_w = 0
    room -= bar_w + 1 if bar_w else 0
    what = " ".join(p for p in (job.get("type"), job.get("project_id")) if p)
    message = job_note(job) if note is None else note
    show_what = bool(what) and room >= cell_len(what) + 1 + 12
    if show_what:
        room -= cell_len(what) + 1
    line = Text(head)
    if show_what:
        line.append(" " + what)
    if bar_w:
        done = round(bar_w * min(100.0, max(0.0, job.get("progress") or 0)) / 100)
        style = STATUS_STYLE.get(status, "") if not active else "cyan"
        line.append(" ")
        line.append("━" * done, style=style)
        line.append("━" * (bar_w - done), style="grey23")
    line.append(" " + tail[0])
    line.append(" ")
    line.append(state, style=STATUS_STYLE.get(status, ""))
    for part in tail[2:]:
        line.append(" " + part)
    room += kept
    if message and room > 1:
        line.append(" " + _cut(message, room - 1), style="yellow" if note else "")
    return line


class _Bars:
    """The renderable a Live view redraws: one bar per job, sized at each drawing."""

    def __init__(self) -> None:
        self.jobs: dict[str, Mapping[str, Any]] = {}
        self.note: str | None = None
        self.frame = 0

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        self.frame += 1
        now_us = _now_us()
        for job in self.jobs.values():
            yield bar_line(job, options.max_width, now_us, frame=self.frame, note=self.note)


def _now_us() -> int:
    import time
    return time.time_ns() // 1000


class _Changes:
    """A line per visible change, for output that is not a terminal: a line the same as
    the last (or seen as the same) is not printed again."""

    def __init__(self, out: Console) -> None:
        self._out = out
        self._last: str | None = None

    def _changed(self, line: str, seen: str | None = None) -> None:
        seen = line if seen is None else seen
        if seen == self._last:
            return
        self._last = seen
        self._out.out(line, highlight=False)

    def _live_here(self) -> bool:
        return self._out.is_terminal and not self._out.is_dumb_terminal


class Follow(_Changes):
    """Shows a job as it changes: a live bar on a terminal, else a line per visible change.

    With ``json_lines`` every new version of the job is printed as one line of JSON.
    ``reconnecting(why)`` says that the daemon is being reached again.
    """

    def __init__(self, out: Console, *, json_lines: bool = False) -> None:
        super().__init__(out)
        self._json = json_lines
        self._bars: _Bars | None = None
        self._live: Live | None = None

    def __enter__(self) -> Follow:
        if not self._json and self._live_here():
            self._bars = _Bars()
            self._live = Live(self._bars, console=self._out, refresh_per_second=8,
                              transient=False)
            self._live.start()
        return self

    def update(self, job: Mapping[str, Any]) -> None:
        if self._bars is not None:
            self._bars.note = None
            self._bars.jobs[job["id"]] = job
            assert self._live is not None
            self._live.refresh()
            return
        if self._json:
            self._changed(json.dumps(job, separators=(",", ":"), ensure_ascii=False))
            return
        line = status_line(job)
        # git repeats one message with rising counts ("Counting objects:  12% (20/161)"):
        # a line for each would bury the rest, so a line needs more than new counts
        self._changed(line, line if not job.get("message") else status_line(
            {**job, "message": _COUNTS.sub("#", job["message"])}))

    def reconnecting(self, job_id: str, why: str) -> None:
        """The daemon is gone for now (a restart): say so until the next update."""
        if self._bars is not None:
            self._bars.note = "reconnecting…"
        elif not self._json:
            self._changed(f"{short_id(job_id)} reconnecting… ({why})")

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.stop()


class Waiting(_Changes):
    """One line saying what jobctl waits for: redrawn in place on a terminal, else printed
    at each change, as ``Follow`` shows a job."""

    def __init__(self, out: Console) -> None:
        super().__init__(out)
        self._live: Live | None = None

    def __enter__(self) -> Waiting:
        if self._live_here():
            self._live = Live(Text(""), console=self._out, auto_refresh=False, transient=True)
            self._live.start()
        return self

    def update(self, line: str) -> None:
        if self._live is None:
            self._changed(line)
        else:
            self._live.update(Text(_cut(line, self._out.width - 1)), refresh=True)

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.stop()


def drain_line(result: Mapping[str, Any]) -> str:
    """``admin.maintenance`` while waiting for the jobs to drain."""
    state = "on" if result.get("maintenance") else "off"
    return (f"waiting until drained: {result.get('running', 0)} running, "
            f"{result.get('queued', 0)} queued (maintenance {state})")


def top_view(view: Mapping[str, Any], now_us: int, *, frame: int = 0,
             title: str = "") -> RenderableType:
    """``jobctl top``: running jobs with bars, the queue in dispatch order, per-user counts.

    ``view``: ``running`` and ``queued`` (the jobs shown), ``total`` (how many there are
    of each, ``total_capped`` when past the count's cap) and ``per_user``.
    """
    return _Top(view, now_us, frame, title)


class _Top:
    def __init__(self, view: Mapping[str, Any], now_us: int, frame: int, title: str) -> None:
        self.view, self.now_us, self.frame, self.title = view, now_us, frame, title

    def _heading(self, name: str) -> str:
        jobs, total = self.view[name], self.view["total"][name]
        count = f"{total}{'+' if self.view.get('total_capped') else ''}"
        return f"{name} ({count}{f', the first {len(jobs)} shown' if total > len(jobs) else ''})"

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = options.max_width
        running, queued = self.view["running"], self.view["queued"]
        yield Text(_cut(self.title, width - 1), style="bold")
        yield Text(self._heading("running"), style="bold cyan")
        for job in running:
            yield bar_line(job, width, self.now_us, frame=self.frame)
        if not running:
            yield Text("  none")
        yield Text(self._heading("queued"), style="bold yellow")
        for job in queued:
            pos = f"#{job.get('queue_position') or '?'}"
            why = WAIT_REASONS.get(job.get("wait_reason") or "", job.get("wait_reason") or "")
            line = f"  {pos:>4} {short_id(job['id'])} {job['type']} {job['user_id']} " \
                   f"{job.get('project_id') or '-'} {_age(job.get('created_at'), self.now_us)}" \
                   f" {why}"
            yield Text(_cut(line, width - 1))
        if not queued:
            yield Text("  none")
        per_user = self.view.get("per_user") or {}
        if per_user:
            yield Text("users (running / queued)", style="bold")
            for user, n in sorted(per_user.items()):
                yield Text(_cut(f"  {user}: {n.get('running', 0)} / {n.get('queued', 0)}",
                                width - 1))
