"""A private PostgreSQL for the tests that need one (SPEC §11), from Debian's packages,
and the store test suite's database on either backend (``store_db``, ``backend``).

A test module opts in with ``pytest_plugins = ["pg"]`` and asks for ``postgres`` (the
session's server: one per test run, started on first use) or ``pg_dsn`` (a database of
its own, copied from a template and dropped after the test).

The server is ``initdb`` + ``pg_ctl`` from ``/usr/lib/postgresql/<version>/bin`` in a
temp folder (on /dev/shm's tmpfs), run as the ``postgres`` OS user when the tests run as
root (PostgreSQL refuses to run as root), on a Unix socket in that folder and no TCP
port, with durability turned off for speed (a crash loses the data, which a test run
throws away anyway). It is stopped by its postmaster's pid at the end of the session.

Without PostgreSQL's server binaries or psycopg the tests that need them skip, unless
``JOBD_REQUIRE_POSTGRES=1`` (CI sets it) makes that a failure.

PYTEST_DONT_REWRITE: test modules import this module (for its types and helpers) before
pytest loads it as their plugin, too late to rewrite; it has no asserts to rewrite.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, NoReturn

import pytest

#: where Debian's postgresql-<version> packages put the server's programs
DEBIAN_BINDIRS = "/usr/lib/postgresql/*/bin"
#: the superuser initdb creates, whoever runs it
SUPERUSER = "postgres"
#: the database that ``postgres.dsn`` names
DATABASE = "jobd"
#: what each test's database is copied from; nothing connects to it, which a copy needs
TEMPLATE = "jobd_template"
#: durability off (a test run's data is thrown away), and nothing but the Unix socket
SETTINGS = {
    "listen_addresses": "''",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
}
#: how long a start and a stop may take, in seconds
START_TIMEOUT = 60
STOP_TIMEOUT = 30


def unavailable(why: str) -> NoReturn:
    """Skip the test for a missing PostgreSQL, or fail it under JOBD_REQUIRE_POSTGRES=1."""
    if os.environ.get("JOBD_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"JOBD_REQUIRE_POSTGRES=1 but {why}", pytrace=False)
    pytest.skip(why)


def find_bindir() -> Path | None:
    """The newest Debian PostgreSQL's bin folder that has initdb and pg_ctl, if any."""
    found = [Path(p) for p in Path("/").glob(DEBIAN_BINDIRS.lstrip("/"))
             if (Path(p) / "initdb").is_file() and (Path(p) / "pg_ctl").is_file()]
    # "9.6" < "15": compare the version folder's numbers, not its text
    found.sort(key=lambda p: [int(n) for n in re.findall(r"\d+", p.parent.name)])
    return found[-1] if found else None


def _scratch() -> str:
    """/dev/shm where it may be written (a tmpfs: the database never touches the disk, and
    a start and a test's database take half and a fifth of the time they take in /tmp),
    else /tmp."""
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK) else "/tmp"


def _gone(pid: int, timeout: float) -> bool:
    """Wait for ``pid`` to exit; whether it did. Not our child (pg_ctl started it), so it
    cannot be waited for: a zombie counts as gone, whoever reaps it, if anyone does."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            # the state follows the command's closing parenthesis
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except FileNotFoundError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


class PostgresServer:
    """One PostgreSQL cluster in a temp folder: ``root/data`` and the socket in ``root``."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        # short: a socket path is limited to 107 bytes
        self.root = Path(tempfile.mkdtemp(prefix="jobd-pg-", dir=_scratch()))
        self.data = self.root / "data"
        self.logfile = self.root / "postgres.log"
        self.pid: int | None = None
        self._owner = pwd.getpwnam(SUPERUSER) if os.geteuid() == 0 else None
        # the socket's folder is open to every uid (tests run jobd as other users too);
        # the data folder inside it is the server's alone, as initdb requires
        self.root.chmod(0o755)
        if self._owner is not None:
            os.chown(self.root, self._owner.pw_uid, self._owner.pw_gid)

    @property
    def socket_dir(self) -> Path:
        return self.root

    @property
    def dsn(self) -> str:
        """The session's database, ``jobd``."""
        return self.dsn_for(DATABASE)

    def dsn_for(self, dbname: str) -> str:
        return f"postgresql:///{dbname}?host={self.socket_dir}&user={SUPERUSER}"

    def _run(self, program: str, *args: str) -> None:
        argv = [str(self.bindir / program), *args]
        if self._owner is not None:
            argv = ["runuser", "-u", SUPERUSER, "--", *argv]
        # cwd: the tests' own folder may be closed to the postgres user
        proc = subprocess.run(argv, cwd=self.root, capture_output=True, text=True,
                              timeout=START_TIMEOUT)
        if proc.returncode != 0:
            log = self.logfile.read_text(errors="replace") if self.logfile.exists() else ""
            raise RuntimeError(f"{program} {' '.join(args)} exited with {proc.returncode}:\n"
                               f"{proc.stdout}{proc.stderr}{log}")

    def _postmaster_pid(self) -> int | None:
        # postmaster.pid's first line is the postmaster's pid (pg_ctl, its parent, exits)
        try:
            return int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (FileNotFoundError, ValueError):
            return None

    def start(self) -> PostgresServer:
        # --no-sync: initdb's own fsyncs are most of its time, and worth nothing here
        self._run("initdb", "--pgdata", str(self.data), "--username", SUPERUSER,
                  "--auth", "trust", "--encoding", "UTF8", "--locale", "C", "--no-sync")
        settings = {**SETTINGS, "unix_socket_directories": f"'{self.socket_dir}'"}
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.writelines(f"{name} = {value}\n" for name, value in settings.items())
        self._run("pg_ctl", "start", "--pgdata", str(self.data), "--log", str(self.logfile),
                  "--wait", "--timeout", str(START_TIMEOUT))
        self.pid = self._postmaster_pid()
        return self

    def restart(self) -> None:
        """Restart the server (fast: every session is cut, as a crash or an operator's
        restart cuts them); its databases stay."""
        self._run("pg_ctl", "restart", "--pgdata", str(self.data), "--mode", "fast",
                  "--log", str(self.logfile), "--wait", "--timeout", str(START_TIMEOUT))
        self.pid = self._postmaster_pid()

    @contextlib.contextmanager
    def down(self) -> Iterator[None]:
        """The server stopped (fast) for the block, then started again; its databases stay."""
        self._run("pg_ctl", "stop", "--pgdata", str(self.data), "--mode", "fast", "--wait",
                  "--timeout", str(START_TIMEOUT))
        try:
            yield
        finally:
            self._run("pg_ctl", "start", "--pgdata", str(self.data), "--log",
                      str(self.logfile), "--wait", "--timeout", str(START_TIMEOUT))
            self.pid = self._postmaster_pid()

    def stop(self) -> None:
        """Stop the postmaster by its pid, wait for its exit, remove the folder."""
        # a start that timed out may still have left a postmaster running
        self.pid = self.pid or self._postmaster_pid()
        # fast shutdown first (SIGINT: roll back, disconnect, exit), then immediate
        # (SIGQUIT), then SIGKILL: nothing in a test run's data needs saving
        for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGKILL):
            if self.pid is None or _gone(self.pid, 0):
                break
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)
            if _gone(self.pid, STOP_TIMEOUT):
                break
        else:
            raise RuntimeError(f"PostgreSQL (pid {self.pid}) outlived SIGKILL")
        self.pid = None
        shutil.rmtree(self.root, ignore_errors=True)


def _connect_admin(server: PostgresServer) -> Any:
    import psycopg
    # CREATE and DROP DATABASE cannot run inside a transaction
    return psycopg.connect(server.dsn_for("postgres"), autocommit=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """The session's PostgreSQL, with the databases ``jobd`` and ``jobd_template``."""
    bindir = find_bindir()
    if bindir is None:
        unavailable(f"no PostgreSQL server in {DEBIAN_BINDIRS}: apt-get install postgresql")
    if importlib.util.find_spec("psycopg") is None:
        unavailable("psycopg is not installed: pip install -e '.[test,postgres]'")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SUPERUSER)
        except KeyError:
            unavailable(f"running as root, and there is no {SUPERUSER} OS user to run "
                        "PostgreSQL as: apt-get install postgresql creates it")
        if shutil.which("runuser") is None:
            unavailable("running as root, and there is no runuser to run PostgreSQL as "
                        f"{SUPERUSER}: apt-get install util-linux")
    server = PostgresServer(bindir)
    try:
        server.start()
        with _connect_admin(server) as admin:
            for name in (DATABASE, TEMPLATE):
                admin.execute(f'CREATE DATABASE "{name}"')
        yield server
    finally:
        server.stop()


_numbers = itertools.count(1)


@pytest.fixture
def pg_dsn(postgres: PostgresServer, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh database for this test alone (a copy of ``jobd_template``); its DSN."""
    # the test's name helps when reading the server's log; 63 bytes is PostgreSQL's limit
    name = f"t{next(_numbers)}_{re.sub(r'[^a-z0-9]+', '_', request.node.name.lower())}"[:63]
    with _connect_admin(postgres) as admin:
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE}"')
    try:
        yield postgres.dsn_for(name)
    finally:
        with _connect_admin(postgres) as admin:
            # FORCE: a daemon or connection the test left open must not keep it alive
            admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


# -- the store's tests on both backends ------------------------------------------------------

#: the backends the store test suite runs on (SPEC §11: both pass the same suite)
BACKENDS = ("sqlite", "postgres")


class StoreDb:
    """A database for one store test on one backend: a SQLite file or a PostgreSQL
    database of its own; stores open on it, and a test peeks at its rows."""

    def __init__(self, backend: str, target: Any) -> None:
        self.backend = backend
        #: the SQLite file's path, or the PostgreSQL database's DSN
        self.target = target

    def __repr__(self) -> str:
        return f"StoreDb({self.backend}: {self.target})"

    def open(self, **kw: Any) -> Any:
        """An open store on this database (``kw``: the store's keyword arguments; a
        ``synchronous`` of SQLite's is left out on PostgreSQL)."""
        if self.backend == "sqlite":
            from jobd.store import Store
            kw.setdefault("synchronous", "normal")
            return Store(self.target, **kw).open()
        from jobd.store.postgres import PostgresStore
        kw.pop("synchronous", None)
        return PostgresStore(self.target, **kw).open()

    def rows(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        """The rows of a read on a connection of the test's own (``?``: an argument)."""
        if self.backend == "sqlite":
            import sqlite3
            conn = sqlite3.connect(self.target, timeout=10)
            try:
                return conn.execute(sql, args).fetchall()
            finally:
                conn.close()
        import psycopg
        with psycopg.connect(self.target, autocommit=True) as pg:
            return [tuple(r) for r in pg.execute(sql.replace("?", "%s"), args).fetchall()]

    def value(self, sql: str, *args: Any) -> Any:
        """The first column of the first row of a read."""
        return self.rows(sql, *args)[0][0]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The store's backend a test runs on; a test about one backend alone overrides it
    (``pytest.mark.parametrize("backend", ["sqlite"], indirect=True)``)."""
    return str(request.param)


@pytest.fixture
def store_db(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> StoreDb:
    """A fresh database on ``backend`` for this test."""
    if backend == "sqlite":
        return StoreDb(backend, tmp_path / "jobd.db")
    return StoreDb(backend, request.getfixturevalue("pg_dsn"))


#: a test about SQLite itself (its file, pragmas, WAL, schema history): not run on PostgreSQL
sqlite_only = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
