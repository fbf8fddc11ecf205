"""jobctl without a daemon: rendering, argument rules, exit codes, an unreachable socket."""

from __future__ import annotations

import io
import json
import os
import re
import socket
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner
from rich.console import Console, RenderableType

from jobctl import render
from jobctl.cli import (EXIT_CANCELLED, EXIT_FAILED, EXIT_OK, EXIT_TIMEOUT, EXIT_UNREACHABLE,
                        EXIT_USAGE, build_options, exit_code, main, parse_option, since,
                        sync_target)
from jobd import errors
from jobd.client import Client, socket_candidates
from jobd.models import Job, JobStatus, from_iso

NOW = from_iso("2026-11-22T12:00:00Z")
HOUR = 3_600_000_000
JOB_ID = "3f2a9c1e-5b7d-4e8f-9a0b-1c2d3e4f5a6b"


def wire_job(**over: Any) -> dict[str, Any]:
    """A job in its wire shape, as the daemon sends it."""
    fields: dict[str, Any] = dict(
        id=JOB_ID, type="sync", user_id="alice", project_id="web", status=JobStatus.RUNNING,
        created_at=NOW - 2 * HOUR, updated_at=NOW, version=7, progress=42.7, phase="indexing",
        message="120/300 files", started_at=NOW - HOUR, attempts=1)
    fields.update(over)
    return Job(**fields).to_dict()


def text_of(renderable: RenderableType, width: int = 140) -> str:
    out = Console(file=io.StringIO(), width=width, no_color=True, highlight=False)
    out.print(renderable)
    return out.file.getvalue()  # type: ignore[attr-defined]


# rendering ---------------------------------------------------------------------------------

def test_job_table_shows_one_row_per_job_with_short_id_and_age() -> None:
    jobs = [wire_job(),
            wire_job(id="0badc0de-0000-4000-8000-000000000000", type="noop", user_id="bob",
                     project_id=None, status=JobStatus.FAILED, progress=99.6, phase=None,
                     created_at=NOW - 3 * 24 * HOUR)]
    lines = text_of(render.job_table(jobs, NOW)).splitlines()
    assert lines[0].split() == ["ID", "TYPE", "USER", "PROJECT", "STATUS", "PROGRESS", "PHASE",
                                "AGE", "RAN", "NOTE"]
    assert lines[1].split() == ["3f2a9c1e", "sync", "alice", "web", "running", "42%", "indexing",
                                "2h", "1h", "120/300", "files"]
    assert lines[2].split() == ["0badc0de", "noop", "bob", "-", "failed", "99%", "-", "3d",
                                "1h"]
    assert JOB_ID not in "\n".join(lines)


def test_on_80_columns_the_list_keeps_every_column_and_cuts_the_note() -> None:
    from rich.cells import cell_len
    jobs = [wire_job(message="a message that goes on and on, past any terminal's width"),
            wire_job(status=JobStatus.FAILED, error="界" * 40, progress=3.0)]
    lines = text_of(render.job_table(jobs, NOW), width=80).splitlines()
    assert all(cell_len(ln) <= 80 for ln in lines), lines
    assert lines[0].split() == ["ID", "TYPE", "USER", "PROJECT", "STATUS", "PROGRESS", "PHASE",
                                "AGE", "RAN", "NOTE"]
    *fixed, note = lines[1].split(maxsplit=9)
    assert fixed == ["3f2a9c1e", "sync", "alice", "web", "running", "42%", "indexing", "2h",
                     "1h"]
    assert note.startswith("a mess") and note.rstrip().endswith("…"), note
    assert lines[2].split()[4] == "failed" and lines[2].rstrip().endswith("界…"), lines[2]


def test_stats_show_the_finished_jobs_by_type_and_maintenance() -> None:
    stats = {"jobs": {"completed": 9}, "running": 0, "workers": 4, "queued": 0,
             "paused": False, "maintenance": True, "finished": {
                 "sync": {"completed": 9, "failed": 1, "cancelled": 2, "success_rate": 0.9,
                          "duration_s": {"mean": 3.0, "p50": 0.42, "p95": 75.0}},
                 "noop": {"completed": 0, "failed": 0, "cancelled": 3, "success_rate": None,
                          "duration_s": {"mean": None, "p50": None, "p95": None}}}}
    shown = text_of(render.stats_view(stats, since_s=7 * 86_400))
    assert re.search(r"^maintenance\s+on \(submits and retries refused\)", shown, re.M), shown
    assert re.search(r"^finished in the last 7d", shown, re.M), shown
    assert re.search(r"^TYPE\s+COMPLETED\s+FAILED\s+CANCELLED\s+SUCCESS\s+P50\s+P95", shown, re.M)
    assert re.search(r"^sync\s+9\s+1\s+2\s+90%\s+0\.42s\s+1m 15s", shown, re.M), shown
    assert re.search(r"^noop\s+0\s+0\s+3\s+-\s+-\s+-", shown, re.M), shown
    quiet = text_of(render.stats_view({**stats, "finished": {}, "maintenance": False}))
    assert re.search(r"^maintenance\s+off", quiet, re.M)
    assert re.search(r"^finished in the last 1d: none", quiet, re.M), quiet


def test_status_line_says_id_status_progress_phase_and_message() -> None:
    assert render.status_line(wire_job()) == "3f2a9c1e running 42% indexing 120/300 files"


def test_status_line_of_a_queued_job_says_where_and_why_it_waits() -> None:
    job = wire_job(status=JobStatus.QUEUED, progress=0, phase=None, message=None,
                   queue_position=3, wait_reason="user_limit")
    assert render.status_line(job) == (
        "3f2a9c1e queued 0% - #3 in queue, its user runs as many jobs as allowed")


def test_status_line_of_a_failed_job_gives_the_error() -> None:
    job = wire_job(status=JobStatus.FAILED, error="git fetch: could not read from remote")
    assert render.status_line(job).endswith("failed 42% indexing git fetch: could not read "
                                            "from remote")


@pytest.mark.parametrize("width", [60, 61, 80])
def test_the_bar_fits_its_columns_with_wide_characters(width: int) -> None:
    """A CJK message (two columns a character) is cut to the columns left, not to as many
    characters: the line never wraps."""
    from rich.cells import cell_len
    job = wire_job(message="日本語のメッセージ" * 6, phase="索引", project_id="プロジェクト")
    line = render.bar_line(job, width, NOW).plain
    assert cell_len(line) < width, (cell_len(line), line)
    assert "42%" in line and "1:00:00" in line and line.endswith("…") and " …" not in line


@pytest.mark.parametrize("width", [60, 61, 80])
def test_the_bar_says_reconnecting_whole_at_any_width(width: int) -> None:
    from rich.cells import cell_len
    job = wire_job(eta_s=3725, project_id="org/some-project")
    line = render.bar_line(job, width, NOW, note="reconnecting…").plain
    assert cell_len(line) < width, (cell_len(line), line)
    assert "42%" in line and "1:00:00" in line and line.endswith(" reconnecting…"), line


def test_progress_is_rounded_down_so_an_unfinished_job_never_shows_100() -> None:
    assert render.percent(99.99) == "99%"
    assert render.percent(100) == "100%"
    assert render.percent(None) == "0%"


@pytest.mark.parametrize("seconds,parts,expected", [
    (0, 1, "0s"), (59.9, 1, "59s"), (61, 1, "1m"), (7_500, 2, "2h 5m"), (90_061, 2, "1d 1h"),
    (-5, 1, "0s"), (0.4, 1, "0.4s"), (0.042, 2, "0.042s"), (0.0012, 1, "0.0012s"),
    (0.00004, 1, "<1ms"),
])
def test_human_duration(seconds: float, parts: int, expected: str) -> None:
    assert render.human_duration(seconds, parts) == expected


def test_text_from_the_daemon_is_shown_literally_not_as_markup() -> None:
    job = wire_job(message="[red]merge[/red] done", status=JobStatus.COMPLETED,
                   result={"files_indexed": 12, "seconds": {"indexing": 1.5}},
                   completed_at=NOW)
    shown = text_of(render.job_detail(job, NOW))
    assert "[red]merge[/red] done" in shown
    assert re.search(r"^result\s+files_indexed: 12 *$", shown, re.M), shown
    assert re.search(r"^( +)seconds: *\n\1  indexing: 1\.5 *$", shown, re.M), shown
    events = [{"at": "2026-11-22T10:00:00Z", "status": "running", "phase": "git_sync",
               "progress": 5, "message": "[b]x[/b]", "actor": "admin:root"}]
    assert "[b]x[/b]" in text_of(render.events_table(events))


@pytest.mark.parametrize("timeout_s,shown", [(0, "none (no limit)"), (0.4, "0.4s"),
                                               (5400, "1h 30m")])
def test_job_detail_shows_the_time_limit(timeout_s: float, shown: str) -> None:
    detail = text_of(render.job_detail(wire_job(timeout_s=timeout_s), NOW))
    assert re.search(rf"^timeout\s+{re.escape(shown)} *$", detail, re.M), detail


def test_job_detail_names_the_error_of_a_failed_job() -> None:
    job = wire_job(status=JobStatus.FAILED, error="timed out after 6h", completed_at=NOW)
    rows = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1)
                for line in text_of(render.job_detail(job, NOW)).splitlines())
    assert rows["error"] == "timed out after 6h"
    assert rows["status"] == "failed"
    assert rows["ran"] == "1h"


#: an SGR sequence that sets a foreground colour (bold alone is not a colour)
_COLOUR = re.compile(r"\x1b\[(?:[0-9]+;)*(?:3[0-8]|9[0-7])(?:;[0-9]+)*m")


def _table_on_a_terminal(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("FORCE_COLOR", "1")  # a terminal, as far as rich can tell
    out = render.console(env=env)
    out.file = io.StringIO()
    out.print(render.job_table([wire_job(status=JobStatus.FAILED)], NOW))
    return out.file.getvalue()


def test_no_color_turns_colours_off(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _COLOUR.search(_table_on_a_terminal({}, monkeypatch))
    assert not _COLOUR.search(_table_on_a_terminal({"NO_COLOR": "1"}, monkeypatch))


def test_follow_off_a_terminal_prints_a_line_per_visible_change() -> None:
    out = Console(file=io.StringIO(), width=200)
    with render.Follow(out) as view:
        view.update(wire_job(progress=10.2, version=1))
        view.update(wire_job(progress=10.9, version=2))  # same whole percent: nothing new
        view.update(wire_job(progress=55, phase="finalizing", message="writing", version=3))
        view.update(wire_job(status=JobStatus.COMPLETED, progress=100, phase="finalizing",
                             message="writing", version=4))
    assert out.file.getvalue().splitlines() == [  # type: ignore[attr-defined]
        "3f2a9c1e running 10% indexing 120/300 files",
        "3f2a9c1e running 55% finalizing writing",
        "3f2a9c1e completed 100% finalizing writing",
    ]


def test_follow_with_json_lines_prints_every_new_version() -> None:
    out = Console(file=io.StringIO(), width=80)
    with render.Follow(out, json_lines=True) as view:
        for version in (1, 2, 2):
            view.update(wire_job(progress=10.2, version=version))
    lines = out.file.getvalue().splitlines()  # type: ignore[attr-defined]
    assert [json.loads(line)["version"] for line in lines] == [1, 2]


# argument rules ----------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("seconds=5", ("seconds", 5)),
    ("full_reindex=true", ("full_reindex", True)),
    ('argv=["make", "all"]', ("argv", ["make", "all"])),
    ("branch=main", ("branch", "main")),
    ("branch=007", ("branch", "007")),
    ("env=A=B", ("env", "A=B")),
    ("message=", ("message", "")),
    ('env={"LANG": "C"}', ("env", {"LANG": "C"})),
])
def test_option_values_are_json_when_they_parse_else_text(text: str,
                                                          expected: tuple[str, Any]) -> None:
    assert parse_option(text) == expected


@pytest.mark.parametrize("text", ["seconds", "=5", ""])
def test_an_option_without_a_key_is_a_usage_error(text: str) -> None:
    with pytest.raises(click.BadParameter, match="KEY=VALUE"):
        parse_option(text)


def test_dash_o_goes_on_top_of_options_json() -> None:
    assert build_options(["b=3", "c=x"], '{"a": 1, "b": 2}') == {"a": 1, "b": 3, "c": "x"}
    assert build_options([], None) is None
    with pytest.raises(click.BadParameter, match="JSON object"):
        build_options([], "[1, 2]")
    with pytest.raises(click.BadParameter, match="not valid JSON"):
        build_options([], "{branch: main}")


def test_a_project_that_is_a_path_means_that_repository(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    repo = tmp_path / "src" / "myrepo"
    repo.mkdir(parents=True)
    (tmp_path / "link").symlink_to(repo)
    real = os.path.realpath(repo)
    monkeypatch.chdir(repo)
    assert sync_target(".", None) == ("myrepo", real)
    assert sync_target("..", None) == ("src", os.path.dirname(real))
    monkeypatch.chdir(tmp_path)
    assert sync_target("./src/myrepo/", None) == ("myrepo", real)
    assert sync_target("./link", None) == ("myrepo", real)
    assert sync_target(str(repo), None) == ("myrepo", real)
    assert sync_target(str(repo), None, "web") == ("web", real)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert sync_target("~/src/myrepo", None) == ("myrepo", real)


@pytest.mark.parametrize("project", ["org/repo", "src/myrepo", "a/b/c", "myrepo", ".hidden"])
def test_a_project_id_with_a_slash_stays_a_project_id(tmp_path: Path, project: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "src" / "myrepo").mkdir(parents=True)  # even when such a folder exists here
    monkeypatch.chdir(tmp_path)
    assert sync_target(project, None) == (project, None)


def test_a_plain_project_is_an_id_and_repo_is_made_real(tmp_path: Path) -> None:
    (tmp_path / "link").symlink_to(tmp_path)
    assert sync_target("web", None) == ("web", None)
    assert sync_target("web", str(tmp_path / "link")) == ("web", os.path.realpath(tmp_path))
    with pytest.raises(click.UsageError, match="already a path"):
        sync_target(".", str(tmp_path))
    with pytest.raises(click.BadParameter, match="no folder name"):
        sync_target("/", None)


def test_since_is_that_long_before_now() -> None:
    assert since(2 * 3600, NOW) == "2026-11-22T10:00:00.000000Z"


# exit codes --------------------------------------------------------------------------------

def test_exit_codes_of_a_waited_for_job() -> None:
    assert (EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_CANCELLED, EXIT_TIMEOUT,
            EXIT_UNREACHABLE) == (0, 1, 2, 3, 4, 69)
    assert exit_code("completed") == EXIT_OK
    assert exit_code("failed") == EXIT_FAILED
    assert exit_code("cancelled") == EXIT_CANCELLED
    assert exit_code("running") == exit_code("queued") == EXIT_TIMEOUT


def test_for_cancel_ending_cancelled_is_success() -> None:
    assert exit_code("cancelled", cancelling=True) == EXIT_OK
    assert exit_code("completed", cancelling=True) == EXIT_FAILED
    assert exit_code("failed", cancelling=True) == EXIT_FAILED
    assert exit_code("running", cancelling=True) == EXIT_TIMEOUT


# finding the daemon ------------------------------------------------------------------------

def test_an_explicit_socket_is_the_only_one_tried(tmp_path: Path) -> None:
    env = {"JOBD_SOCKET": "/elsewhere.sock", "XDG_RUNTIME_DIR": str(tmp_path)}
    assert socket_candidates(tmp_path / "a.sock", env) == [tmp_path / "a.sock"]
    assert socket_candidates(None, env) == [Path("/elsewhere.sock")]


def test_the_user_socket_is_tried_first_only_when_it_exists(tmp_path: Path) -> None:
    env = {"XDG_RUNTIME_DIR": str(tmp_path)}
    assert socket_candidates(None, env) == [Path("/run/jobd/jobd.sock")]
    (tmp_path / "jobd").mkdir()
    (tmp_path / "jobd" / "jobd.sock").touch()
    assert socket_candidates(None, env) == [tmp_path / "jobd" / "jobd.sock",
                                            Path("/run/jobd/jobd.sock")]


def test_a_missing_socket_is_unreachable_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nobody.sock"
    with Client(path) as client, pytest.raises(errors.Unreachable) as caught:
        client.get(JOB_ID)
    assert caught.value.message.startswith(
        f"socket {path}: no daemon answers (no such file); start it with `systemctl start jobd`")
    assert caught.value.http_status == 503


def test_a_socket_file_nobody_listens_on_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as left_behind:
        left_behind.bind(str(path))  # bound, never listening: what a crashed daemon leaves
        with pytest.raises(errors.Unreachable, match=r"no daemon answers \(connection refused\)"):
            Client(path).ping()


def test_jobctl_exits_69_and_says_which_socket(tmp_path: Path) -> None:
    path = tmp_path / "nobody.sock"
    result = CliRunner().invoke(main, ["--socket", str(path), "list"])
    assert result.exit_code == EXIT_UNREACHABLE
    assert result.stderr.startswith(f"jobctl: socket {path}: no daemon answers")
    assert result.stdout == ""


@pytest.mark.skipif(os.path.exists("/run/jobd/jobd.sock"), reason="a system jobd may answer")
def test_jobctl_lists_every_socket_it_tried(tmp_path: Path) -> None:
    user_socket = tmp_path / "jobd" / "jobd.sock"
    user_socket.parent.mkdir()
    with socket.socket(socket.AF_UNIX) as left_behind:
        left_behind.bind(str(user_socket))
        result = CliRunner().invoke(main, ["ping"], env={"XDG_RUNTIME_DIR": str(tmp_path),
                                                         "JOBD_SOCKET": None})
    assert result.exit_code == EXIT_UNREACHABLE
    assert f"socket {user_socket}: no daemon answers (connection refused)" in result.stderr
    assert "socket /run/jobd/jobd.sock: no daemon answers" in result.stderr


@pytest.mark.parametrize("args", [["status", "abc"], ["cancel", "not-hex!"],
                                  ["submit", "noop", "-o", "seconds"],
                                  ["list", "--since", "soon"], ["list", "--limit", "0"]])
def test_bad_arguments_exit_2_before_any_call(tmp_path: Path, args: list[str]) -> None:
    result = CliRunner().invoke(main, ["--socket", str(tmp_path / "nobody.sock"), *args])
    assert result.exit_code == EXIT_USAGE, result.output
    assert "no daemon answers" not in result.output
