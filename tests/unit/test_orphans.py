"""Forensics after a crash: a job's process group and marked processes, found and killed."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from jobd.orphans import kill_marked, kill_orphan_group, process_start_time
from procs import alive, group, wait_for


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
