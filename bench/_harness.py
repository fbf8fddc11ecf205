"""What the benchmarks share: a jobd launcher, a cheap NDJSON client, the echo reference.

The client is kept as thin as a client can be (prebuilt request bytes, a blocking socket,
one ``recv`` per answer, or one ``selectors`` loop for many connections) so that the
figures measure the daemon rather than the client. Both run on the same two cores as the
daemon; that is part of every figure.
"""

from __future__ import annotations

import json
import math
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["BenchError", "Conn", "Jobd", "Row", "cpu_seconds", "drive", "EchoServer",
           "fsync_latency", "iso_us", "machine", "pct", "print_table", "request", "workdir"]

ROOT = Path(__file__).resolve().parent.parent

# A bare asyncio NDJSON server: every line comes straight back. What the daemon adds on
# top of it (parsing, auth, the method, the store) is what the ratios show.
_ECHO = """
import asyncio, sys

async def serve(reader, writer):
    while line := await reader.readline():
        writer.write(line)
        await writer.drain()

async def main():
    server = await asyncio.start_unix_server(serve, path=sys.argv[1], limit=1 << 20)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()

asyncio.run(main())
"""


class BenchError(Exception):
    """The benchmark cannot go on; the message says why."""


def workdir(keep: bool) -> Path:
    """A fresh folder under /tmp (short: Unix socket paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="jobd-bench-", dir="/tmp"))
    if not keep:
        import atexit
        atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


class Conn:
    """One blocking connection; one call in flight."""

    def __init__(self, path: Path | str, timeout: float = 70.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self._next_id = 0

    def close(self) -> None:
        self.sock.close()

    def roundtrip(self, data: bytes) -> bytes:
        """Send one request line, return the one answer line."""
        self.sock.sendall(data)
        buf = self.sock.recv(1 << 20)
        while not buf.endswith(b"\n"):
            more = self.sock.recv(1 << 20)
            if not more:
                raise BenchError("the server closed the connection mid-answer")
            buf += more
        return buf

    def call(self, method: str, **params: Any) -> Any:
        """A JSON-RPC call; its result, or BenchError with the server's error."""
        self._next_id += 1
        line = request(method, params, self._next_id)
        answer = json.loads(self.roundtrip(line))
        if "error" in answer:
            raise BenchError(f"{method} refused: {answer['error']}")
        return answer["result"]


def request(method: str, params: dict[str, Any], ident: int = 1) -> bytes:
    return (json.dumps({"jsonrpc": "2.0", "id": ident, "method": method, "params": params},
                       separators=(",", ":")) + "\n").encode()


class Jobd:
    """A real ``python -m jobd serve`` on its own socket, database and config."""

    def __init__(self, root: Path, config: str) -> None:
        self.root = root
        self.socket = root / "jobd.sock"
        self.db = root / "state" / "jobd.db"
        self.config = root / "jobd.toml"
        self.stderr = root / "jobd.log"
        self.config.write_text(config)
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_s = 0.0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 120.0) -> "Jobd":
        """Start the daemon; return once it answers ``ping``."""
        self.db.parent.mkdir(parents=True, exist_ok=True)
        # this checkout's code, whatever else the interpreter has installed
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
        argv = [sys.executable, "-m", "jobd", "--config", str(self.config), "--socket",
                str(self.socket), "--db", str(self.db), "--log-format", "json", "serve"]
        with open(self.stderr, "ab") as err:
            started = time.perf_counter()
            self.proc = subprocess.Popen(argv, env=env, stdout=err, stderr=err,
                                         stdin=subprocess.DEVNULL, cwd=self.root)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"jobd exited with {self.proc.returncode}; its log:\n"
                                 f"{self.log_tail()}")
            try:
                conn = Conn(self.socket, timeout=5)
                try:
                    conn.call("ping")
                finally:
                    conn.close()
                self.startup_s = time.perf_counter() - started
                return self
            except OSError:
                time.sleep(0.005)
        raise BenchError(f"jobd did not answer within {timeout:g}s; its log:\n{self.log_tail()}")

    def connect(self) -> Conn:
        return Conn(self.socket)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def log_tail(self, lines: int = 30) -> str:
        if not self.stderr.exists():
            return ""
        return "\n".join(self.stderr.read_text(errors="replace").splitlines()[-lines:])


class EchoServer:
    """The reference: a bare asyncio NDJSON echo server in its own process."""

    def __init__(self, root: Path) -> None:
        self.socket = root / "echo.sock"
        self.proc = subprocess.Popen([sys.executable, "-c", _ECHO, str(self.socket)],
                                     stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def __enter__(self) -> "EchoServer":
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != b"ready":
            raise BenchError("the echo server did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait()


def drive(path: Path | str, make: Callable[[int, int], bytes], *, connections: int,
          duration: float | None = None, total: int | None = None) -> tuple[int, float, list[str]]:
    """Keep one request in flight on each of ``connections`` connections.

    ``make(connection, n)`` builds the n-th request of a connection. Runs for ``duration``
    seconds or until ``total`` answers came back (whichever is given). Returns (answers,
    seconds, the first few error answers).
    """
    sel = selectors.DefaultSelector()
    socks, bufs, sent = [], {}, {}
    for c in range(connections):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(path))
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, c)
        socks.append(s)
        bufs[c], sent[c] = b"", 0
    done, issued = 0, 0
    errors: list[str] = []
    started = time.perf_counter()
    end = started + duration if duration is not None else float("inf")
    for c, s in enumerate(socks):
        if total is None or issued < total:
            s.sendall(make(c, 0))
            sent[c], issued = 1, issued + 1
    in_flight = issued
    while in_flight:
        for key, _ in sel.select(1.0):
            c, conn = key.data, socks[key.data]
            data = conn.recv(1 << 20)
            if not data:
                raise BenchError("the server closed a connection")
            buf = bufs[c] + data
            if not buf.endswith(b"\n"):
                bufs[c] = buf
                continue
            bufs[c] = b""
            in_flight -= 1
            done += 1
            if b'"error":{' in buf and len(errors) < 5:
                errors.append(buf.decode(errors="replace")[:300])
            if time.perf_counter() < end and (total is None or issued < total):
                conn.sendall(make(c, sent[c]))
                sent[c] += 1
                issued += 1
                in_flight += 1
    elapsed = time.perf_counter() - started
    for s in socks:
        sel.unregister(s)
        s.close()
    return done, elapsed, errors


def fsync_latency(folder: Path, n: int = 200) -> list[float]:
    """Seconds per ``fdatasync`` of a fresh 4 KiB write in ``folder`` (what a commit waits for)."""
    path = folder / "fsync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    out = []
    try:
        for i in range(n):
            os.pwrite(fd, os.urandom(4096), (i % 64) * 4096)
            t = time.perf_counter()
            os.fdatasync(fd)
            out.append(time.perf_counter() - t)
    finally:
        os.close(fd)
        path.unlink()
    return out


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process (all its threads) has used so far."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine() -> str:
    """CPUs and load average: the figures depend on both (other work on the machine counts)."""
    one, five, _ = os.getloadavg()
    return f"{os.cpu_count()} CPUs, load average {one:.1f} (1 min) {five:.1f} (5 min)"


def us(seconds: float) -> str:
    return f"{seconds * 1e6:,.0f} µs"


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.1f} ms"


def pct(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (nearest rank)."""
    ordered = sorted(samples)
    if not ordered:
        return float("nan")
    rank = min(len(ordered), max(1, math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


def iso_us(text: str) -> int:
    """``2026-11-22T10:00:00.123456Z`` -> microseconds since the epoch."""
    from datetime import datetime
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1_000_000)


class Row:
    """One line of the table: a figure, what was measured, the goal, the reference."""

    def __init__(self, figure: str, measured: str, goal: str = "", reference: str = "",
                 met: bool | None = None) -> None:
        self.cells = (figure, measured, goal, reference,
                      "" if met is None else "yes" if met else "NO")


def print_table(title: str, rows: Sequence[Row]) -> None:
    header = ("figure", "measured", "goal", "reference (same run)", "met")
    table = [header, *(r.cells for r in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    print(f"\n{title}")
    for n, line in enumerate(table):
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))
