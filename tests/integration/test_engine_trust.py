"""What a job may not do to the daemon, and what a bad moment may not do to a job, through
the real daemon (issue 7): no process outlives its job however it detaches, no zombie
piles up, a full disk does not wedge a job, time limits of "none" and 0 mean none, and
cancel is quick (SPEC §5, §6, §9)."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from conftest import (FAST_CONFIG, Daemon, fill, pid_alive, result_of, wait_for,
                      wait_terminal)


def command(d: Daemon, script: str, **params: Any) -> dict[str, Any]:
    return result_of(d, "jobs.submit", type="command", options={"argv": ["sh", "-c", script]},
                     **params)


def read_pids(path: Path, count: int) -> list[int]:
    wait_for(lambda: path.exists() and len(path.read_text().split()) >= count,
             what=f"{count} processes to start")
    return [int(p) for p in path.read_text().split()]


def detached(pids: Path) -> str:
    """Two grandchildren in sessions of their own, one with a cleared environment (no
    JOBD_JOB_ID mark), each writing its pid to ``pids``."""
    return (f"setsid sh -c 'echo $$ >> {pids}; exec sleep 300' & "
            f"env -i /usr/bin/setsid /bin/sh -c 'echo $$ >> {pids}; exec sleep 300' & ")


def all_dead(pids: list[int]) -> bool:
    return not any(pid_alive(p) for p in pids)


def zombies_of(pid: int) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2:].split()
        if fields[0] == b"Z" and int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


# -- no child outlives its job (item 6) ---------------------------------------------------------

def test_detached_grandchildren_die_when_the_job_ends(daemon: Daemon, tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    pids.touch()
    job = command(daemon, detached(pids)
                  + f"while [ $(wc -l < {pids}) -lt 2 ]; do sleep 0.01; done")
    assert wait_terminal(daemon, job["id"])["status"] == "completed"
    assert all_dead(read_pids(pids, 2))


def test_detached_grandchildren_die_when_the_job_is_cancelled(daemon: Daemon,
                                                               tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    pids.touch()
    job = command(daemon, detached(pids) + "sleep 300")
    spawned = read_pids(pids, 2)
    stopped = result_of(daemon, "jobs.cancel", job_id=job["id"], wait=True)
    assert stopped["status"] == "cancelled"
    assert all_dead(spawned)


def test_detached_grandchildren_die_with_a_killed_daemon(
        make_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    d = make_daemon()
    pids = tmp_path / "pids"
    pids.touch()
    job = command(d, detached(pids) + f"echo $$ >> {pids}; sleep 300")
    spawned = read_pids(pids, 3)
    d.kill()
    wait_for(lambda: all_dead(spawned), timeout=2, what="the job's processes to die with jobd")
    d.start()
    failed = wait_terminal(d, job["id"])
    assert (failed["status"], failed["error"]) == ("failed", "interrupted by daemon restart")
    assert all_dead(spawned)


def test_orphans_of_job_programs_leave_no_zombie_under_the_daemon(daemon: Daemon) -> None:
    assert daemon.proc is not None
    scripts = [
        "setsid sh -c 'sleep 0.05' & exit 0",          # orphaned at once, exits soon
        "setsid sh -c 'sleep 0.05' & sleep 0.3",       # exits while the program runs
        "(setsid sh -c 'exit 0' &); sleep 0.1",
    ]
    jobs = [command(daemon, s) for s in scripts for _ in range(3)]
    for job in jobs:
        assert wait_terminal(daemon, job["id"])["status"] == "completed"
    wait_for(lambda: zombies_of(daemon.proc.pid) == [], timeout=5,
             what="no zombie under the daemon")


def processes_running(cmdline: bytes) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        try:
            if Path(f"/proc/{entry.name}/cmdline").read_bytes() == cmdline:
                found.append(int(entry.name))
        except (OSError, ValueError):
            continue
    return [pid for pid in found if pid_alive(pid)]


def test_a_job_that_kills_its_supervisor_leaves_no_process_behind(daemon: Daemon) -> None:
    """B4: a grandchild in a session of its own, with a cleared environment, survived
    (re-parented to init) when the program killed its supervisor, and the job's error
    told the supervisor's status as the program's."""
    assert daemon.proc is not None
    job = command(daemon, "setsid env -i sleep 333 & sleep .3; kill -9 $PPID; sleep 1")
    left = wait_for(lambda: processes_running(b"sleep\x00333\x00"), what="sleep 333 to start")
    done = wait_terminal(daemon, job["id"])
    assert (done["status"], done["error"]) == (
        "failed", "the job's supervisor was killed (signal 9); its processes were killed")
    wait_for(lambda: all_dead(left), timeout=5, what="sleep 333 to be killed")
    wait_for(lambda: zombies_of(daemon.proc.pid) == [], timeout=5,
             what="no zombie under the daemon")
    assert daemon.proc.poll() is None


# -- cancel latency (SPEC §9: ≤ 250 ms) ---------------------------------------------------------

def test_cancel_of_a_program_that_honours_sigterm_is_quick(daemon: Daemon,
                                                           tmp_path: Path) -> None:
    took = []
    for n in range(5):
        ready = tmp_path / f"ready{n}"
        job = command(daemon, f"touch {ready}; exec sleep 300")
        wait_for(ready.exists, what="the program to start")
        started = time.monotonic()
        stopped = result_of(daemon, "jobs.cancel", job_id=job["id"], wait=True)
        took.append(time.monotonic() - started)
        assert stopped["status"] == "cancelled"
    print(f"cancel latency: median {statistics.median(took) * 1000:.0f} ms, "
          f"max {max(took) * 1000:.0f} ms")
    assert statistics.median(took) <= 0.25, took


# -- time limits (item 18) ----------------------------------------------------------------------

@pytest.mark.parametrize("default", ["none", "0s"])
def test_a_default_timeout_of_none_is_no_limit(make_daemon: Callable[..., Daemon],
                                               default: str) -> None:
    d = make_daemon(config=FAST_CONFIG + f'default_timeout = "{default}"\n')
    done = wait_terminal(d, command(d, "sleep 1.2")["id"])
    assert (done["status"], done["error"]) == ("completed", None)


def test_timeout_s_0_from_an_admin_is_no_limit(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon(config=FAST_CONFIG + 'default_timeout = "1s"\n')
    unlimited = command(d, "sleep 1.5", timeout_s=0)
    limited = command(d, "sleep 1.5")
    assert wait_terminal(d, unlimited["id"])["status"] == "completed"
    failed = wait_terminal(d, limited["id"])
    assert (failed["status"], failed["error"]) == ("failed", "timed out after 1s")


# -- a full disk (item 3) -----------------------------------------------------------------------

def end_tries(d: Daemon, job_id: str) -> int:
    """How many times the daemon tried to commit the job's end and found storage full."""
    return sum(1 for e in d.log_events()
               if e.get("event") == "job_end_pending" and e.get("job_id") == job_id)


def wait_tries(d: Daemon, job_id: str, more: int) -> None:
    want = end_tries(d, job_id) + more
    wait_for(lambda: end_tries(d, job_id) >= want, timeout=20,
             what=f"{more} more failed tries of the job's end")


def on_small_disk(make_daemon: Callable[..., Daemon], disk: Path) -> Daemon:
    d = make_daemon(start=False)
    d.state = disk / "state"
    d.db = d.state / "jobd.db"
    return d.start()


@pytest.mark.root
def test_a_job_that_ends_on_a_full_disk_is_recorded_when_space_returns(
        make_daemon: Callable[..., Daemon], small_disk: Path, tmp_path: Path) -> None:
    d = on_small_disk(make_daemon, small_disk)
    release = tmp_path / "release"
    job = command(d, f"while [ ! -e {release} ]; do sleep 0.02; done")
    wait_for(lambda: result_of(d, "jobs.get", job_id=job["id"])["status"] == "running")
    filler = fill(small_disk)
    release.touch()

    pending = wait_for(lambda: (j := result_of(d, "jobs.get", job_id=job["id"]))
                       and "not recorded yet" in (j["message"] or "") and j,
                       what="the job to say its end waits for storage")
    assert pending["status"] == "running" and "storage full" in pending["message"]
    wait_tries(d, job["id"], 3)
    assert result_of(d, "jobs.get", job_id=job["id"])["status"] == "running"

    filler.unlink()
    done = wait_terminal(d, job["id"], timeout=15)
    assert done["status"] == "completed", done
    assert d.proc is not None and d.proc.poll() is None  # no restart needed


@pytest.mark.root
def test_a_cancel_on_a_full_disk_ends_the_job_cancelled(
        make_daemon: Callable[..., Daemon], small_disk: Path, tmp_path: Path) -> None:
    d = on_small_disk(make_daemon, small_disk)
    ready = tmp_path / "ready"
    job = command(d, f"touch {ready}; exec sleep 300")
    wait_for(ready.exists, what="the program to start")
    filler = fill(small_disk)

    # the store cannot record the request, yet the engine stops the job at once ...
    answer = d.raw("jobs.cancel", job_id=job["id"])
    assert answer["result"]["cancel_requested"] is True, answer
    wait_tries(d, job["id"], 2)
    filler.unlink()
    # ... and its end is recorded cancelled once there is room again
    assert wait_terminal(d, job["id"], timeout=15)["status"] == "cancelled"


@pytest.mark.root
@pytest.mark.disk_size("8m")
def test_a_job_that_fills_the_disk_and_completes_is_not_recorded_timed_out(
        make_daemon: Callable[..., Daemon], small_disk: Path) -> None:
    """B1: its end waited for storage past its time limit, and was then recorded "timed
    out after 3s", its result lost."""
    d = on_small_disk(make_daemon, small_disk)
    filler = small_disk / "filler"
    submitted = time.monotonic()
    job = command(d, f"cat /dev/zero > {filler} 2>/dev/null; sleep 1; exit 0", timeout_s=3)
    wait_for(lambda: end_tries(d, job["id"]), timeout=20, what="the end to wait for storage")
    # past the limit, with room for the dispatch loop to look at it (every 0.5 s)
    wait_for(lambda: time.monotonic() > submitted + 4, what="the time limit to pass")
    wait_tries(d, job["id"], 1)
    filler.unlink()
    done = wait_terminal(d, job["id"], timeout=15)
    assert (done["status"], done["error"]) == ("completed", None), done
    assert done["result"] is not None


# -- a log read past its end (B2) -----------------------------------------------------------------

@pytest.mark.parametrize("offset", [2**63 - 1, 2**63 - 2**20, 2**62, 2**63 - 11])
@pytest.mark.parametrize("limit", [10, 1 << 20])
def test_a_log_read_far_past_its_end_is_an_empty_page_or_a_clear_error(
        daemon: Daemon, offset: int, limit: int) -> None:
    job = command(daemon, "echo some output")
    assert wait_terminal(daemon, job["id"])["status"] == "completed"
    answer = daemon.raw("jobs.logs", job_id=job["id"], offset=offset, limit_bytes=limit)
    if "error" in answer:
        assert answer["error"]["code"] == -32602, answer
    else:
        page = answer["result"]
        assert page["data"] == "" and page["next_offset"] == offset, page
    assert "Traceback" not in daemon.log()
