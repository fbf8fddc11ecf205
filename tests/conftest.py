"""Shared test fixtures: a real jobd process on a temp socket, and real git repositories."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

#: git identity and isolation for every git the tests (and the daemons they start) run
GIT_ENV = {
    "GIT_AUTHOR_NAME": "Test", "GIT_AUTHOR_EMAIL": "test@example.invalid",
    "GIT_COMMITTER_NAME": "Test", "GIT_COMMITTER_EMAIL": "test@example.invalid",
    "GIT_CONFIG_NOSYSTEM": "1", "GIT_TERMINAL_PROMPT": "0",
}

FAST_CONFIG = """
[execution]
cancel_grace = "1s"
shutdown_grace = "5s"
"""


def git(*args: str, cwd: Path | str) -> str:
    """Run git in ``cwd``; its stdout."""
    env = {**os.environ, **GIT_ENV}
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, text=True,
                          capture_output=True).stdout.strip()


def commit_files(repo: Path, files: dict[str, str | None], message: str = "change") -> str:
    """Write (or, for None, delete) files in ``repo``, commit them; the new revision."""
    for name, content in files.items():
        path = repo / name
        if content is None:
            git("rm", "-q", name, cwd=repo)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)
            git("add", name, cwd=repo)
    git("commit", "-q", "-m", message, cwd=repo)
    return git("rev-parse", "HEAD", cwd=repo)


def make_upstream(path: Path, files: dict[str, str] | None = None) -> Path:
    """A repository with one commit on ``main``."""
    path.mkdir(parents=True)
    git("init", "-q", "-b", "main", cwd=path)
    commit_files(path, files or {"README.md": "hello\n", "src/a.py": "print('a')\n"}, "initial")
    return path


def clone(upstream: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    git("clone", "-q", str(upstream), str(target), cwd=target.parent)
    return target


class Daemon:
    """A real ``jobd`` process on a socket in a temp folder."""

    def __init__(self, root: Path, config: str = FAST_CONFIG,
                 env: dict[str, str] | None = None) -> None:
        self.root = root
        self.state = root / "state"
        # a short path: Unix socket paths are limited to 107 bytes
        self.socket = Path(tempfile.mkdtemp(prefix="jobd-", dir="/tmp")) / "jobd.sock"
        self.db = self.state / "jobd.db"
        self.config = root / "jobd.toml"
        root.mkdir(parents=True, exist_ok=True)
        self.config.write_text(config)
        self.stderr = root / "jobd.stderr"
        self.env = {**os.environ, **GIT_ENV, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def repos(self) -> Path:
        """The default allowed root: ``<state dir>/repos``."""
        return self.state / "repos"

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "jobd", "--config", str(self.config), "--socket",
                str(self.socket), "--db", str(self.db), "--log-format", "json", "serve"]

    def start(self, timeout: float = 15.0) -> "Daemon":
        self.state.mkdir(parents=True, exist_ok=True)
        err = open(self.stderr, "ab")
        self.proc = subprocess.Popen(self.argv(), env=self.env, stdout=err, stderr=err,
                                     stdin=subprocess.DEVNULL)
        err.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jobd exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if self.raw("ping").get("result"):
                    return self
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"jobd did not answer within {timeout}s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send ``sig`` and wait for the exit; the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        return code

    def kill(self) -> None:
        """kill -9: a crash."""
        self.stop(signal.SIGKILL)

    def log(self) -> str:
        return self.stderr.read_text(errors="replace") if self.stderr.exists() else ""

    def log_events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def client(self, **kw: Any) -> Any:
        from jobd.client import Client
        return Client(socket=str(self.socket), **kw)

    def raw(self, method: str, **params: Any) -> dict[str, Any]:
        """One JSON-RPC call on a fresh connection; the whole response object."""
        return self.send({"jsonrpc": "2.0", "id": 1, "method": method, "params": params})

    def send(self, request: Any) -> dict[str, Any]:
        line = request if isinstance(request, (bytes, str)) else json.dumps(request)
        data = line.encode() if isinstance(line, str) else line
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(30)
            s.connect(str(self.socket))
            s.sendall(data if data.endswith(b"\n") else data + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
        return json.loads(buf)


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02,
             what: str = "condition") -> Any:
    """Poll until ``predicate()`` is truthy; its value. Fails the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@pytest.fixture
def make_daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Start daemons (``make_daemon(config=..., env=...)``); all are stopped afterwards."""
    started: list[Daemon] = []

    def make(config: str = FAST_CONFIG, env: dict[str, str] | None = None,
             start: bool = True, root: Path | None = None) -> Daemon:
        d = Daemon(root or tmp_path / f"d{len(started)}", config, env)
        started.append(d)
        return d.start() if start else d

    yield make
    for d in started:
        if d.proc is not None and d.proc.poll() is None:
            d.proc.send_signal(signal.SIGTERM)
            try:
                d.proc.wait(20)
            except subprocess.TimeoutExpired:
                d.proc.kill()
                d.proc.wait()


@pytest.fixture
def daemon(make_daemon: Callable[..., Daemon]) -> Daemon:
    """A running jobd with short grace periods."""
    return make_daemon()
