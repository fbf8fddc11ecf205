"""The daemon's metrics (SPEC §10): counted as things happen, written as Prometheus text.

jobd writes the text exposition (format 0.0.4) itself: no metrics library in the daemon.
Every label value comes from a closed set — a method of the RPC table or ``other`` (the
RPC layer names it), a registered job type or ``other``, a code of SPEC §4, a status of
§2 — so no client
input can grow the set of series, and no label names a user. Counters and histograms
live from the daemon's start (a scraper sees the reset, as Prometheus expects); the
gauges are read from the daemon's own counts when the text is written.

Recording is a few dictionary updates under one lock: the event loop, the writer's
thread and the workers all record.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections import defaultdict
from typing import Callable, Container, Iterable, Mapping

from jobd.models import TERMINAL, Job, JobStatus

__all__ = ["Histogram", "JOB_BUCKETS", "OTHER", "Metrics", "RPC_BUCKETS", "WRITE_BUCKETS"]

#: upper bounds (seconds) of ``jobd_rpc_seconds``: a ping to a 60 s long poll
RPC_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
               0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: upper bounds (seconds) of the queue wait and run time histograms: a noop to a day
JOB_BUCKETS = (0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
               3600.0, 7200.0, 14400.0, 28800.0, 86400.0)
#: upper bounds (seconds) of the store's write transactions (``jobd_store_write_seconds``):
#: a commit of a few writes to a cleanup's chunk, and SPEC §9's 50 ms among them
WRITE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                 2.5, 5.0, 10.0)
OTHER = "other"


class Histogram:
    """Counts per bucket (not cumulative until written), their sum and count. Written by
    one thread (or under a lock), read by any: a reader may see one observation's count
    before its sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def lines(self, name: str, labels: str) -> Iterable[str]:
        total = 0
        sep = "," if labels else ""
        for bound, n in zip((*self.bounds, math.inf), self.counts):
            total += n
            le = "+Inf" if bound == math.inf else _number(bound)
            yield f'{name}_bucket{{{labels}{sep}le="{le}"}} {total}'
        braces = f"{{{labels}}}" if labels else ""
        yield f"{name}_sum{braces} {_number(self.sum)}"
        yield f"{name}_count{braces} {total}"


class Metrics:
    """What the daemon counts; ``text`` writes it with the gauges of the moment.

    ``types`` gives the job types registered now (a reload may change them); ``codes``
    the error codes a call may end with (0 is a result).
    """

    def __init__(self, types: Callable[[], Container[str]], codes: Iterable[int]) -> None:
        self._types = types
        self._codes = frozenset(codes) | {0}
        self._lock = threading.Lock()
        self._requests: defaultdict[tuple[str, int], int] = defaultdict(int)
        self._rpc_seconds: dict[str, Histogram] = {}
        self._submitted: defaultdict[str, int] = defaultdict(int)
        self._finished: defaultdict[tuple[str, str], int] = defaultdict(int)
        self._waited: dict[str, Histogram] = {}
        self._ran: dict[str, Histogram] = {}

    def _type(self, type: str) -> str:
        return type if type in self._types() else OTHER

    # -- recording -------------------------------------------------------------------------

    def rpc(self, method: str, code: int, seconds: float) -> None:
        """One call answered: ``method`` a name of the RPC table or ``OTHER`` (the RPC
        layer knows its table), ``code`` 0 for a result, else its error's code."""
        code = code if code in self._codes else -32603
        with self._lock:
            self._requests[(method, code)] += 1
            hist = self._rpc_seconds.get(method)
            if hist is None:
                hist = self._rpc_seconds[method] = Histogram(RPC_BUCKETS)
            hist.observe(max(0.0, seconds))

    def submitted(self, type: str) -> None:
        """A job was queued by a submit (not a fold into a queued one)."""
        name = self._type(type)
        with self._lock:
            self._submitted[name] += 1

    def started(self, type: str, waited_s: float) -> None:
        """A job's first attempt started ``waited_s`` after its submit."""
        self._observe(self._waited, self._type(type), waited_s)

    def finished(self, type: str, status: str, ran_s: float | None) -> None:
        """A job ended ``status``; ``ran_s`` None when it never ran (cancelled queued)."""
        name = self._type(type)
        with self._lock:
            self._finished[(name, status)] += 1
        if ran_s is not None:
            self._observe(self._ran, name, ran_s)

    def job_changed(self, job: Job) -> None:
        """The store's after-commit listener, a job in the state a commit left it: an
        attempt that began now counts as started (its queue wait from the submit, for a
        first attempt), a job that ended now as finished; any other change (progress, a
        cancel request) as nothing. (Submits are counted by the submit, which knows a
        fold from a new job.)"""
        status = job.status
        if status is JobStatus.RUNNING:
            if job.started_at == job.updated_at and job.attempts == 1:
                self.started(job.type, (job.started_at - job.created_at) / 1e6)
        elif status in TERMINAL and job.completed_at == job.updated_at:
            ran = (None if job.started_at is None
                   else (job.completed_at - job.started_at) / 1e6)
            self.finished(job.type, str(status), ran)

    def _observe(self, table: dict[str, Histogram], name: str, value: float) -> None:
        with self._lock:
            hist = table.get(name)
            if hist is None:
                hist = table[name] = Histogram(JOB_BUCKETS)
            hist.observe(max(0.0, value))

    # -- the exposition --------------------------------------------------------------------

    def text(self, gauges: Mapping[str, float | Mapping[str, float]],
             writes: Histogram | None = None) -> str:
        """The Prometheus text exposition: ``gauges`` (a value, or values by status for
        ``jobd_jobs``), the store's write transactions (``writes``, if open) and everything
        counted so far."""
        out: list[str] = []

        def family(name: str, kind: str, help: str) -> None:
            out.append(f"# HELP {name} {help}")
            out.append(f"# TYPE {name} {kind}")

        for name, value in gauges.items():
            family(name, "gauge", _GAUGE_HELP.get(name, name))
            if isinstance(value, Mapping):
                out.extend(f'{name}{{status="{s}"}} {_number(v)}'
                           for s, v in sorted(value.items()))
            else:
                out.append(f"{name} {_number(value)}")
        with self._lock:
            family("jobd_jobs_submitted_total", "counter", "Jobs queued by a submit.")
            out.extend(f'jobd_jobs_submitted_total{{type="{t}"}} {n}'
                       for t, n in sorted(self._submitted.items()))
            family("jobd_jobs_finished_total", "counter", "Jobs that ended, by end status.")
            out.extend(f'jobd_jobs_finished_total{{type="{t}",status="{s}"}} {n}'
                       for (t, s), n in sorted(self._finished.items()))
            for name, table, help in (
                    ("jobd_job_queue_wait_seconds", self._waited,
                     "Time from a job's submit to its first start."),
                    ("jobd_job_run_seconds", self._ran, "Run time of ended jobs.")):
                family(name, "histogram", help)
                for t, hist in sorted(table.items()):
                    out.extend(hist.lines(name, f'type="{t}"'))
            family("jobd_rpc_requests_total", "counter", "JSON-RPC calls answered, by code.")
            out.extend(f'jobd_rpc_requests_total{{method="{m}",code="{c}"}} {n}'
                       for (m, c), n in sorted(self._requests.items()))
            family("jobd_rpc_seconds", "histogram", "Time to answer a JSON-RPC call.")
            for m, hist in sorted(self._rpc_seconds.items()):
                out.extend(hist.lines("jobd_rpc_seconds", f'method="{m}"'))
        if writes is not None:
            family("jobd_store_write_seconds", "histogram",
                   "Time of each write transaction, from its begin to its durable commit.")
            out.extend(writes.lines("jobd_store_write_seconds", ""))
        return "\n".join(out) + "\n"


_GAUGE_HELP = {
    "jobd_jobs": "Stored jobs by status.",
    "jobd_running": "Jobs running now.",
    "jobd_queued": "Jobs queued now.",
    "jobd_workers": "Jobs that may run at once.",
    "jobd_paused": "1 while dispatch is paused.",
    "jobd_maintenance": "1 while maintenance refuses submits.",
    "jobd_db_bytes": "Size of the database and its WAL.",
}


def _number(value: float) -> str:
    """A sample value as the text format writes it (integers without a point)."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()
                                  and abs(value) < 2**53):
        return str(int(value))
    return repr(float(value))
