"""The real ``jobctl`` command against a real daemon: output, exit codes and terminals (SPEC §7).

jobctl runs as a subprocess (the console script beside the test's Python), so exit
codes, stdout/stderr and terminal detection are what a person or a script gets. One
daemon serves the module; each test acts for a user of its own (``--as-user``, which
an admin may pass while keeping admin-only job types), so tests do not see each
other's jobs.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import pty
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from conftest import Daemon, clone, commit_files, git, make_upstream
from jobd import errors
from jobd.models import from_iso

JOBCTL = str(Path(sys.executable).parent / "jobctl")

CONFIG = """
[execution]
workers = 4
cancel_grace = "1s"
shutdown_grace = "5s"
"""

#: one line per change when not on a terminal: ``<id8> <status> <N>% <phase> [note]``
STATUS_LINE = re.compile(r"^[0-9a-f]{8} (queued|running|completed|failed|cancelled) "
                         r"\d{1,3}% (-|init|git_sync|indexing|finalizing)( .*)?$")
ESC = "\x1b"
SGR = re.compile(r"\x1b\[([0-9;]*)m")

_users = itertools.count(1)


@pytest.fixture(scope="module")
def jd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("jobctl"), CONFIG).start()
    yield d
    assert d.stop() == 0
    assert "rpc_method_crashed" not in d.log()


@pytest.fixture
def who() -> str:
    """A user of the test's own."""
    return f"jc{os.getpid()}x{next(_users)}"


def base_env(**extra: str) -> dict[str, str]:
    """The environment of a jobctl run: no socket or colour settings from outside."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("JOBD_SOCKET", "NO_COLOR", "FORCE_COLOR", "COLUMNS", "TERM")}
    env.update(extra)
    return env


def jobctl(d: Daemon | None, *args: str, env: dict[str, str] | None = None,
           timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run jobctl (``--socket`` of ``d`` when given) with stdout and stderr piped."""
    argv = [JOBCTL, *(["--socket", str(d.socket)] if d else []), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          env=env or base_env(), stdin=subprocess.DEVNULL)


def as_json(proc: subprocess.CompletedProcess[str]) -> Any:
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr}"
    return json.loads(proc.stdout)


def submit(d: Daemon, who: str, type_: str, **kw: Any) -> dict[str, Any]:
    with d.client(as_user=who) as c:
        job: dict[str, Any] = c.submit(type_, **kw)
    return job


def sh_job(d: Daemon, who: str, script: str) -> dict[str, Any]:
    return submit(d, who, "command", options={"argv": ["sh", "-c", script]})


def until_status(d: Daemon, job_id: str, *statuses: str, timeout: float = 20.0) -> dict[str, Any]:
    """Long-poll the job until it reaches one of ``statuses``."""
    deadline = time.monotonic() + timeout
    with d.client() as c:
        job: dict[str, Any] = c.get(job_id)
        while job["status"] not in statuses:
            left = deadline - time.monotonic()
            if left <= 0 or job["status"] in ("completed", "failed", "cancelled"):
                pytest.fail(f"job {job_id} is {job['status']} ({job['error']}), "
                            f"expected {statuses}")
            job = c.wait(job_id, after_version=job["version"], timeout_s=min(left, 5.0))
    return job


def run_in_pty(argv: list[str], env: dict[str, str], timeout: float = 30.0) -> tuple[int, str]:
    """Run ``argv`` with stdin, stdout and stderr on a new pseudo-terminal: (exit code, output)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env,
                            close_fds=True)
    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError as e:  # EIO: every writer has closed the terminal
                    if e.errno != errno.EIO:
                        raise
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
        code = proc.wait(max(0.1, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return code, out.decode(errors="replace")


def colour_codes(text: str) -> list[str]:
    """The SGR parameters in ``text`` that set a foreground or background colour."""
    found = []
    for params in SGR.findall(text):
        for p in params.split(";"):
            if p.isdigit() and (30 <= int(p) <= 49 or 90 <= int(p) <= 107):
                found.append(params)
    return found


# -- scenarios --------------------------------------------------------------------------------

def test_ping_prints_version_and_role_also_found_through_jobd_socket(jd: Daemon) -> None:
    proc = jobctl(None, "ping", env=base_env(JOBD_SOCKET=str(jd.socket)))
    assert proc.returncode == 0, proc.stderr
    version = jd.raw("ping")["result"]["version"]
    assert f"jobd {version} at {jd.socket}" in proc.stdout
    assert "you are root (uid 0, admin)" in proc.stdout

    answer = as_json(jobctl(jd, "--json", "ping"))
    assert answer["version"] == version
    assert answer["caller"] == {"uid": 0, "user": "root", "role": "admin"}


def test_submit_wait_exits_0_and_json_prints_one_job(jd: Daemon, who: str) -> None:
    proc = jobctl(jd, "--as-user", who, "submit", "noop", "-o", "seconds=0", "--wait")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^submitted: noop [0-9a-f-]{36} \(queued", proc.stdout, re.M), proc.stdout
    assert re.search(r"^[0-9a-f]{8} completed 100% -$", proc.stdout, re.M), proc.stdout

    job = as_json(jobctl(jd, "--json", "--as-user", who, "submit", "noop", "-o", "seconds=0",
                         "--wait"))
    assert isinstance(job, dict)
    assert job["status"] == "completed" and job["type"] == "noop" and job["user_id"] == who
    assert job["options"] == {"seconds": 0}
    # a limit of "none", as SPEC §1 writes limits: no run-time limit (an admin's to ask)
    for given, timeout in (("none", 0), ("90s", 90)):
        job = as_json(jobctl(jd, "--json", "submit", "noop", "--job-timeout", given))
        assert job["timeout_s"] == timeout, job


def test_a_failing_command_exits_1_with_the_error_on_stderr(jd: Daemon, who: str) -> None:
    proc = jobctl(jd, "--as-user", who, "submit", "command", "--options-json",
                  '{"argv": ["sh", "-c", "echo boom >&2; exit 3"]}', "--wait")
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    job_id = re.search(r"submitted: command ([0-9a-f-]{36})", proc.stdout).group(1)  # type: ignore[union-attr]
    with jd.client() as c:
        job = c.get(job_id)
    assert (job["status"], job["error"]) == ("failed", "sh exited with status 3: boom")
    assert f"jobctl: job {job_id[:8]} failed: sh exited with status 3: boom" in proc.stderr
    assert f"jobctl logs {job_id[:8]}" in proc.stderr
    assert "boom" in jobctl(jd, "logs", job_id[:8]).stdout


def test_a_job_cancelled_by_someone_else_ends_the_wait_with_3(jd: Daemon, who: str) -> None:
    waiter = subprocess.Popen(
        [JOBCTL, "--socket", str(jd.socket), "--as-user", who, "submit", "noop",
         "-o", "seconds=30", "--wait"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=base_env())
    try:
        assert waiter.stdout is not None
        first = waiter.stdout.readline()
        job_id = re.search(r"submitted: noop ([0-9a-f-]{36})", first).group(1)  # type: ignore[union-attr]
        until_status(jd, job_id, "running")
        cancel = jobctl(jd, "cancel", job_id[:8])
        assert cancel.returncode == 0, cancel.stderr
        out, err = waiter.communicate(timeout=20)
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.wait()
    assert waiter.returncode == 3, (out, err)
    assert f"jobctl: job {job_id[:8]} was cancelled" in err
    assert until_status(jd, job_id, "cancelled")["status"] == "cancelled"


def test_cancel_wait_ends_cancelled_and_a_completed_job_is_a_conflict(jd: Daemon,
                                                                       who: str) -> None:
    job = sh_job(jd, who, "sleep 30")
    until_status(jd, job["id"], "running")
    proc = jobctl(jd, "--json", "cancel", job["id"], "--wait")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["status"] == "cancelled"
    with jd.client() as c:
        assert c.get(job["id"])["status"] == "cancelled"

    done = submit(jd, who, "noop", options={"seconds": 0})
    until_status(jd, done["id"], "completed")
    proc = jobctl(jd, "cancel", done["id"])
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"jobctl: job {done['id']} is completed; only queued or "
                                  "running jobs can be cancelled"), proc.stderr


def test_wait_timeout_exits_4_and_the_job_goes_on(jd: Daemon, who: str) -> None:
    started = time.monotonic()
    proc = jobctl(jd, "--json", "--as-user", who, "submit", "noop", "-o", "seconds=30",
                  "--wait", "--timeout", "1s")
    assert proc.returncode == 4, proc.stderr
    job = json.loads(proc.stdout)
    assert job["status"] in ("queued", "running")
    assert "gave up waiting" in proc.stderr and "goes on" in proc.stderr
    assert time.monotonic() - started < 15
    with jd.client() as c:
        assert c.get(job["id"])["status"] == "running"
        c.cancel(job["id"], wait=True)


def test_job_prefixes(jd: Daemon, who: str) -> None:
    job = submit(jd, who, "noop", options={"seconds": 0})
    until_status(jd, job["id"], "completed")
    found = as_json(jobctl(jd, "--json", "--as-user", who, "status", job["id"][:6]))
    assert found["id"] == job["id"] and found["status"] == "completed"
    # the id as some tools print a UUID: 32 hex digits, no hyphens
    bare = as_json(jobctl(jd, "--json", "--as-user", who, "status",
                          job["id"].replace("-", "").upper()))
    assert bare["id"] == job["id"]

    # only this user's job is in scope: any other prefix names nothing
    other = next(p for p in ("0000", "1111", "2222") if not job["id"].startswith(p))
    proc = jobctl(jd, "--as-user", who, "status", other)
    assert proc.returncode == 1
    assert f"no job matches {other!r}" in proc.stderr

    proc = jobctl(jd, "status", "abc")
    assert proc.returncode == 2
    assert "at least its first 4 characters" in proc.stderr


def test_list_pages_and_filters(jd: Daemon, who: str) -> None:
    done = submit(jd, who, "noop", options={"seconds": 0})
    failed = sh_job(jd, who, "exit 1")
    cancelled = submit(jd, who, "noop", options={"seconds": 30})
    with jd.client() as c:
        c.cancel(cancelled["id"], wait=True)
    extra = submit(jd, who, "noop", options={"seconds": 0})
    for job, status in ((done, "completed"), (failed, "failed"), (cancelled, "cancelled"),
                        (extra, "completed")):
        until_status(jd, job["id"], status)
    newest_first = [j["id"] for j in (extra, cancelled, failed, done)]

    listed = as_json(jobctl(jd, "--json", "--as-user", who, "list", "--limit", "2", "--all"))
    assert [j["id"] for j in listed] == newest_first

    both = as_json(jobctl(jd, "--json", "--as-user", who, "list", "--status", "completed",
                          "--status", "failed"))
    assert [j["id"] for j in both] == [extra["id"], failed["id"], done["id"]]

    table = jobctl(jd, "--as-user", who, "list", "--limit", "2")
    assert table.returncode == 0
    assert table.stdout.split("\n")[0].split() == ["ID", "TYPE", "USER", "PROJECT", "STATUS",
                                                   "PROGRESS", "PHASE", "AGE", "RAN", "NOTE"]
    assert not [ln for ln in table.stdout.splitlines() if ln != ln.rstrip()], "trailing spaces"
    assert [ln.split()[0] for ln in table.stdout.splitlines()[1:]] == [
        i[:8] for i in newest_first[:2]]
    assert "showing the newest 2; --all (or --limit) for more" in table.stderr
    assert ESC not in table.stdout + table.stderr

    # --since: a window that reaches back past the last job but not to the one before it,
    # 2.5 s older (the jobctl runs above took part of that already)
    time.sleep(max(0.0, from_iso(extra["created_at"]) / 1e6 + 2.5 - time.time()))
    last = submit(jd, who, "noop", options={"seconds": 0})
    gap = (from_iso(last["created_at"]) - from_iso(extra["created_at"])) / 1e6
    # jobctl reads its clock after it starts: the window holds as long as that takes < gap - 0.2 s
    reach = time.time() - from_iso(last["created_at"]) / 1e6 + gap - 0.2
    recent = as_json(jobctl(jd, "--json", "--as-user", who, "list", "--since",
                            f"{reach:.3f}s"))
    assert [j["id"] for j in recent] == [last["id"]]


def test_wait_without_a_terminal_prints_a_line_per_change_not_per_count(jd: Daemon,
                                                                         who: str) -> None:
    script = ('for i in $(seq 1 30); do echo "{\\"progress\\": 10, \\"message\\": '
              '\\"counted $i of 30\\"}"; sleep 0.02; done; '
              'echo \'{"progress": 50, "message": "counted 30 of 30, done"}\'; sleep 0.5')
    proc = jobctl(jd, "--as-user", who, "submit", "command", "--options-json",
                  json.dumps({"argv": ["sh", "-c", script]}), "--wait")
    assert proc.returncode == 0, proc.stderr
    *changes, result = proc.stdout.splitlines()[1:]
    assert all(STATUS_LINE.match(ln) for ln in changes), changes
    assert result == "result: returncode=0"
    # the counter alone moved: one line says so, not one per count
    assert len([ln for ln in changes if re.search(r" running 10% - counted \d+ of 30$", ln)]) == 1
    assert any(ln.endswith(" running 50% - counted 30 of 30, done") for ln in changes), changes
    assert changes[-1].split()[1:3] == ["completed", "100%"]


def test_logs_follow_shows_every_line_and_ends_with_the_job(jd: Daemon, who: str) -> None:
    job = sh_job(jd, who, "for i in 1 2 3 4 5; do echo line $i; sleep 0.2; done")
    proc = jobctl(jd, "logs", job["id"][:8], "--follow")
    assert proc.returncode == 0, proc.stderr
    assert [ln for ln in proc.stdout.splitlines() if ln.startswith("line")] == [
        f"line {i}" for i in range(1, 6)]
    with jd.client() as c:
        assert c.get(job["id"])["status"] == "completed"


def test_sync_of_a_path_uses_the_folder_name_as_project(jd: Daemon, tmp_path: Path) -> None:
    upstream = make_upstream(tmp_path / "upstream", {"a.txt": "a\n", "b.txt": "b\n"})
    repo = clone(upstream, jd.repos / "root" / "proj")
    old = git("rev-parse", "HEAD", cwd=repo)
    new = commit_files(upstream, {"c.txt": "c\n", "a.txt": "a2\n", "b.txt": None})

    proc = jobctl(jd, "--json", "sync", str(repo), "--wait")
    job = as_json(proc)
    assert job["status"] == "completed"
    assert job["project_id"] == "proj" and job["user_id"] == "root"
    result = job["result"]
    assert (result["old_revision"], result["new_revision"]) == (old, new)
    assert (result["files_added"], result["files_modified"], result["files_deleted"]) == (1, 1, 1)
    assert result["files_indexed"] == 2
    assert git("rev-parse", "HEAD", cwd=repo) == new


def test_as_user_scopes_list(jd: Daemon, who: str) -> None:
    mine = submit(jd, who, "noop", options={"seconds": 0})
    roots = submit(jd, "root", "noop", options={"seconds": 0})
    scoped = as_json(jobctl(jd, "--json", "--as-user", who, "list", "--limit", "1000"))
    assert [j["id"] for j in scoped] == [mine["id"]]
    everyone = as_json(jobctl(jd, "--json", "list", "--limit", "1000"))
    assert {mine["id"], roots["id"]} <= {j["id"] for j in everyone}

    proc = jobctl(jd, "--as-user", who, "status", roots["id"])
    assert proc.returncode == 1 and "belongs to another user" in proc.stderr


def test_metrics_prints_the_prometheus_text(jd: Daemon, who: str) -> None:
    submit(jd, who, "noop", options={"seconds": 0})
    proc = jobctl(jd, "metrics")
    assert proc.returncode == 0, proc.stderr
    assert '\njobd_jobs_submitted_total{type="noop"} ' in proc.stdout
    assert proc.stdout.startswith("# HELP ") and proc.stdout.endswith("\n")
    assert "\njobd_rpc_requests_total{" in as_json(jobctl(jd, "--json", "metrics"))["text"]


def test_stats_pause_resume_and_cleanup(jd: Daemon, who: str) -> None:
    stats = as_json(jobctl(jd, "--json", "stats"))
    assert {"jobs", "running", "queued", "workers", "per_user", "paused", "db_bytes",
            "uptime_s"} <= set(stats)
    assert stats["workers"] == 4 and stats["paused"] is False

    proc = jobctl(jd, "pause")
    try:
        assert proc.returncode == 0, proc.stderr
        assert "dispatching paused" in proc.stdout
        job = submit(jd, who, "noop", options={"seconds": 0})
        assert job["wait_reason"] == "paused"
        shown = jobctl(jd, "status", job["id"][:8])
        assert shown.returncode == 0, shown.stderr
        assert re.search(r"^status\s+queued", shown.stdout, re.M), shown.stdout
        assert re.search(r"^queue\s+#\d+ in queue, dispatching is paused", shown.stdout, re.M)
        assert ESC not in shown.stdout
        people = jobctl(jd, "stats")
        assert people.returncode == 0, people.stderr
        assert re.search(r"^dispatch\s+paused", people.stdout, re.M), people.stdout
        assert re.search(r"^workers\s+\d+ of 4 busy, [1-9]\d* queued", people.stdout, re.M)
        assert ESC not in people.stdout
    finally:
        resumed = jobctl(jd, "resume")
    assert resumed.returncode == 0 and "dispatching resumed" in resumed.stdout
    until_status(jd, job["id"], "completed")
    people = jobctl(jd, "stats", "--since", "2h")
    assert re.search(r"^maintenance\s+off$", people.stdout, re.M), people.stdout
    assert re.search(r"^finished in the last 2h$", people.stdout, re.M), people.stdout
    assert re.search(r"^noop\s+[1-9]\d*\s+\d+\s+\d+\s+\d+%\s+\S+s\s+\S+s$", people.stdout,
                     re.M), people.stdout

    with jd.client() as c:
        assert not c.list(status=["queued", "running"])["jobs"], "a test left a job running"
        terminal = len(c.list(limit=1000)["jobs"])
    dry = jobctl(jd, "cleanup", "--older-than", "0s", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    count = int(re.search(r"^would delete (\d+) jobs? ", dry.stdout).group(1))  # type: ignore[union-attr]
    assert count == terminal >= 1
    with jd.client() as c:
        assert c.get(job["id"])["status"] == "completed"  # a dry run deletes nothing
    # one status only: the completed job stays
    cancelled = as_json(jobctl(jd, "--json", "cleanup", "--older-than", "0s",
                               "--status", "cancelled", "--status", "failed"))
    count -= cancelled["deleted"]
    with jd.client() as c:
        assert c.get(job["id"])["status"] == "completed"
    done = as_json(jobctl(jd, "--json", "cleanup", "--older-than", "0s"))
    assert done["deleted"] == count and set(done["cutoffs"]) == {"keep", "keep_failed"}
    with jd.client() as c:
        assert c.list(limit=1000)["jobs"] == []


def test_unreachable_daemon_exits_69_naming_the_socket(tmp_path: Path) -> None:
    stale = Path(tempfile.mkdtemp(prefix="jobctl-", dir="/tmp")) / "jobd.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))  # bound, never listening: what a crashed daemon leaves behind
    try:
        for args in (["ping"], ["status", "abcd"]):
            proc = jobctl(None, "--socket", str(stale), *args)
            assert proc.returncode == 69, (args, proc.stderr)
            assert f"socket {stale}: no daemon answers (connection refused)" in proc.stderr
            assert "systemctl start jobd" in proc.stderr
    finally:
        shutil.rmtree(stale.parent)

    missing = tmp_path / "nowhere.sock"  # a daemon stopped cleanly removes its socket
    proc = jobctl(None, "submit", "noop", "--wait", env=base_env(JOBD_SOCKET=str(missing)))
    assert proc.returncode == 69, proc.stderr
    assert f"socket {missing}: no daemon answers (no such file)" in proc.stderr


def test_no_color_is_honoured_on_a_terminal(jd: Daemon, who: str) -> None:
    job = submit(jd, who, "noop", options={"seconds": 0})
    until_status(jd, job["id"], "completed")
    argv = [JOBCTL, "--socket", str(jd.socket), "--as-user", who, "list"]
    terminal = base_env(TERM="xterm-256color", COLUMNS="120")
    code, coloured = run_in_pty(argv, terminal)
    assert code == 0, coloured
    assert colour_codes(coloured), f"no colour on a terminal: {coloured!r}"
    code, plain = run_in_pty(argv, {**terminal, "NO_COLOR": "1"})
    assert code == 0, plain
    assert "completed" in plain and not colour_codes(plain), repr(plain)


def test_sync_wait_draws_a_bar_on_a_terminal_and_lines_otherwise(jd: Daemon,
                                                                 tmp_path: Path) -> None:
    upstream = make_upstream(tmp_path / "upstream")
    for i in range(100):  # some work for the bar to show while the sync runs
        (upstream / "src" / f"m{i}.py").write_text(f"x = {i}\n")
    git("add", "-A", cwd=upstream)
    git("commit", "-q", "-m", "many files", cwd=upstream)
    repo = clone(upstream, jd.repos / "root" / "bar")
    commit_files(upstream, {"src/new.py": "new\n"})

    code, screen = run_in_pty([JOBCTL, "--socket", str(jd.socket), "sync", str(repo), "--wait"],
                              base_env(TERM="xterm-256color", COLUMNS="120"))
    assert code == 0, screen
    assert "\x1b[?25l" in screen, "the live display hides the cursor while it draws"
    assert "━" in screen, f"no bar drawn: {screen!r}"
    assert "100%" in screen and "completed finalizing" in screen, repr(screen)
    assert "result: " in screen

    commit_files(upstream, {"src/newer.py": "newer\n"})
    proc = jobctl(jd, "sync", str(repo), "--wait")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("submitted: sync bar ")
    changes = [ln for ln in lines[1:] if not ln.startswith("result: ")]
    assert all(STATUS_LINE.match(ln) for ln in changes), changes
    assert len(changes) >= 3 and changes[-1].split()[1:4] == ["completed", "100%", "finalizing"]
    assert all(a != b for a, b in zip(changes, changes[1:])), "a line repeated without change"
    assert lines[-1].startswith("result: ") and "files_added=1" in lines[-1]
    assert ESC not in proc.stdout



# -- global options anywhere (SPEC §7) ------------------------------------------------------

def test_global_options_go_before_or_after_the_command(jd: Daemon, who: str) -> None:
    job = submit(jd, who, "noop")
    until_status(jd, job["id"], "completed")
    before = subprocess.run([JOBCTL, "--json", "--socket", str(jd.socket), "--as-user", who,
                             "list"], capture_output=True, text=True, timeout=30,
                            env=base_env(), stdin=subprocess.DEVNULL)
    after = subprocess.run([JOBCTL, "list", "--json", "--socket", str(jd.socket), "--as-user",
                            who], capture_output=True, text=True, timeout=30, env=base_env(),
                           stdin=subprocess.DEVNULL)
    mixed = subprocess.run([JOBCTL, "--socket", str(jd.socket), "list", "--as-user", who,
                            "--json"], capture_output=True, text=True, timeout=30,
                           env=base_env(), stdin=subprocess.DEVNULL)
    assert [j["id"] for j in as_json(before)] == [job["id"]]
    assert as_json(after) == as_json(before) and as_json(mixed) == as_json(before)
    # the one after the command wins, as for jobd's own options
    wrong = subprocess.run([JOBCTL, "--socket", "/nonexistent/jobd.sock", "ping", "--socket",
                            str(jd.socket)], capture_output=True, text=True, timeout=30,
                           env=base_env(), stdin=subprocess.DEVNULL)
    assert wrong.returncode == 0, wrong.stderr


def test_version_flag() -> None:
    import jobd
    proc = subprocess.run([JOBCTL, "--version"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and proc.stdout == f"jobctl {jobd.__version__}\n"


# -- issue 8: several jobs, filters, errors for scripts, the small commands ----------------

def test_cancel_of_several_jobs_prints_a_line_each_and_exits_with_the_worst(jd: Daemon,
                                                                            who: str) -> None:
    a, b = (submit(jd, who, "noop", options={"seconds": 30}) for _ in range(2))
    done = submit(jd, who, "noop", options={"seconds": 0})
    until_status(jd, done["id"], "completed")
    # more than one job and no terminal: nothing is touched without --yes
    proc = jobctl(jd, "--as-user", who, "cancel", a["id"][:8], b["id"][:8])
    assert proc.returncode == 2 and "add --yes" in proc.stderr, proc.stderr
    with jd.client() as c:
        assert {c.get(j["id"])["status"] for j in (a, b)} <= {"queued", "running"}

    proc = jobctl(jd, "--as-user", who, "cancel", a["id"][:8], b["id"][:8], done["id"][:8],
                  "--yes", "--wait")
    assert proc.returncode == 1, (proc.stdout, proc.stderr)  # the completed one: a conflict
    assert f"cancelled {a['id'][:8]}" in proc.stdout.splitlines()
    assert f"cancelled {b['id'][:8]}" in proc.stdout.splitlines()
    assert f"job {done['id']} is completed" in proc.stderr

    proc = jobctl(jd, "--as-user", who, "retry", a["id"][:8], "--wait", "--timeout", "1s")
    assert proc.returncode == 4, proc.stderr  # worst of one: ran out
    with jd.client() as c:
        c.cancel(a["id"], wait=True)


def test_cancel_and_retry_by_filter_is_one_call_and_asks_first(jd: Daemon, who: str) -> None:
    jobs = [submit(jd, who, "noop", options={"seconds": 30}) for _ in range(3)]
    other = submit(jd, who + "o", "noop", options={"seconds": 30})
    try:
        _filtered_cancel_and_retry(jd, who, jobs, other)
    finally:
        with jd.client() as c:
            for job in (*jobs, other):
                with contextlib.suppress(errors.Conflict):
                    c.cancel(job["id"], wait=True)


def _filtered_cancel_and_retry(jd: Daemon, who: str, jobs: list[dict[str, Any]],
                               other: dict[str, Any]) -> None:
    proc = jobctl(jd, "cancel", "--user", who, "--status", "queued", "--status", "running")
    assert proc.returncode == 2 and "3 jobs would be cancelled" in proc.stderr, proc.stderr
    proc = jobctl(jd, "--json", "cancel", "--user", who, "--status", "queued", "--status",
                  "running")  # the refusal is JSON too
    assert proc.returncode == 2 and proc.stdout == "", proc
    assert "3 jobs would be cancelled" in json.loads(proc.stderr)["error"]["message"]
    with jd.client() as c:
        assert all(c.get(j["id"])["status"] in ("queued", "running") for j in jobs)

    proc = jobctl(jd, "--json", "cancel", "--user", who, "--status", "queued", "--status",
                  "running", "--yes", "--wait")
    assert proc.returncode == 0, proc.stderr
    assert {j["id"] for j in json.loads(proc.stdout)} == {j["id"] for j in jobs}
    with jd.client() as c:
        assert {c.get(j["id"])["status"] for j in jobs} == {"cancelled"}
        assert c.get(other["id"])["status"] in ("queued", "running")

    proc = jobctl(jd, "retry", "--user", who, "--status", "cancelled", "--since", "1h", "--yes")
    assert proc.returncode == 0, proc.stderr
    assert len([ln for ln in proc.stdout.splitlines() if ln.startswith("queued again")]) == 3
    proc = jobctl(jd, "cancel", "--user", who, "--status", "failed")
    assert (proc.returncode, proc.stdout.strip()) == (0, "no jobs match"), proc.stderr


def test_a_filtered_cancel_goes_on_past_the_daemon_s_1000_a_call(jd: Daemon, who: str) -> None:
    jobctl(jd, "pause")
    try:
        for user in (who, who + "b"):  # at most 1,000 queued a user
            with jd.client(as_user=user) as c:
                for _ in range(550):
                    c.submit("noop")
        proc = jobctl(jd, "cancel", "--status", "queued", "--since", "1h")
        assert proc.returncode == 2 and "1000 or more jobs would be cancelled" in proc.stderr
        proc = jobctl(jd, "--json", "cancel", "--status", "queued", "--since", "1h", "--yes")
        assert proc.returncode == 0, proc.stderr
        assert len(json.loads(proc.stdout)) == 1100
        with jd.client() as c:
            assert c.list(status="queued", limit=10)["jobs"] == []
    finally:
        jobctl(jd, "resume")


def test_a_filtered_cancel_touches_no_job_submitted_after_it_began(
        jd: Daemon, who: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Jobs another client submits after the preview (one job: nothing to confirm) or
    between the calls of more than 1,000 are not the command's: they stay queued."""
    from click.testing import CliRunner

    from jobctl.cli import main
    from jobd.client import Client

    real, late, racing = Client.cancel, [], [0]

    def cancel(self: Client, *args: Any, **kw: Any) -> Any:
        answer = real(self, *args, **kw)
        if "filter" in kw and racing[0]:  # another client submits right after the call
            racing[0] -= 1
            with jd.client(as_user=who) as other:
                late.extend(other.submit("noop")["id"] for _ in range(3))
        return answer

    def ctl(*args: str) -> Any:
        run = CliRunner().invoke(main, ["--socket", str(jd.socket), "--json", "cancel", *args])
        assert run.exit_code == 0, run.output
        return [job["id"] for job in json.loads(run.stdout)]

    jobctl(jd, "pause")
    try:
        with jd.client(as_user=who) as c:
            first = c.submit("noop")
        monkeypatch.setattr(Client, "cancel", cancel)
        racing[0] = 2  # after the preview and after the call
        assert ctl("--user", who, "--status", "queued") == [first["id"]]
        with jd.client() as c:
            assert len(late) == 6 and {c.get(i)["status"] for i in late} == {"queued"}
        with jd.client(as_user=who + "m") as c:
            many = [c.submit("noop")["id"] for _ in range(1000)]
        with jd.client(as_user=who + "n") as c:
            many.append(c.submit("noop")["id"])
        racing[0] = 1  # after the first of two calls
        cancelled = ctl("--status", "queued", "--since", "1h", "--yes")
        assert len(late) == 9 and set(late[:6] + many) <= set(cancelled), len(cancelled)
        with jd.client() as c:
            assert [c.get(i)["status"] for i in late[6:]] == ["queued"] * 3
    finally:
        monkeypatch.undo()
        with jd.client() as c:
            for job_id in late:
                with contextlib.suppress(errors.Conflict):
                    c.cancel(job_id)
        jobctl(jd, "resume")


def test_jobs_a_filtered_cancel_did_get_their_lines_when_the_daemon_goes_away(
        make_daemon: Callable[..., Daemon], monkeypatch: pytest.MonkeyPatch) -> None:
    """Past 1,000 matches, the daemon is killed after the first call: the 1,000 jobs it
    cancelled are still named, each on its line, and the exit says the daemon is gone."""
    from click.testing import CliRunner

    from jobctl.cli import EXIT_UNREACHABLE, main
    from jobd.client import Client

    d = make_daemon(config=CONFIG)
    jobctl(d, "pause")
    for user in ("alice", "bob"):
        with d.client(as_user=user) as c:
            for _ in range(501):
                c.submit("noop")
    real = Client.cancel

    def cancel(self: Client, *args: Any, **kw: Any) -> Any:
        answer = real(self, *args, **kw)
        d.kill()
        return answer

    monkeypatch.setattr(Client, "cancel", cancel)
    run = CliRunner().invoke(main, ["--socket", str(d.socket), "cancel", "--status",
                                    "queued", "--yes"])
    assert run.exit_code == EXIT_UNREACHABLE, run.output
    lines = [ln for ln in run.stdout.splitlines() if ln.startswith("cancelled ")]
    assert len(lines) == 1000 and lines[0].endswith("(its state now unknown)"), lines[:2]


@pytest.mark.parametrize("args", [("--json", "list", "--watch", "--limit", "2"),
                                  ("--json", "top"), ("top",), ("list", "--watch")],
                         ids=["list-json", "top-json", "top", "list"])
def test_live_views_off_a_terminal_print_a_view_each_second(jd: Daemon, who: str,
                                                            args: tuple[str, ...]) -> None:
    with jd.client(as_user=who) as c:
        job = c.submit("noop", options={"seconds": 30})
    view = subprocess.Popen([JOBCTL, "--socket", str(jd.socket), *args], env=base_env(),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    frames: list[str] = []
    guard = threading.Timer(10, view.kill)  # a view that prints nothing fails, not hangs
    guard.start()
    try:
        assert view.stdout is not None
        if "--json" in args:
            frames = [view.stdout.readline(), view.stdout.readline()]
        else:  # a frame ends with an empty line
            frame = ""
            while len(frames) < 2 and (line := view.stdout.readline()):
                if line.strip():
                    frame += line
                else:
                    frames.append(frame)
                    frame = ""
    finally:
        guard.cancel()
        view.kill()
        view.wait()
        with jd.client() as c:
            c.cancel(job["id"])
    assert len(frames) == 2, frames
    for frame in frames:
        if "--json" in args:
            shown = json.loads(frame)
            jobs = shown if isinstance(shown, list) else shown["running"] + shown["queued"]
            assert job["id"] in {j["id"] for j in jobs}, frame
        else:
            assert job["id"][:8] in frame, frame


def test_timeout_bounds_a_follow_whose_daemon_freezes(
        make_daemon: Callable[..., Daemon]) -> None:
    """A daemon that stops answering mid-wait (SIGSTOP, not gone) is waited for no longer
    than --timeout (and a second for the answer), not the client's 60 s a call."""
    d = make_daemon(config=CONFIG)
    with d.client(as_user="alice") as c:
        job = c.submit("noop", options={"seconds": 60})
    assert d.proc is not None
    started = time.monotonic()
    follow = subprocess.Popen([JOBCTL, "--socket", str(d.socket), "status", job["id"],
                               "--follow", "--timeout", "2s"], env=base_env(),
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.8)
        d.proc.send_signal(signal.SIGSTOP)
        out, err = follow.communicate(timeout=30)
    finally:
        d.proc.send_signal(signal.SIGCONT)
        if follow.poll() is None:
            follow.kill()
            follow.wait()
    assert follow.returncode == 4, (out, err)
    assert time.monotonic() - started < 6, "waited past --timeout for a frozen daemon"


def test_several_jobs_waited_for_share_one_timeout_and_a_job_named_twice_is_one(
        jd: Daemon, who: str) -> None:
    with jd.client(as_user=who) as c:
        jobs = [c.submit("noop", options={"seconds": 30}) for _ in range(3)]
    try:
        proc = jobctl(jd, "--as-user", who, "--json", "cancel", jobs[0]["id"][:8],
                      jobs[0]["id"], "--yes", "--wait")
        assert proc.returncode == 0, proc.stderr
        assert [j["id"] for j in json.loads(proc.stdout)] == [jobs[0]["id"]]
        with jd.client(as_user=who) as c:
            for job in jobs:
                with contextlib.suppress(errors.Conflict):
                    c.cancel(job["id"], wait=True)
        started = time.monotonic()
        proc = jobctl(jd, "--as-user", who, "retry", *(j["id"][:8] for j in jobs), "--yes",
                      "--wait", "--timeout", "1s")
        assert proc.returncode == 4, proc.stderr  # they run 30 s: each wait ran out
        assert time.monotonic() - started < 2.8, "each job waited for a timeout of its own"
    finally:
        with jd.client() as c:
            for job in jobs:
                with contextlib.suppress(errors.Conflict):
                    c.cancel(job["id"], wait=True)


def test_a_refused_cancel_with_json_is_json_on_stderr(jd: Daemon, who: str) -> None:
    with jd.client(as_user=who) as c:
        job = c.submit("noop")
    until_status(jd, job["id"], "completed")
    proc = jobctl(jd, "--as-user", who, "--json", "cancel", job["id"])
    assert (proc.returncode, proc.stdout) == (1, ""), proc
    error = json.loads(proc.stderr)["error"]
    assert error["code"] == -32009 and "only queued or running jobs" in error["message"]


def test_json_nested_past_the_recursion_limit_is_a_usage_error(jd: Daemon) -> None:
    deep = "[" * 100_000
    for args in (("--metadata-json", deep), ("--options-json", deep)):
        proc = jobctl(jd, "submit", "noop", *args)
        assert proc.returncode == 2 and "nested too deeply" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr


def test_errors_with_json_are_json_on_stderr(jd: Daemon, who: str) -> None:
    proc = jobctl(jd, "--as-user", who, "--json", "status", "0000-0000")
    assert proc.returncode == 1 and proc.stdout == ""
    error = json.loads(proc.stderr)["error"]
    assert error["code"] == -32004 and error["data"]["http_status"] == 404
    assert "no job matches" in error["message"]

    proc = jobctl(None, "--socket", "/nonexistent/jobd.sock", "ping", "--json")
    assert proc.returncode == 69
    assert json.loads(proc.stderr)["error"]["data"]["http_status"] == 503

    # a JOB that is no prefix at all: a usage error (2), in JSON too
    for args in (("status", "zz!?"), ("events", "zz!?"), ("logs", "zz!?")):
        proc = jobctl(jd, "--as-user", who, "--json", *args)
        assert proc.returncode == 2 and proc.stdout == "", (args, proc.stderr)
        assert json.loads(proc.stderr)["error"]["code"] == -32602, (args, proc.stderr)
    # among several jobs, it is that job's error; the others are done
    job = submit(jd, who, "noop", options={"seconds": 30})
    proc = jobctl(jd, "--as-user", who, "--json", "cancel", "zz!?", job["id"][:8], "--yes")
    assert proc.returncode == 2, proc.stderr
    assert json.loads(proc.stderr.splitlines()[0])["error"]["code"] == -32602, proc.stderr
    assert [j["id"] for j in json.loads(proc.stdout)] == [job["id"]]
    with jd.client() as c:
        c.cancel(job["id"], wait=True)


def test_version_names_both_sides(jd: Daemon) -> None:
    import jobd
    proc = jobctl(jd, "version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"jobctl {jobd.__version__}",
                                        f"jobd {jobd.__version__} at {jd.socket}"]
    alone = jobctl(None, "--socket", "/nonexistent/jobd.sock", "version")
    assert alone.returncode == 0 and "jobd: not reached (socket /nonexistent" in alone.stdout


def test_logs_tail_and_a_silent_failure(jd: Daemon, who: str) -> None:
    job = sh_job(jd, who, "for i in $(seq 1 50); do echo line $i; done")
    until_status(jd, job["id"], "completed")
    proc = jobctl(jd, "logs", job["id"][:8], "--tail", "3")
    assert proc.returncode == 0, proc.stderr
    whole = jobctl(jd, "logs", job["id"][:8]).stdout.splitlines()
    assert "line 50" in whole and len(whole) > 3
    assert proc.stdout.splitlines() == whole[-3:]
    assert jobctl(jd, "logs", job["id"][:8], "--tail", "3", "--follow").stdout == proc.stdout
    # with --json the tail is the first page of the follow, and the pages go on from it
    followed = jobctl(jd, "--json", "logs", job["id"][:8], "--tail", "3", "--follow")
    assert followed.returncode == 0, followed.stderr
    pages = [json.loads(ln) for ln in followed.stdout.splitlines()]
    assert pages[0]["data"] == proc.stdout and pages[-1]["eof"] is True, pages
    assert "".join(p["data"] for p in pages[1:]) == ""
    assert all(p["next_offset"] == pages[0]["next_offset"] for p in pages), pages

    silent = jobctl(jd, "--as-user", who, "submit", "command", "-o", 'argv=["sh", "-c", "exit 3"]',
                    "--wait")
    assert silent.returncode == 1
    assert "failed: sh exited with status 3" in silent.stderr
    assert "jobctl logs" not in silent.stderr and "it wrote no output" in silent.stderr


def test_submit_description_and_metadata_and_list_until(jd: Daemon, who: str) -> None:
    job = as_json(jobctl(jd, "--json", "--as-user", who, "submit", "noop", "-o", "seconds=0",
                         "--description", "try the queue", "--metadata-json", '{"t": ["ü", 1]}'))
    assert (job["description"], job["metadata"]) == ("try the queue", {"t": ["ü", 1]})
    bad = jobctl(jd, "submit", "noop", "--metadata-json", "[1]")
    assert bad.returncode == 2 and "must be a JSON object" in bad.stderr
    until_status(jd, job["id"], "completed")
    time.sleep(1.1)
    old = as_json(jobctl(jd, "--json", "--as-user", who, "list", "--until", "1s"))
    assert [j["id"] for j in old] == [job["id"]]
    assert as_json(jobctl(jd, "--json", "--as-user", who, "list", "--until", "1h")) == []


def test_a_follow_whose_timeout_runs_out_while_jobd_is_away_exits_4(
        make_daemon: Callable[..., Daemon]) -> None:
    """SPEC §7: --timeout bounds the wait (exit 4); the daemon gone meanwhile does not make
    it 69 after the reconnect budget."""
    d = make_daemon()
    job = submit(d, "alice", "noop", options={"seconds": 60})
    for command in (("logs", job["id"][:8], "--follow"), ("status", job["id"][:8], "--follow")):
        if d.proc is None or d.proc.poll() is not None:
            d.start()
        started = time.monotonic()
        proc = subprocess.Popen([JOBCTL, "--socket", str(d.socket), *command, "--timeout", "2s"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=base_env(), stdin=subprocess.DEVNULL)
        time.sleep(0.7)
        d.kill()
        out, err = proc.communicate(timeout=30)
        took = time.monotonic() - started
        assert proc.returncode == 4 and took < 8, (command, proc.returncode, took, err)


@pytest.fixture(scope="module")
def long_queue(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, str]]:
    """A paused daemon with 1,101 jobs queued, and the id of the first, which runs next."""
    d = Daemon(tmp_path_factory.mktemp("queue"), CONFIG + "max_queued_per_user = 2000\n")
    d.start()
    with d.client() as c:
        c.pause()  # the queue stays as it is
    first = submit(d, "alice", "noop")
    batch = [{"jsonrpc": "2.0", "id": i, "method": "jobs.submit",
              "params": {"type": "noop", "as_user": "alice"}} for i in range(100)]
    for _ in range(11):
        assert all("result" in r for r in d.send(batch))
    yield d, first["id"]
    assert d.stop() == 0


def first_lines(d: Daemon, *args: str, count: int = 1) -> list[str]:
    """The first lines a live view prints off a terminal; then it is stopped."""
    view = subprocess.Popen([JOBCTL, "--socket", str(d.socket), *args], env=base_env(),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert view.stdout is not None
        return [view.stdout.readline() for _ in range(count)]
    finally:
        view.kill()
        view.wait()


@pytest.mark.parametrize("scope", [(), ("--as-user", "alice")], ids=["admin", "user"])
def test_top_shows_the_head_of_a_long_queue_and_counts_all_of_it(
        long_queue: tuple[Daemon, str], scope: tuple[str, ...]) -> None:
    """Past 1,000 queued jobs, top shows those that run next, and counts every one (from
    admin.stats for an admin, from the list's total in a user's scope)."""
    d, first = long_queue
    view = json.loads(first_lines(d, *scope, "--json", "top")[0])
    assert view["queued"][0]["id"] == first
    assert [j["queue_position"] for j in view["queued"]] == list(range(1, 1001))
    assert view["total"] == {"running": 0, "queued": 1101}
    assert view["per_user"] == {"alice": {"running": 0, "queued": 1101}}
    # for people: the first frame names the socket it was drawn from, and the whole count
    head = first_lines(d, *scope, "top", count=4)
    assert head[0].startswith(f"jobd at {d.socket} "), head
    assert head[3].startswith("queued (1101, the first 1000 shown)"), head


@pytest.mark.parametrize("args,said", [
    (("--json", "list", "--limit", "0"), "'--limit': 0 is not in the range"),
    (("list", "--limit", "0", "--json"), "'--limit': 0 is not in the range"),
    (("--json", "cancel"), "name the jobs to cancel"),
    (("--json", "submit", "noop", "-o", "bad"), "'bad' is not KEY=VALUE"),
    (("--json", "status"), "Missing argument 'JOB'"),
    # refused while parsing, before --json was read
    (("list", "--bogus", "--json"), "No such option '--bogus'"),
    (("--json", "--bogus"), "No such option '--bogus'"),
    (("list", "--limit", "x", "--json"), "'x' is not a valid integer"),
])
def test_usage_errors_with_json_are_json_on_stderr(jd: Daemon, args: tuple[str, ...],
                                                   said: str) -> None:
    proc = jobctl(jd, *args)
    assert (proc.returncode, proc.stdout) == (2, ""), proc
    error = json.loads(proc.stderr)["error"]
    assert error["code"] == -32602 and said in error["message"], error
    assert error["data"]["http_status"] == 422


def test_maintenance_wait_drained_shows_the_wait_and_a_timeout_says_it_stays_on(
        make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon(config=CONFIG)
    job = submit(d, "alice", "noop", options={"seconds": 30})
    until_status(d, job["id"], "running")
    argv = ["maintenance", "on", "--wait-drained", "--timeout", "1.5s"]
    proc = jobctl(d, *argv)
    assert proc.returncode == 4, proc
    assert proc.stdout.splitlines() == [
        "waiting until drained: 1 running, 0 queued (maintenance on)"], proc.stdout
    assert ("gave up waiting: 1 running, 0 queued; maintenance stays on "
            "(`jobctl maintenance off` ends it)") in proc.stderr
    code, shown = run_in_pty([JOBCTL, "--socket", str(d.socket), *argv],
                             base_env(TERM="xterm-256color", COLUMNS="100"))
    assert code == 4 and "waiting until drained: 1 running" in shown, shown
    with d.client() as c:
        assert c.maintenance()["maintenance"] is True
        c.cancel(job["id"])
    done = jobctl(d, "maintenance", "on", "--wait-drained")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "maintenance on: 0 running, 0 queued, drained"


def test_a_closed_stdout_ends_jobctl_quietly_as_sigpipe_would(
        long_queue: tuple[Daemon, str]) -> None:
    d, _ = long_queue
    for args, codes in (("list --limit 1000", {"141"}),
                        # one write that the pipe took in part: Python may call it done
                        ("--json list --limit 1000", {"0", "141"})):
        shell = subprocess.run(
            ["bash", "-c", f'"$0" --socket {d.socket} {args} | head -1; '
             'echo "${PIPESTATUS[0]}" >&2', JOBCTL],
            capture_output=True, text=True, timeout=30, env=base_env(), stdin=subprocess.DEVNULL)
        assert len(shell.stdout.splitlines()) == 1, shell.stdout
        *said, code = shell.stderr.splitlines()
        assert said == [] and code in codes, shell.stderr


def test_ctrl_c_during_a_call_exits_130(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon(config=CONFIG)
    assert d.proc is not None
    d.proc.send_signal(signal.SIGSTOP)  # the call waits for an answer
    try:
        proc = subprocess.Popen([JOBCTL, "--socket", str(d.socket), "list"], env=base_env(),
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    finally:
        d.proc.send_signal(signal.SIGCONT)
    assert proc.returncode == 130, (out, err)
    assert "Aborted" not in err and "Traceback" not in err, err


@pytest.mark.parametrize("args,flag", [
    (("status", "JOB"), "--follow"),
    (("logs", "JOB"), "--follow"),
    (("cancel", "JOB"), "--wait"),
    (("retry", "JOB"), "--wait"),
    (("submit", "noop"), "--wait"),
    (("sync", "p", "--url", "https://example.com/p.git"), "--wait"),
    (("maintenance", "on"), "--wait-drained"),
])
def test_a_timeout_without_the_wait_it_bounds_is_a_usage_error_and_asks_nothing(
        jd: Daemon, who: str, args: tuple[str, ...], flag: str) -> None:
    """--timeout bounds a wait: given without the flag that waits it would bound nothing,
    so it is refused (exit 2) before the daemon is asked anything: no job is submitted or
    cancelled, maintenance stays off."""
    job = submit(jd, who, "noop", options={"seconds": 30})
    with jd.client() as c:
        before = [(j["id"], j["status"]) for j in c.list(limit=1000)["jobs"]]
    argv = [job["id"] if a == "JOB" else a for a in args]
    proc = jobctl(jd, *argv, "--timeout", "5s")
    assert proc.returncode == 2 and proc.stdout == "", proc
    assert f"--timeout bounds the wait of {flag}: give {flag} too" in proc.stderr, proc.stderr
    with jd.client() as c:
        assert [(j["id"], j["status"]) for j in c.list(limit=1000)["jobs"]] == before
        assert c.get(job["id"])["cancel_requested"] is False
        assert c.maintenance()["maintenance"] is False
        c.cancel(job["id"], wait=True)
