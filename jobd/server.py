"""The asyncio Unix-socket server: framing, connection limits, socket activation, sd_notify.

It owns the listening socket (bound here, or adopted from systemd on fd 3) and every
connection on it: lines in, lines out, in order (SPEC §4). What a line means is not its
business: each complete line goes to ``dispatch`` with its ``Connection`` (the Caller the
kernel vouches for, and the answer memory it may hold), and whatever comes back is
written as one line. A connection is not read while its last answer is unsent, and one
whose client does not read its answers within ``line_timeout`` is closed. Framing errors
and refusals are answered with ``error_line``, which rpc.py provides so that every error
has the same shape.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import dataclasses
import fcntl
import math
import os
import socket
import stat
import struct
import termios
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import structlog

from jobd import auth, state
from jobd.config import Config, _user_socket
from jobd.errors import InternalError, InvalidRequest, JobdError, LimitExceeded
from jobd.models import Role

__all__ = ["AlreadyRunning", "Connection", "Dispatch", "Server", "notify", "watchdog_loop"]

log = structlog.get_logger()

#: one request line (no newline) on its connection -> one answer line (ending in a
#: newline), or None (notifications)
Dispatch = Callable[[bytes, "Connection"], Awaitable[bytes | None]]

_SD_LISTEN_FD = 3
_READ_CHUNK = 65536
_STOP_GRACE_S = 3.0      # how long stop() lets in-flight requests finish
_PROBE_TIMEOUT_S = 1.0   # connect to an existing socket file: does a daemon answer?
_EXEMPT = (Role.ADMIN, Role.SERVICE)
#: answer bytes one uid may have being built or unsent, in max_response_bytes
_ANSWERS_PER_UID = 2
_RECHECK_S = 0.5          # an idle connection with input waiting is looked at again after this
_USER_SOCKET_MODE = 0o600  # in the per-user folder, whatever server.socket_mode says


class AlreadyRunning(Exception):
    """Another jobd answers on the socket."""


class _AnswerMemory:
    """Bytes of answers being built or waiting to be sent, per uid.

    A call that may answer big reserves a whole ``max_response_bytes`` before it is
    built, shrinks that to the answer's size once built, and gives it back when the
    answer has reached the kernel: one user's unread answers hold at most
    ``_ANSWERS_PER_UID`` × ``max_response_bytes``, however many connections they open.
    """

    #: after this many bytes of big answers, the heap is handed back once none is held
    TRIM_AFTER = 32 << 20

    def __init__(self) -> None:
        self.held: collections.Counter[int] = collections.Counter()
        self._waiters: list[asyncio.Future[None]] = []
        self._since_trim = 0

    async def reserve(self, uid: int, nbytes: int, capacity: float) -> None:
        # one reservation always fits, whatever its size: the limit only makes callers wait
        while self.held[uid] and self.held[uid] + nbytes > capacity:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        self.held[uid] += nbytes

    def release(self, uid: int, nbytes: int) -> None:
        if not nbytes:
            return
        self.held[uid] -= nbytes
        if self.held[uid] <= 0:
            del self.held[uid]
        self._since_trim += nbytes
        if not self.held and self._since_trim >= self.TRIM_AFTER:
            # a burst of big answers is over: give its memory back to the system (glibc
            # keeps freed heap otherwise), off the event loop
            self._since_trim = 0
            asyncio.get_running_loop().run_in_executor(None, _trim_heap)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


def _trim_heap() -> None:
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


class Connection:
    """One client connection: its caller, its read deadline, the answer memory it holds.

    A single timer per connection enforces both read timeouts: it is re-armed only when
    it fires early or when a nearer deadline is set, so answering a request costs no
    timer work at all.
    """

    __slots__ = ("transport", "deadline", "reason", "timer", "timed_out", "held",
                 "refusals", "_server", "_caller", "_gid", "_known", "_known_at")

    #: how long a connection's caller (its groups, and so its role) is taken as known
    KNOWN_S = 60.0

    def __init__(self, server: Server, caller: auth.Caller, gid: int,
                 transport: asyncio.BaseTransport) -> None:
        self._server = server
        self._caller = caller
        self._gid = gid
        self._known = server.config  # the config the caller was identified under
        self._known_at = time.monotonic()
        self.transport = transport
        self.deadline: float | None = None   # None while a request is being answered
        self.reason = ""
        self.timer: asyncio.TimerHandle | None = None
        self.timed_out = ""
        self.held = 0        # bytes reserved in the server's answer memory
        self.refusals = 0    # hostile lines refused so far

    @property
    def caller(self) -> auth.Caller:
        """Who calls, as of now: identified again once a reload changed the config (an
        admin removed from ``auth.admins``) or KNOWN_S after the last time (a user's groups
        changed), so a role is decided per call (SPEC §1), not kept for as long as the
        connection stays open."""
        caller, config = self._caller, self._server.config
        if config is not self._known or time.monotonic() - self._known_at > self.KNOWN_S:
            try:
                caller = auth.identify(caller.uid, self._gid, caller.pid, config)
            except OSError:  # the password or group database is unreadable: as it was
                pass
            else:
                if caller.role is not self._caller.role:
                    log.info("caller_role_changed", user=caller.user, uid=caller.uid,
                             role=str(caller.role), was=str(self._caller.role))
                self._caller = caller
            self._known, self._known_at = config, time.monotonic()
        return caller

    @property
    def max_response_bytes(self) -> int:
        return self._server.limits.max_response_bytes

    async def reserve(self) -> None:
        """Hold room for one answer of up to ``max_response_bytes`` before building it.

        A service is not held back: a web server is one uid for all its users, and one of
        them reading slowly must not stall every other user's lists (it reads its answers
        at once, and forwards them itself).
        """
        limit = self.max_response_bytes
        capacity = math.inf if self.caller.role is Role.SERVICE else limit * _ANSWERS_PER_UID
        await self._server.answers.reserve(self.caller.uid, limit, capacity)
        self.held += limit

    def settle(self, nbytes: int) -> None:
        """The answer is built: hold only its ``nbytes`` until it is sent."""
        if self.held > nbytes:
            self._server.answers.release(self.caller.uid, self.held - nbytes)
            self.held = nbytes

    def release(self) -> None:
        self._server.answers.release(self.caller.uid, self.held)
        self.held = 0

    def refused(self, reason: str, **details: Any) -> None:
        """Log a hostile line: the first one per connection at info, later ones at debug."""
        self.refusals += 1
        emit = log.info if self.refusals == 1 else log.debug
        emit("request_refused", user=self.caller.user, uid=self.caller.uid, reason=reason,
             refusals=self.refusals, **details)

    def wait_until(self, loop: asyncio.AbstractEventLoop, deadline: float, reason: str) -> None:
        self.deadline, self.reason = deadline, reason
        if self.timer is None or deadline < self.timer.when():
            if self.timer is not None:
                self.timer.cancel()
            self.timer = loop.call_at(deadline, self._expire, loop)

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        self.timer = None
        if self.deadline is None:
            return  # busy answering; the next wait re-arms
        if loop.time() < self.deadline:
            self.timer = loop.call_at(self.deadline, self._expire, loop)
            return
        if self.reason == "idle_timeout" and _pending_input(self.transport):
            # a request came in while the daemon could not run (SIGSTOP, a long pause):
            # it is read, not dropped
            self.timer = loop.call_at(loop.time() + _RECHECK_S, self._expire, loop)
            return
        # data read in this same loop turn wakes the reading task on the next one:
        # close only if it is still waiting then
        loop.call_soon(self._close_if_waiting, loop)

    def _close_if_waiting(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.deadline is not None and loop.time() >= self.deadline:
            self.timed_out = self.reason
            self.transport.close()

    def cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


def _pending_input(transport: asyncio.BaseTransport) -> bool:
    """Bytes wait in the kernel to be read on this connection."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return False
    try:
        waiting = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    except OSError:
        return False
    return struct.unpack("i", waiting)[0] > 0


class Server:
    """The listening socket and its connections."""

    def __init__(self, config: Config, dispatch: Dispatch, *,
                 error_line: Callable[[JobdError], str]) -> None:
        self._config = config
        self._dispatch = dispatch
        self._error_line = error_line
        self._server: asyncio.AbstractServer | None = None
        self._conns: dict[asyncio.Task[None], Connection] = {}
        self._per_uid: collections.Counter[int] = collections.Counter()
        self._stopping = False
        self.answers = _AnswerMemory()
        # (path, inode) of the socket file we bound; None when systemd owns it
        self._bound: tuple[Path, int] | None = None

    @property
    def connections(self) -> int:
        return len(self._conns)

    @property
    def limits(self) -> Any:
        """The ``[server]`` section in force (a reload may change it)."""
        return self._config.server

    @property
    def config(self) -> Config:
        """The config in force (a reload replaces it): whom ``[auth]`` lists."""
        return self._config

    def reconfigure(self, config: Config) -> None:
        """Use ``config``'s ``[server]`` limits and timeouts for new connections and lines.

        The socket path and its mode stay as they were bound: only a restart changes them.
        """
        self._config = dataclasses.replace(
            config, socket=self._config.socket,
            server=dataclasses.replace(config.server,
                                       socket_mode=self._config.server.socket_mode))

    async def start(self, *, accept: bool = True) -> None:
        """Listen: on the socket systemd passed in, else on ``config.socket``.

        With ``accept=False`` connections wait in the backlog until ``accept()``.
        """
        sock = _adopt()
        if sock is not None:
            log.info("socket_adopted", socket=sock.getsockname() or "(unnamed)")
        else:
            sock = self._bind()
        # bound (a second daemon sees "already running"), but no call is taken before
        # accept(): the store and the recovery of a crash come first
        self._server = await asyncio.start_unix_server(
            self._serve, sock=sock, limit=_READ_CHUNK, backlog=socket.SOMAXCONN,
            start_serving=False)
        if accept:
            await self.accept()

    async def accept(self) -> None:
        """Start answering connections (they waited in the backlog until now)."""
        assert self._server is not None
        await self._server.start_serving()

    def _bind(self) -> socket.socket:
        path = self._config.socket
        folder = _user_folder_of(path)
        if folder is not None:
            _trusted_user_folder(folder)
            mode = _USER_SOCKET_MODE
        else:
            if not path.parent.is_dir():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.parent.chmod(0o755)  # whatever the umask: clients must reach the socket
            mode = int(self._config.server.socket_mode, 8)
        _remove_stale(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(path))
            # before listen(): nobody can connect while the mode is still the umask's
            path.chmod(mode)
            self._bound = (path, path.stat().st_ino)
        except OSError as e:
            sock.close()
            why = f"cannot listen on {path}: {e.strerror or e}"
            raise (OSError(e.errno, why) if e.errno is not None else OSError(why)) from None
        log.info("socket_bound", socket=str(path), mode=f"{mode:04o}")
        return sock

    async def stop(self) -> None:
        """Stop accepting, let requests being answered finish, close every connection."""
        if self._server is None:
            return
        self._stopping = True
        self._server.close()
        for conn in self._conns.values():
            if conn.deadline is not None:  # waiting for a request, not answering one
                conn.transport.close()
        tasks = set(self._conns)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=_STOP_GRACE_S)
            for task in pending:
                task.cancel()
            if pending:
                log.warning("requests_abandoned", count=len(pending))
                await asyncio.wait(pending)
        await self._server.wait_closed()
        self._server = None
        if self._bound is not None:
            path, inode = self._bound
            try:
                if path.stat().st_ino == inode:  # not a file some later daemon bound
                    path.unlink()
            except FileNotFoundError:
                pass
            self._bound = None
        log.info("server_stopped")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        transport = writer.transport
        limits = self.limits
        if self._stopping:
            transport.close()
            return
        if len(self._conns) >= limits.max_connections:
            log.warning("connection_refused", limit="max_connections",
                        connections=len(self._conns))
            self._refuse(writer, LimitExceeded(
                f"jobd already serves {len(self._conns)} connections "
                f"(server.max_connections = {limits.max_connections}); try again later"))
            return
        try:
            pid, uid, gid = auth.peer_credentials(writer.get_extra_info("socket"))
            caller = auth.identify(uid, gid, pid, self._config)
        except OSError as e:  # the peer went away before we looked
            log.debug("connection_lost_early", error=str(e))
            transport.close()
            return
        exempt = caller.role in _EXEMPT
        if not exempt and self._per_uid[uid] >= limits.max_connections_per_uid:
            log.info("connection_refused", limit="max_connections_per_uid", user=caller.user,
                     uid=uid, connections=self._per_uid[uid])
            self._refuse(writer, LimitExceeded(
                f"{caller.user} already has {self._per_uid[uid]} connections to jobd "
                f"(server.max_connections_per_uid = {limits.max_connections_per_uid}); "
                "close some, or reuse one"))
            return

        task = asyncio.current_task()
        assert task is not None
        conn = Connection(self, caller, gid, transport)
        self._conns[task] = conn
        if not exempt:
            self._per_uid[uid] += 1
        # drain() then waits until an answer has wholly reached the kernel
        transport.set_write_buffer_limits(high=0)  # type: ignore[attr-defined]
        log.debug("connection_opened", user=caller.user, uid=uid, pid=pid, role=str(caller.role))
        try:
            reason = await self._lines(conn, reader, writer)
        except asyncio.CancelledError:
            # finish normally: asyncio's stream callback logs a cancelled task as an error
            reason = "cancelled by shutdown"
        except ConnectionError as e:
            reason = f"connection error: {e}"
        except Exception:
            log.exception("connection_failed", user=caller.user, pid=pid)
            reason = "internal error"
        finally:
            conn.cancel_timer()
            conn.release()
            del self._conns[task]
            if not exempt:
                self._per_uid[uid] -= 1
                if not self._per_uid[uid]:
                    del self._per_uid[uid]
            if conn.timed_out == "answer_unread":
                transport.abort()  # drop the unread answer now, not when the client reads
            else:
                transport.close()
            if conn.timed_out:
                log.info("connection_timed_out", user=caller.user, pid=pid, timeout=conn.timed_out)
            else:
                log.debug("connection_closed", user=caller.user, pid=pid, reason=reason)

    def _refuse(self, writer: asyncio.StreamWriter, error: JobdError) -> None:
        writer.write((self._error_line(error) + "\n").encode())
        writer.close()

    async def _lines(self, conn: Connection, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> str:
        """Answer request lines until EOF, a framing error, a timeout or shutdown."""
        loop = asyncio.get_running_loop()
        tail = bytearray()        # the start of a line whose newline has not arrived yet
        line_started = 0.0
        while not self._stopping:
            limits = self.limits
            if tail and limits.line_timeout is not None:
                conn.wait_until(loop, line_started + limits.line_timeout, "line_timeout")
            elif not tail and limits.idle_timeout is not None:
                conn.wait_until(loop, loop.time() + limits.idle_timeout, "idle_timeout")
            chunk = await reader.read(_READ_CHUNK)
            if not chunk:
                return "eof"
            conn.deadline = None
            arrived = loop.time()
            max_bytes = self.limits.max_message_bytes  # a reload meanwhile counts
            if tail:
                tail += chunk
                data: bytes | bytearray = tail
            else:
                data = chunk
            start = 0
            while (nl := data.find(b"\n", start)) >= 0:
                if writer.transport.is_closing():
                    # an answer could not be written: the client is gone, and the lines
                    # it left are not run for no one (a client that only stopped
                    # sending, half-closed, still gets every answer)
                    return "client gone"
                if nl - start > max_bytes:
                    break
                line = bytes(data[start:nl])
                start = nl + 1
                if line and not line.isspace():
                    answer = await self._answer(line, conn)
                    if answer is not None and not await self._send(conn, writer, answer):
                        return "answer unread"
                    conn.release()
                if self._stopping:
                    return "shutdown"
            if len(data) - start > max_bytes:
                conn.refused("line too long", max_message_bytes=max_bytes)
                writer.write((self._error_line(InvalidRequest(
                    f"request line longer than {max_bytes} bytes "
                    "(server.max_message_bytes); send smaller requests")) + "\n").encode())
                return "line too long"
            # what is left is the start of the next line; it began in this chunk unless it
            # is the old tail still waiting for its newline
            if data is tail:
                if start:
                    del tail[:start]
                    line_started = arrived
            else:
                tail = bytearray(data[start:])
                line_started = arrived
        return "shutdown"

    async def _send(self, conn: Connection, writer: asyncio.StreamWriter, answer: bytes) -> bool:
        """Write one answer and wait until it has reached the kernel; False if it never did."""
        writer.write(answer)
        if writer.transport.get_write_buffer_size():
            # nothing more is read or answered on this connection until the client
            # reads this answer
            try:
                await asyncio.wait_for(writer.drain(), self.limits.line_timeout)
            except asyncio.TimeoutError:
                conn.timed_out = "answer_unread"
                return False
        return True

    async def _answer(self, line: bytes, conn: Connection) -> bytes | None:
        try:
            return await self._dispatch(line, conn)
        except Exception:
            log.exception("request_failed", user=conn.caller.user)
            return (self._error_line(InternalError()) + "\n").encode()


def _user_folders() -> set[Path]:
    """The per-user socket folders (SPEC §1): ``$XDG_RUNTIME_DIR/jobd``, ``/tmp/jobd-$UID``."""
    return {_user_socket(os.environ).parent, _user_socket({}).parent}


def _user_folder_of(path: Path) -> Path | None:
    """The per-user socket folder ``path`` is in, however it is spelt (``//tmp/…``,
    ``/tmp/../tmp/…``, through a symbolic link to it): None if it is in none. A per-user
    folder that is itself a link is one (``_trusted_user_folder`` refuses it), but is
    never followed: another user's link there cannot claim an operator's folder."""
    spelt = _lexical(path.parent)
    real = os.path.realpath(path.parent)
    return next((f for f in _user_folders()
                 if _lexical(f) == spelt
                 or os.path.join(os.path.realpath(f.parent), f.name) == real), None)


def _lexical(path: Path) -> str:
    """``path`` with ``.``, ``..`` and repeated slashes (a leading ``//`` too) resolved as
    text, no link followed."""
    return "/" + os.path.normpath(path).lstrip("/")


def _trusted_user_folder(folder: Path) -> None:
    """Make the per-user socket folder 0700, or refuse one that someone else could control."""
    try:
        os.mkdir(folder, 0o700)
        os.chmod(folder, 0o700)  # whatever the umask
        return
    except FileExistsError:
        pass
    except FileNotFoundError:
        raise OSError(f"socket folder {folder}: {folder.parent} does not exist (is "
                      "XDG_RUNTIME_DIR right?); choose another socket path (--socket)") from None
    problem = state.private_dir_problem(folder, os.geteuid())
    if problem is not None:
        raise OSError(f"socket folder {folder} {problem}: jobd binds only in a per-user "
                      "folder that is its own; remove it (jobd makes it 0700) or choose "
                      "another socket path (--socket)")
    os.chmod(folder, 0o700)  # its own, and no wider (one left 0755)


def _adopt() -> socket.socket | None:
    """The listening socket systemd passed on fd 3, if it was meant for this process."""
    fds, pid = os.environ.get("LISTEN_FDS"), os.environ.get("LISTEN_PID")
    if fds is None or pid != str(os.getpid()):
        return None
    for name in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    if fds != "1":
        raise OSError(f"systemd passed LISTEN_FDS={fds} sockets; jobd takes exactly one "
                      "(one ListenStream= in jobd.socket)")
    os.set_inheritable(_SD_LISTEN_FD, False)  # job subprocesses must never hold it
    sock = socket.socket(fileno=_SD_LISTEN_FD)
    if (sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM
            or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)):
        sock.detach()
        raise OSError("the socket systemd passed on fd 3 is not a listening Unix stream "
                      "socket; use ListenStream=/path in jobd.socket")
    sock.setblocking(False)
    return sock


def _remove_stale(path: Path) -> None:
    """Remove a socket file no daemon answers on; refuse if one does."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(f"{path} exists and is not a socket; remove it or choose "
                              "another socket path (--socket)")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(_PROBE_TIMEOUT_S)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        pass
    except PermissionError:
        raise OSError(f"{path} is a socket jobd may not connect to (permission denied): "
                      "another user's daemon, or a file of theirs; remove it or choose "
                      "another socket path (--socket)") from None
    except (BlockingIOError, TimeoutError):  # a backlog so full it cannot accept: alive
        raise AlreadyRunning(f"{path}: jobd is already running (and busy); "
                             "stop it first or choose another socket path") from None
    else:
        raise AlreadyRunning(f"{path}: jobd is already running; stop it first "
                             "(systemctl stop jobd) or choose another socket path")
    finally:
        probe.close()
    path.unlink(missing_ok=True)
    log.info("stale_socket_removed", socket=str(path))


def notify(message: str) -> bool:
    """Send one sd_notify datagram (``READY=1``, ``STATUS=...``) to ``$NOTIFY_SOCKET``.

    False when there is no notify socket (not started by systemd) or the send failed.
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message.encode(), address)
    except OSError as e:
        log.warning("notify_failed", notify_socket=os.environ.get("NOTIFY_SOCKET"),
                    message=message, error=str(e))
        return False
    return True


async def watchdog_loop() -> None:
    """Tell systemd we are alive every half ``WATCHDOG_USEC``; return at once without one."""
    usec, pid = os.environ.get("WATCHDOG_USEC"), os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return
    try:
        interval = int(usec) / 2_000_000
    except ValueError:
        log.warning("watchdog_ignored", watchdog_usec=usec, reason="not an integer")
        return
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)
