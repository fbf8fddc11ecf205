"""The asyncio Unix-socket server: framing, connection limits, socket activation, sd_notify.

It owns the listening socket (bound here, or adopted from systemd on fd 3) and every
connection on it: lines in, lines out, in order (SPEC §4). What a line means is not its
business: each complete line goes to ``dispatch`` with the Caller the kernel vouches for,
and whatever comes back is written as one line. Framing errors and refusals are answered
with ``error_line``, which rpc.py provides so that every error has the same shape.
"""

from __future__ import annotations

import asyncio
import collections
import os
import socket
import stat
from pathlib import Path
from typing import Awaitable, Callable

import structlog

from jobd import auth
from jobd.config import Config
from jobd.errors import InternalError, InvalidRequest, JobdError, LimitExceeded, ParseError
from jobd.models import Role

__all__ = ["AlreadyRunning", "Dispatch", "Server", "notify", "watchdog_loop"]

log = structlog.get_logger()

#: one request line (no newline) and its caller -> one response line (no newline), or None
Dispatch = Callable[[str, auth.Caller], Awaitable[str | None]]

_SD_LISTEN_FD = 3
_READ_CHUNK = 65536
_STOP_GRACE_S = 3.0      # how long stop() lets in-flight requests finish
_PROBE_TIMEOUT_S = 1.0   # connect to an existing socket file: does a daemon answer?
_EXEMPT = (Role.ADMIN, Role.SERVICE)


class AlreadyRunning(Exception):
    """Another jobd answers on the socket."""


class _Conn:
    """One client connection and its read deadline.

    A single timer per connection enforces both timeouts: it is re-armed only when it
    fires early or when a nearer deadline is set, so answering a request costs no timer
    work at all.
    """

    __slots__ = ("caller", "transport", "deadline", "reason", "timer", "timed_out")

    def __init__(self, caller: auth.Caller, transport: asyncio.BaseTransport) -> None:
        self.caller = caller
        self.transport = transport
        self.deadline: float | None = None   # None while a request is being answered
        self.reason = ""
        self.timer: asyncio.TimerHandle | None = None
        self.timed_out = ""

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
        self.timed_out = self.reason
        self.transport.close()

    def cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class Server:
    """The listening socket and its connections."""

    def __init__(self, config: Config, dispatch: Dispatch, *,
                 error_line: Callable[[JobdError], str]) -> None:
        self._config = config
        self._dispatch = dispatch
        self._error_line = error_line
        self._server: asyncio.AbstractServer | None = None
        self._conns: dict[asyncio.Task[None], _Conn] = {}
        self._per_uid: collections.Counter[int] = collections.Counter()
        self._stopping = False
        # (path, inode) of the socket file we bound; None when systemd owns it
        self._bound: tuple[Path, int] | None = None

    @property
    def connections(self) -> int:
        return len(self._conns)

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
        if not path.parent.is_dir():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.parent.chmod(0o755)  # whatever the umask: clients must reach the socket
        _remove_stale(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(path))
            # before listen(): nobody can connect while the mode is still the umask's
            path.chmod(int(self._config.server.socket_mode, 8))
            self._bound = (path, path.stat().st_ino)
        except OSError as e:
            sock.close()
            raise OSError(e.errno, f"cannot listen on {path}: {e.strerror or e}") from None
        log.info("socket_bound", socket=str(path), mode=self._config.server.socket_mode)
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
        limits = self._config.server
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
        conn = _Conn(caller, transport)
        self._conns[task] = conn
        if not exempt:
            self._per_uid[uid] += 1
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
            del self._conns[task]
            if not exempt:
                self._per_uid[uid] -= 1
                if not self._per_uid[uid]:
                    del self._per_uid[uid]
            transport.close()
            if conn.timed_out:
                log.info("connection_timed_out", user=caller.user, pid=pid, timeout=conn.timed_out)
            else:
                log.debug("connection_closed", user=caller.user, pid=pid, reason=reason)

    def _refuse(self, writer: asyncio.StreamWriter, error: JobdError) -> None:
        writer.write((self._error_line(error) + "\n").encode())
        writer.close()

    async def _lines(self, conn: _Conn, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> str:
        """Answer request lines until EOF, a framing error, a timeout or shutdown."""
        loop = asyncio.get_running_loop()
        limits = self._config.server
        max_bytes = limits.max_message_bytes
        transport = writer.transport
        caller = conn.caller
        tail = bytearray()        # the start of a line whose newline has not arrived yet
        line_started = 0.0
        while not self._stopping:
            if tail:
                conn.wait_until(loop, line_started + limits.line_timeout, "line_timeout")
            else:
                conn.wait_until(loop, loop.time() + limits.idle_timeout, "idle_timeout")
            chunk = await reader.read(_READ_CHUNK)
            if not chunk:
                return "eof"
            conn.deadline = None
            arrived = loop.time()
            if tail:
                tail += chunk
                data: bytes | bytearray = tail
            else:
                data = chunk
            start = 0
            while (nl := data.find(b"\n", start)) >= 0:
                if nl - start > max_bytes:
                    break
                line = data[start:nl]
                start = nl + 1
                if line and not line.isspace():
                    response = await self._answer(line, caller)
                    if response is not None:
                        writer.write((response + "\n").encode())
                        if transport.get_write_buffer_size():
                            await writer.drain()  # the client reads slower than we answer
                if self._stopping:
                    return "shutdown"
            if len(data) - start > max_bytes:
                log.info("request_refused", user=caller.user, reason="line too long",
                         max_message_bytes=max_bytes)
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

    async def _answer(self, line: bytes | bytearray, caller: auth.Caller) -> str | None:
        try:
            text = line.decode()
        except UnicodeDecodeError as e:
            return self._error_line(ParseError(
                f"request is not valid UTF-8 (byte {e.start}); send JSON encoded as UTF-8"))
        try:
            return await self._dispatch(text, caller)
        except Exception:
            log.exception("request_failed", user=caller.user)
            return self._error_line(InternalError())


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
