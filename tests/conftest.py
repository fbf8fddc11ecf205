"""Shared test fixtures: a real jobd process on a temp socket, and real git repositories."""

from __future__ import annotations

import contextlib
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


@pytest.fixture
def small_disk(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A small real tmpfs (4 MiB; ``@pytest.mark.disk_size("2m")`` for another size), so
    the disk fills up for real. Skips unless root may mount one here."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    marker = request.node.get_closest_marker("disk_size")
    size = marker.args[0] if marker else "4m"
    where = tmp_path / "small"
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                              str(where)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def fill(disk: Path) -> Path:
    """Fill ``disk`` to the last byte; the file that holds the space."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for size in (1 << 16, 4096, 512, 1):
            try:
                while os.write(fd, b"\0" * size):
                    pass
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel ``pip wheel`` builds from the checkout's files as a fresh clone has them
    (no build or egg-info leftovers, which would let setuptools find files the packaging
    itself does not name); built once for every test of what it ships."""
    import shutil
    root = Path(__file__).resolve().parent.parent
    work = tmp_path_factory.mktemp("wheel")
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=root,
                            check=True, capture_output=True, text=True).stdout.split()
    for name in listed:
        if (root / name).is_file():
            (work / "src" / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / name, work / "src" / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                    str(work / "dist"), str(work / "src")], check=True, capture_output=True,
                   timeout=300)
    built, = (work / "dist").glob("jobd-*.whl")
    return built


def plugin_env(site: Path, module: str, source: str, **entry_points: str) -> dict[str, str]:
    """An environment in which jobd loads ``source`` as module ``module`` of a plugin
    distribution in ``site``, its ``jobd.handlers`` entry points ``name = module:attr``."""
    dist = site / f"{module}-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[jobd.handlers]\n" + "".join(
        f"{name} = {module}:{attr}\n" for name, attr in entry_points.items()))
    (site / f"{module}.py").write_text(source)
    return {"PYTHONPATH": os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH"))
                                          if p)}


#: the interpreter for a process run as another uid: the venv's base Python, which lies
#: outside the checkout (a venv inside a clone under /root is not another uid's to enter);
#: what it imports of jobd comes from ``readable_jobd``
OTHER_UID_PYTHON = os.path.realpath(sys.executable)


@pytest.fixture(scope="session")
def readable_jobd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """An environment in which another uid's Python imports this checkout's jobd.

    The checkout (and its venv) may lie in a folder only root can enter, such as a clone in
    /root: jobd and the libraries it imports are copied into a temp folder anyone may read,
    and ``PYTHONPATH`` points there.
    """
    import importlib.util
    import shutil
    top = Path(tempfile.mkdtemp(prefix="jobd-readable-"))
    try:
        top.chmod(0o755)
        for name in ("jobd", "structlog"):
            spec = importlib.util.find_spec(name)
            assert spec is not None and spec.origin is not None, name
            shutil.copytree(Path(spec.origin).parent, top / name,
                            ignore=shutil.ignore_patterns("__pycache__"))
        for path in top.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        yield {"PYTHONPATH": str(top), "PYTHONDONTWRITEBYTECODE": "1"}
    finally:
        shutil.rmtree(top, ignore_errors=True)


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


class LocalAccounts:
    """Local users and groups made with useradd/groupadd for one test module (root only)."""

    def __init__(self) -> None:
        self.users: list[str] = []
        self.groups: list[str] = []
        import shutil
        #: a Python other users can run (a virtualenv's may live under root's home)
        self.python = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin") or sys.executable

    def group(self, name: str) -> Any:
        """A new group ``name`` (a leftover of an interrupted run is replaced)."""
        import grp
        with contextlib.suppress(KeyError):
            grp.getgrnam(name)
            subprocess.run(["groupdel", name], capture_output=True)
        subprocess.run(["groupadd", name], check=True, capture_output=True)
        self.groups.append(name)
        return grp.getgrnam(name)

    def user(self, name: str, groups: tuple[str, ...] = ()) -> Any:
        """A new user ``name`` with its own group, also in ``groups``; its passwd entry."""
        import pwd
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            subprocess.run(["userdel", "-r", name], capture_output=True)
        argv = ["useradd", "--no-create-home", "--user-group", "--shell", "/usr/sbin/nologin"]
        if groups:
            argv += ["--groups", ",".join(groups)]
        subprocess.run([*argv, name], check=True, capture_output=True)
        self.users.append(name)
        return pwd.getpwnam(name)

    def run_as(self, name: str, argv: list[str], timeout: float = 30.0) -> str:
        """Run ``argv`` as user ``name`` (uid, gid and groups); its stdout. Fails on exit ≠ 0."""
        import pwd
        entry = pwd.getpwnam(name)
        proc = subprocess.run(
            ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--init-groups",
             "--", *argv], capture_output=True, text=True, timeout=timeout, cwd="/",
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/", "LANG": "C.UTF-8"})
        assert proc.returncode == 0, f"{argv[0]} as {name} exited {proc.returncode}:\n{proc.stderr}"
        return proc.stdout

    def remove_all(self) -> None:
        for name in reversed(self.users):
            subprocess.run(["userdel", "-r", name], capture_output=True)
        for name in reversed(self.groups):
            subprocess.run(["groupdel", name], capture_output=True)


@pytest.fixture(scope="module")
def local_accounts() -> Iterator[LocalAccounts]:
    """Create local users and groups (``.user(name)``, ``.group(name)``); removed afterwards.

    Skips unless running as root with useradd, groupadd and setpriv installed.
    """
    import shutil
    if os.geteuid() != 0:
        pytest.skip("creating local users needs root (useradd); run the suite as root")
    missing = [t for t in ("useradd", "userdel", "groupadd", "groupdel", "setpriv")
               if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (apt-get install passwd util-linux)")
    accounts = LocalAccounts()
    try:
        yield accounts
    finally:
        accounts.remove_all()


def result_of(d: Daemon, method: str, **params: Any) -> Any:
    """The result of one call that must succeed; the test fails with the error otherwise."""
    response = d.raw(method, **params)
    if "error" in response:
        pytest.fail(f"{method} {params} failed: {response['error']}")
    return response["result"]


def error_of(d: Daemon, method: str, **params: Any) -> dict[str, Any]:
    """The error object of one call that must fail."""
    response = d.raw(method, **params)
    if "error" not in response:
        pytest.fail(f"{method} {params} succeeded, but should have failed: {response['result']}")
    return response["error"]


def wait_terminal(d: Daemon, job_id: str, timeout: float = 20.0) -> dict[str, Any]:
    """Long-poll ``jobs.wait`` until the job is completed, failed or cancelled; the job."""
    return follow(d, job_id, timeout)[0]


def pid_alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat[stat.rindex(b")") + 2:][:1] not in (b"Z", b"X")


def group_alive(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group ``pgid``."""
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except (FileNotFoundError, ProcessLookupError):
            continue
        fields = stat[stat.rindex(b")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            members.append(int(entry.name))
    return members


def follow(d: Daemon, job_id: str, timeout: float = 20.0) -> tuple[dict[str, Any], list[float]]:
    """Watch a job through ``jobs.wait`` until it ends: (the final job, every progress seen)."""
    deadline = time.monotonic() + timeout
    job = result_of(d, "jobs.wait", job_id=job_id)
    seen = [job["progress"]]
    while job["status"] not in ("completed", "failed", "cancelled"):
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"job {job_id} still {job['status']} after {timeout}s: {job}")
        job = result_of(d, "jobs.wait", job_id=job_id, after_version=job["version"],
                        timeout_s=min(left, 5.0))
        seen.append(job["progress"])
    return job, seen


def phases_of(d: Daemon, job_id: str) -> list[str]:
    """The phases a job's event history went through, in order, each once."""
    phases: list[str] = []
    for event in result_of(d, "jobs.events", job_id=job_id):
        if event["phase"] and (not phases or phases[-1] != event["phase"]):
            phases.append(event["phase"])
    return phases


def joblog(d: Daemon, job_id: str) -> str:
    """A job's captured output (up to 1 MiB)."""
    return result_of(d, "jobs.logs", job_id=job_id, limit_bytes=1_048_576)["data"]
