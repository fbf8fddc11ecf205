"""What the HTTP tests share: the check that the ``http`` extra is installed, a real
uvicorn on a loopback port in a thread, the web login the router is mounted behind, a
real ``jobd-http`` process, and a jobd configured for the web (a slow CIDX-like indexer,
a step-by-step program type).

Without FastAPI, uvicorn, PyJWT or httpx the HTTP tests skip, unless
``JOBD_REQUIRE_HTTP=1`` (CI sets it) makes the missing extra a failure.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

_MISSING = [m for m in ("fastapi", "uvicorn", "jwt", "httpx") if importlib.util.find_spec(m) is None]
if _MISSING:
    _WHY = (f"{', '.join(_MISSING)} not installed: pip install -e '.[test,http]' "
            "for the HTTP tests")
    if os.environ.get("JOBD_REQUIRE_HTTP") == "1":
        pytest.fail(f"JOBD_REQUIRE_HTTP=1 but {_WHY}", pytrace=False)
    pytest.skip(_WHY, allow_module_level=True)

import httpx  # noqa: E402
import uvicorn  # noqa: E402
from fastapi import FastAPI, Header, HTTPException  # noqa: E402

import jobd.http  # noqa: E402

TESTS = Path(__file__).resolve().parent.parent
FAKE_CIDX = TESTS / "fake_cidx_index.py"
STEPS = Path(__file__).resolve().parent / "steps.py"

#: a jobd for the web: a CIDX-like two-pass indexer, a program type open to users, and a
#: small queue so that the limit (429) is easy to reach
WEB_CONFIG = f"""
[execution]
cancel_grace = "1s"
shutdown_grace = "5s"
max_queued_per_user = 3

[sync]
index_command = [{json.dumps(sys.executable)}, {json.dumps(str(FAKE_CIDX))}, "--progress-json"]
index_passes = 2

[types.steps]
argv = [{json.dumps(sys.executable)}, {json.dumps(str(STEPS))}]
roles = ["user", "service", "admin"]
"""
#: the indexer's pause per file: a sync takes about a second, long enough to be watched
WEB_ENV = {"FAKE_CIDX_DELAY": "0.03"}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A jobd for the web (``WEB_CONFIG``), one per test module that imports this fixture."""
    from conftest import Daemon
    d = Daemon(tmp_path_factory.mktemp("jobd"), WEB_CONFIG, WEB_ENV).start()
    yield d
    assert d.stop() == 0


def cidx_login() -> jobd.http.Principal:
    """The web server's own login dependency: here nobody is logged in until a test
    overrides it."""
    raise HTTPException(401, "not logged in", headers={"WWW-Authenticate": "Bearer"})


def header_login(x_user: str | None = Header(None),
                 x_admin: str | None = Header(None)) -> jobd.http.Principal:
    """The principal the tests put in place of ``cidx_login``: the user a header names."""
    if not x_user:
        raise HTTPException(401, "not logged in", headers={"WWW-Authenticate": "Bearer"})
    return jobd.http.Principal(x_user, admin=x_admin == "1")


def web_app(socket_path: str | os.PathLike[str], **kw: Any) -> FastAPI:
    """A FastAPI app that mounts the router as the CIDX server would, its login overridden."""
    app = FastAPI()
    app.include_router(jobd.http.router(principal=cidx_login, socket=str(socket_path), **kw))
    app.dependency_overrides[cidx_login] = header_login
    return app


class Served:
    """``app`` served by a real uvicorn on a free loopback port, in a thread."""

    def __init__(self, app: Any) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = "http://127.0.0.1:%d" % self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    def __enter__(self) -> "Served":
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


def as_user(user: str, admin: bool = False) -> dict[str, str]:
    """The headers by which ``header_login`` knows the user."""
    return {"X-User": user, **({"X-Admin": "1"} if admin else {})}


def events(response: httpx.Response) -> Iterator[dict[str, Any]]:
    """The server-sent events of a streamed response as they come: ``{id, event, data}``,
    and ``{"comment": text}`` for a comment line."""
    fields: dict[str, Any] = {}
    for line in response.iter_lines():
        if line.startswith(":"):
            yield {"comment": line[1:].strip()}
        elif line == "":
            if fields:
                yield fields
            fields = {}
        else:
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            fields[name] = json.loads(value) if name == "data" else value
    if fields:
        yield fields


class Gateway:
    """A real ``jobd-http`` process (``python -m jobd.http``) on a free loopback port."""

    def __init__(self, root: Path, *args: str, as_admin_account: bool = True) -> None:
        """``as_admin_account``: it runs as an account jobd knows as an admin (these tests
        run as root), which jobd-http serves only when told to."""
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.argv = [sys.executable, "-m", "jobd.http", "--listen", f"127.0.0.1:{port}",
                     *(["--allow-admin-account"] if as_admin_account else []), *args]
        self.stderr = root / f"jobd-http-{port}.stderr"
        #: the process's environment (None: this one's)
        self.env: dict[str, str] | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> "Gateway":
        with open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen(self.argv, stdout=err, stderr=err, env=self.env,
                                         stdin=subprocess.DEVNULL, cwd="/")
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jobd-http exited {self.proc.returncode}:\n"
                                   f"{self.stderr.read_text()}")
            try:
                httpx.get(self.url + "/api/jobs", timeout=1)
                return self
            except httpx.TransportError:
                assert time.monotonic() < deadline, "jobd-http did not start listening"
                time.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
