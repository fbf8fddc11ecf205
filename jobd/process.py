"""Subprocesses of jobs: the supervisor, log capture, progress lines, cancel and timeout.

Every program a job runs starts under its own small supervisor process
(``jobd.supervise``), in a session and process group of its own. The supervisor is a
child subreaper: whatever the program spawns stays its descendant, however it
detaches, and is killed and reaped when the program ends, is cancelled or times out,
or when jobd dies (SPEC §5: no child outlives its job). Output goes to the job's log,
capped at ``max_log_bytes`` with the oldest output dropped first (SPEC §1), and every
output line is checked for progress. After a daemon crash, ``kill_orphan_group`` and
``kill_marked`` take down whatever the dead daemon's jobs left behind (SPEC §6).
jobd is a child subreaper as well, as a backstop: if a program kills its supervisor,
what the supervisor held is re-parented to jobd, and ``sweep_orphans`` (after such a
death, and on every tick of the engine) kills and reaps it.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import json
import math
import os
import re
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
from jobd.models import is_note  # the one rule for jobd's own lines, named here too

__all__ = [
    "Completed", "JobLog", "JOB_ENV", "SUPERVISOR", "is_note", "kill_marked",
    "kill_orphan_group", "note_lines", "parse_progress", "process_start_time", "read_log",
    "remove_log", "run", "sweep_orphans",
]

_log = structlog.get_logger()

_TICK = 0.01          # how often the loop looks at `stop` and the clock (an Event cannot be selected)
_DRAIN = 0.5          # after the supervisor exited, how long its pipes may take to close
_START = 10.0         # how long the supervisor may take to report the program started
_UNRESPONSIVE = 2.0   # past the grace, how long jobd waits for the supervisor to finish
_ABORT = 2.0          # how long a supervisor told to kill everything may take to exit
_SUPERVISOR_EXIT = 2.0  # recovery: how long an orphaned supervisor may take to finish
_READ = 65536
_MAX_LINE = 16384     # a longer unterminated line keeps only its tail for progress parsing
_EOL = re.compile(rb"[\r\n]")

# Text progress: a percentage that ends the line, or is followed only by what git adds:
# "Receiving objects:  45% (45/100), 1.00 MiB | 2.00 MiB/s, done."
_UNIT = r"[\d.]+\s*(?:bytes|[KMGTP]?i?B)"
_BEFORE_PERCENT = re.compile(r"(?<![\d.])\d{1,3}(?:\.\d+)?$")
_AFTER_PERCENT = re.compile(
    rf"(?:\s*\(\d+/\d+\))?(?:,\s*{_UNIT}\s*\|\s*{_UNIT}/s)?(?:,\s*done\.?)?\s*")


@dataclasses.dataclass(frozen=True)
class Completed:
    argv: tuple[str, ...]
    returncode: int            #: negative = killed by that signal
    cancelled: bool            #: stopped because `stop` was set
    timed_out: bool            #: stopped because `deadline` passed
    stdout: str                #: captured stdout text (only when capture=True, else "")
    #: the supervisor died without reporting the program's end: ``returncode`` is its own
    supervisor_died: bool = False


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _clamp(percent: float) -> float:
    return min(100.0, max(0.0, percent))


def parse_progress(line: str) -> tuple[float | None, str | None] | None:
    """One output line -> (percent 0-100 or None, message or None), or None if not progress.

    Forms: ``{"current": n, "total": m, "info": "..."}`` (percent None when total is 0),
    ``{"progress": 42.5, "message": "..."}``, or text ending in ``NN%``/``NN.N%``, which
    may be followed by git's count, throughput and ``, done.``; the message of a text
    line is the whole stripped line.
    """
    text = line.strip()
    if text.startswith("{") and text.endswith("}"):
        try:
            obj = json.loads(text)
        except ValueError:
            return None
        if not isinstance(obj, dict):
            return None
        info = obj.get("info", obj.get("message"))
        message = info if isinstance(info, str) else None
        current, total = _number(obj.get("current")), _number(obj.get("total"))
        if current is not None and total is not None:
            return (_clamp(100.0 * current / total) if total else None), message
        progress = _number(obj.get("progress"))
        if progress is not None:
            return _clamp(progress), message
        return None
    # what may follow the percentage holds no '%', so only the last one can qualify
    at = text.rfind("%")
    if at < 0 or not _AFTER_PERCENT.fullmatch(text, at + 1):
        return None
    number = _BEFORE_PERCENT.search(text, max(0, at - 32), at)
    if number is None or float(number.group()) > 100:
        return None
    return float(number.group()), text


# ---------------------------------------------------------------------------------- logs

# Held while a log file and its `.base` sidecar are swapped, and while a reader picks up
# the pair, so a reader never combines a new file with an old base or the reverse.
_SWAP = threading.Lock()


def _base_path(path: Path) -> Path:
    return path.with_name(path.name + ".base")


def _read_base(path: Path) -> int:
    try:
        return int(_base_path(path).read_text())
    except FileNotFoundError:
        return 0
    except ValueError:
        _log.warning("log_base_unreadable", path=str(_base_path(path)))
        return 0


def note_lines(text: str, at_us: int | None = None) -> bytes:
    """jobd's own lines in a job's log: ``[jobd 2026-11-22T10:00:00Z] <text>``, one per
    line of ``text``, stamped with ``at_us`` (microseconds since the epoch; default now)."""
    at = time.time() if at_us is None else at_us / 1e6
    mark = time.strftime("[jobd %Y-%m-%dT%H:%M:%SZ] ", time.gmtime(at)).encode()
    return b"".join(mark + part.encode("utf-8", "replace") + b"\n"
                    for part in (text.splitlines() or [""]))


class _Terminal:
    """Keeps only the last state of each ``\r`` run, as a terminal would show it: git
    redraws its progress with ``\r``, and the log keeps the line, not every redraw.

    A ``\r`` not followed by ``\n`` starts the line over; ``\r\n`` is a line end. What
    follows the last line end is held back while it may still be redrawn (at most
    ``_MAX_LINE`` bytes of it; a longer one goes out as it is).
    """

    __slots__ = ("held",)

    def __init__(self) -> None:
        self.held = b""

    def feed(self, data: bytes) -> bytes:
        text = self.held + data
        end = text.rfind(b"\n") + 1
        done, self.held = text[:end], text[end:]
        if b"\r" in done:
            done = b"".join(_last_state(line) + b"\n" for line in done.split(b"\n")[:-1])
        self.held = _last_state(self.held, keep_trailing=True)
        if len(self.held) > _MAX_LINE:
            done, self.held = done + self.held, b""
        return done

    def flush(self) -> bytes:
        held, self.held = _last_state(self.held), b""
        return held + b"\n" if held else b""


def _last_state(line: bytes, keep_trailing: bool = False) -> bytes:
    """What a terminal shows of ``line`` after its ``\r`` redraws: the last non-empty
    state (with ``keep_trailing``, a final ``\r`` is kept: the next write redraws)."""
    if b"\r" not in line:
        return line
    trailing = keep_trailing and line.endswith(b"\r")
    states = [state for state in line.split(b"\r") if state]
    last = states[-1] if states else b""
    return last + b"\r" if trailing else last


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class JobLog:
    """A job's captured output: append-only, thread-safe, at most ``max_bytes`` on disk.

    When a write would pass ``max_bytes`` the oldest output is dropped, down to three
    quarters of the cap (so a chatty job does not rewrite the file on every write), and
    at a line boundary when one is near. Offsets are absolute over everything ever
    written: ``<path>.base`` holds how many bytes were dropped.
    """

    def __init__(self, path: Path, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, not {max_bytes}")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        # opened on the first write: a job that prints nothing (a noop) costs no file
        self._fd: int | None = None
        self._closed = False
        self._size = self._dropped = 0
        self._at_line_start = True
        self._failed = False  #: a write failed (disk full): warned once
        self._story: list[bytes] = []  #: story lines held until the log has a file

    def _open(self) -> int:
        return os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    def _ensure_open(self) -> int:
        if self._closed:
            raise ValueError(f"job log {self.path} is closed")
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = self._open()
            self._size = os.fstat(self._fd).st_size
            self._dropped = _read_base(self.path)
            self._at_line_start = (self._size == 0
                                   or os.pread(self._fd, 1, self._size - 1) == b"\n")
        return self._fd

    def write(self, data: bytes) -> None:
        with self._lock:
            self._append_or_drop(data)

    def note(self, text: str) -> None:
        """A line of jobd's own (``note_lines``), on a line of its own."""
        with self._lock:
            self._append_or_drop(note_lines(text), own_line=True)

    def story(self, text: str, at_us: int | None = None) -> None:
        """A line of the job's story (an attempt started, a cancel, the end): written at
        once when the job has a log, else held until it gets one (a job that never runs a
        program gets none: ``jobs.logs`` tells its story from its events)."""
        lines = note_lines(text, at_us)
        with self._lock:
            if self._fd is None and not self.path.exists():
                self._story.append(lines)
            else:
                self._append_or_drop(lines, own_line=True)

    def _append_or_drop(self, data: bytes, *, own_line: bool = False) -> None:
        """Append; output that cannot be written (a full disk) is dropped, not the job."""
        try:
            self._append(data, own_line=own_line)
        except OSError as e:
            if not self._failed:
                _log.warning("job_log_write_failed", path=str(self.path), error=str(e))
            self._failed = True

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def _append(self, data: bytes, *, own_line: bool = False) -> None:
        if not data:
            return
        self._ensure_open()
        if self._story:
            story, self._story = b"".join(self._story), []
            self._append(story, own_line=True)
        if own_line and not self._at_line_start:
            data = b"\n" + data
        assert self._fd is not None
        if self._size + len(data) <= self.max_bytes:
            _write_all(self._fd, data)
            self._size += len(data)
        else:
            self._trim_with(data)
        self._at_line_start = data.endswith(b"\n")

    def _trim_with(self, data: bytes) -> None:
        assert self._fd is not None
        keep = max(1, self.max_bytes * 3 // 4)
        if len(data) >= keep:
            tail = data[len(data) - keep:]
        else:
            need = keep - len(data)
            tail = os.pread(self._fd, need, self._size - need) + data
        # start the kept part at a line boundary, so the log does not open mid-line
        newline = tail.find(b"\n", 0, min(4096, len(tail) - 1))
        if newline != -1:
            tail = tail[newline + 1:]
        dropped = self._dropped + self._size + len(data) - len(tail)
        tmp = self.path.with_name(self.path.name + ".tmp")
        base_tmp = self.path.with_name(self.path.name + ".base.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
        try:
            _write_all(fd, tail)
        finally:
            os.close(fd)
        base_tmp.write_text(str(dropped))
        with _SWAP:
            os.replace(tmp, self.path)
            os.replace(base_tmp, _base_path(self.path))
        os.close(self._fd)
        self._fd = self._open()
        self._size = len(tail)
        self._dropped = dropped


def remove_log(path: Path) -> None:
    """Delete a forgotten job's log with its sidecars (a trim's leftovers too)."""
    path = Path(path)
    for p in (path, _base_path(path), path.with_name(path.name + ".tmp"),
              path.with_name(path.name + ".base.tmp")):
        p.unlink(missing_ok=True)


def read_log(path: Path, offset: int, limit: int) -> tuple[bytes, int]:
    """(data, next_offset) from absolute ``offset``; an offset in the dropped part starts
    at the oldest kept byte. A missing file, or an offset at or past the end, gives
    ``(b"", offset)``."""
    path = Path(path)
    with _SWAP:
        base = _read_base(path)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return b"", offset
    try:
        start = max(offset, base)
        # read no further than the file's end: an offset past it, up to any size a
        # client may send, is an empty page, not an error of pread's
        want = min(limit, os.fstat(fd).st_size - (start - base))
        data = os.pread(fd, want, start - base) if want > 0 else b""
    finally:
        os.close(fd)
    return data, start + len(data)


# ----------------------------------------------------------------------------- processes

#: the per-job supervisor script every program runs under (it imports nothing from jobd)
SUPERVISOR = Path(supervise.__file__)


def process_start_time(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (clock ticks since boot), None if the process is gone."""
    stat = supervise.stat(pid)
    return stat[3] if stat else None


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class _Lines:
    """Splits a stream into lines on both \\r and \\n (git redraws its progress with \\r)."""

    __slots__ = ("partial",)

    def __init__(self) -> None:
        self.partial = b""

    def feed(self, data: bytes) -> list[bytes]:
        parts = _EOL.split(self.partial + data)
        self.partial = parts.pop()[-_MAX_LINE:]
        return parts


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
        self.lines = {fd: _Lines() for fd in (out, err, prog)}
        self.logged = {out: _Terminal(), err: _Terminal()}
        self.open = {out, err, prog}
        self.reports = b""  #: the supervisor's unfinished last line
        self.first: list[str] | None = None  #: its first report: started or error
        self.ctl_open = True
        self.status: int | None = None  #: the program's exit code, as the supervisor saw it
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
                  on_timeout: Callable[[], None] | None = None) -> tuple[bool, bool]:
        """Read output until the supervisor exits; (cancelled, timed_out)."""
        cancelled = timed_out = False
        # the supervisor SIGKILLs after the grace itself; this is for one that cannot
        kill_at: float | None = None
        while not self.exited():
            now = time.monotonic()
            if kill_at is None:
                cancelled = stop.is_set()
                timed_out = not cancelled and deadline is not None and now >= deadline
                if timed_out and on_timeout is not None:
                    on_timeout()
                if cancelled or timed_out:
                    self.tell(b"term\n")
                    kill_at = now + grace + _UNRESPONSIVE
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

    def read(self, fd: int) -> None:
        try:
            data = os.read(fd, _READ)
        except BlockingIOError:
            return
        if not data:
            self.sel.unregister(fd)
            self.open.discard(fd)
            self.parse(self.lines[fd].partial)
            if fd in self.logged:
                self.log.write(self.logged[fd].flush())
            return
        if fd in self.logged:
            self.log.write(self.logged[fd].feed(data))
        if fd == self.out and self.captured is not None:
            self.captured.append(data)
        if self.on_progress is not None:
            for line in self.lines[fd].feed(data):
                self.parse(line)

    def parse(self, line: bytes) -> None:
        if self.on_progress is None or (b"%" not in line and b"{" not in line):
            return
        hit = parse_progress(line.decode("utf-8", "replace"))
        if hit is not None:
            self.on_progress(*hit)

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
        capture: bool = False) -> Completed:
    """Run ``argv`` under a per-job supervisor, in its own session and process group.

    stdin is /dev/null; the environment is ``os.environ`` updated with ``env`` plus
    ``JOBD_PROGRESS_FD``, a pipe for progress lines. Progress lines on stdout, stderr
    and that pipe go to ``on_progress``. When ``stop`` is set or ``deadline`` (a
    ``time.monotonic()`` value) passes, every process of the program gets SIGTERM, then
    SIGKILL after ``grace`` seconds. When the program exits, every process it left
    behind is killed and reaped, wherever it moved (``jobd.supervise``).
    ``on_spawn(pgid, start_time)`` is called once the program started, ``on_timeout()``
    when the deadline passed, before the SIGTERM. A missing
    program raises FileNotFoundError naming it; another failure to start it, OSError.
    """
    args = tuple(argv)
    if not args:
        raise ValueError("empty command: argv must name a program")
    # every pipe and socket is close-on-exec in this process, so programs other threads
    # start meanwhile cannot hold them open
    (out_r, out_w), (err_r, err_w), (prog_r, prog_w) = os.pipe(), os.pipe(), os.pipe()
    ctl, ctl_child = socket.socketpair()
    child_env = {**os.environ, **(env or {}), "JOBD_PROGRESS_FD": str(prog_w)}
    _become_subreaper()
    try:
        with _SUPERVISORS_LOCK:  # a sweep meanwhile must know it for a supervisor
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", str(SUPERVISOR), str(ctl_child.fileno()),
                 repr(grace), "--", *args], cwd=cwd, env=child_env,
                stdin=subprocess.DEVNULL, stdout=out_w, stderr=err_w,
                pass_fds=(prog_w, ctl_child.fileno()), close_fds=True,
                start_new_session=True)
            _SUPERVISORS[proc.pid] = proc
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
        cancelled, timed_out = child.supervise(stop, deadline, grace, on_timeout)
        returncode = child.finish()
    except BaseException:
        if child.proc.returncode is None:
            child.abort()
        raise
    finally:
        child.close()
        _forget_supervisor(child.proc)
    return Completed(argv=args, returncode=returncode, cancelled=cancelled,
                     timed_out=timed_out, stdout=child.stdout(),
                     supervisor_died=child.status is None)


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


def _forget_supervisor(proc: subprocess.Popen[bytes]) -> None:
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


#: the environment variable that marks every process of a job (set by the engine)
JOB_ENV = "JOBD_JOB_ID"


def _marked(job_id: str) -> list[tuple[int, int, bool]]:
    """(pid, start time, is a supervisor) of every live process marked with ``job_id``."""
    mark = b"\0" + f"{JOB_ENV}={job_id}".encode() + b"\0"
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
            found.append((int(entry.name), stat[3], bytes(SUPERVISOR) in cmdline))
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
