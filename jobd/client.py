"""Client and AsyncClient: jobd's JSON-RPC over its Unix socket, for Python callers.

This module owns the client side of SPEC §4 and §8: finding the daemon's socket
(SPEC §1's order), the line framing, one reused connection per client, and turning
JSON-RPC errors back into the ``jobd.errors`` class of their code, and the follow
protocol (``watch``, ``tail``, ``resolve``, ``follow_changes``) written once, as steps
that each client drives with its own I/O. ``jobctl`` and the CIDX web server both use it.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import copy
import dataclasses
import errno
import grp
import itertools
import json
import os
import pwd
import re
import select
import socket as _socket
import struct
import threading
import time
from pathlib import Path
from typing import (Any, AsyncIterator, Awaitable, Callable, Generator, Generic, Iterator,
                    Mapping, TypeVar)

from jobd import errors, state
from jobd.config import default_socket_paths
from jobd.models import READ_METHODS
from jobd.errors import (Conflict, Forbidden, InternalError, InvalidParams, InvalidRequest,
                         JobdError, LimitExceeded, MethodNotFound, NotFound, ParseError,
                         Unauthenticated, Unavailable, Unreachable)

__all__ = [
    "AsyncClient", "AsyncClientPool", "Client", "Conflict", "Forbidden", "InternalError",
    "InvalidParams", "InvalidRequest", "JobdError", "LimitExceeded", "MAX_LINE_BYTES",
    "MethodNotFound", "NotFound", "ParseError", "RECONNECT_S", "Unauthenticated",
    "Unavailable", "Unreachable", "socket_candidates",
]

#: the longest response line read; a page of jobs.list with big metadata stays under it
MAX_LINE_BYTES = 64 * 1024 * 1024
#: how long a call whose line the daemon cut off waits for the answer it left
_ANSWER_LEFT_S = 1.0

_START_HINT = ("start it with `systemctl start jobd` (or `jobd serve` as yourself), "
               "or name its socket with JOBD_SOCKET")

#: the long polls: the daemon holds each open for up to its timeout_s (default 30)
_LONG_POLLS = frozenset({"jobs.wait", "jobs.changes"})
#: how much longer than the answer timeout a call that waits for jobs to stop is given
_STOP_WAIT_S = 300.0

#: how long ``watch`` and ``tail`` keep trying while the daemon restarts (jobs survive it)
RECONNECT_S = 30.0
#: the longest single long poll of ``watch``; short enough that its timeout is kept closely
_POLL_S = 30.0
#: how long ``tail(follow=True)`` waits for the job to change before reading again
_LOG_POLL_S = 1.0
#: the pause between two tries to reach a restarting daemon
_RETRY_S = 0.5
#: how many of an ambiguous prefix's matches ``resolve`` names, and reads at most
_MATCHES_SHOWN = 10
_MATCHES_READ = 1000

_FULL_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_PREFIX = re.compile(r"^[0-9a-f-]{4,36}$")
_BARE_ID = re.compile(r"^[0-9a-f]{32}$")
_TERMINAL = frozenset({"completed", "failed", "cancelled"})

_R = TypeVar("_R")


def socket_candidates(socket: str | os.PathLike[str] | None = None,
                      env: Mapping[str, str] | None = None) -> list[Path]:
    """The sockets to try, in order: ``socket``, else ``$JOBD_SOCKET``, else SPEC §1's defaults.

    An explicit choice is the only candidate. Of the defaults, the ordinary-user socket
    is tried only if its file exists; the system socket always is, so that a failure
    names at least one path.
    """
    return [c.path for c in _candidates(socket, env)]


@dataclasses.dataclass(frozen=True)
class _Candidate:
    path: Path
    #: found by searching SPEC §1's defaults, not named by the caller: trusted only when
    #: its folder is the caller's own (or the system's) and the daemon's uid is right
    searched: bool


def _candidates(socket: str | os.PathLike[str] | None,
                env: Mapping[str, str] | None) -> list[_Candidate]:
    env = os.environ if env is None else env
    chosen = socket or env.get("JOBD_SOCKET")
    if chosen:
        return [_Candidate(Path(chosen), searched=False)]
    *user, system = default_socket_paths(env)
    return [_Candidate(p, searched=True) for p in user if p.exists()] + [
        _Candidate(system, searched=True)]


def _distrust(candidate: _Candidate) -> str | None:
    """Why a socket found by searching must not be used, before connecting; None if it may."""
    if not candidate.searched or candidate.path.parent == _SYSTEM_DIR:
        return None
    folder = candidate.path.parent
    problem = state.private_dir_problem(folder, os.getuid())
    return f"socket {candidate.path}: skipped, {folder} {problem}" if problem else None


def _peer_problem(candidate: _Candidate, sock: _socket.socket) -> str | None:
    """Why the daemon on a searched socket is not one to trust (SO_PEERCRED), or None.

    The caller's own daemon, root's, or the system daemon's (the owner of /run/jobd).
    """
    if not candidate.searched:
        return None
    _, uid, _ = _UCRED.unpack(sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED,
                                              _UCRED.size))
    trusted = {os.getuid(), 0}
    with contextlib.suppress(OSError):
        trusted.add(_SYSTEM_DIR.stat().st_uid)
    if uid in trusted:
        return None
    return (f"socket {candidate.path}: skipped, the daemon there runs as uid {uid}, "
            "not as you, root or the system's jobd")


_SYSTEM_DIR = Path("/run/jobd")
_UCRED = struct.Struct("3i")


def _connect_failure(path: Path, exc: BaseException) -> str:
    """One path's reason, for the Unreachable message."""
    if isinstance(exc, TimeoutError):
        return f"socket {path}: no answer to connect (timed out)"
    code = getattr(exc, "errno", None)
    if code == errno.ENOENT:
        return f"socket {path}: no daemon answers (no such file)"
    if code == errno.ECONNREFUSED:
        return f"socket {path}: no daemon answers (connection refused)"
    if code in (errno.EACCES, errno.EPERM):
        return _denied(path)
    if code == errno.ENOTSOCK:
        return f"socket {path}: no daemon answers (not a socket)"
    return f"socket {path}: no daemon answers ({getattr(exc, 'strerror', None) or exc})"


def _denied(path: Path) -> str:
    """Why a socket that is there refused us: who may connect, and how to become one."""
    owner = group = "?"
    with contextlib.suppress(OSError):
        st = path.stat()
        owner, group = str(st.st_uid), str(st.st_gid)
        with contextlib.suppress(KeyError):
            owner = pwd.getpwuid(st.st_uid).pw_name
        with contextlib.suppress(KeyError):
            group = grp.getgrgid(st.st_gid).gr_name
    return (f"socket {path}: permission denied; only its owner ({owner}) and members of its "
            f"group ({group}) may connect (`ls -l {path}` shows them): ask an admin to add you "
            f"to the group (`usermod -aG {group} $USER`), then log in again")


def _unreachable(reasons: list[str]) -> errors.Unreachable:
    # a daemon that refuses us is running: starting one is no advice then
    hint = [] if reasons and all(": permission denied;" in r for r in reasons) else [_START_HINT]
    return errors.Unreachable("; ".join(reasons + hint), detail={"tried": reasons})


def _broken(path: Path | None, method: str, exc: BaseException | None) -> errors.Unreachable:
    why = f" ({exc})" if exc else ""
    return errors.Unreachable(
        f"socket {path}: the connection broke during {method}{why}; the call may or may not "
        "have taken effect, so look (e.g. `jobctl list`) before repeating it")


def _timed_out(path: Path | None, method: str, timeout: float | None) -> errors.Unreachable:
    return errors.Unreachable(f"socket {path}: no answer to {method} within {timeout:g} s; "
                              "the daemon may be overloaded or stuck")


def _too_long(path: Path | None, method: str) -> errors.InternalError:
    return errors.InternalError(f"socket {path}: the answer to {method} is longer than "
                                f"{MAX_LINE_BYTES} bytes")


def _request(req_id: int, method: str, params: dict[str, Any]) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": req_id, "method": method, "params": params},
                      separators=(",", ":")).encode() + b"\n"


def _result(path: Path | None, req_id: int, line: bytes) -> Any:
    """The result of one response line, or raise the ``jobd.errors`` class of its error."""
    try:
        response = json.loads(line)
    except ValueError:
        raise errors.InternalError(f"socket {path}: the daemon sent a line that is not JSON: "
                                   f"{line[:200]!r}") from None
    if not isinstance(response, dict):
        raise errors.InternalError(f"socket {path}: the daemon sent {type(response).__name__}, "
                                   "not a JSON-RPC response")
    # an error about the framing itself (a line too long) comes back with id null
    if response.get("id") not in (req_id, None) or (response.get("id") is None
                                                    and "error" not in response):
        raise errors.InternalError(f"socket {path}: the daemon answered request "
                                   f"{response.get('id')!r} while {req_id} was due")
    if "error" not in response:
        return response.get("result")
    error = response["error"] if isinstance(response["error"], dict) else {}
    data = error.get("data") if isinstance(error.get("data"), dict) else {}
    code = error.get("code")
    cls = errors.BY_CODE.get(code, errors.JobdError) if isinstance(code, int) else errors.JobdError
    exc = cls(str(error.get("message") or cls.__doc__ or "error"),
              field=data.get("field"), detail=data.get("detail"),
              job_id=data["job_id"] if isinstance(data.get("job_id"), str) else None)
    if isinstance(code, int):
        exc.code = code
    if isinstance(data.get("http_status"), int):
        exc.http_status = data["http_status"]
    raise exc


@dataclasses.dataclass(frozen=True)
class _Call:
    """A step of the follow protocol: make this call; its result (or error) comes back.
    ``within``: the seconds the caller's own timeout leaves, which bound the wait for the
    answer too (a daemon frozen mid-call is not waited for past the caller's timeout)."""

    method: str
    params: dict[str, Any]
    within: float | None = None


@dataclasses.dataclass(frozen=True)
class _Sleep:
    """A step: pause this long (seconds)."""

    seconds: float


@dataclasses.dataclass(frozen=True)
class _Emit:
    """A step: hand this value to the caller of ``watch`` or ``tail``."""

    value: Any


_Steps = Generator["_Call | _Sleep | _Emit", Any, Any]

#: called with the error each time ``watch`` or ``tail`` lost the daemon and tries again
OnReconnect = Callable[[JobdError], None]


def _call(method: str, **params: Any) -> _Steps:
    """One call as a step: its result, or its error raised here."""
    return (yield _Call(method, params))


def _patient(method: str, params: dict[str, Any], deadline: float,
             on_reconnect: OnReconnect | None, clock: Callable[[], float],
             ends_at: float | None = None) -> _Steps:
    """A read call that outlasts a daemon restart: tried again until ``deadline``. None
    when ``ends_at`` (the caller's own timeout) comes first: the wait is over, not the
    daemon unreachable."""
    while True:
        try:
            return (yield _Call(method, params, None if ends_at is None
                                else max(0.0, ends_at - clock())))
        except (Unreachable, Unavailable) as e:
            if ends_at is not None and clock() >= ends_at:
                return None
            if clock() >= deadline:
                raise
            if on_reconnect is not None:
                on_reconnect(e)
            yield _Sleep(_RETRY_S)


def _watch(job_id: str, timeout: float | None, reconnect_s: float,
           on_reconnect: OnReconnect | None, clock: Callable[[], float]) -> _Steps:
    """Emit the job now and at every change until it ends or ``timeout`` runs out.

    After the daemon was lost and found again the job is emitted even if unchanged,
    so a caller showing "reconnecting…" learns that it is back.
    """
    deadline = None if timeout is None else clock() + timeout
    job = yield _Call("jobs.wait", dict(job_id=job_id), timeout)
    yield _Emit(job)
    lost = False

    def note(e: JobdError) -> None:
        nonlocal lost
        lost = True
        if on_reconnect is not None:
            on_reconnect(e)

    while job["status"] not in _TERMINAL:
        left = None if deadline is None else deadline - clock()
        if left is not None and left <= 0:
            return
        poll = _POLL_S if left is None else min(_POLL_S, left)
        params = dict(job_id=job_id, after_version=job["version"], timeout_s=poll)
        fresh = yield from _patient("jobs.wait", params, clock() + reconnect_s, note, clock,
                                    deadline)
        if fresh is None:  # the timeout ran out while the daemon was away
            return
        if fresh["version"] != job["version"] or fresh["status"] in _TERMINAL or lost:
            yield _Emit(fresh)
        job, lost = fresh, False


def _tail(job_id: str, follow: bool, offset: int, timeout: float | None, reconnect_s: float,
          on_reconnect: OnReconnect | None, clock: Callable[[], float]) -> _Steps:
    """Emit every ``jobs.logs`` page that carries data; with ``follow``, until the job ends.

    Without ``follow`` it stops at the end of what is written now. It returns the
    offset to go on from.
    """
    deadline = None if timeout is None else clock() + timeout
    version = None
    while True:
        page = yield from _patient("jobs.logs", dict(job_id=job_id, offset=offset),
                                   clock() + reconnect_s, on_reconnect, clock, deadline)
        if page is None:  # the timeout ran out while the daemon was away
            return offset
        offset = page["next_offset"]
        if page["data"]:
            yield _Emit(page)
        if page["eof"]:
            return offset
        if page["data"]:
            continue  # the next page may be there already
        left = None if deadline is None else deadline - clock()
        if not follow or (left is not None and left <= 0):
            return offset
        # no new output yet: a short long poll, so that the job's end is seen at once
        params = dict(job_id=job_id, after_version=version,
                      timeout_s=_LOG_POLL_S if left is None else min(_LOG_POLL_S, left))
        job = yield from _patient("jobs.wait", params, clock() + reconnect_s, on_reconnect,
                                  clock, deadline)
        if job is None:
            return offset
        version = job["version"]


def _follow_changes(after: str | None, filters: dict[str, Any], reconnect_s: float,
                    on_reconnect: OnReconnect | None, clock: Callable[[], float]) -> _Steps:
    """Emit every ``jobs.changes`` answer that holds jobs, for ever: one long poll after
    another from the last cursor, outlasting a daemon restart as ``watch`` does."""
    cursor = after
    while True:
        answer = yield from _patient("jobs.changes", dict(filters, after=cursor,
                                                          timeout_s=_POLL_S),
                                     clock() + reconnect_s, on_reconnect, clock)
        if answer["jobs"]:
            yield _Emit(answer)
        cursor = answer["cursor"]


def _capture(steps: _Steps, box: list[Any]) -> _Steps:
    """``steps``, with what they return put into ``box`` (a driver only sees the emits)."""
    box.append((yield from steps))


def _resolve(ref: str) -> _Steps:
    """The full id that ``ref`` (an id, with or without its hyphens, or a unique prefix of
    ≥ 4 characters) names."""
    ref = ref.strip().lower()
    if _BARE_ID.match(ref):  # as some tools print a UUID
        ref = f"{ref[:8]}-{ref[8:12]}-{ref[12:16]}-{ref[16:20]}-{ref[20:]}"
    if _FULL_ID.match(ref):
        return ref
    if not _PREFIX.match(ref):
        raise InvalidParams(f"{ref!r} is not a job id; give the id or at least its first "
                            "4 characters (0-9, a-f)", field="job_id")
    page = yield from _call("jobs.list", id_prefix=ref, limit=_MATCHES_READ, fields=["id"])
    ids = [j["id"] for j in page["jobs"]]
    if not ids:
        raise NotFound(f"no job matches {ref!r}; `jobctl list` shows the jobs you may see")
    if len(ids) == 1:
        return ids[0]
    shown = ", ".join(ids[:_MATCHES_SHOWN])
    count = f"{len(ids)}{' or more' if page.get('next_cursor') else ''}"
    more = f" and {len(ids) - _MATCHES_SHOWN} more" if len(ids) > _MATCHES_SHOWN else ""
    raise InvalidParams(f"ambiguous prefix {ref!r}: it matches {count} jobs: {shown}{more}; "
                        "give more characters", field="job_id", detail={"matches": ids})


def _held_s(method: str, params: Mapping[str, Any]) -> float:
    """How long the daemon may rightly hold a call before it answers, on top of the
    answer timeout.

    A long poll: its ``timeout_s`` (default 30). A call that waits for jobs to stop
    (``jobs.cancel`` with ``wait``, ``admin.purge``): up to ``cancel_grace`` + 2 s on the
    daemon, a setting the client cannot read (only admins see the config), so
    ``_STOP_WAIT_S``, five minutes: no job needs that long between SIGTERM and SIGKILL,
    so a daemon silent past it (and the answer timeout) is taken for frozen.
    """
    if method in _LONG_POLLS:
        return float(params.get("timeout_s", 30))
    if method == "admin.purge" or (method == "jobs.cancel" and params.get("wait")):
        return _STOP_WAIT_S
    return 0.0


class _Api(abc.ABC, Generic[_R]):
    """The methods of SPEC §4, written once for both clients.

    Each method is one ``call``: ``Client`` returns its result, ``AsyncClient`` a
    coroutine of it.
    """

    def __init__(self, socket: str | os.PathLike[str] | None, as_user: str | None,
                 as_admin: bool, timeout: float | None, as_role: str | None = None) -> None:
        self._candidates = _candidates(socket, None)
        self.as_user = as_user
        self.as_admin = as_admin
        #: ``"user"``: a service or admin acting with a plain user's rights (SPEC §3)
        self.as_role = as_role
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._path: Path | None = None

    @property
    def socket_path(self) -> Path | None:
        """The socket of the daemon this client is connected to (None before the first call)."""
        return self._path

    def _prepare(self, method: str, params: dict[str, Any], within: float | None = None
                 ) -> tuple[dict[str, Any], float | None, bool]:
        """(params as sent, how long to wait for the answer, whether a resend is safe);
        ``within``: the seconds a caller's own timeout leaves (``_Call``)."""
        params = {k: v for k, v in params.items() if v is not None}
        if method != "ping":
            if self.as_user is not None:
                params.setdefault("as_user", self.as_user)
            if self.as_admin:
                params.setdefault("as_admin", True)
            if self.as_role is not None:
                params.setdefault("as_role", self.as_role)
        timeout = self.timeout
        if timeout is not None:
            timeout += _held_s(method, params)
        if within is not None:
            timeout = within + _ANSWER_LEFT_S if timeout is None else min(
                timeout, within + _ANSWER_LEFT_S)
        # a submit with an idempotency key returns the same job when sent twice
        safe = method in READ_METHODS or (method == "jobs.submit" and "idempotency_key" in params)
        return params, timeout, safe

    @abc.abstractmethod
    def call(self, method: str, **params: Any) -> _R:
        """Send one request and return its result (None params are left out)."""

    @abc.abstractmethod
    def _send(self, method: str, params: dict[str, Any], within: float | None = None) -> _R:
        """``call``, its wait for the answer bounded by ``within`` too (``_Call``)."""

    @abc.abstractmethod
    def _stream(self, steps: _Steps) -> Any:
        """Drive ``steps``: an iterator (async for AsyncClient) of what they emit."""

    @abc.abstractmethod
    def _complete(self, steps: _Steps) -> _R:
        """Drive ``steps`` to their end: what they return."""

    def ping(self) -> _R:
        return self.call("ping")

    def submit(self, type: str, project_id: str | None = None, *,
               options: dict[str, Any] | None = None, priority: int | None = None,
               metadata: dict[str, Any] | None = None, description: str | None = None,
               timeout_s: float | None = None, idempotency_key: str | None = None,
               on_duplicate: str | None = None) -> _R:
        return self.call("jobs.submit", type=type, project_id=project_id, options=options,
                         priority=priority, metadata=metadata, description=description,
                         timeout_s=timeout_s, idempotency_key=idempotency_key,
                         on_duplicate=on_duplicate)

    def get(self, job_id: str) -> _R:
        return self.call("jobs.get", job_id=job_id)

    def list(self, **filters: Any) -> _R:
        """``{jobs, next_cursor}``; filters: status, type, user_id, project_id,
        created_after, created_before, id_prefix, order, limit, cursor, with_total, fields."""
        return self.call("jobs.list", **filters)

    def cancel(self, job_id: str | None = None, wait: bool = False, *,
               filter: dict[str, Any] | None = None, dry_run: bool = False) -> _R:
        """One job (the job), or every job matching ``filter`` in one call (``{jobs, count}``)."""
        return self.call("jobs.cancel", job_id=job_id, wait=wait or None, filter=filter,
                         dry_run=dry_run or None)

    def retry(self, job_id: str | None = None, *, filter: dict[str, Any] | None = None,
              dry_run: bool = False) -> _R:
        """One job (the job), or every job matching ``filter`` in one call (``{jobs, count}``)."""
        return self.call("jobs.retry", job_id=job_id, filter=filter, dry_run=dry_run or None)

    def wait(self, job_id: str, after_version: int | None = None,
             timeout_s: float | None = None) -> _R:
        return self.call("jobs.wait", job_id=job_id, after_version=after_version,
                         timeout_s=timeout_s)

    def changes(self, after: str | None = None, timeout_s: float | None = None,
                **filters: Any) -> _R:
        """``{jobs, cursor}``: every job in scope changed after the cursor ``after``, at once
        or when one changes (a long poll of up to ``timeout_s``, default 30); without
        ``after``, the queued and running jobs now. The next call passes ``cursor``.
        Filters as ``list``'s: status, type, user_id, project_id, created_after,
        created_before, id_prefix, fields."""
        return self.call("jobs.changes", after=after, timeout_s=timeout_s, **filters)

    def events(self, job_id: str) -> _R:
        return self.call("jobs.events", job_id=job_id)

    def logs(self, job_id: str, offset: int = 0, limit_bytes: int | None = None) -> _R:
        return self.call("jobs.logs", job_id=job_id, offset=offset, limit_bytes=limit_bytes)

    def stats(self, since: str | None = None) -> _R:
        return self.call("admin.stats", since=since)

    def cleanup(self, older_than_s: float | None = None, dry_run: bool = False,
                status: list[str] | None = None) -> _R:
        return self.call("admin.cleanup", older_than_s=older_than_s, dry_run=dry_run or None,
                         status=status or None)

    def pause(self) -> _R:
        return self.call("admin.pause")

    def resume(self) -> _R:
        return self.call("admin.resume")

    def maintenance(self, enabled: bool | None = None, reason: str | None = None) -> _R:
        """Switch maintenance on or off; without ``enabled`` only report it."""
        return self.call("admin.maintenance", enabled=enabled, reason=reason)

    def metrics(self) -> _R:
        return self.call("admin.metrics")

    def purge(self, user_id: str) -> _R:
        """``{deleted}``: every job of a removed account gone (its active ones cancelled
        first), with their events, logs and manifests."""
        return self.call("admin.purge", user_id=user_id)

    def watch(self, job_id: str, timeout: float | None = None, *,
              reconnect_s: float = RECONNECT_S, on_reconnect: OnReconnect | None = None,
              clock: Callable[[], float] = time.monotonic) -> Any:
        """The job now and at every change until it ends (long polls by version).

        Stops early, the job not ended, once ``timeout`` seconds have passed. While the
        daemon cannot be reached (a restart) it tries again for up to ``reconnect_s``,
        calling ``on_reconnect(error)`` at each try, then yields the job again.
        """
        return self._stream(_watch(job_id, timeout, reconnect_s, on_reconnect, clock))

    def tail(self, job_id: str, follow: bool = False, *, offset: int = 0,
             timeout: float | None = None, reconnect_s: float = RECONNECT_S,
             on_reconnect: OnReconnect | None = None,
             clock: Callable[[], float] = time.monotonic) -> Any:
        """The job's log from ``offset`` as ``jobs.logs`` pages ``{data, next_offset, eof}``.

        Without ``follow`` it ends at what is written now; with it, when the job has
        ended and all was read (or ``timeout`` ran out).
        """
        return self._stream(_tail(job_id, follow, offset, timeout, reconnect_s, on_reconnect,
                                  clock))

    def follow_changes(self, after: str | None = None, *, reconnect_s: float = RECONNECT_S,
                       on_reconnect: OnReconnect | None = None,
                       clock: Callable[[], float] = time.monotonic, **filters: Any) -> Any:
        """Every ``changes`` answer that holds jobs (``{jobs, cursor}``), without end: what
        a web server following its users' jobs runs on one connection. Keep the last
        ``cursor`` to go on from it later (also after a daemon restart)."""
        return self._stream(_follow_changes(after, filters, reconnect_s, on_reconnect, clock))

    def resolve(self, ref: str) -> _R:
        """The id of the one job that ``ref``, an id or a prefix of ≥ 4 characters, names.

        NotFound when none in scope does; InvalidParams listing the matches when several do.
        """
        return self._complete(_resolve(ref))


class Client(_Api[Any]):
    """A blocking client on one connection, opened at the first call and reused.

    Thread-safe: calls from several threads take turns on the connection. A thread
    that long-polls (``wait``) while others call should use its own Client.
    """

    def __init__(self, socket: str | os.PathLike[str] | None = None, as_user: str | None = None,
                 as_admin: bool = False, timeout: float | None = 60.0, *,
                 as_role: str | None = None) -> None:
        super().__init__(socket, as_user, as_admin, timeout, as_role)
        self._lock = threading.Lock()
        self._sock: _socket.socket | None = None
        self._reader: Any = None

    def call(self, method: str, **params: Any) -> Any:
        return self._send(method, params)

    def _send(self, method: str, params: dict[str, Any], within: float | None = None) -> Any:
        params, timeout, safe = self._prepare(method, params, within)
        with self._lock:
            for attempt in (1, 2):
                if self._sock is None or self._peer_closed():
                    self._open()
                req_id = next(self._ids)
                try:
                    line = self._exchange(_request(req_id, method, params), timeout)
                except TimeoutError:
                    self._drop()
                    raise _timed_out(self._path, method, timeout) from None
                except OSError as e:
                    self._drop()
                    if safe and attempt == 1:
                        continue
                    raise _broken(self._path, method, e) from None
                except BaseException:
                    self._drop()  # interrupted: the answer would come to the next call
                    raise
                if not line.endswith(b"\n"):
                    self._drop()
                    if len(line) > MAX_LINE_BYTES:
                        raise _too_long(self._path, method)
                    if safe and attempt == 1:
                        continue
                    raise _broken(self._path, method, None)
                try:
                    return _result(self._path, req_id, line)
                except errors.InvalidRequest:
                    self._drop()  # the daemon closes the connection after such a line
                    raise
        raise AssertionError("unreachable")  # the loop returns or raises

    def _stream(self, steps: _Steps) -> Iterator[Any]:
        reply: Any = None
        failure: JobdError | None = None
        while True:
            try:
                step = steps.throw(failure) if failure else steps.send(reply)
            except StopIteration:
                return
            reply, failure = None, None
            if isinstance(step, _Call):
                try:
                    reply = self._send(step.method, step.params, step.within)
                except JobdError as e:
                    failure = e
            elif isinstance(step, _Sleep):
                time.sleep(step.seconds)
            else:
                yield step.value

    def _complete(self, steps: _Steps) -> Any:
        box: list[Any] = []
        for _ in self._stream(_capture(steps, box)):
            pass
        return box[0]

    def _open(self) -> None:
        reasons = []
        for candidate in self._candidates:
            path = candidate.path
            if problem := _distrust(candidate):
                reasons.append(problem)
                continue
            sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(str(path))
            except OSError as e:
                sock.close()
                reasons.append(_connect_failure(path, e))
                continue
            if problem := _peer_problem(candidate, sock):
                sock.close()
                reasons.append(problem)
                continue
            self._sock, self._path = sock, path
            self._reader = sock.makefile("rb")
            return
        raise _unreachable(reasons)

    def _exchange(self, request: bytes, timeout: float | None) -> bytes:
        assert self._sock is not None
        self._sock.settimeout(timeout)
        try:
            self._sock.sendall(request)
        except (BrokenPipeError, ConnectionResetError):
            # the daemon refused the line before reading all of it (too long) and closed
            # the connection: its answer is still there to be read
            self._sock.settimeout(_ANSWER_LEFT_S)
            left: bytes = self._reader.readline(MAX_LINE_BYTES + 1)
            if not left.endswith(b"\n"):
                raise
            self._drop()  # closed by the daemon: the next call opens a new connection
            return left
        line: bytes = self._reader.readline(MAX_LINE_BYTES + 1)
        return line

    def _peer_closed(self) -> bool:
        """Whether the daemon closed this idle connection (it does after ``idle_timeout``).

        Checked before each call, so that a submit does not go out on a connection
        that is already gone and then fail with an unknown outcome.
        """
        assert self._sock is not None
        readable, _, _ = select.select([self._sock], [], [], 0)
        if not readable:
            return False
        # end of stream, or bytes nobody asked for: either way the connection is no use
        self._drop()
        return True

    def _drop(self) -> None:
        if self._reader is not None:
            self._reader.close()
        if self._sock is not None:
            self._sock.close()
        self._sock = self._reader = None

    def close(self) -> None:
        with self._lock:
            self._drop()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _AsyncApi(_Api[Awaitable[Any]]):
    """The asyncio driver of the follow protocol's steps (``Client._stream`` is the other)."""

    async def _stream(self, steps: _Steps) -> AsyncIterator[Any]:
        reply: Any = None
        failure: JobdError | None = None
        while True:
            try:
                step = steps.throw(failure) if failure else steps.send(reply)
            except StopIteration:
                return
            reply, failure = None, None
            if isinstance(step, _Call):
                try:
                    reply = await self._send(step.method, step.params, step.within)
                except JobdError as e:
                    failure = e
            elif isinstance(step, _Sleep):
                await asyncio.sleep(step.seconds)
            else:
                yield step.value

    async def _complete(self, steps: _Steps) -> Any:
        box: list[Any] = []
        async for _ in self._stream(_capture(steps, box)):
            pass
        return box[0]


class AsyncClient(_AsyncApi):
    """The asyncio twin of ``Client``: every method is a coroutine, one connection per client."""

    def __init__(self, socket: str | os.PathLike[str] | None = None, as_user: str | None = None,
                 as_admin: bool = False, timeout: float | None = 60.0, *,
                 as_role: str | None = None) -> None:
        super().__init__(socket, as_user, as_admin, timeout, as_role)
        self._lock = asyncio.Lock()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  #: the connection's

    async def call(self, method: str, **params: Any) -> Any:
        return await self._send(method, params)

    async def _send(self, method: str, params: dict[str, Any],
                    within: float | None = None) -> Any:
        params, timeout, safe = self._prepare(method, params, within)
        async with self._lock:
            for attempt in (1, 2):
                # a connection made under another event loop (asyncio.run per call) is no
                # use under this one
                if (self._reader is None or self._reader.at_eof()
                        or self._loop is not asyncio.get_running_loop()):
                    await self._open()
                req_id = next(self._ids)
                try:
                    async with asyncio.timeout(timeout):
                        line = await self._exchange(_request(req_id, method, params))
                except TimeoutError:
                    self._drop()
                    raise _timed_out(self._path, method, timeout) from None
                except asyncio.LimitOverrunError:
                    self._drop()
                    raise _too_long(self._path, method) from None
                except (OSError, asyncio.IncompleteReadError) as e:
                    self._drop()
                    if safe and attempt == 1:
                        continue
                    raise _broken(self._path, method, e if isinstance(e, OSError) else None
                                  ) from None
                except BaseException:
                    self._drop()  # cancelled: the answer would come to the next call
                    raise
                try:
                    return _result(self._path, req_id, line)
                except errors.InvalidRequest:
                    # the daemon closes the connection after a line it could not frame (too
                    # long): the next call must not go out on it before this loop sees the end
                    self._drop()
                    raise
        raise AssertionError("unreachable")  # the loop returns or raises

    async def _open(self) -> None:
        self._drop()
        reasons = []
        for candidate in self._candidates:
            path = candidate.path
            if problem := _distrust(candidate):
                reasons.append(problem)
                continue
            try:
                async with asyncio.timeout(self.timeout):
                    self._reader, self._writer = await asyncio.open_unix_connection(
                        str(path), limit=MAX_LINE_BYTES)
            except (OSError, TimeoutError) as e:
                reasons.append(_connect_failure(path, e))
                continue
            if problem := _peer_problem(candidate, self._writer.get_extra_info("socket")):
                self._drop()
                reasons.append(problem)
                continue
            self._path, self._loop = path, asyncio.get_running_loop()
            return
        raise _unreachable(reasons)

    async def _exchange(self, request: bytes) -> bytes:
        assert self._reader is not None and self._writer is not None
        self._writer.write(request)
        try:
            await self._writer.drain()
        except (BrokenPipeError, ConnectionResetError) as e:
            # as ``Client._exchange``: the answer to a line refused before it was all read.
            # A reset makes the reader raise before it gives what it holds, so what it
            # holds is looked at first (StreamReader has no public way to see it)
            held = bytes(getattr(self._reader, "_buffer", b""))
            left = held[:end + 1] if (end := held.find(b"\n")) >= 0 else None
            if left is None:
                try:
                    async with asyncio.timeout(_ANSWER_LEFT_S):
                        left = await self._reader.readuntil(b"\n")
                except (OSError, TimeoutError, asyncio.IncompleteReadError,
                        asyncio.LimitOverrunError):
                    raise e from None
            self._drop()  # closed by the daemon: the next call opens a new connection
            return left
        return await self._reader.readuntil(b"\n")

    def _drop(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            # a stream of an event loop closed since (asyncio.run per call) cannot be
            # closed; it is forgotten all the same, so the next call opens a new one
            with contextlib.suppress(RuntimeError):
                writer.close()

    async def close(self) -> None:
        async with self._lock:
            # a stream of an earlier event loop is only forgotten (``_drop``)
            writer = self._writer if self._loop is asyncio.get_running_loop() else None
            self._drop()
            if writer is not None:
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncClientPool(_AsyncApi):
    """``size`` AsyncClients behind one face, for a web server: up to ``size`` calls at once.

    Each connection serves one call at a time; a call waits for a free one. A
    ``watch`` or ``tail`` takes a connection for each of its long polls only. A web
    server keeps one pool for all its users and hands each request
    ``pool.acting(user)``: the same connections, every call acting for that user.
    """

    def __init__(self, size: int, socket: str | os.PathLike[str] | None = None,
                 as_user: str | None = None, as_admin: bool = False,
                 timeout: float | None = 60.0, *, as_role: str | None = None) -> None:
        if size < 1:
            raise ValueError(f"a pool needs at least one connection (got size={size})")
        super().__init__(socket, as_user, as_admin, timeout, as_role)
        self.size = size
        # the members act for nobody: each call brings the scope of the pool (or view)
        self._members = [AsyncClient(socket, None, False, timeout) for _ in range(size)]
        #: the free members and the event loop they wait in, shared by every view (a
        #: queue belongs to the loop that first waits on it)
        self._idle: dict[str, Any] = {"loop": None, "queue": None}

    def _free(self) -> asyncio.Queue[AsyncClient]:
        """The queue of free members in the running loop: under a new loop (another
        ``asyncio.run``) every member is free again, and reconnects there."""
        loop = asyncio.get_running_loop()
        if self._idle["loop"] is not loop:
            queue: asyncio.Queue[AsyncClient] = asyncio.Queue()
            for member in self._members:
                queue.put_nowait(member)
            self._idle.update(loop=loop, queue=queue)
        free: asyncio.Queue[AsyncClient] = self._idle["queue"]
        return free

    def acting(self, as_user: str | None, *, as_admin: bool = False,
               as_role: str | None = None) -> AsyncClientPool:
        """A view of this pool whose calls act for ``as_user`` (SPEC §3: with
        ``as_admin``, or ``as_role="user"`` for a plain user's rights); it shares the
        connections, so closing either closes both."""
        view = copy.copy(self)
        view.as_user, view.as_admin, view.as_role = as_user, as_admin, as_role
        return view

    @property
    def socket_path(self) -> Path | None:
        return next((m.socket_path for m in self._members if m.socket_path), None)

    async def call(self, method: str, **params: Any) -> Any:
        return await self._send(method, params)

    async def _send(self, method: str, params: dict[str, Any],
                    within: float | None = None) -> Any:
        params, _, _ = self._prepare(method, params)
        free = self._free()
        member = await free.get()
        try:
            return await member._send(method, params, within)
        finally:
            free.put_nowait(member)

    async def close(self) -> None:
        for member in self._members:
            await member.close()

    async def __aenter__(self) -> AsyncClientPool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
