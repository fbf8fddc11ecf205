"""Running a job's program: real programs, real signals, real process groups."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from jobd.joblogs import JobLog, read
from jobd.orphans import process_start_time
from jobd.process import run
from procs import alive, group, state_and_group, wait_for

PY = sys.executable


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
    data, end = read(log.path, 0, 1 << 16)
    # the log keeps what a terminal shows: the last state of the \r run, as one line
    assert data == b"hello there\nReceiving objects: 100% (10/10), done.\n"
    assert end == len(data)


def test_a_long_redrawn_line_is_stored_as_its_last_state(tmp_path, log):
    """git prints thousands of \r states: the log gets one short line, progress sees all."""
    hits = []
    states = "".join(f"Receiving objects: {i:3d}% ({i}/100)\r" for i in range(101))
    run(["sh", "-c", 'printf "%s\\n" "$1" >&2', "sh", states], cwd=tmp_path, env=None, log=log,
        stop=threading.Event(), deadline=None, grace=1.0,
        on_progress=lambda p, m: hits.append(p))
    assert read(log.path, 0, 1 << 16)[0] == b"Receiving objects: 100% (100/100)\n"
    assert len(hits) == 101


def test_stdout_is_not_kept_unless_captured(log):
    done = start(["sh", "-c", "echo out; exit 3"], log)
    assert (done.returncode, done.stdout) == (3, "")
    assert read(log.path, 0, 100)[0] == b"out\n"


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
    assert read(log.path, 0, 1000)[0] == b"plain output\n"


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
    assert all(state_and_group(pid) is None for pid in escaped)  # reaped too, not left as zombies


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
        "from jobd.joblogs import JobLog\n"
        "from jobd.process import run\n"
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


def boottime() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def test_a_lease_not_extended_in_time_stops_the_program_and_what_it_detached(tmp_path, log):
    """A cluster node's lease (SPEC §11): the supervisor is told until when it holds, and
    stops everything once that passes with no newer one (SIGTERM, SIGKILL after the
    grace), whatever the program does."""
    pids = tmp_path / "pids"
    pids.touch()
    held = boottime() + 0.4
    began = time.monotonic()
    stop = threading.Event()
    threading.Timer(5, stop.set).start()  # should the lease never lapse: a cancel, not a hang
    done = start(["sh", "-c", "trap '' TERM; " + _detached(pids) + f"echo $$ >> {pids}; "
                  "sleep 300"], log, stop=stop, grace=0.3, lease=lambda: held)
    assert done.expired and done.returncode == -signal.SIGKILL, done
    assert 0.7 <= time.monotonic() - began < 3
    spawned = [int(p) for p in pids.read_text().split()]
    assert len(spawned) == 3
    wait_for(lambda: not any(alive(pid) for pid in spawned), timeout=2)


def test_a_lease_extended_at_each_heartbeat_lets_the_program_finish(log):
    done = start([PY, "-c", "import time; time.sleep(1.0)"], log,
                 lease=lambda: boottime() + 0.3)
    assert done.returncode == 0 and not done.expired, done


def test_a_lease_already_lapsed_starts_nothing(tmp_path, log):
    marker = tmp_path / "ran"
    with pytest.raises(OSError, match="lease lapsed before the program started"):
        start(["touch", str(marker)], log, lease=lambda: boottime() - 1)
    time.sleep(0.2)
    assert not marker.exists()


def test_a_frozen_node_loses_its_job_processes_before_its_lease_could_be_taken_over(tmp_path):
    """SIGSTOP of jobd freezes every thread that could kill its jobs; the supervisor
    kills them on its own once the last deadline it was given passes, and the node,
    woken by SIGCONT, learns that its program was killed for that."""
    pids = tmp_path / "pids"
    pids.touch()
    report = tmp_path / "report"
    parent = script(tmp_path, (
        "import sys, threading, time\n"
        "from pathlib import Path\n"
        "from jobd.joblogs import JobLog\n"
        "from jobd.process import run\n"
        "held = time.clock_gettime(time.CLOCK_BOOTTIME) + 0.5\n"
        "def heartbeat():\n"
        "    global held\n"
        "    while True:\n"
        "        held = time.clock_gettime(time.CLOCK_BOOTTIME) + 0.5\n"
        "        time.sleep(0.1)\n"
        "threading.Thread(target=heartbeat, daemon=True).start()\n"
        f"log = JobLog(Path({str(tmp_path / 'job.log')!r}), 1 << 20)\n"
        f"done = run(['sh', '-c', {_detached(pids) + 'echo $$ >> ' + str(pids) + '; sleep 300'!r}],\n"
        "    cwd=None, env=None, log=log, stop=threading.Event(), deadline=None, grace=0.5,\n"
        "    lease=lambda: held)\n"
        f"Path({str(report)!r}).write_text(f'{{done.expired}} {{done.returncode}}')\n"))
    proc = subprocess.Popen([PY, parent], cwd=Path(__file__).parents[2])
    try:
        spawned = _pids(pids, 3)
        time.sleep(0.8)  # heartbeats keep it running past the first deadline
        assert all(alive(pid) for pid in spawned)
        proc.send_signal(signal.SIGSTOP)
        frozen = time.monotonic()
        wait_for(lambda: not any(alive(pid) for pid in spawned), timeout=3)
        assert time.monotonic() - frozen < 2
        proc.send_signal(signal.SIGCONT)
        assert proc.wait(10) == 0
    finally:
        proc.kill()
        proc.wait()
    assert report.read_text() == f"True {-signal.SIGTERM}"
