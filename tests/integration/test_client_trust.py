"""The client trusts a socket it found by searching only when it is safe (SPEC §1): its
folder is the caller's own, and the daemon behind it runs as the caller, root or jobd.

A fake daemon that answers every call as ``role: admin`` stands in for what a hostile
user would run; the client must never talk to it."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
from pathlib import Path
from typing import Iterator

import pytest

from conftest import OTHER_UID_PYTHON

from jobd import errors
from jobd.client import Client

FAKE = {"jsonrpc": "2.0", "id": 1,
        "result": {"version": "fake", "uptime_s": 1, "caller": {"uid": 0, "user": "root",
                                                                "role": "admin"}}}


def serve_fake(sock: socket.socket) -> threading.Thread:
    """Answer one connection's lines with the fake ping result, in a thread."""
    def run() -> None:
        try:
            sock.settimeout(10)
            conn, _ = sock.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(json.dumps(FAKE).encode() + b"\n")
        except OSError:  # closed by the test, or never asked: the point was not to be
            return
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``$XDG_RUNTIME_DIR`` for this test, with no JOBD_SOCKET in the way."""
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    monkeypatch.delenv("JOBD_SOCKET", raising=False)
    return runtime


@pytest.fixture
def fake_daemon(runtime: Path) -> Iterator[socket.socket]:
    folder = runtime / "jobd"
    folder.mkdir(mode=0o700)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(folder / "jobd.sock"))
    sock.listen()
    yield sock
    sock.close()


def unreachable_reason(client: Client) -> str:
    with pytest.raises(errors.Unreachable) as caught:
        client.ping()
    return caught.value.message


def test_a_safe_folder_and_own_daemon_are_used(fake_daemon: socket.socket) -> None:
    serve_fake(fake_daemon)
    with Client() as client:
        assert client.ping()["version"] == "fake"  # the check is not in the way of the real one


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o1777])
def test_a_folder_others_may_write_is_skipped(fake_daemon: socket.socket, runtime: Path,
                                              mode: int) -> None:
    (runtime / "jobd").chmod(mode)
    serve_fake(fake_daemon)
    with Client(timeout=2) as client:
        reason = unreachable_reason(client)
    assert f"socket {runtime}/jobd/jobd.sock: skipped, {runtime}/jobd is writable by" in reason


def test_a_symlinked_folder_is_skipped(runtime: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(elsewhere / "jobd.sock"))
    sock.listen()
    (runtime / "jobd").symlink_to(elsewhere)
    serve_fake(sock)
    with Client(timeout=2) as client:
        assert "is a symbolic link, not a folder" in unreachable_reason(client)
    sock.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="handing a folder to another uid needs root")
def test_a_folder_owned_by_someone_else_is_skipped(fake_daemon: socket.socket,
                                                   runtime: Path) -> None:
    os.chown(runtime / "jobd", 65534, 65534)
    serve_fake(fake_daemon)
    with Client(timeout=2) as client:
        assert "is owned by uid 65534, not by uid 0" in unreachable_reason(client)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="a daemon of another uid needs root and setpriv")
def test_a_daemon_running_as_someone_else_is_skipped(runtime: Path) -> None:
    folder = runtime / "jobd"
    folder.mkdir(mode=0o700)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(folder / "jobd.sock"))
    os.chmod(folder / "jobd.sock", 0o666)
    # the peer's credentials are the ones of whoever called listen(): uid 65534 here
    script = ("import json, socket, sys; s = socket.socket(fileno=int(sys.argv[1])); "
              "s.listen(); print('ready', flush=True); c, _ = s.accept(); c.recv(9999); "
              f"c.sendall({json.dumps(json.dumps(FAKE))}.encode() + b'\\n')")
    child = subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                              OTHER_UID_PYTHON, "-S", "-c", script, str(sock.fileno())],
                             pass_fds=(sock.fileno(),), stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline() == "ready\n", child.stderr
    try:
        with Client(timeout=3) as client:
            reason = unreachable_reason(client)
        assert "skipped, the daemon there runs as uid 65534" in reason
    finally:
        child.kill()
        child.wait()
        sock.close()


def test_an_explicit_socket_is_the_callers_choice(runtime: Path, tmp_path: Path) -> None:
    # named by the caller (--socket / JOBD_SOCKET): no folder rule, as with any path given
    open_folder = tmp_path / "shared"
    open_folder.mkdir()
    open_folder.chmod(0o777)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(open_folder / "jobd.sock"))
    sock.listen()
    serve_fake(sock)
    with Client(socket=open_folder / "jobd.sock") as client:
        assert client.ping()["version"] == "fake"
    sock.close()
