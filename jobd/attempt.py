"""One run of a job (an attempt) and why it stops; the end a handler's outcome means.

A job may run several times (a retry, a resume after a restart) under the same id; each
start is an ``Attempt``, numbered as the job's ``attempts`` counts it. The attempt is the
engine's one home of "why this attempt stops": the first stop is told in the job's log,
a cancel wins over every other reason, and once the handler returned (``settle``) no
stop changes the end. The store's ``cancel_requested`` stays the durable mark of a
cancel (a restart reads it). ``outcome`` turns (stop reason, failure, resumable) into the
end that is recorded, and ``crash_end`` what a crash left running into its end: pure
functions, tested as tables.
"""

from __future__ import annotations

import dataclasses
import enum
import threading
from typing import Any

from jobd.handlers import Cancelled, JobFailed
from jobd.models import Job, JobStatus

__all__ = ["Attempt", "StopReason", "crash_end", "duration", "outcome"]


class StopReason(enum.Enum):
    """Why a running attempt is being stopped."""

    #: a user, admin or service cancelled the job (``jobs.cancel``); it ends cancelled
    CANCEL = "cancel"
    #: its run-time limit passed; it ends failed ("timed out after …")
    TIMEOUT = "timeout"
    #: the daemon is stopping; a resumable job is queued again, another fails
    SHUTDOWN = "shutdown"


@dataclasses.dataclass(eq=False)
class Attempt:
    """One start of a job: its slot in the dispatcher is ``(job_id, number)``."""

    job_id: str
    number: int  #: 1 for the first start; the job's ``attempts`` once it runs
    deadline: float | None = None  #: on the engine's clock; None: no time limit
    stop: StopReason | None = None  #: what decides the end, if anything stopped it
    timeout_s: float | None = None  #: the limit ``deadline`` came from (told on a timeout)
    cancelled_by: str | None = None  #: who asked for the cancel, when one came
    settled: bool = False  #: the handler returned: its end is decided
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    @property
    def key(self) -> tuple[str, int]:
        return (self.job_id, self.number)

    def request_stop(self, reason: StopReason, by: str | None = None) -> bool:
        """Stop for ``reason`` (``by``: who cancelled). True if this is the attempt's
        first stop (its log tells it); a later cancel still wins over a timeout or a
        shutdown. After ``settle`` nothing changes and the answer is False."""
        with self._lock:
            if self.settled:
                return False
            first = self.stop is None
            if first or reason is StopReason.CANCEL:
                if reason is StopReason.CANCEL and self.stop is not StopReason.CANCEL:
                    self.cancelled_by = by
                self.stop = reason
            return first

    def settle(self) -> bool:
        """Make the handler's outcome final; False if it was settled already (its end is
        being recorded elsewhere)."""
        with self._lock:
            if self.settled:
                return False
            self.settled = True
            return True

    def due(self, now: float) -> bool:
        """Whether its time limit has passed at ``now`` (the engine's clock)."""
        return self.deadline is not None and now > self.deadline

    def told(self, reason: StopReason, by: str | None, in_process: bool) -> str:
        """The story line of its first stop (``in_process``: a program gets SIGTERM)."""
        why = {StopReason.CANCEL: f"cancelled by {by}" if by else "cancelled",
               StopReason.TIMEOUT: f"timed out after {duration(self.timeout_s or 0)}",
               StopReason.SHUTDOWN: "interrupted by daemon shutdown"}[reason]
        return why + (": sending SIGTERM" if in_process else "")


def outcome(stop: StopReason | None, failure: JobFailed | Cancelled | None, *,
            resumable: bool, result: dict[str, Any] | None = None,
            timeout_s: float | None = None) -> tuple[JobStatus, dict[str, Any]]:
    """The end an attempt's outcome means, and the fields that go with it.

    ``stop`` is why the attempt was stopped before its handler returned (a cancel, a
    timeout, a shutdown), ``failure`` what the handler raised (a crash comes here as a
    ``JobFailed`` naming it), ``resumable`` whether the job type may run again after a
    stop. A stop wins over what the handler did, except that a handler that returned
    normally during a shutdown has completed.
    """
    if stop is StopReason.CANCEL:
        return JobStatus.CANCELLED, {"message": "cancelled"}
    if stop is StopReason.TIMEOUT:
        return JobStatus.FAILED, {"error": f"timed out after {duration(timeout_s or 0)}"}
    if stop is StopReason.SHUTDOWN and failure is not None:
        if resumable:
            return JobStatus.QUEUED, {"message": "interrupted by shutdown"}
        return JobStatus.FAILED, {"error": "interrupted by daemon shutdown"}
    if isinstance(failure, JobFailed):
        return JobStatus.FAILED, {"error": str(failure)}
    if isinstance(failure, Cancelled):
        return JobStatus.CANCELLED, {"message": "cancelled"}
    return JobStatus.COMPLETED, {"result": result or {}}


#: the end of a job a crash interrupted, by how its daemon went: (cancelled, failed, gave
#: up, requeued). ``restart``: it died and this start recovers it (one node, or a cluster
#: node of this host and state folder); ``lost``: another cluster node lost its lease
_CRASH_TEXTS = {
    "restart": ("cancelled (the daemon restarted while stopping)",
                "interrupted by daemon restart",
                "interrupted by {n} daemon restarts; gave up (max_recoveries = {max})",
                "recovered after restart"),
    "lost": ("cancelled (node {node} lost its lease while stopping)",
             "interrupted: node {node} lost its lease",
             "interrupted {n} times, last as node {node} lost its lease; gave up "
             "(max_recoveries = {max})",
             "recovered: node {node} lost its lease"),
}


def end_story(status: JobStatus | str, message: str | None) -> str:
    """The closing line of an attempt in the job's story (its log, or its events)."""
    if status == JobStatus.QUEUED:
        return f"{message or 'stopped'}; queued again"
    if status == JobStatus.COMPLETED or not message or message == str(status):
        return f"ended {status}"
    return f"ended {status}: {message}"


def crash_end(job: Job, resumable: bool, max_recoveries: int, why: str = "restart",
              node: int | None = None) -> tuple[JobStatus, dict[str, Any]]:
    """What a running job whose daemon is gone becomes (SPEC §6, §11), and its text:
    cancelled if its cancel was asked, failed if not resumable or recovered
    ``max_recoveries`` times, else queued to resume from its checkpoints. ``why``:
    ``restart`` or ``lost`` (``node``: the node that lost its lease)."""
    cancelled, failed, gave_up, requeued = (
        t.format(node=node, n=job.recoveries + 1, max=max_recoveries)
        for t in _CRASH_TEXTS[why])
    if job.cancel_requested:
        return JobStatus.CANCELLED, {"message": cancelled}
    if not resumable:
        return JobStatus.FAILED, {"error": failed}
    if job.recoveries + 1 >= max_recoveries:
        return JobStatus.FAILED, {"error": gave_up}
    return JobStatus.QUEUED, {"message": requeued}


def duration(seconds: float) -> str:
    """``seconds`` as a config would say it: ``1s``, ``90s``, ``2m``, ``1h``."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"
