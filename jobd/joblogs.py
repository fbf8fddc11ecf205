"""Job logs: the one place that knows where a job's log lives and how it is written.

A job's log (SPEC §1: ``<state dir>/logs/<job id>.log``) holds its programs' output and
jobd's own story lines (``[jobd <time>] ...``, SPEC §5). It is capped at
``max_log_bytes`` with the oldest output dropped first; offsets stay absolute over all
that was ever written, the dropped count kept in ``<log>.base``. Trimming rewrites the
log through ``<log>.tmp`` and ``<log>.base.tmp``, which an interrupted trim can leave
behind: readers take the new base if the crash came between the trim's two renames, the
log's next writer finishes or undoes the trim, and ``delete`` removes all four. ``JobLog`` writes, ``read`` pages through,
``end`` and ``since`` give what one command added (a failed git's error line), ``tail``
the last line a program printed, ``delete`` forgets, ``remove_strays`` sweeps the logs a
crash left of jobs already forgotten; nothing else in jobd builds a log's path or opens a
log file.
"""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path
from typing import Callable, Iterable

import structlog

from jobd.models import NOTE_MARK, is_note  # is_note: the rule clients share lives in models

__all__ = ["JobLog", "Stream", "delete", "end", "is_note", "note_lines", "page", "path",
           "read", "remove_strays", "since", "sweep_strays", "tail"]

_log = structlog.get_logger()

#: an unfinished output line is held back for redraws (carriage returns) at most this long
_MAX_HELD = 16384
#: how much of a log's end ``tail`` reads for the last output line
_TAIL_BYTES = 4096
#: the longest line ``tail`` gives (it goes into an error message)
_TAIL_CHARS = 300

# Held while a log file and its `.base` sidecar are swapped, and while a reader picks up
# the pair, so a reader never combines a new file with an old base or the reverse.
_SWAP = threading.Lock()


def path(log_dir: Path, job_id: str) -> Path:
    """Where job ``job_id``'s log lives in ``log_dir`` (``Config.log_dir``)."""
    return Path(log_dir) / f"{job_id}.log"


#: a job's log files, by what follows its id: the log (``path``), its base
#: (``_base_path``), a trim's new pair (``_tmp_paths``)
_SUFFIXES = (".log", ".log.base", ".log.tmp", ".log.base.tmp")


def _base_path(log: Path) -> Path:
    return log.with_name(log.name + ".base")


def _tmp_paths(log: Path) -> tuple[Path, Path]:
    """The trim's new log and new base, written before they replace the pair."""
    return log.with_name(log.name + ".tmp"), log.with_name(log.name + ".base.tmp")


def _settle(log: Path) -> None:
    """Finish or undo a trim a crash interrupted, before the log's one writer opens it
    (under ``_SWAP``): cut between its renames, the new base goes into place; cut before
    them, the old pair stands and the trim's files go."""
    tmp, base_tmp = _tmp_paths(log)
    if tmp.exists():
        tmp.unlink()
        base_tmp.unlink(missing_ok=True)
    elif base_tmp.exists():
        os.replace(base_tmp, _base_path(log))


def _read_base(log: Path) -> int:
    """How many bytes were dropped before the log's first; called under ``_SWAP``.

    A trim renames the new log into place and then the new base: a ``.base.tmp`` with no
    ``.tmp`` beside it is one a crash cut between the two renames (in a live daemon
    readers never see that pair), and its file is the new log's base."""
    base = _base_path(log)
    tmp, base_tmp = _tmp_paths(log)
    if not tmp.exists() and base_tmp.exists():
        base = base_tmp
    try:
        return int(base.read_text())
    except FileNotFoundError:
        return 0
    except ValueError:
        _log.warning("log_base_unreadable", path=str(_base_path(log)))
        return 0


def note_lines(text: str, at_us: int | None = None) -> bytes:
    """jobd's own lines in a job's log: ``[jobd 2026-11-22T10:00:00Z] <text>``, one per
    line of ``text``, stamped with ``at_us`` (microseconds since the epoch; default now)."""
    at = time.time() if at_us is None else at_us / 1e6
    mark = (NOTE_MARK + time.strftime("%Y-%m-%dT%H:%M:%SZ] ", time.gmtime(at))).encode()
    return b"".join(mark + part.encode("utf-8", "replace") + b"\n"
                    for part in (text.splitlines() or [""]))


def _last_state(line: bytes, keep_trailing: bool = False) -> bytes:
    r"""What a terminal shows of ``line`` after its ``\r`` redraws: the last non-empty
    state (with ``keep_trailing``, a final ``\r`` is kept: the next write redraws)."""
    if b"\r" not in line:
        return line
    trailing = keep_trailing and line.endswith(b"\r")
    states = [state for state in line.split(b"\r") if state]
    last = states[-1] if states else b""
    return last + b"\r" if trailing else last


class Stream:
    r"""One output stream of a program (its stdout, its stderr) going into a job's log.

    Keeps only the last state of each ``\r`` run, as a terminal would show it: git
    redraws its progress with ``\r``, and the log keeps the line, not every redraw. A
    ``\r`` not followed by ``\n`` starts the line over; ``\r\n`` is a line end. What
    follows the last line end is held back while it may still be redrawn (at most
    ``_MAX_HELD`` bytes of it; a longer one goes out as it is). What one ``write`` makes
    final reaches the log in one write, however many lines it holds.
    """

    __slots__ = ("held", "log")

    def __init__(self, log: JobLog) -> None:
        self.log = log
        self.held = b""

    def write(self, data: bytes) -> None:
        text = self.held + data
        cut = text.rfind(b"\n") + 1
        done, self.held = text[:cut], text[cut:]
        if b"\r" in done:
            done = b"".join(_last_state(line) + b"\n" for line in done.split(b"\n")[:-1])
        self.held = _last_state(self.held, keep_trailing=True)
        if len(self.held) > _MAX_HELD:
            done, self.held = done + self.held, b""
        self.log.write(done)

    def close(self) -> None:
        """The stream ended: what was held goes out, ended as a line."""
        held, self.held = _last_state(self.held), b""
        if held:
            self.log.write(held + b"\n")


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
        #: whether the file was there before this writer (a previous attempt's): looked
        #: up once, not on every story line
        self._existed: bool | None = None

    def _open(self) -> int:
        return os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    def _ensure_open(self) -> int:
        if self._closed:
            raise ValueError(f"job log {self.path} is closed")
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with _SWAP:
                _settle(self.path)
                self._fd = self._open()
                self._size = os.fstat(self._fd).st_size
                self._dropped = _read_base(self.path)
            self._at_line_start = (self._size == 0
                                   or os.pread(self._fd, 1, self._size - 1) == b"\n")
        return self._fd

    def stream(self) -> Stream:
        """A writer for one output stream of a program (``Stream``)."""
        return Stream(self)

    def write(self, data: bytes) -> None:
        with self._lock:
            self._append_or_drop(data)

    def note(self, text: str) -> None:
        """A line of jobd's own (``note_lines``), on a line of its own."""
        with self._lock:
            self._append_or_drop(note_lines(text), own_line=True)

    def begin_with(self, told: bytes) -> None:
        """What a log not made yet begins with, once something makes it (the story of
        the attempts before, told from the events): held as the story's first lines."""
        if told:
            with self._lock:
                self._story.insert(0, told)

    def story(self, text: str, at_us: int | None = None) -> None:
        """A line of the job's story (an attempt started, a cancel, the end): written at
        once when the job has a log, else held until it gets one (a job that never runs a
        program gets none: ``jobs.logs`` tells its story from its events)."""
        lines = note_lines(text, at_us)
        with self._lock:
            if self._fd is None and self._existed is None:
                self._existed = self.path.exists()
            if self._fd is None and not self._existed:
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
            # the held story goes out in the same write as what made the log (story lines
            # end their line, so what follows them starts one)
            data, self._story, own_line = b"".join(self._story) + data, [], True
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
        tmp, base_tmp = _tmp_paths(self.path)
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


def continue_at(log: Path, offset: int) -> None:
    """Make ``log`` an empty log whose first ``offset`` bytes are dropped: an attempt goes
    on with a log that is kept elsewhere (the cluster's database) only from there on."""
    log = Path(log)
    tmp, base_tmp = _tmp_paths(log)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640))
    base_tmp.write_text(str(offset))
    with _SWAP:
        os.replace(tmp, log)
        os.replace(base_tmp, _base_path(log))


def read(log: Path, offset: int, limit: int) -> tuple[bytes, int]:
    """(data, next_offset) from absolute ``offset``; an offset in the dropped part starts
    at the oldest kept byte. A missing file, or an offset at or past the end, gives
    ``(b"", offset)``."""
    log = Path(log)
    with _SWAP:
        base = _read_base(log)
        try:
            fd = os.open(log, os.O_RDONLY | os.O_CLOEXEC)
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


def page(data: bytes, next_offset: int, *, growing: bool = False) -> tuple[str, int]:
    """A page of log bytes as text, and where the next page begins: a UTF-8 character
    that the page's end cuts in two is left to the next page whole, rather than decoded
    into U+FFFD here and its last bytes into more of them there. A page that holds only
    such a piece is left empty when the log is ``growing`` there (a running job's end:
    the rest is being written); else (a limit under 4 bytes, an ended log's last bytes)
    it is decoded as it is, invalid bytes replaced, so that paging always moves on."""
    cut = 0
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte < 0x80:  # ASCII: no character is cut
            break
        if byte >= 0xC0:  # the lead byte of a character of 2, 3 or 4 bytes
            cut = back if back < (2 if byte < 0xE0 else 3 if byte < 0xF0 else 4) else 0
            break
    if 0 < cut < len(data) or (cut and growing):
        data, next_offset = data[:-cut], next_offset - cut
    return data.decode("utf-8", "replace"), next_offset


def end(log: Path) -> int:
    """The absolute offset of the log's end: how many bytes were ever written to it."""
    log = Path(log)
    with _SWAP:
        try:
            return _read_base(log) + os.stat(log).st_size
        except FileNotFoundError:
            return 0


def since(log: Path, offset: int, limit: int) -> bytes:
    """What was written at or after absolute ``offset`` (``end`` before it was written):
    its last ``limit`` bytes, or what is kept of it if the log was cut back meanwhile."""
    return read(log, max(offset, end(log) - limit), limit)[0]


def tail(log: Path, offset: int = 0) -> str:
    """The last line a program printed into the log at or after absolute ``offset``
    (``end`` before it ran: not an earlier program's or attempt's), not one of jobd's
    notes, stripped and at most ``_TAIL_CHARS`` long, for an error message; "" when there
    is none."""
    try:
        end = since(log, offset, _TAIL_BYTES).decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [ln.strip() for ln in end.replace("\r", "\n").split("\n")]
    lines = [ln for ln in lines if ln and not is_note(ln)]
    return lines[-1][:_TAIL_CHARS] if lines else ""


def delete(log_dir: Path, job_ids: Iterable[str]) -> None:
    """Forget the logs of ``job_ids`` in ``log_dir``: each file, its ``.base``, and what
    an interrupted trim left. By name in the opened folder: building each of the four
    paths would cost three times their unlinks (a cleanup forgets 100,000 jobs)."""
    try:
        folder = os.open(log_dir, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return  # no job ever wrote a log here
    try:
        for job_id in job_ids:
            for suffix in _SUFFIXES:
                try:
                    os.unlink(job_id + suffix, dir_fd=folder)
                except FileNotFoundError:
                    pass
    finally:
        os.close(folder)


#: the names a job's log files may have (``delete`` removes all of them)
_LOG_NAME = re.compile(r"(.+)\.log(?:\.base)?(?:\.tmp)?")


def sweep_strays(log_dir: Path, known: Callable[[list[str]], set[str]]) -> int:
    """``remove_strays``, as housekeeping that never fails its caller (an unreadable
    folder, a store gone away are logged): how many jobs' logs went."""
    try:
        removed = remove_strays(log_dir, known)
    except Exception:  # noqa: BLE001 - housekeeping never stops the daemon or a cleanup
        _log.exception("stray_logs_sweep_failed", log_dir=str(log_dir))
        return 0
    if removed:
        _log.info("stray_logs_removed", jobs=removed, log_dir=str(log_dir))
    return removed


def remove_strays(log_dir: Path, known: Callable[[list[str]], set[str]],
                  chunk: int = 1000) -> int:
    """Delete the logs of jobs that ``known`` (the store's ``known_ids``) no longer has,
    asking it ``chunk`` ids at a time; how many jobs' logs went.

    A job's rows and its log go in two steps (the rows first), so a crash between them
    leaves logs of forgotten jobs behind: after an unclean stop, these are swept."""
    removed = 0
    try:
        names = os.scandir(log_dir)
    except FileNotFoundError:
        return 0
    with names:
        ids = sorted({m.group(1) for e in names if (m := _LOG_NAME.fullmatch(e.name))})
    for start in range(0, len(ids), chunk):
        batch = ids[start:start + chunk]
        gone = set(batch) - known(batch)
        delete(log_dir, gone)
        removed += len(gone)
    return removed
