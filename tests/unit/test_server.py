"""server: a real Server on a real Unix socket, with real clients (SPEC §4 framing, §6)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Coroutine, Iterator

import pytest

from jobd import server
from jobd.config import Config, Server as ServerSection
from jobd.errors import JobdError

REPO = Path(__file__).resolve().parents[2]
NOBODY_UID = 54321   # not the daemon's uid, and no admin or service list names it


def _name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid-{uid}"


def aio(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test in its own event loop, bounded so a hang fails instead of stalling."""
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(fn(*args, **kwargs), 30))
    return run


def error_line(err: JobdError) -> str:
    return json.dumps({"jsonrpc": "2.0", "id": None,
                       "error": {"code": err.code, "message": err.message, "data": err.data()}})


async def echo(data: bytes, conn: server.Connection) -> bytes | None:
    """The stand-in for rpc: 'notify' -> no answer, 'boom' raises, 'sleep N' sleeps first,
    'big N' answers N bytes."""
    line = data.decode(errors="replace")
    caller = conn.caller
    if "notify" in line:
        return None
    if "boom" in line:
        raise RuntimeError("boom")
    if line.startswith("sleep "):
        await asyncio.sleep(float(line.split()[1]))
    if line.startswith("big "):
        await conn.reserve()
        answer = json.dumps({"echo": "x" * int(line.split()[1])}).encode() + b"\n"
        conn.settle(len(answer))
        return answer
    return json.dumps({"echo": line, "user": caller.user, "uid": caller.uid,
                       "role": str(caller.role)}).encode() + b"\n"


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # short on purpose: a Unix socket path must fit in 108 bytes
    d = Path(tempfile.mkdtemp(prefix="jobd-t", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def make_config(d: Path, **limits: Any) -> Config:
    return Config(socket=d / "jobd.sock", db=d / "jobd.db", server=ServerSection(**limits))


@contextlib.asynccontextmanager
async def serving(config: Config, dispatch: server.Dispatch = echo) -> AsyncIterator[server.Server]:
    srv = server.Server(config, dispatch, error_line=error_line)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, path: Path) -> Client:
        return cls(*await asyncio.open_unix_connection(str(path)))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def line(self) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.reader.readline(), 5)
        assert raw.endswith(b"\n"), f"connection closed instead of answering: {raw!r}"
        return json.loads(raw)

    async def closed(self, within: float = 5) -> bool:
        """True once the server has closed the connection (EOF or reset) within ``within``."""
        try:
            rest = await asyncio.wait_for(self.reader.read(), within)
        except ConnectionResetError:
            return True
        except asyncio.TimeoutError:
            return False
        assert rest == b"", f"unexpected data before close: {rest!r}"
        return True

    def close(self) -> None:
        self.writer.close()


async def until(predicate: Callable[[], bool], within: float = 5) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


# -- framing ---------------------------------------------------------------------------------

@aio
async def test_a_request_is_answered_with_the_callers_identity(sock_dir: Path) -> None:
    async with serving(make_config(sock_dir)) as srv:
        c = await Client.open(sock_dir / "jobd.sock")
        await c.send(b'{"id":1}\n')
        # the daemon's own uid is an admin
        assert await c.line() == {"echo": '{"id":1}', "user": pwd.getpwuid(os.getuid()).pw_name,
                                  "uid": os.getuid(), "role": "admin"}
        assert srv.connections == 1
        c.close()
        await until(lambda: srv.connections == 0)


@aio
async def test_pipelined_requests_in_one_write_are_answered_in_order(sock_dir: Path) -> None:
    async with serving(make_config(sock_dir)):
        c = await Client.open(sock_dir / "jobd.sock")
        # a slow first request must not let the fast ones overtake it; notifications get nothing
        await c.send(b"sleep 0.05 a\nb\nnotify c\nd\n\n  \ne\n")
        got = [(await c.line())["echo"] for _ in range(4)]
        assert got == ["sleep 0.05 a", "b", "d", "e"]
        await c.send(b"f\n")
        assert (await c.line())["echo"] == "f"  # nothing was left over for the notification


@aio
async def test_lines_split_across_writes_are_reassembled(sock_dir: Path) -> None:
    async with serving(make_config(sock_dir)):
        c = await Client.open(sock_dir / "jobd.sock")
        payload = '{"name":"café"}\n{"n":2}\n{"n":3}\n'.encode()
        cut = payload.index("é".encode()) + 1  # in the middle of a two-byte character
        for part in (payload[:cut], payload[cut:cut + 9], payload[cut + 9:]):
            await c.send(part)
            await asyncio.sleep(0.01)  # let the server read each part on its own
        assert [(await c.line())["echo"] for _ in range(3)] == [
            '{"name":"café"}', '{"n":2}', '{"n":3}']


@aio
async def test_a_failing_dispatch_answers_internal_error_and_keeps_serving(
        sock_dir: Path) -> None:
    async with serving(make_config(sock_dir)):
        c = await Client.open(sock_dir / "jobd.sock")
        await c.send(b"boom\nafter\n")
        error = await c.line()
        assert error["error"]["code"] == -32603
        assert "Traceback" not in error["error"]["message"]
        assert (await c.line())["echo"] == "after"


@aio
async def test_a_line_of_exactly_the_limit_is_accepted(sock_dir: Path) -> None:
    async with serving(make_config(sock_dir, max_message_bytes=1000)):
        c = await Client.open(sock_dir / "jobd.sock")
        await c.send(b"x" * 1000 + b"\n")
        assert len((await c.line())["echo"]) == 1000


@pytest.mark.parametrize("newline", [False, True], ids=["unfinished", "finished"])
@aio
async def test_a_line_over_the_limit_is_refused_and_the_connection_closed(
        sock_dir: Path, newline: bool) -> None:
    async with serving(make_config(sock_dir, max_message_bytes=1000)) as srv:
        c = await Client.open(sock_dir / "jobd.sock")
        await c.send(b"ok\n")
        assert (await c.line())["echo"] == "ok"
        await c.send(b"y" * 1001 + (b"\n" if newline else b""))
        error = await c.line()
        assert error["error"]["code"] == -32600
        assert "longer than 1000 bytes" in error["error"]["message"]
        assert await c.closed()
        await until(lambda: srv.connections == 0)


@aio
async def test_a_huge_unfinished_line_is_not_buffered_without_bound(sock_dir: Path) -> None:
    async with serving(make_config(sock_dir, max_message_bytes=4096)):
        c = await Client.open(sock_dir / "jobd.sock")
        c.writer.write(b"z" * 5_000_000)  # far more than the limit, never a newline
        error = await c.line()
        assert error["error"]["code"] == -32600
        assert await c.closed()


# -- connection limits -----------------------------------------------------------------------

@aio
async def test_connections_over_max_connections_are_refused(sock_dir: Path) -> None:
    async with serving(make_config(sock_dir, max_connections=2)) as srv:
        path = sock_dir / "jobd.sock"
        first, second = await Client.open(path), await Client.open(path)
        for c in (first, second):
            await c.send(b"hi\n")
            await c.line()
        third = await Client.open(path)
        error = await third.line()
        assert error["error"]["code"] == -32029
        assert "max_connections = 2" in error["error"]["message"]
        assert await third.closed()
        first.close()
        await until(lambda: srv.connections == 1)
        fourth = await Client.open(path)
        await fourth.send(b"again\n")
        assert (await fourth.line())["echo"] == "again"


@aio
async def test_admins_are_not_held_to_the_per_uid_limit(sock_dir: Path) -> None:
    async with serving(make_config(sock_dir, max_connections_per_uid=1)):
        clients = [await Client.open(sock_dir / "jobd.sock") for _ in range(3)]
        for i, c in enumerate(clients):
            await c.send(b"%d\n" % i)
            assert (await c.line())["echo"] == str(i)


# Run as another uid: opens N connections one after the other, keeping each open, and
# prints what each got: its first line and whether the server then closed it.
PER_UID_CLIENT = r"""
import json, socket, sys
path, n = sys.argv[1], int(sys.argv[2])
kept, out = [], []
for i in range(n):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(path)
    kept.append(s)
    try:
        s.sendall(b'{"i":%d}\n' % i)
    except OSError:
        pass  # refused and already closed: the answer is still there to read
    f = s.makefile("rb")
    first = json.loads(f.readline())
    closed = None
    if "error" in first:
        try:
            closed = f.readline() == b""
        except ConnectionResetError:
            closed = True
    out.append({"first": first, "closed": closed})
print(json.dumps(out))
"""


def _as_uid(uid: int, *argv: str) -> list[str]:
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
            "/usr/bin/python3", *argv]


@pytest.mark.root
@aio
async def test_a_plain_user_over_the_per_uid_limit_is_refused(sock_dir: Path) -> None:
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("connecting as another uid needs root and setpriv")
    config = make_config(sock_dir, max_connections_per_uid=2, socket_mode="0666")
    async with serving(config) as srv:
        path = str(sock_dir / "jobd.sock")
        proc = await asyncio.create_subprocess_exec(
            *_as_uid(NOBODY_UID, "-c", PER_UID_CLIENT, path, "3"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        # meanwhile another plain uid has its own allowance
        other = await asyncio.create_subprocess_exec(
            *_as_uid(NOBODY_UID + 1, "-c", PER_UID_CLIENT, path, "2"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = await proc.communicate()
        out2, err2 = await other.communicate()
        assert proc.returncode == 0, err.decode()
        assert other.returncode == 0, err2.decode()
        results = json.loads(out)
        for i in (0, 1):
            assert results[i]["first"]["uid"] == NOBODY_UID
            assert results[i]["first"]["user"] == _name(NOBODY_UID)
            assert results[i]["first"]["role"] == "user"
        refused = results[2]
        assert refused["first"]["error"]["code"] == -32029
        assert "max_connections_per_uid = 2" in refused["first"]["error"]["message"]
        assert refused["closed"] is True
        assert all("echo" in r["first"] for r in json.loads(out2))
        await until(lambda: srv.connections == 0)


# -- timeouts --------------------------------------------------------------------------------

@aio
async def test_an_idle_connection_is_closed(sock_dir: Path) -> None:
    async with serving(make_config(sock_dir, idle_timeout=0.4)) as srv:
        c = await Client.open(sock_dir / "jobd.sock")
        # requests keep it open well past the idle timeout
        for i in range(12):
            await asyncio.sleep(0.05)
            await c.send(b"%d\n" % i)
            await c.line()
        started = time.monotonic()
        assert await c.closed(within=5)
        assert 0.3 < time.monotonic() - started < 3
        await until(lambda: srv.connections == 0)


@aio
async def test_a_request_slower_than_the_idle_timeout_still_gets_its_answer(
        sock_dir: Path) -> None:
    async with serving(make_config(sock_dir, idle_timeout=0.1)):
        c = await Client.open(sock_dir / "jobd.sock")
        await c.send(b"sleep 0.3\n")
        assert (await c.line())["echo"] == "sleep 0.3"


@aio
async def test_an_unfinished_line_is_closed_after_the_line_timeout(sock_dir: Path) -> None:
    async with serving(make_config(sock_dir, line_timeout=0.4, idle_timeout=60)):
        c = await Client.open(sock_dir / "jobd.sock")
        await c.send(b"done\n{\"started\":")
        assert (await c.line())["echo"] == "done"
        started = time.monotonic()
        # a byte now and then does not buy the line more time
        while time.monotonic() - started < 3:
            try:
                await c.send(b"1")
            except ConnectionError:
                break
            if await c.closed(within=0.1):
                break
        assert 0.3 < time.monotonic() - started < 2


# -- the socket file -------------------------------------------------------------------------

@aio
async def test_the_socket_gets_the_configured_mode_and_is_removed_on_stop(
        sock_dir: Path) -> None:
    path = sock_dir / "jobd.sock"
    for mode in ("0600", "0660"):
        async with serving(make_config(sock_dir, socket_mode=mode)):
            st = path.stat()
            assert stat.S_ISSOCK(st.st_mode)
            assert stat.S_IMODE(st.st_mode) == int(mode, 8)
        assert not path.exists()


@aio
async def test_a_missing_parent_directory_is_created_reachable(sock_dir: Path) -> None:
    config = Config(socket=sock_dir / "run" / "jobd" / "jobd.sock", db=sock_dir / "jobd.db")
    old = os.umask(0o077)
    try:
        async with serving(config):
            assert stat.S_IMODE(config.socket.parent.stat().st_mode) == 0o755
    finally:
        os.umask(old)


@aio
async def test_a_stale_socket_file_is_removed(sock_dir: Path) -> None:
    path = sock_dir / "jobd.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # the file stays, nobody listens: what a crashed daemon leaves
    async with serving(make_config(sock_dir)):
        c = await Client.open(path)
        await c.send(b"alive\n")
        assert (await c.line())["echo"] == "alive"


@aio
async def test_a_live_socket_means_already_running(sock_dir: Path) -> None:
    config = make_config(sock_dir)
    async with serving(config):
        second = server.Server(config, echo, error_line=error_line)
        with pytest.raises(server.AlreadyRunning, match="jobd is already running"):
            await second.start()
        c = await Client.open(config.socket)  # the first one is untouched
        await c.send(b"still\n")
        assert (await c.line())["echo"] == "still"
        await second.stop()
        assert config.socket.exists()


@aio
async def test_a_file_that_is_not_a_socket_is_left_alone(sock_dir: Path) -> None:
    config = make_config(sock_dir)
    config.socket.write_text("precious")
    with pytest.raises(FileExistsError, match="not a socket"):
        await server.Server(config, echo, error_line=error_line).start()
    assert config.socket.read_text() == "precious"


@aio
async def test_stop_lets_a_request_in_flight_finish(sock_dir: Path) -> None:
    srv = server.Server(make_config(sock_dir), echo, error_line=error_line)
    await srv.start()
    path = sock_dir / "jobd.sock"
    busy, idle = await Client.open(path), await Client.open(path)
    await idle.send(b"x\n")
    await idle.line()
    await busy.send(b"sleep 0.3\nnever\n")
    await asyncio.sleep(0.05)
    stopping = asyncio.create_task(srv.stop())
    assert await idle.closed(within=1)
    assert (await busy.line())["echo"] == "sleep 0.3"
    assert await busy.closed()  # the pipelined second request is not started
    await stopping
    assert srv.connections == 0
    assert not (sock_dir / "jobd.sock").exists()
    with pytest.raises(OSError):
        await asyncio.open_unix_connection(str(sock_dir / "jobd.sock"))


# -- systemd: socket activation and notify ----------------------------------------------------

ACTIVATED_CHILD = r"""
import asyncio, json, os, signal, sys
from pathlib import Path
from jobd import server
from jobd.config import Config

async def dispatch(line, conn):
    return json.dumps({"listen": [os.environ.get(k) for k in
                                  ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")],
                       "inheritable": os.get_inheritable(3),
                       "user": conn.caller.user}).encode() + b"\n"

async def main():
    config = Config(socket=Path(sys.argv[1]), db=Path(sys.argv[1]).with_name("db"))
    srv = server.Server(config, dispatch, error_line=str)
    await srv.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await srv.stop()

asyncio.run(main())
"""


def test_socket_passed_by_systemd_is_adopted_and_left_in_place(sock_dir: Path) -> None:
    path = sock_dir / "activated.sock"
    unused = sock_dir / "configured.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()
    fd = listener.fileno()
    # what systemd does between fork and exec: the socket onto fd 3, LISTEN_PID = own pid
    launcher = ("import os, sys; fd = int(sys.argv[1]); fd == 3 or (os.dup2(fd, 3), os.close(fd)); "
                "os.environ.update(LISTEN_FDS='1', LISTEN_PID=str(os.getpid()), "
                "LISTEN_FDNAMES='jobd'); os.execv(sys.executable, [sys.executable, *sys.argv[2:]])")
    child = subprocess.Popen(
        [sys.executable, "-c", launcher, str(fd), "-c", ACTIVATED_CHILD, str(unused)],
        pass_fds=(fd,), cwd=REPO, stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    listener.close()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.settimeout(10)
            c.connect(str(path))
            c.sendall(b"hello\n")
            answer = json.loads(c.makefile("rb").readline())
        assert answer["listen"] == [None, None, None]  # not passed on to job processes
        assert answer["inheritable"] is False
        assert not unused.exists()
    finally:
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=10)
    assert child.returncode == 0, err.decode()
    assert path.exists()  # systemd owns it: a restart must find it


@aio
async def test_listen_fds_meant_for_another_process_are_ignored(
        sock_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_PID", str(os.getppid()))
    async with serving(make_config(sock_dir)):
        assert (sock_dir / "jobd.sock").exists()
        assert os.environ["LISTEN_FDS"] == "1"


@pytest.fixture
def notify_socket(sock_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    path = sock_dir / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        s.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield s


def test_notify_sends_the_message_to_notify_socket(notify_socket: socket.socket) -> None:
    assert server.notify("READY=1")
    assert notify_socket.recv(4096) == b"READY=1"
    assert server.notify("STATUS=serving 3 jobs")
    assert notify_socket.recv(4096) == b"STATUS=serving 3 jobs"


def test_notify_reaches_an_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"jobd-test-notify-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        s.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert server.notify("READY=1")
        assert s.recv(4096) == b"READY=1"


def test_notify_without_systemd_is_false(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert server.notify("READY=1") is False


def test_notify_to_a_vanished_socket_is_false(sock_dir: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(sock_dir / "gone"))
    assert server.notify("READY=1") is False


@aio
async def test_watchdog_pings_every_half_interval(notify_socket: socket.socket,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "100000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    notify_socket.setblocking(False)
    loop = asyncio.get_running_loop()
    task = asyncio.create_task(server.watchdog_loop())
    try:
        started = time.monotonic()
        for _ in range(3):
            assert await asyncio.wait_for(loop.sock_recv(notify_socket, 64), 5) == b"WATCHDOG=1"
        assert time.monotonic() - started >= 0.09  # two intervals of 50 ms
    finally:
        task.cancel()


@pytest.mark.parametrize("env", [{"WATCHDOG_USEC": "100000", "WATCHDOG_PID": "1"}, {}],
                         ids=["another-pid", "unset"])
@aio
async def test_watchdog_does_nothing_when_not_asked(env: dict[str, str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    await asyncio.wait_for(server.watchdog_loop(), 1)  # returns at once


# -- answers: flushed before the next line, bounded, a client that does not read --------------

@aio
async def test_no_line_is_read_while_an_answer_is_unsent(sock_dir: Path) -> None:
    seen: list[bytes] = []

    async def recording(data: bytes, conn: server.Connection) -> bytes | None:
        seen.append(data)
        return await echo(data, conn)

    async with serving(make_config(sock_dir), recording):
        reader, writer = await asyncio.open_unix_connection(str(sock_dir / "jobd.sock"),
                                                            limit=1 << 24)
        writer.transport.pause_reading()  # a client that does not read, for now
        writer.write(b"big 4000000\nafter\n")
        await writer.drain()
        await asyncio.sleep(0.3)
        assert seen == [b"big 4000000"]  # "after" waits in the socket, unread
        writer.transport.resume_reading()
        assert len(json.loads(await reader.readline())["echo"]) == 4_000_000
        assert json.loads(await reader.readline())["echo"] == "after"
        assert seen == [b"big 4000000", b"after"]
        writer.close()


@aio
async def test_a_client_that_does_not_read_its_answer_is_closed_after_line_timeout(
        sock_dir: Path) -> None:
    async with serving(make_config(sock_dir, line_timeout=0.5, idle_timeout=60)) as srv:
        reader, writer = await asyncio.open_unix_connection(str(sock_dir / "jobd.sock"))
        writer.transport.pause_reading()
        writer.write(b"big 8000000\n")
        await writer.drain()
        await until(lambda: srv.connections == 1)
        started = time.monotonic()
        await until(lambda: srv.connections == 0, within=5)
        assert 0.4 < time.monotonic() - started < 3
        assert not srv.answers.held  # the unread answer's memory is given back
        writer.close()


@pytest.fixture
def as_service(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every peer is taken for a service (the suite runs as root, an admin)."""
    identify = server.auth.identify

    def service(*args: Any, **kw: Any) -> Any:
        import dataclasses
        return dataclasses.replace(identify(*args, **kw), role=server.Role.SERVICE)
    monkeypatch.setattr(server.auth, "identify", service)


async def _hogs(sock_dir: Path, n: int, size: int) -> list[asyncio.StreamWriter]:
    """``n`` connections that each ask for a big answer and never read it."""
    hogs = []
    for _ in range(n):
        _, writer = await asyncio.open_unix_connection(str(sock_dir / "jobd.sock"))
        writer.transport.pause_reading()
        writer.write(f"big {size}\n".encode())
        hogs.append(writer)
    return hogs


@aio
async def test_one_uid_holds_at_most_two_large_answers_however_many_connections(
        sock_dir: Path) -> None:
    limit = 1_000_000
    async with serving(make_config(sock_dir, max_response_bytes=limit)) as srv:
        hogs = await _hogs(sock_dir, 5, 900_000)
        # two answers built and held (each shrunk to its size), the others wait their turn
        await until(lambda: sum(srv.answers.held.values()) >= 2 * 900_000)
        await asyncio.sleep(0.2)
        assert 2 * 900_000 <= sum(srv.answers.held.values()) <= 2 * limit
        c = await Client.open(sock_dir / "jobd.sock")  # a small answer does not wait
        await c.send(b"quick\n")
        assert (await c.line())["echo"] == "quick"
        for w in hogs:
            w.close()
        await until(lambda: srv.connections == 1)
        assert not srv.answers.held


@aio
async def test_a_service_is_not_held_to_the_answer_memory_of_a_uid(
        sock_dir: Path, as_service: None) -> None:
    # a web server is one uid for all its users: one slow reader must not stall the rest
    limit = 1_000_000
    async with serving(make_config(sock_dir, max_response_bytes=limit)) as srv:
        hogs = await _hogs(sock_dir, 3, 900_000)
        await until(lambda: sum(srv.answers.held.values()) >= 3 * 900_000)
        c = await Client.open(sock_dir / "jobd.sock")
        await c.send(b"big 10\n")  # a big call of the same uid goes through at once
        assert (await asyncio.wait_for(c.line(), 2))["echo"] == "x" * 10
        for w in hogs:
            w.close()
        await until(lambda: srv.connections == 1)


# -- reload ----------------------------------------------------------------------------------

@aio
async def test_reconfigure_applies_new_limits_to_new_lines_and_keeps_the_socket(
        sock_dir: Path) -> None:
    config = make_config(sock_dir, max_message_bytes=1000, socket_mode="0660")
    async with serving(config) as srv:
        c = await Client.open(config.socket)
        await c.send(b"a" * 500 + b"\n")
        assert len((await c.line())["echo"]) == 500
        moved = Config(socket=sock_dir / "elsewhere.sock", db=config.db,
                       server=ServerSection(max_message_bytes=100, socket_mode="0600",
                                            idle_timeout=0.3))
        srv.reconfigure(moved)
        await c.send(b"b" * 500 + b"\n")  # the same connection, a new line: the new limit
        error = await c.line()
        assert error["error"]["code"] == -32600 and "longer than 100 bytes" in error["error"]["message"]
        assert await c.closed()
        idle = await Client.open(config.socket)  # the socket and its mode stay as bound
        assert stat.S_IMODE(config.socket.stat().st_mode) == 0o660
        assert not moved.socket.exists()
        assert await idle.closed(within=3)  # the new idle_timeout
    assert srv.limits.socket_mode == "0660" and srv.limits.max_message_bytes == 100


# -- the per-user socket folder ----------------------------------------------------------------

@pytest.mark.parametrize("problem", ["missing", "0777", "0755", "symlink"])
@aio
async def test_the_per_user_folder_is_made_private_or_refused(
        sock_dir: Path, monkeypatch: pytest.MonkeyPatch, problem: str) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(sock_dir))
    folder = sock_dir / "jobd"
    if problem == "0777":
        folder.mkdir()
        folder.chmod(0o777)
    elif problem == "0755":
        folder.mkdir()
        folder.chmod(0o755)
    elif problem == "symlink":
        (sock_dir / "real").mkdir(mode=0o700)
        folder.symlink_to(sock_dir / "real")
    config = Config(socket=folder / "jobd.sock", db=sock_dir / "jobd.db",
                    server=ServerSection(socket_mode="0666"))
    if problem in ("0777", "symlink"):
        with pytest.raises(OSError, match=f"socket folder {folder} is "):
            await server.Server(config, echo, error_line=error_line).start()
        assert not (sock_dir / "real" / "jobd.sock").exists()
        return
    async with serving(config):
        assert stat.S_IMODE(folder.lstat().st_mode) == 0o700  # one left 0755 too
        assert stat.S_IMODE(config.socket.stat().st_mode) == 0o600  # not socket_mode
