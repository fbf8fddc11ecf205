"""What a job's processes leave behind, and the backstop that kills it (SPEC §5, §6).

After a daemon crash, ``kill_orphan_group`` takes down what is left of a job's recorded
process group (proven the job's by its start time) and ``kill_marked`` every process
whose environment carries the job's mark (``JOB_ENV``). jobd is a child subreaper as
well, as a backstop: if a program kills its supervisor, what the supervisor held is
re-parented to jobd, and ``sweep_orphans`` (after such a death, and on every tick of the
engine) kills and reaps it. ``spawn_supervisor`` and ``forget_supervisor`` keep the
list of jobd's live supervisors, which a sweep leaves alone.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import threading
import time
from typing import Callable

import structlog

from jobd import supervise

__all__ = [
    "JOB_ENV", "forget_supervisor", "kill_marked", "kill_orphan_group", "process_start_time",
    "spawn_supervisor", "sweep_orphans",
]

_log = structlog.get_logger()

_SUPERVISOR_EXIT = 2.0  # recovery: how long an orphaned supervisor may take to finish

#: the environment variable that marks every process of a job (set by the engine)
JOB_ENV = "JOBD_JOB_ID"


def process_start_time(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (clock ticks since boot), None if the process is gone."""
    stat = supervise.stat(pid)
    return stat[3] if stat else None


# jobd is a child subreaper too, as a backstop: when a job's supervisor dies (killed by
# its own program, say), what it held is re-parented here instead of to init, and
# sweep_orphans kills and reaps it.
_PR_SET_CHILD_SUBREAPER = 36
_subreaper = False
#: jobd's live supervisors, pid -> process: a sweep never touches these (nor reaps one:
#: its Popen would lose the exit status)
_SUPERVISORS: dict[int, subprocess.Popen[bytes]] = {}
_SUPERVISORS_LOCK = threading.Lock()


def _become_subreaper() -> None:
    global _subreaper
    with _SUPERVISORS_LOCK:
        if _subreaper:
            return
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            _log.warning("subreaper_unavailable", error=os.strerror(ctypes.get_errno()))
        _subreaper = True


def spawn_supervisor(spawn: Callable[[], subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    """Start a job's supervisor with ``spawn`` and count it as one of jobd's live
    supervisors (jobd first becomes a subreaper); ``forget_supervisor`` once reaped."""
    _become_subreaper()
    with _SUPERVISORS_LOCK:  # a sweep meanwhile must know it for a supervisor
        proc = spawn()
        _SUPERVISORS[proc.pid] = proc
    return proc


def forget_supervisor(proc: subprocess.Popen[bytes]) -> None:
    """A supervisor reaped: its pid may now be anyone's."""
    with _SUPERVISORS_LOCK:
        if proc.returncode is not None and _SUPERVISORS.get(proc.pid) is proc:
            del _SUPERVISORS[proc.pid]


def _orphans() -> dict[int, tuple[str, int]]:
    """pid -> (state, start time) of every child of jobd that a job left: in a session other than
    jobd's (a job's programs run in their own; jobd's own short ``subprocess.run``
    children stay in jobd's), and not one of jobd's live supervisors."""
    me, session = os.getpid(), os.getsid(0)
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        stat = supervise.stat(pid)
        if stat is None or stat[1] != me or pid in _SUPERVISORS:
            continue
        try:
            if os.getsid(pid) == session:
                continue
        except ProcessLookupError:
            continue
        found[pid] = stat[0], stat[3]
    return found


def sweep_orphans(wait: float = 0.0) -> int:
    """SIGKILL every orphan a job left under jobd (see ``_orphans``) with its
    descendants, and reap them; how many were killed. With ``wait``, go on for up to that
    many seconds until none is left (a killed orphan's children are re-parented here)."""
    if not _subreaper:
        return 0
    until = time.monotonic() + wait
    killed = 0
    while True:
        with _SUPERVISORS_LOCK:
            orphans = _orphans()
            for pid, (state, start) in orphans.items():
                tree = {p: st for p, (p_state, st) in supervise.descendants(pid).items()
                        if p_state not in ("Z", "X")}
                if state not in ("Z", "X"):
                    tree[pid] = start
                killed += sum(1 for p, st in tree.items() if _kill_if_same(p, st))
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass
        if not orphans or time.monotonic() >= until:
            break
        time.sleep(0.01)
    if killed:
        _log.warning("orphan_processes_killed", killed=killed)
    return killed


def kill_orphan_group(pgid: int, start_time: int | None) -> int:
    """After a daemon crash: SIGKILL what is left of a job's process group; how many.

    The group is the job's only if its leader (pid == pgid), when alive, started exactly
    at ``start_time``; with the leader gone, the members that started at or after
    ``start_time`` are the job's (an older one cannot be its descendant). Without a
    recorded start time nothing can be proven, so nothing is killed.
    """
    if start_time is None or pgid <= 1 or pgid == os.getpgrp():
        return 0
    killed: set[tuple[int, int]] = set()
    # repeat: a member may have forked between the scan and its kill
    for _ in range(5):
        members = {}  # pid -> (state, start time)
        for entry in os.scandir("/proc"):
            if entry.name.isdigit() and (stat := supervise.stat(int(entry.name))) and (
                    stat[2] == pgid):
                members[int(entry.name)] = stat[0], stat[3]
        if pgid in members and members[pgid][1] != start_time:
            break  # the pgid belongs to a later, unrelated group (even if a zombie)
        fresh = {(pid, st) for pid, (state, st) in members.items()
                 if state not in ("Z", "X") and st >= start_time
                 and (pid, st) not in killed and pid != os.getpid()}
        if not fresh:
            break
        for pid, st in fresh:
            if _kill_if_same(pid, st):
                killed.add((pid, st))
    if killed:
        _log.info("orphan_group_killed", pgid=pgid, killed=len(killed))
    return len(killed)


def _marked(job_id: str) -> list[tuple[int, int, bool]]:
    """(pid, start time, is a supervisor) of every live process marked with ``job_id``."""
    mark = b"\0" + f"{JOB_ENV}={job_id}".encode() + b"\0"
    script = os.fsencode(supervise.SCRIPT)
    me = os.getpid()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                environ = b"\0" + f.read()
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if mark not in environ:
            continue
        stat = supervise.stat(int(entry.name))
        if stat is not None and stat[0] not in ("Z", "X"):
            found.append((int(entry.name), stat[3], script in cmdline))
    return found


def kill_marked(job_id: str) -> int:
    """SIGKILL every process whose environment carries ``JOBD_JOB_ID=<job_id>``; how many.

    Catches what a recorded process group cannot: a process started just before a crash,
    before its group was recorded, and descendants that left the group. A supervisor
    still at work (its jobd just died) is given a moment to finish first: it also kills
    what carries no mark (a program started with a cleared environment). Only processes
    of the daemon's own user can be read, which are the only ones a job starts.
    """
    marked = _marked(job_id)
    if any(is_supervisor for _, _, is_supervisor in marked):
        until = time.monotonic() + _SUPERVISOR_EXIT
        while time.monotonic() < until and any(s for _, _, s in marked):
            time.sleep(0.01)
            marked = _marked(job_id)
    killed = sum(1 for pid, start, _ in marked if _kill_if_same(pid, start))
    if killed:
        _log.info("marked_processes_killed", job_id=job_id, killed=killed)
    return killed


def _kill_if_same(pid: int, start_time: int) -> bool:
    """SIGKILL ``pid`` only if it is still the process that started at ``start_time``."""
    try:
        # through a pidfd, the check and the kill reach the same process even if the pid
        # is reused in between
        pidfd: int | None = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    except OSError:
        pidfd = None  # pidfd_open filtered (older container runtimes): plain kill
    try:
        stat = supervise.stat(pid)
        if stat is None or stat[3] != start_time:
            return False
        if pidfd is None:
            os.kill(pid, signal.SIGKILL)
        else:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        return True
    except ProcessLookupError:
        return False
    finally:
        if pidfd is not None:
            os.close(pidfd)
