"""The job, its status and the state machine as data (SPEC §2).

Shared by the daemon and its clients: nothing here touches the database, the socket
or the clock.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import enum
import functools
import os
import threading
import time
from typing import Any

__all__ = [
    "readable",
    "RawJSON", "TERMINAL", "TRANSITIONS", "Job", "JobStatus", "Phase",
    "NOTE_MARK", "READ_METHODS", "Role", "WaitReason", "from_iso", "is_note", "iso",
    "new_job_id",
]

#: the RPC methods that change nothing (SPEC §4): the client may send one again after its
#: connection broke mid-call, and the daemon does not run one sent as a notification
READ_METHODS = frozenset({"ping", "jobs.get", "jobs.list", "jobs.wait", "jobs.changes",
                          "jobs.events", "jobs.logs", "admin.stats", "admin.metrics"})


class JobStatus(enum.StrEnum):
    CREATED = "created"        #: recorded by jobs.submit; admitted to queued in the same transaction
    QUEUED = "queued"          #: waiting for a worker
    RUNNING = "running"        #: a worker runs its handler
    COMPLETED = "completed"    #: the handler finished and returned its result
    FAILED = "failed"          #: the handler raised, timed out, or was interrupted for good
    CANCELLED = "cancelled"    #: stopped on request; may be retried


class _JobIds:
    """Random (version 4) UUIDs as text, their randomness read from the OS 256 ids at a
    time: each ``os.urandom`` is a system call that gives up the interpreter lock, which
    the event loop's thread must then win back from the store's writer, once per submit.
    A forked child starts with none of its parent's unused bytes."""

    _BATCH = 16 * 256

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool = b""
        self._at = 0
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._lock = threading.Lock()
        self._pool, self._at = b"", 0

    def __call__(self) -> str:
        with self._lock:
            if self._at >= len(self._pool):
                self._pool, self._at = os.urandom(self._BATCH), 0
            raw = bytearray(self._pool[self._at:self._at + 16])
            self._at += 16
        raw[6] = raw[6] & 0x0F | 0x40  # version 4
        raw[8] = raw[8] & 0x3F | 0x80  # RFC 4122's variant
        h = raw.hex()
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


#: a new job's id, as ``str(uuid.uuid4())`` makes it
new_job_id = _JobIds()


#: every allowed (from, to); anything else is a conflict (-32009)
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.CREATED: frozenset({JobStatus.QUEUED}),
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.CANCELLED}),
    JobStatus.RUNNING: frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED,
                                  JobStatus.QUEUED}),
    JobStatus.COMPLETED: frozenset(),
    JobStatus.FAILED: frozenset({JobStatus.QUEUED}),
    JobStatus.CANCELLED: frozenset({JobStatus.QUEUED}),
}

TERMINAL = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED})

def sources(to: JobStatus) -> tuple[JobStatus, ...]:
    """The statuses a job may leave to become ``to``."""
    return tuple(s for s, targets in TRANSITIONS.items() if to in targets)


class RawJSON(str):
    """A value already encoded as JSON text, to be sent as it is (``jobs.list`` pages)."""


class Phase(enum.StrEnum):
    INIT = "init"              #: resolve and check the repository
    GIT_SYNC = "git_sync"      #: fetch and merge
    INDEXING = "indexing"      #: run the indexer
    FINALIZING = "finalizing"  #: write the summary


class WaitReason(enum.StrEnum):
    SLOTS = "slots"                #: every worker is busy
    USER_LIMIT = "user_limit"      #: the owner already runs max_running_per_user jobs
    PROJECT_BUSY = "project_busy"  #: a sync/index of the same (user, project) runs
    PAUSED = "paused"              #: an admin paused dispatching


class Role(enum.StrEnum):
    ADMIN = "admin"      #: uid 0, the daemon's uid, or listed in auth.admins
    SERVICE = "service"  #: listed in auth.services; acts for the user it names
    USER = "user"        #: anyone else who reaches the socket


@functools.lru_cache(maxsize=4096)
def _iso_seconds(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


def iso(us: int | None) -> str | None:
    """Microseconds since the epoch -> ``2026-11-22T10:00:00.123456Z``."""
    if us is None:
        return None
    # on every job answered, four times: the seconds part is cached (6x faster)
    return f"{_iso_seconds(us // 1_000_000)}.{us % 1_000_000:06d}Z"


def from_iso(text: str) -> int:
    """ISO 8601 (``Z`` or an offset; naive means UTC) -> microseconds since the epoch."""
    t = _dt.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    if t.tzinfo is None:
        t = t.replace(tzinfo=_dt.timezone.utc)
    delta = t - _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


@dataclasses.dataclass(frozen=True, slots=True)
class Job:
    id: str
    type: str
    user_id: str
    project_id: str | None
    status: JobStatus
    created_at: int                      #: microseconds since the epoch, like every *_at
    updated_at: int
    version: int
    progress: float = 0.0
    phase: str | None = None
    message: str | None = None
    priority: int = 0
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    result: dict[str, Any] | None = None
    error: str | None = None
    attempts: int = 0
    cancel_requested: bool = False
    description: str | None = None
    timeout_s: float | None = None
    started_at: int | None = None
    completed_at: int | None = None
    # computed by the daemon when answering, never stored
    queue_position: int | None = None
    wait_reason: str | None = None
    eta_s: float | None = None
    # internal: not part of the wire shape
    seq: int = 0                         #: insertion order; the keyset of jobs.list
    recoveries: int = 0                  #: restarts this job has been recovered from
    idempotency_key: str | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def to_dict(self) -> dict[str, Any]:
        """The wire shape of SPEC §2."""
        return {
            "id": self.id,
            "type": self.type,
            "user_id": self.user_id,
            "project_id": self.project_id,
            "status": str(self.status),
            "progress": round(self.progress, 2),
            "phase": self.phase,
            "message": self.message,
            "priority": self.priority,
            "options": self.options,
            "metadata": self.metadata,
            "result": self.result,
            "error": self.error,
            "attempts": self.attempts,
            "queue_position": self.queue_position,
            "wait_reason": self.wait_reason,
            "cancel_requested": self.cancel_requested,
            "version": self.version,
            "description": self.description,
            "timeout_s": self.timeout_s,
            "created_at": iso(self.created_at),
            "started_at": iso(self.started_at),
            "completed_at": iso(self.completed_at),
            "updated_at": iso(self.updated_at),
            "eta_s": self.eta_s,
        }


#: how jobd's own lines in a job's log begin: ``[jobd 2026-11-22T10:00:00Z] <text>``
NOTE_MARK = "[jobd "


def readable(value: str | bytes, limit: int | None = None) -> str:
    """``value`` as text that is always valid UTF-8, cut to ``limit`` characters (with …).

    Undecodable bytes (a file name git reports) and lone surrogates (what surrogateescape
    made of such bytes) become backslash escapes: SQLite refuses text it cannot encode,
    and a job whose end cannot be recorded would stay running. Valid text comes back as
    the very same object.
    """
    if isinstance(value, bytes):
        text = value.decode("utf-8", "backslashreplace")
    else:
        try:
            value.encode()
            text = value
        except UnicodeEncodeError:
            text = value.encode("utf-8", "backslashreplace").decode()
    if limit is not None and len(text) > limit:
        text = text[:limit - 1] + "…"
    return text


def is_note(line: str) -> bool:
    """Whether a job's log line is one of jobd's own (SPEC §5), not a program's output.

    The one home of the rule, for the daemon and for its clients (jobctl tells a failure
    whose log holds only jobd's lines by it)."""
    return line.startswith(NOTE_MARK) and "] " in line[:40]
