"""Subprocesses of jobs: real programs, real signals, real process groups."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from jobd.process import (
    kill_marked, _Terminal, is_note,
    JobLog, kill_orphan_group, parse_progress, process_start_time, read_log, run,
)

PY = sys.executable


def _stat(pid: int) -> tuple[str, int] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except FileNotFoundError:
        return None
    fields = raw[raw.rindex(b")") + 2:].split()
    return fields[0].decode(), int(fields[2])


def group(pgid: int, *, zombies: bool = True) -> list[int]:
    """Every process in /proc whose process group is ``pgid``."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit() and (stat := _stat(int(name))) and stat[1] == pgid:
            if zombies or stat[0] != "Z":
                found.append(int(name))
    return found


def alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"


def wait_for(predicate, timeout: float = 5.0) -> None:
    until = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < until, "condition not reached in time"
        time.sleep(0.005)


@pytest.fixture
def log(tmp_path: Path):
    job_log = JobLog(tmp_path / "logs" / "job.log", 1 << 20)
    yield job_log
    job_log.close()


def script(tmp_path: Path, text: str) -> str:
    path = tmp_path / "child.py"
    path.write_text(text)
    return str(path)


def start(argv, log, *, stop=None, deadline=None, grace=1.0, **kw):
    return run(argv, cwd=None, env=None, log=log, stop=stop or threading.Event(),
               deadline=deadline, grace=grace, **kw)


# ------------------------------------------------------------------------ parse_progress

@pytest.mark.parametrize("line, expected", [
    ('{"current": 25, "total": 200, "info": "src/a.py"}', (12.5, "src/a.py")),
    ('{"current": 3, "total": 0, "info": "scanning"}', (None, "scanning")),
    ('  {"progress": 42.5, "message": "indexing"}\n', (42.5, "indexing")),
    ('{"progress": 7}', (7.0, None)),
    ("Receiving objects:  45% (45/100)", (45.0, "Receiving objects:  45% (45/100)")),
    ("Receiving objects:  45% (45/100), 1.00 MiB | 2.00 MiB/s",
     (45.0, "Receiving objects:  45% (45/100), 1.00 MiB | 2.00 MiB/s")),
    ("remote: Counting objects: 100% (3/3), done.",
     (100.0, "remote: Counting objects: 100% (3/3), done.")),
    ("copying 12.5%  ", (12.5, "copying 12.5%")),
])
def test_parse_progress_reads_each_form(line, expected):
    assert parse_progress(line) == expected


@pytest.mark.parametrize("line", [
    "", "hello world", "50% of the time it works", "load 150%", '{"current": 1}',
    '{"name": "x"}', "{not json 40%}", '["progress", 40]', '{"progress": true}',
])
def test_parse_progress_ignores_other_lines(line):
    assert parse_progress(line) is None


# ------------------------------------------------------------------------- output, progress

def test_output_goes_to_the_log_and_progress_split_on_carriage_returns(tmp_path, log):
    hits = []
    argv = ["sh", "-c", 'printf "hello $GREETING\\n"; '
            'printf "Receiving objects:  10%% (1/10)\\rReceiving objects:  50%% (5/10)\\r'
            'Receiving objects: 100%% (10/10), done." >&2']
    done = run(argv, cwd=tmp_path, env={"GREETING": "there"}, log=log,
               stop=threading.Event(), deadline=None, grace=1.0,
               on_progress=lambda p, m: hits.append((p, m)), capture=True)
    assert (done.returncode, done.cancelled, done.timed_out) == (0, False, False)
    assert done.stdout == "hello there\n"
    assert [p for p, _ in hits] == [10.0, 50.0, 100.0]
    assert hits[-1][1] == "Receiving objects: 100% (10/10), done."
    data, end = read_log(log.path, 0, 1 << 16)
    # the log keeps what a terminal shows: the last state of the \r run, as one line
    assert data == b"hello there\nReceiving objects: 100% (10/10), done.\n"
    assert end == len(data)


@pytest.mark.parametrize("chunks, kept", [
    ([b"a 1%\ra 2", b"%\ra 3%\n"], b"a 3%\n"),          # a redraw split across reads
    ([b"one\r\n", b"two\n"], b"one\ntwo\n"),           # \r\n ends a line
    ([b"x 1%\r", b"\n"], b"x 1%\n"),                     # a final \r, then the line end
    ([b"no end\rlast"], b"last\n"),                      # the end of output ends the line
])
def test_the_log_keeps_the_last_state_of_each_carriage_return_run(chunks, kept):
    terminal = _Terminal()
    assert b"".join(terminal.feed(c) for c in chunks) + terminal.flush() == kept


def test_a_long_redrawn_line_is_stored_as_its_last_state(tmp_path, log):
    """git prints thousands of \r states: the log gets one short line, progress sees all."""
    hits = []
    states = "".join(f"Receiving objects: {i:3d}% ({i}/100)\r" for i in range(101))
    run(["sh", "-c", 'printf "%s\\n" "$1" >&2', "sh", states], cwd=tmp_path, env=None, log=log,
        stop=threading.Event(), deadline=None, grace=1.0,
        on_progress=lambda p, m: hits.append(p))
    assert read_log(log.path, 0, 1 << 16)[0] == b"Receiving objects: 100% (100/100)\n"
    assert len(hits) == 101


def test_stdout_is_not_kept_unless_captured(log):
    done = start(["sh", "-c", "echo out; exit 3"], log)
    assert (done.returncode, done.stdout) == (3, "")
    assert read_log(log.path, 0, 100)[0] == b"out\n"


def test_progress_fd_reaches_on_progress_but_not_the_log(tmp_path, log):
    child = script(tmp_path, (
        "import os\n"
        "fd = int(os.environ['JOBD_PROGRESS_FD'])\n"
        "os.write(fd, b'{\"current\": 1, \"total\": 4, \"info\": \"one\"}\\n')\n"
        "os.write(fd, b'{\"progress\": 50, \"message\": \"half\"}')\n"
        "print('plain output')\n"))
    hits = []
    done = start([PY, child], log, on_progress=lambda p, m: hits.append((p, m)))
    assert done.returncode == 0
    assert hits == [(25.0, "one"), (50.0, "half")]
    assert read_log(log.path, 0, 1000)[0] == b"plain output\n"


def test_on_spawn_gets_the_group_and_its_start_time(log):
    spawned = []
    done = start(["sh", "-c", "echo $$"], log, capture=True,
                 on_spawn=lambda pgid, st: spawned.append((pgid, st)))
    [(pgid, st)] = spawned
    assert done.stdout == f"{pgid}\n"
    assert st > 0
    assert process_start_time(pgid) is None  # reaped


def test_missing_program_raises_file_not_found_naming_it(tmp_path, log):
    with pytest.raises(FileNotFoundError, match="no-such-program-xyz"):
        start(["no-such-program-xyz", "--help"], log)
    with pytest.raises(FileNotFoundError, match="working directory .*gone"):
        run(["true"], cwd=tmp_path / "gone", env=None, log=log, stop=threading.Event(),
            deadline=None, grace=1.0)


# ----------------------------------------------------------------------------------- log

def test_log_cap_drops_oldest_and_offsets_stay_absolute(tmp_path):
    path = tmp_path / "job.log"
    job_log = JobLog(path, 1000)
    written = b""
    pages, offset = [], 0
    for i in range(300):
        line = b"line %04d\n" % i
        job_log.write(line)
        written += line
        assert path.stat().st_size <= 1000
        if i % 7 == 0:  # a reader follows along while old output is dropped
            data, offset_next = read_log(path, offset, 64)
            pages.append((offset_next - len(data), data))
            offset = offset_next
    job_log.close()

    while True:
        data, offset_next = read_log(path, offset, 64)
        if not data:
            break
        pages.append((offset_next - len(data), data))
        offset = offset_next
    assert offset == len(written)
    for start_at, data in pages:  # every page is what was written at that offset
        assert data == written[start_at:start_at + len(data)]
    starts = [s for s, _ in pages]
    assert starts == sorted(starts) and len(set(starts)) == len(starts)

    # an offset inside the dropped part starts at the oldest byte kept, on a line start
    data, end = read_log(path, 0, 10_000)
    assert end == len(written) and written.endswith(data)
    assert 0 < len(data) <= 1000 and data.startswith(b"line ")
    assert read_log(tmp_path / "missing.log", 42, 10) == (b"", 42)


def test_log_takes_concurrent_writers_whole(tmp_path):
    path = tmp_path / "job.log"
    job_log = JobLog(path, 4000)

    def writer(n: int) -> None:
        for i in range(200):
            job_log.write(b"writer %d line %03d\n" % (n, i))

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    job_log.close()
    data, end = read_log(path, 0, 10_000)
    assert end == 4 * 200 * len(b"writer 0 line 000\n")
    assert 0 < len(data) <= 4000
    assert all(line.startswith(b"writer ") and len(line) == 17 for line in data.splitlines())


def test_log_reopened_appends_and_keeps_offsets(tmp_path):
    path = tmp_path / "job.log"
    first = JobLog(path, 100)
    first.write(b"x" * 150)
    first.close()
    again = JobLog(path, 100)
    again.note("phase git_sync")
    again.close()
    data, end = read_log(path, 0, 1000)
    assert end == 150 + len(b"\n[jobd 2026-11-22T10:00:00Z] phase git_sync\n")
    assert re.search(rb"\[jobd \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\] phase git_sync\n$", data)


def test_note_writes_a_jobd_line(log):
    log.note("$ git fetch --progress origin")
    log.write(b"output\n")
    log.note("phase indexing")
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()).encode()
    data = read_log(log.path, 0, 1000)[0]
    # the stamp is the wall clock: a second may tick between the notes and the read
    assert re.sub(rb"\[jobd [0-9T:Z-]{20}\]", b"[jobd " + stamp + b"]", data) == (
        b"[jobd %s] $ git fetch --progress origin\noutput\n[jobd %s] phase indexing\n"
        % (stamp, stamp))
    assert all(is_note(line) for line in data.decode().splitlines() if line != "output")


def test_story_lines_wait_for_a_log_and_are_dropped_without_one(tmp_path):
    """A job that never writes output gets no file; one that does gets its story first."""
    quiet = JobLog(tmp_path / "quiet.log", 1000)
    quiet.story("attempt 1 started", 1_795_000_000_000_000)
    quiet.close()
    assert not (tmp_path / "quiet.log").exists()
    busy = JobLog(tmp_path / "busy.log", 1000)
    busy.story("attempt 1 started", 1_795_000_000_000_000)
    busy.write(b"out\n")
    busy.story("ended completed", 1_795_000_001_000_000)
    busy.close()
    assert read_log(tmp_path / "busy.log", 0, 1000)[0] == (
        b"[jobd 2026-11-18T11:06:40Z] attempt 1 started\nout\n"
        b"[jobd 2026-11-18T11:06:41Z] ended completed\n")


# ------------------------------------------------------------------- cancel, timeout, groups

def test_cancel_sigkills_a_program_that_ignores_sigterm_after_grace(tmp_path, log):
    child = script(tmp_path, (
        "import os, signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "os.write(int(os.environ['JOBD_PROGRESS_FD']), b'{\"progress\": 1}\\n')\n"
        "time.sleep(60)\n"))
    stop = threading.Event()
    stopped_at = []

    def ready(percent, message):
        stopped_at.append(time.monotonic())
        stop.set()

    done = start([PY, child], log, stop=stop, grace=0.3, on_progress=ready)
    took = time.monotonic() - stopped_at[0]
    assert (done.returncode, done.cancelled, done.timed_out) == (-signal.SIGKILL, True, False)
    assert 0.3 <= took < 2.0


def test_cancel_takes_the_whole_group_down_quickly(log):
    pgids, stopped_at = [], []
    stop = threading.Event()

    def cancel():  # from another thread, as a cancel request arrives
        stopped_at.append(time.monotonic())
        stop.set()

    def ready(percent, message):
        threading.Thread(target=cancel).start()

    argv = ["sh", "-c", "sleep 1000 & echo $!; sleep 1000 & echo $!; "
            # dash redirects only fds 0-9: a shell reaches the pipe through /dev/fd
            'echo "{\\"progress\\": 1}" >/dev/fd/$JOBD_PROGRESS_FD; wait']
    done = start(argv, log, stop=stop, grace=5.0, on_progress=ready, capture=True,
                 on_spawn=lambda pgid, st: pgids.append(pgid))
    took = time.monotonic() - stopped_at[0]
    assert done.cancelled and done.returncode == -signal.SIGTERM
    assert took < 0.25
    sleepers = [int(pid) for pid in done.stdout.split()]
    assert len(sleepers) == 2 and pgids[0] not in sleepers
    assert group(pgids[0]) == []  # nothing left, not even a zombie
    assert not any(alive(pid) for pid in sleepers)


def test_grandchildren_die_when_the_leader_exits(log):
    pgids = []
    t0 = time.monotonic()
    # the grandchild holds stdout open: run must not wait for it to finish
    done = start(["sh", "-c", "sleep 1000 & echo $!"], log, capture=True,
                 on_spawn=lambda pgid, st: pgids.append(pgid))
    assert done.returncode == 0 and not done.cancelled
    assert time.monotonic() - t0 < 2.0
    assert not alive(int(done.stdout))
    assert group(pgids[0]) == []


def test_a_process_that_left_the_group_dies_with_its_program(tmp_path, log):
    child = script(tmp_path, (
        "import subprocess\n"
        "p = subprocess.Popen(['sleep', '1000'], start_new_session=True)\n"
        "print(p.pid, flush=True)\n"))
    t0 = time.monotonic()
    done = start([PY, child], log, capture=True)
    escaped = int(done.stdout)
    assert done.returncode == 0
    assert time.monotonic() - t0 < 3.0
    assert not alive(escaped)


def test_deadline_times_out(log):
    t0 = time.monotonic()
    done = start(["sleep", "1000"], log, deadline=t0 + 0.2)
    assert (done.timed_out, done.cancelled, done.returncode) == (True, False, -signal.SIGTERM)
    assert 0.2 <= time.monotonic() - t0 < 1.0


# ------------------------------------------------------------------------ orphan recovery

@pytest.fixture
def detached():
    """A process group started like a crashed daemon's job: ``sh`` with two sleepers."""
    started = []

    def spawn(command: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(["sh", "-c", command], start_new_session=True,
                                stdout=subprocess.PIPE)
        started.append(proc)
        return proc

    yield spawn
    for proc in started:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        proc.stdout.close()


def test_kill_orphan_group_kills_a_matching_group(detached):
    proc = detached("sleep 1000 & sleep 1000 & wait")
    leader_start = process_start_time(proc.pid)
    wait_for(lambda: len(group(proc.pid, zombies=False)) == 3)

    assert kill_orphan_group(proc.pid, leader_start + 1) == 0  # pgid reused by another
    assert len(group(proc.pid, zombies=False)) == 3
    assert kill_orphan_group(proc.pid, None) == 0

    assert kill_orphan_group(proc.pid, leader_start) == 3
    # sh exits 0 if its sleepers die first and its `wait` returns before its own SIGKILL
    assert proc.wait(timeout=5) in (0, -signal.SIGKILL)
    wait_for(lambda: group(proc.pid, zombies=False) == [])


def test_kill_orphan_group_without_its_leader(detached):
    proc = detached("sleep 1000 & echo $!")
    leader_start = process_start_time(proc.pid)
    sleeper = int(proc.stdout.readline())
    proc.wait()
    sleeper_start = process_start_time(sleeper)
    assert alive(sleeper)

    assert kill_orphan_group(proc.pid, sleeper_start + 1) == 0  # started before: not ours
    assert alive(sleeper)
    assert kill_orphan_group(proc.pid, leader_start) == 1
    wait_for(lambda: not alive(sleeper))


def test_process_start_time():
    me = process_start_time(os.getpid())
    assert isinstance(me, int) and me > 0
    proc = subprocess.Popen(["true"])
    proc.wait()
    assert process_start_time(proc.pid) is None


def test_a_job_log_nothing_was_written_to_leaves_no_file(tmp_path):
    log = JobLog(tmp_path / "logs" / "quiet.log", 1024)
    log.close()
    assert not (tmp_path / "logs" / "quiet.log").exists()
    assert read_log(tmp_path / "logs" / "quiet.log", 0, 100) == (b"", 0)
    with pytest.raises(ValueError, match="closed"):
        log.write(b"late\n")


def test_kill_marked_finds_a_job_process_by_its_environment(tmp_path):
    env = {**os.environ, "JOBD_JOB_ID": "job-1"}
    mine = subprocess.Popen(["sleep", "1000"], env=env, start_new_session=True)
    other = subprocess.Popen(["sleep", "1000"], env={**os.environ, "JOBD_JOB_ID": "job-12"},
                             start_new_session=True)
    try:
        wait_for(lambda: alive(mine.pid) and alive(other.pid))
        assert kill_marked("job-1") == 1
        assert mine.wait(timeout=5) == -signal.SIGKILL
        assert alive(other.pid)  # a longer id with the same prefix is another job
    finally:
        for p in (mine, other):
            p.kill()
            p.wait()


# ------------------------------------------------------------- the supervisor: nothing outlives

def _pids(path: Path, count: int) -> list[int]:
    wait_for(lambda: path.exists() and len(path.read_text().split()) >= count)
    return [int(p) for p in path.read_text().split()]


def _detached(pids: Path) -> str:
    """Shell lines that start two sleepers in sessions of their own, one with a cleared
    environment (so no JOBD_JOB_ID mark), each writing its pid to ``pids``."""
    return (f"setsid sh -c 'echo $$ >> {pids}; exec sleep 300' & "
            f"env -i /usr/bin/setsid /bin/sh -c 'echo $$ >> {pids}; exec sleep 300' & ")


def test_setsid_grandchildren_die_when_the_program_exits(tmp_path, log):
    pids = tmp_path / "pids"
    argv = ["sh", "-c", _detached(pids) + f"while [ $(wc -l < {pids}) -lt 2 ]; do sleep 0.01; done"]
    pids.touch()
    done = start(argv, log)
    assert done.returncode == 0
    escaped = _pids(pids, 2)
    assert not any(alive(pid) for pid in escaped)
    assert all(_stat(pid) is None for pid in escaped)  # reaped too, not left as zombies


def test_cancel_stops_setsid_grandchildren_quickly(tmp_path, log):
    pids = tmp_path / "pids"
    pids.touch()
    stop = threading.Event()
    stopped_at = []

    def cancel_once_started(percent, message):
        _pids(pids, 2)
        stopped_at.append(time.monotonic())
        stop.set()

    argv = ["sh", "-c", _detached(pids) + f"while [ $(wc -l < {pids}) -lt 2 ]; do sleep 0.01; done; "
            'echo "{\\"progress\\": 1}"; sleep 300']
    done = start(argv, log, stop=stop, grace=5.0, on_progress=cancel_once_started)
    took = time.monotonic() - stopped_at[0]
    assert done.cancelled and done.returncode == -signal.SIGTERM
    assert took < 0.25, took
    assert not any(alive(pid) for pid in _pids(pids, 2))


def test_orphans_that_exit_during_the_run_are_reaped_at_once(tmp_path, log):
    pids = tmp_path / "pids"
    # the orphan's parent exits at once; the orphan itself exits after 0.1 s while the
    # program still runs: someone must reap it then, not at the end
    argv = ["sh", "-c", f"sh -c 'sleep 0.1 & echo $! > {pids}'; sleep 0.6; "
            f"cat /proc/$(cat {pids})/stat 2>/dev/null || echo gone"]
    done = start(argv, log, capture=True)
    assert done.returncode == 0
    assert done.stdout.strip() == "gone", done.stdout


def test_the_exit_status_is_reported_faithfully(log):
    assert start(["sh", "-c", "exit 7"], log).returncode == 7
    assert start(["sh", "-c", "kill -USR1 $$"], log).returncode == -signal.SIGUSR1


def test_a_program_that_cannot_be_executed_is_an_error_naming_it(tmp_path, log):
    plain = tmp_path / "not-executable"
    plain.write_text("#!/bin/sh\necho hi\n")
    with pytest.raises(PermissionError, match="not-executable"):
        start([str(plain)], log)


def test_a_killed_parent_takes_the_program_and_its_detached_children_down(tmp_path):
    pids = tmp_path / "pids"
    pids.touch()
    parent = script(tmp_path, (
        "import sys, threading\n"
        "from pathlib import Path\n"
        "from jobd.process import JobLog, run\n"
        f"log = JobLog(Path({str(tmp_path / 'job.log')!r}), 1 << 20)\n"
        f"run(['sh', '-c', {_detached(pids) + 'echo $$ >> ' + str(pids) + '; sleep 300'!r}],\n"
        "    cwd=None, env=None, log=log, stop=threading.Event(), deadline=None, grace=5)\n"))
    proc = subprocess.Popen([PY, parent], cwd=Path(__file__).parents[2])
    try:
        spawned = _pids(pids, 3)
        assert all(alive(pid) for pid in spawned)
    finally:
        proc.kill()  # kill -9: no chance to clean up
        proc.wait()
    wait_for(lambda: not any(alive(pid) for pid in spawned), timeout=2)


@pytest.mark.parametrize("offset", [4, 5, 1 << 40, 2**63 - 1, 2**63, 2**64])
def test_read_log_at_or_past_the_end_is_an_empty_page(tmp_path: Path, offset: int) -> None:
    log = JobLog(tmp_path / "job.log", 1 << 20)
    log.write(b"abcd")
    assert read_log(log.path, offset, 1 << 20) == (b"", offset)
    assert read_log(log.path, 2, 1 << 20) == (b"cd", 4)
