"""The change feed behind ``jobs.changes``: one monotonic sequence of every job change the
daemon sees, kept in memory and bounded, its cursors, and the long polls it wakes.

Every change passes through ``record``: the store's after-commit listener (each status
transition, cancel request, retry and fold) and the engine's progress hook (phase
changes and live progress ticks, which reach the database only every ``FLUSH_S``). An
entry holds the job's id and what a filter looks at (user, type, project, status,
creation time) and the wall-clock µs it was recorded; its place in the log is its
counter. The log is a list that the recording thread swaps for a trimmed copy once it
holds twice ``keep`` entries, so readers slice it without a lock and a writer never
waits for a reader.

A cursor is base64url text of ``c1.<boot>.<counter>.<µs>``: the token of this daemon
start, the counter of the last change the answer covered, and the µs it was recorded.
One of this start still in the log is answered from the log. One of another start (the
daemon restarted) or older than the log keeps is answered from the database by time:
every job whose last change is at or after µs − ``REWIND_US`` (a change is recorded
after its commit, and its ``updated_at`` is its transaction's time, up to a write's
length earlier): duplicates are possible, misses are not. While such an answer from the
database is longer than one answer may be, its cursor is ``d1.<µs>.<seq>``, the last
job sent in (change time, seq) order.

A waiting call files a ``Waiter`` under the user its filters name (None: every user's
jobs). A change costs the recording thread an append and two dict lookups; only while
someone waits for its user's jobs (or every user's) is the event loop woken, once per
batch of changes, to check each against those waiters, a comparison of a few fields.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import re
import secrets
import threading
import time
from typing import Any, Callable

from jobd.errors import InvalidParams
from jobd.models import Job
from jobd.params import shown

__all__ = ["Change", "ChangeLog", "KEEP", "Position", "REWIND_US", "matches"]

#: how many changes the log keeps at least (a cursor older than that reads the database)
KEEP = 10_000
#: how far before a cursor's time a read from the database starts
REWIND_US = 2_000_000
_CURSOR_RE = re.compile(r"[A-Za-z0-9_-]{1,120}={0,2}")
_NUMBER_RE = re.compile(r"-?[0-9]{1,19}")
_BOOT_RE = re.compile(r"[0-9a-f]{16}")


def _now_us() -> int:
    return time.time_ns() // 1000


@dataclasses.dataclass(frozen=True, slots=True)
class Change:
    """One entry of the log: a job changed (what filters look at, as it was then)."""

    job_id: str
    seq: int
    user_id: str
    type: str
    project_id: str | None
    status: str
    created_at: int
    at_us: int  #: when it was recorded (wall clock)


@dataclasses.dataclass(frozen=True)
class Position:
    """Where an answer starts: after ``counter`` in the log (``counter`` not None; it was
    recorded at ``at_us``), else from the database after (``at_us``, ``seq``) in change
    order; ``snapshot``: no cursor was given, so the answer is the active jobs now."""

    counter: int | None = None
    at_us: int = -1
    seq: int = -1
    snapshot: bool = False


def matches(filters: dict[str, Any], change: Change) -> bool:
    """Whether ``change`` passes the checked filters of jobs.list (``Manager._filters``
    with ``id_prefix``)."""
    f = filters
    return ((not f["statuses"] or change.status in f["statuses"])
            and (not f["types"] or change.type in f["types"])
            and (f["user_id"] is None or change.user_id == f["user_id"])
            and (f["project_id"] is None or change.project_id == f["project_id"])
            and (f["created_after"] is None or change.created_at >= f["created_after"])
            and (f["created_before"] is None or change.created_at < f["created_before"])
            and (not f.get("id_prefix") or change.job_id.startswith(f["id_prefix"])))


@dataclasses.dataclass(eq=False)
class Waiter:
    """One waiting jobs.changes call: woken by the first change its filters pass."""

    filters: dict[str, Any]
    future: asyncio.Future[None]


class ChangeLog:
    """The bounded log of changes of one daemon start, and its waiters."""

    def __init__(self, keep: int = KEEP, clock: Callable[[], int] = _now_us) -> None:
        self.keep = keep
        self.clock = clock
        #: this start's token: a cursor of another start is answered from the database
        self.boot = secrets.token_hex(8)
        #: (counter of the first entry, the entries): swapped whole, read without a lock
        self._log: tuple[int, list[Change]] = (1, [])
        self._lock = threading.Lock()
        self._waiters: dict[str | None, set[Waiter]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scheduled = False
        self._woken = 0  #: the last counter the waiters were checked against
        self.closed = False

    # -- recording (any thread) ----------------------------------------------------------

    def record(self, job: Job) -> None:
        """``job`` changed (its change is committed, or live in the engine's memory)."""
        change = Change(job.id, job.seq or 0, job.user_id, job.type, job.project_id,
                        str(job.status), job.created_at, self.clock())
        with self._lock:
            base, entries = self._log
            entries.append(change)
            if len(entries) >= 2 * self.keep:
                self._log = (base + len(entries) - self.keep, entries[-self.keep:])
        # the loop is woken only for a change someone may wait for: its user's waiters,
        # or the unscoped ones (a waiter filed after this check reads the entry itself)
        waiters = self._waiters
        if ((change.user_id in waiters or None in waiters) and not self._scheduled
                and self._loop is not None):
            self._scheduled = True
            try:
                self._loop.call_soon_threadsafe(self._wake)
            except RuntimeError:  # the loop is closed: the daemon is gone
                pass

    def head(self) -> tuple[int, int]:
        """The counter of the latest change (0: none yet) and when it was recorded."""
        base, entries = self._log
        n = len(entries)
        return base + n - 1, entries[n - 1].at_us if n else self.clock()

    # -- reading -------------------------------------------------------------------------

    def since(self, counter: int, filters: dict[str, Any]
              ) -> tuple[list[tuple[int, Change]], int, int] | None:
        """The jobs passing ``filters`` that changed after ``counter``, each once at its
        latest change as ``(counter, change)``, oldest first; and the head covered (its
        counter and time). None when the log no longer reaches back to ``counter``."""
        base, entries = self._log
        n = len(entries)
        if counter + 1 < base:
            return None
        head = base + n - 1
        newer = entries[counter + 1 - base:n]
        seen: set[str] = set()
        latest: list[tuple[int, Change]] = []
        number = head
        # every user's jobs, unfiltered (0 is a time: created_before the epoch is a filter)
        everything = all(v is None or v == [] for v in filters.values())
        for change in reversed(newer):
            if change.job_id not in seen:
                seen.add(change.job_id)
                if everything or matches(filters, change):
                    latest.append((number, change))
            number -= 1
        latest.reverse()
        return latest, head, entries[n - 1].at_us if n else self.clock()

    # -- cursors -------------------------------------------------------------------------

    def cursor(self, counter: int, at_us: int) -> str:
        """The cursor past change ``counter`` of this start, recorded at ``at_us``."""
        return _encode(f"c1.{self.boot}.{counter}.{at_us}")

    @staticmethod
    def database_cursor(at_us: int, seq: int) -> str:
        """The cursor past the job (``at_us``: its last change, ``seq``) of an answer read
        from the database."""
        return _encode(f"d1.{at_us}.{seq}")

    def position(self, cursor: Any) -> Position:
        """Where an answer after ``cursor`` starts; a cursor jobd did not give out is
        InvalidParams naming ``after``."""
        if cursor is None:
            return Position(snapshot=True)
        parts = _decode(cursor)
        if parts is not None:
            if parts[0] == "c1" and len(parts) == 4 and _BOOT_RE.fullmatch(parts[1]):
                counter, at_us = int(parts[2]), int(parts[3])
                head = self.head()[0]
                if parts[1] != self.boot:  # another start of the daemon: by time
                    return Position(at_us=at_us - REWIND_US)
                if 0 <= counter <= head:
                    if counter + 1 < self._log[0]:  # older than the log keeps
                        return Position(at_us=at_us - REWIND_US)
                    return Position(counter=counter, at_us=at_us)
            elif parts[0] == "d1" and len(parts) == 3:
                return Position(at_us=int(parts[1]), seq=int(parts[2]))
        raise InvalidParams(f"after is not a cursor this daemon gave out (got {shown(cursor)}): "
                            "pass the cursor of the previous jobs.changes answer as it came, "
                            "or leave after out to start again", field="after")

    # -- waiting (on the event loop) -----------------------------------------------------

    def subscribe(self, filters: dict[str, Any]) -> Waiter:
        """File a waiter for the next change ``filters`` pass (before reading, so that a
        change in between still wakes it)."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        waiter = Waiter(filters, loop.create_future())
        self._waiters.setdefault(filters["user_id"], set()).add(waiter)
        return waiter

    def unsubscribe(self, waiter: Waiter) -> None:
        user = waiter.filters["user_id"]
        waiters = self._waiters.get(user)
        if waiters is not None:
            waiters.discard(waiter)
            if not waiters:
                del self._waiters[user]

    def close(self) -> None:
        """The daemon is stopping: wake every waiter now rather than at its timeout."""
        self.closed = True
        for waiters in list(self._waiters.values()):
            for waiter in waiters:
                if not waiter.future.done():
                    waiter.future.set_result(None)

    def _wake(self) -> None:
        """Check the changes recorded since the last wake-up against the waiters."""
        self._scheduled = False
        base, entries = self._log
        head = base + len(entries) - 1
        start = max(self._woken + 1, base)
        for change in entries[start - base:head + 1 - base]:
            for user in (change.user_id, None):
                for waiter in self._waiters.get(user, ()):
                    if not waiter.future.done() and matches(waiter.filters, change):
                        waiter.future.set_result(None)
        self._woken = max(self._woken, head)


def _encode(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode()


def _decode(cursor: Any) -> list[str] | None:
    """A cursor's fields, each number checked; None if it is not one of ours at all."""
    if not isinstance(cursor, str) or not _CURSOR_RE.fullmatch(cursor):
        return None
    try:
        parts = base64.urlsafe_b64decode(cursor).decode("ascii").split(".")
    except (ValueError, binascii.Error):  # bad padding, or bytes that are not text
        return None
    numbers = parts[2:] if parts[0] == "c1" else parts[1:]
    # within 2**62: a time read by rewinding REWIND_US stays a 64-bit integer for SQL
    if not numbers or not all(_NUMBER_RE.fullmatch(n) and abs(int(n)) < 2**62
                              for n in numbers):
        return None
    return parts
