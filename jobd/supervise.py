"""The per-job supervisor: one small process between jobd and each program a job runs.

jobd starts it as ``python -I -S supervise.py CTL_FD GRACE UNTIL -- PROGRAM ARGS...``. It
imports nothing from jobd (so it starts in a few milliseconds) and:

- makes itself a child subreaper, so every descendant of the program stays its
  descendant, however it detaches (a grandchild that calls ``setsid`` and loses its
  parent is re-parented here, not to init);
- starts the program in a session and process group of its own, with stdout, stderr
  and ``$JOBD_PROGRESS_FD`` passed through untouched;
- reaps orphaned descendants as they exit, so no zombie piles up;
- when the program ends, SIGKILLs and reaps every descendant left, then reports the
  program's exit status and exits: nothing a job started outlives it (SPEC §5).

Control socket (``CTL_FD``), one line per message. From jobd: ``term [S]`` — SIGTERM
to every descendant, SIGKILL after S seconds, ``GRACE`` when not given (cancel and
timeout: ``cancel_grace``; a shutdown gives ``shutdown_grace``);
``until T`` — the deadline is now T (``CLOCK_BOOTTIME`` seconds, as ``UNTIL``; ``-``:
none). When the deadline passes, the supervisor reports ``expired`` and stops everything
as for ``term``; a deadline already past at the start means the program is not started.
A cluster node moves it on at each heartbeat that renewed its lease, so the processes of
a node that froze or lost the database stop before another node may take the job over
(SPEC §11); a time, not a duration, so a message delivered late cannot extend it. End of file from jobd, or SIGHUP (the parent-death signal, so
also after ``kill -9`` of jobd): SIGKILL everything at once. To jobd: ``started PID
START`` (the program's pid, which is its process group, and its start time in clock
ticks since boot), ``error ERRNO`` (the program could not be started), ``killed N``
(the grace passed: N processes got SIGKILL), ``expired`` (the deadline passed: everything
is being killed), ``exit CODE`` (negative: killed by that signal).

jobd imports ``stat`` and ``descendants`` from here, so /proc is parsed in one place,
and ``SCRIPT``, by which it starts the supervisor and tells its processes after a crash.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import sys
import time

#: this script, as jobd runs it (``jobd.process``) and finds it in /proc (``jobd.orphans``)
SCRIPT = __file__
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
#: how long killed descendants may take to be reaped before the supervisor gives up on them
_REAP_S = 10.0


def stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, ppid, pgrp, start time) of a process from /proc, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # the command name may hold spaces and parentheses: fields resume after the last ')'
    fields = raw[raw.rindex(b")") + 2:].split()
    return fields[0].decode(), int(fields[1]), int(fields[2]), int(fields[19])


def descendants(root: int) -> dict[int, tuple[str, int]]:
    """Every descendant of ``root`` now: pid -> (state, start time)."""
    children: dict[int, list[int]] = {}
    info: dict[int, tuple[str, int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (st := stat(int(name))) is not None:
            children.setdefault(st[1], []).append(int(name))
            info[int(name)] = st[0], st[3]
    found: dict[int, tuple[str, int]] = {}
    todo = list(children.get(root, ()))
    while todo:
        pid = todo.pop()
        if pid not in found and pid in info:
            found[pid] = info[pid]
            todo.extend(children.get(pid, ()))
    return found


def _signal(pid: int, start: int, sig: int) -> None:
    """Signal ``pid`` only if it is still the process that started at ``start``."""
    try:
        # through a pidfd the check and the signal reach the same process, even if the
        # pid is reused in between
        pidfd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        st = stat(pid)
        if st is not None and st[3] == start:
            signal.pidfd_send_signal(pidfd, sig)
    except OSError:
        pass
    finally:
        os.close(pidfd)


class Supervisor:
    def __init__(self, ctl: int, grace: float, argv: list[str]) -> None:
        self.ctl = ctl
        self.grace = grace
        self.argv = argv
        self.me = os.getpid()
        self.parent = os.getppid()
        self.program = 0
        self.status: int | None = None  #: the program's exit code, once reaped
        self.kill_at: float | None = None  #: SIGKILL everything then (after a term)
        self.gone = False  #: jobd is gone (or gave up): kill everything now
        self.until: float | None = None  #: the deadline (CLOCK_BOOTTIME), None: none
        self.told = b""  #: jobd's unfinished last line
        self.killed = False  #: the grace passed and SIGKILL went out
        self.wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, sig: int, frame: object) -> None:
        # a handler only notes what came; the loop acts on it
        if sig == signal.SIGTERM:
            self.term()
        elif sig in (signal.SIGHUP, signal.SIGINT):
            self.gone = True

    def send(self, line: str) -> None:
        try:
            os.write(self.ctl, line.encode() + b"\n")
        except OSError:
            self.gone = True

    def start(self) -> bool:
        os.set_inheritable(self.ctl, False)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGHUP, 0, 0, 0)
        if os.getppid() != self.parent:  # jobd died before the death signal was armed
            return False
        if self.expired():
            return False
        try:
            # Python ignores SIGPIPE and SIGXFSZ; a program expects their defaults
            self.program = os.posix_spawnp(
                self.argv[0], self.argv, os.environ, setsid=True, setsigmask=(),
                setsigdef=(signal.SIGPIPE, signal.SIGXFSZ, signal.SIGCHLD, signal.SIGTERM,
                           signal.SIGHUP, signal.SIGINT))
        except OSError as e:
            self.send(f"error {e.errno or 0}")
            return False
        st = stat(self.program)
        self.send(f"started {self.program} {st[3] if st else 0}")
        return True

    def term(self, grace: float | None = None) -> None:
        if self.kill_at is None:
            self.kill_at = time.monotonic() + (self.grace if grace is None else grace)
            self.signal_all(signal.SIGTERM)

    def signal_all(self, sig: int) -> int:
        """Send ``sig`` to every live descendant; how many there were."""
        live = [(pid, start) for pid, (state, start) in descendants(self.me).items()
                if state not in ("Z", "X")]
        for pid, start in live:
            _signal(pid, start, sig)
        return len(live)

    def program_exited(self) -> bool:
        # WNOWAIT: the program stays a zombie, so its pid (the process group of whatever
        # is left of it) cannot be reused before the rest is killed
        return os.waitid(os.P_PID, self.program,
                         os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None

    def reap_orphans(self) -> None:
        """Reap every exited descendant that was re-parented here, but not the program."""
        while True:
            try:
                got = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if got is None or got.si_pid == self.program:
                return
            os.waitpid(got.si_pid, 0)

    def read_control(self) -> None:
        try:
            data = os.read(self.ctl, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.gone = True
            return
        *lines, self.told = (self.told + data).split(b"\n")
        for line in lines:
            word, _, value = line.partition(b" ")
            if word == b"term":
                self.term(float(value) if value else None)
            elif word == b"until":
                self.until = float(value)

    def expired(self) -> bool:
        """Whether the deadline has passed (said to jobd once, then as for ``term``)."""
        if self.until is None or time.clock_gettime(time.CLOCK_BOOTTIME) < self.until:
            return False
        self.until = None
        self.send("expired")
        return True

    def wait(self) -> None:
        """Until the program exits or jobd is gone, reaping orphans and acting on messages."""
        os.set_blocking(self.ctl, False)
        while not self.gone and not self.program_exited():
            self.reap_orphans()
            timeout = None
            if self.expired():
                self.term()
            elif self.until is not None:
                timeout = max(0.0, self.until - time.clock_gettime(time.CLOCK_BOOTTIME))
            if self.kill_at is not None:
                left = max(0.0, self.kill_at - time.monotonic())
                if left == 0:
                    killed = self.signal_all(signal.SIGKILL)
                    if not self.killed:
                        self.send(f"killed {killed}")
                    self.killed = True
                    left = 0.05  # until the kills are reaped
                timeout = left if timeout is None else min(timeout, left)
            ready, _, _ = select.select([self.ctl, self.wake_r], [], [], timeout)
            if self.wake_r in ready:
                while True:
                    try:
                        if not os.read(self.wake_r, 512):
                            break
                    except BlockingIOError:
                        break
            if self.ctl in ready:
                self.read_control()

    def kill_all(self) -> None:
        """SIGKILL every descendant and reap them all, the program's status kept."""
        until = time.monotonic() + _REAP_S
        while True:
            live = self.signal_all(signal.SIGKILL)
            children = True
            while True:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    children = False
                    break
                if pid == 0:
                    break
                if pid == self.program:
                    self.status = os.waitstatus_to_exitcode(status)
            if not live and not children:
                return
            if time.monotonic() > until:
                return
            time.sleep(0.001)


def main(argv: list[str]) -> int:
    if len(argv) < 6 or argv[4] != "--":
        sys.stderr.write("usage: supervise.py CTL_FD GRACE UNTIL -- PROGRAM ARGS...\n")
        return 2
    sup = Supervisor(int(argv[1]), float(argv[2]), argv[5:])
    sup.until = None if argv[3] == "-" else float(argv[3])
    if not sup.start():
        return 0
    sup.wait()
    sup.kill_all()
    if sup.status is not None:
        sup.send(f"exit {sup.status}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
