"""Running a job's program: the supervisor, its pipes, cancel and timeout.

Every program a job runs starts under its own small supervisor process
(``jobd.supervise``), in a session and process group of its own. The supervisor is a
child subreaper: whatever the program spawns stays its descendant, however it
detaches, and is killed and reaped when the program ends, is cancelled or times out,
or when jobd dies (SPEC §5: no child outlives its job). ``run`` writes the program's
stdout and stderr to the job's log (``jobd.joblogs``) and reads progress from each line
of them and of the progress pipe (``jobd.progress``), and the program's last
``{"result": {...}}`` line on stdout or that pipe. If the supervisor itself dies,
what it held is killed at once (``jobd.orphans``, which also owns the forensics after a
daemon crash).
"""

from __future__ import annotations

import dataclasses
import errno
import math
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import structlog

from jobd import supervise
from jobd.joblogs import JobLog
from jobd.orphans import (JOB_ENV, forget_supervisor, kill_marked, kill_orphan_group,
                          spawn_supervisor, sweep_orphans)
from jobd.progress import (MAX_RESULT, Lines, Passes, is_result_line, parse_progress,
                           parse_result)

__all__ = ["Completed", "JOB_ENV", "run"]

_log = structlog.get_logger()

_TICK = 0.01          # how often the loop looks at `stop` and the clock (an Event cannot be selected)
_DRAIN = 0.5          # after the supervisor exited, how long its pipes may take to close
_START = 10.0         # how long the supervisor may take to report the program started
_UNRESPONSIVE = 2.0   # past the grace, how long jobd waits for the supervisor to finish
_ABORT = 2.0          # how long a supervisor told to kill everything may take to exit
_READ = 65536


@dataclasses.dataclass(frozen=True)
class Completed:
    argv: tuple[str, ...]
    returncode: int            #: negative = killed by that signal
    cancelled: bool            #: stopped because `stop` was set
    timed_out: bool            #: stopped because `deadline` passed
    stdout: str                #: captured stdout text (only when capture=True, else "")
    #: the supervisor died without reporting the program's end: ``returncode`` is its own
    supervisor_died: bool = False
    #: the object of its last ``{"result": {...}}`` line on stdout or the progress pipe
    result: dict[str, Any] | None = None
    #: the supervisor killed everything because the node's lease was not extended in time
    expired: bool = False


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class _Child:
    """One program under its supervisor: reads its pipes and the supervisor's reports."""

    def __init__(self, proc: subprocess.Popen[bytes], ctl: socket.socket, env: Mapping[str, str],
                 out: int, err: int, prog: int, log: JobLog,
                 on_progress: Callable[[float | None, str | None], None] | None,
                 capture: bool) -> None:
        self.proc = proc
        self.ctl = ctl
        self.env = env
        self.out = out
        self.log = log
        self.on_progress = on_progress
        self.captured: list[bytes] | None = [] if capture else None
        self.result: dict[str, Any] | None = None
        self.results = {out, prog}  #: where a result line counts
        self.lines = {fd: Lines() for fd in (out, err, prog)}
        self.logged = {out: log.stream(), err: log.stream()}
        self.open = {out, err, prog}
        self.reports = b""  #: the supervisor's unfinished last line
        self.first: list[str] | None = None  #: its first report: started or error
        self.ctl_open = True
        self.status: int | None = None  #: the program's exit code, as the supervisor saw it
        self.expired = False  #: the supervisor's deadline passed (``run``'s ``lease``)
        self.pgid = self.start = 0
        self.sel = selectors.DefaultSelector()
        for fd in self.open:
            os.set_blocking(fd, False)
            self.sel.register(fd, selectors.EVENT_READ)
        ctl.setblocking(False)
        self.sel.register(ctl, selectors.EVENT_READ)
        try:
            # readable when the supervisor exits: wakes the loop at once
            self.pidfd: int | None = os.pidfd_open(proc.pid)
            self.sel.register(self.pidfd, selectors.EVENT_READ)
        except OSError:
            self.pidfd = None

    def started(self, timeout: float) -> tuple[int, int]:
        """The supervisor's first report: (pgid, start time); OSError if it could not start
        the program."""
        until = time.monotonic() + timeout
        while self.first is None:
            left = until - time.monotonic()
            if self.expired and not self.ctl_open:
                raise OSError(errno.ETIMEDOUT, "the node's lease lapsed before the program "
                                               "started")
            if left <= 0 or not self.ctl_open:
                raise OSError(errno.ECHILD, "the job's supervisor did not start the program")
            self.pump(left)
        word, *values = self.first
        if word == "error":
            code = int(values[0])
            raise OSError(code, os.strerror(code))
        self.pgid, self.start = int(values[0]), int(values[1])
        return self.pgid, self.start

    def exited(self) -> bool:
        return self.proc.poll() is not None

    def supervise(self, stop: threading.Event, deadline: float | None, grace: float,
                  on_timeout: Callable[[], None] | None = None,
                  lease: Callable[[], float | None] | None = None,
                  held: float | None = None,
                  stop_grace: Callable[[], float] | None = None) -> tuple[bool, bool]:
        """Read output until the supervisor exits; (cancelled, timed_out). ``held``: the
        deadline the supervisor was started with; ``stop_grace()``: the grace of a stop,
        asked when it comes (else ``grace``)."""
        cancelled = timed_out = False
        # the supervisor SIGKILLs after the grace itself; this is for one that cannot
        kill_at: float | None = None
        while not self.exited():
            now = time.monotonic()
            if lease is not None and (until := lease()) != held and until is not None:
                held = until
                self.tell(f"until {until!r}\n".encode())
            if kill_at is None:
                cancelled = stop.is_set()
                timed_out = not cancelled and deadline is not None and now >= deadline
                if timed_out and on_timeout is not None:
                    on_timeout()
                if cancelled or timed_out:
                    given = stop_grace() if cancelled and stop_grace is not None else grace
                    self.tell(f"term {given!r}\n".encode())
                    kill_at = now + given + _UNRESPONSIVE
            elif now >= kill_at:
                _log.warning("supervisor_unresponsive", pid=self.proc.pid, pgid=self.pgid)
                _signal_group(self.pgid, signal.SIGKILL)
                self.proc.kill()
                kill_at = math.inf
            self.pump(_TICK if kill_at is None else min(_TICK, max(0.0, kill_at - now)))
        return cancelled, timed_out

    def tell(self, message: bytes) -> None:
        try:
            self.ctl.send(message)
        except OSError:
            pass  # it is exiting: its end is read all the same

    def pump(self, timeout: float) -> None:
        for key, _ in self.sel.select(timeout):
            if key.fileobj is self.ctl:
                self.read_control()
            elif key.fd != self.pidfd:
                self.read(key.fd)

    def read_control(self) -> None:
        """Take what the supervisor reported."""
        try:
            data = self.ctl.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.sel.unregister(self.ctl)
            self.ctl_open = False
            return
        *lines, self.reports = (self.reports + data).split(b"\n")
        for line in lines:
            word, *values = line.decode().split()
            if word in ("started", "error"):
                self.first = [word, *values]
            elif word == "exit":
                self.status = int(values[0])
            elif word == "killed":  # the grace passed: SIGKILL for what was left
                _log.info("process_group_killed", pgid=self.pgid, processes=int(values[0]))
            elif word == "expired":
                self.expired = True
                _log.warning("process_group_killed_lease_lapsed", pgid=self.pgid)

    def read(self, fd: int) -> None:
        try:
            data = os.read(fd, _READ)
        except BlockingIOError:
            return
        if not data:
            self.sel.unregister(fd)
            self.open.discard(fd)
            self.parse(fd, self.lines[fd].partial)
            if fd in self.logged:
                self.logged[fd].close()
            return
        if fd in self.logged:
            self.logged[fd].write(data)
        if fd == self.out and self.captured is not None:
            self.captured.append(data)
        if self.on_progress is not None or fd in self.results:
            for line in self.lines[fd].feed(data):
                self.parse(fd, line)

    def parse(self, fd: int, line: bytes) -> None:
        if b"%" not in line and b"{" not in line:
            return
        if fd in self.results and is_result_line(line):
            result = parse_result(line)
            if result is not None:
                self.result = result
            elif len(line.strip()) > MAX_RESULT:
                self.log.note(f"a result line of more than {MAX_RESULT} bytes was ignored: "
                              f"the most a result may take")
            return
        if self.on_progress is None:
            return
        hit = parse_progress(line.decode("utf-8", "replace"))
        if hit is None:
            return
        percent, message, counts = hit
        if counts is not None and isinstance(self.on_progress, Passes):
            self.on_progress.count(counts, message)
        else:
            self.on_progress(percent, message)

    def finish(self) -> int:
        """Reap the supervisor, read what the pipes still hold; the program's exit code."""
        if self.pidfd is not None:
            self.sel.unregister(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = None
        code = self.proc.wait()
        until = time.monotonic() + _DRAIN
        while (self.open or self.ctl_open) and (left := until - time.monotonic()) > 0:
            self.pump(left)
        if self.open:
            # only a process the supervisor could not kill still holds a pipe
            _log.warning("process_pipes_abandoned", pgid=self.pgid)
        if self.status is None:
            # the supervisor itself was killed: what it ran is left to this process
            _log.warning("supervisor_failed", pid=self.proc.pid, returncode=code)
            kill_orphan_group(self.pgid, self.start)
            if mark := self.env.get(JOB_ENV):
                kill_marked(mark)
            sweep_orphans(wait=_ABORT)  # what left the group and carries no mark
            return code
        return self.status

    def abort(self) -> None:
        """jobd gives up on the program: closing the control socket kills everything now."""
        self.ctl.close()
        try:
            self.proc.wait(_ABORT)
        except subprocess.TimeoutExpired:
            _log.warning("supervisor_unresponsive", pid=self.proc.pid, pgid=self.pgid)
            _signal_group(self.pgid, signal.SIGKILL)
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        self.sel.close()
        self.ctl.close()
        for fd in self.lines:
            os.close(fd)
        if self.pidfd is not None:
            os.close(self.pidfd)

    def stdout(self) -> str:
        return b"".join(self.captured).decode("utf-8", "replace") if self.captured else ""


def _not_found(argv: tuple[str, ...], cwd: str | Path | None) -> FileNotFoundError:
    if cwd is not None and not os.path.isdir(cwd):
        return FileNotFoundError(
            f"cannot run {argv[0]}: working directory {os.fspath(cwd)} does not exist")
    return FileNotFoundError(
        f"cannot run {argv[0]}: no such program (not found on PATH or not a file); "
        "install it or give its full path")


def run(argv: Sequence[str], *, cwd: str | Path | None, env: Mapping[str, str] | None,
        log: JobLog, stop: threading.Event, deadline: float | None, grace: float,
        on_progress: Callable[[float | None, str | None], None] | None = None,
        on_spawn: Callable[[int, int], None] | None = None,
        on_timeout: Callable[[], None] | None = None,
        lease: Callable[[], float | None] | None = None,
        stop_grace: Callable[[], float] | None = None,
        capture: bool = False) -> Completed:
    """Run ``argv`` under a per-job supervisor, in its own session and process group.

    stdin is /dev/null; the environment is ``os.environ`` updated with ``env`` plus
    ``JOBD_PROGRESS_FD``, a pipe for progress lines. Progress lines on stdout, stderr
    and that pipe go to ``on_progress`` (the counts of a ``{"current", "total"}`` line to
    ``on_progress.count`` when it is a ``Passes``); the last ``{"result": {...}}`` line on
    stdout or that pipe is the ``result``. When ``stop`` is set or ``deadline`` (a
    ``time.monotonic()`` value) passes, every process of the program gets SIGTERM, then
    SIGKILL after ``grace`` seconds (after ``stop_grace()``, asked then, for a stop).
    When the program exits, every process it left
    behind is killed and reaped, wherever it moved (``jobd.supervise``).
    ``on_spawn(pgid, start_time)`` is called once the program started, ``on_timeout()``
    when the deadline passed, before the SIGTERM. ``lease()``, asked at the start and
    then every tick, is the time (``CLOCK_BOOTTIME`` seconds) until which this node may
    run its jobs (None: no such limit); the supervisor is told each new one and, should
    that time pass first, stops every process of the program (SIGTERM, SIGKILL after
    ``grace``) on its own, so also while this process is frozen (``Completed.expired``);
    one already past means the program is not started (OSError ETIMEDOUT). A missing
    program raises FileNotFoundError naming it; another failure to start it, OSError.
    """
    args = tuple(argv)
    if not args:
        raise ValueError("empty command: argv must name a program")
    # every pipe and socket is close-on-exec in this process, so programs other threads
    # start meanwhile cannot hold them open
    (out_r, out_w), (err_r, err_w), (prog_r, prog_w) = os.pipe(), os.pipe(), os.pipe()
    ctl, ctl_child = socket.socketpair()
    until = None if lease is None else lease()
    child_env = {**os.environ, **(env or {}), "JOBD_PROGRESS_FD": str(prog_w)}
    try:
        proc = spawn_supervisor(lambda: subprocess.Popen(
            [sys.executable, "-I", "-S", supervise.SCRIPT, str(ctl_child.fileno()),
             repr(grace), "-" if until is None else repr(until), "--", *args],
            cwd=cwd, env=child_env,
            stdin=subprocess.DEVNULL, stdout=out_w, stderr=err_w,
            pass_fds=(prog_w, ctl_child.fileno()), close_fds=True,
            start_new_session=True))
    except BaseException as exc:
        for fd in (out_r, err_r, prog_r):
            os.close(fd)
        ctl.close()
        if isinstance(exc, FileNotFoundError):
            raise _not_found(args, cwd) from None
        raise
    finally:
        for fd in (out_w, err_w, prog_w):
            os.close(fd)
        ctl_child.close()
    child = _Child(proc, ctl, child_env, out_r, err_r, prog_r, log, on_progress, capture)
    try:
        try:
            pgid, start = child.started(_START)
        except OSError as e:
            child.abort()
            if e.errno == errno.ENOENT:
                raise _not_found(args, cwd) from None
            raise OSError(e.errno, e.strerror, args[0]) from None
        if on_spawn is not None:
            on_spawn(pgid, start)
        cancelled, timed_out = child.supervise(stop, deadline, grace, on_timeout, lease, until,
                                               stop_grace)
        returncode = child.finish()
    except BaseException:
        if child.proc.returncode is None:
            child.abort()
        raise
    finally:
        child.close()
        forget_supervisor(child.proc)
    return Completed(argv=args, returncode=returncode, cancelled=cancelled,
                     timed_out=timed_out, stdout=child.stdout(),
                     supervisor_died=child.status is None, result=child.result,
                     expired=child.expired)
