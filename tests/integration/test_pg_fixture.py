"""The tests' private PostgreSQL (tests/pg.py) is a real server that does what the
PostgreSQL store will rely on (SPEC §11): tables and transactions, advisory locks,
LISTEN/NOTIFY between connections, a Unix socket and no TCP port, a database per test,
a stop by its pid, and a skip (or, under JOBD_REQUIRE_POSTGRES=1, a failure) without it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import pg

pytest_plugins = ["pg"]

TESTS = Path(__file__).resolve().parent.parent


def connect(dsn: str, **kw: Any) -> Any:
    import psycopg  # the postgres fixture has skipped the test if it is missing
    return psycopg.connect(dsn, **kw)


def test_a_table_keeps_what_a_committed_transaction_wrote(pg_dsn: str) -> None:
    with connect(pg_dsn) as writer, connect(pg_dsn) as reader:
        writer.execute("CREATE TABLE jobs (id text PRIMARY KEY, state text NOT NULL)")
        writer.cursor().executemany("INSERT INTO jobs VALUES (%s, %s)",
                                    [("j1", "queued"), ("j2", "running")])
        reader.rollback()
        assert reader.execute("SELECT to_regclass('jobs')").fetchone() == (None,)
        writer.commit()
        rows = reader.execute("SELECT id, state FROM jobs ORDER BY id").fetchall()
        assert rows == [("j1", "queued"), ("j2", "running")]


def test_an_advisory_lock_is_held_by_one_session_at_a_time(pg_dsn: str) -> None:
    with connect(pg_dsn, autocommit=True) as a, connect(pg_dsn, autocommit=True) as b:
        def try_lock(conn: Any) -> bool:
            return conn.execute("SELECT pg_try_advisory_lock(7401)").fetchone()[0]
        assert try_lock(a)
        assert not try_lock(b)
        assert a.execute("SELECT pg_advisory_unlock(7401)").fetchone()[0]
        assert try_lock(b)
        assert not try_lock(a)


def test_a_notify_reaches_a_listener_on_another_connection(pg_dsn: str) -> None:
    with connect(pg_dsn, autocommit=True) as listener, connect(pg_dsn) as notifier:
        listener.execute("LISTEN jobd_jobs")
        notifier.execute("SELECT pg_notify('jobd_jobs', 'j1:3')")
        # a NOTIFY is delivered at its transaction's commit, not before
        assert list(listener.notifies(timeout=0.2)) == []
        notifier.commit()
        got = list(listener.notifies(timeout=5, stop_after=1))
        assert [(n.channel, n.payload, n.pid) for n in got] == \
            [("jobd_jobs", "j1:3", notifier.info.backend_pid)]


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd)
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    return inodes


def test_the_server_listens_on_its_unix_socket_and_no_tcp_port(
        postgres: pg.PostgresServer) -> None:
    assert postgres.pid is not None
    inodes = _socket_inodes(postgres.pid)
    tcp = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            tcp.add(line.split()[9])
    assert not inodes & tcp, "the postmaster has a TCP socket"
    unix = {line.split()[6]: line.split()[-1]
            for line in Path("/proc/net/unix").read_text().splitlines()[1:]
            if len(line.split()) == 8}
    listening = sorted(unix[i] for i in inodes if i in unix)
    assert listening == [str(postgres.socket_dir / ".s.PGSQL.5432")]
    with connect(postgres.dsn) as conn:
        assert conn.execute("SHOW listen_addresses").fetchone() == ("",)
        assert conn.execute("SELECT current_database()").fetchone() == ("jobd",)


_seen: list[str] = []


@pytest.mark.parametrize("turn", ["first", "second"])
def test_each_test_gets_a_database_of_its_own_dropped_after_it(
        turn: str, pg_dsn: str, postgres: pg.PostgresServer) -> None:
    with connect(pg_dsn) as conn:
        name = conn.execute("SELECT current_database()").fetchone()[0]
        # what the other turn wrote is not here, and this turn's write goes nowhere else
        assert conn.execute("SELECT to_regclass('mark')").fetchone() == (None,)
        conn.execute("CREATE TABLE mark (turn text)")
        conn.execute("INSERT INTO mark VALUES (%s)", (turn,))
    with connect(postgres.dsn) as conn:
        names = {r[0] for r in conn.execute("SELECT datname FROM pg_database").fetchall()}
    assert name in names and name != "jobd" and name not in _seen
    assert not names & set(_seen), "an earlier test's database was not dropped"
    _seen.append(name)


def test_a_server_stops_by_its_pid_and_leaves_nothing_behind() -> None:
    bindir = pg.find_bindir()
    if bindir is None:
        pg.unavailable("no PostgreSQL server binaries")
    server = pg.PostgresServer(bindir)
    try:
        server.start()
        assert server.pid is not None
        pid = server.pid
        assert Path(f"/proc/{pid}/exe").resolve() == (bindir / "postgres").resolve()
    finally:
        server.stop()
    assert not Path(f"/proc/{pid}").exists() or \
        Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    assert not server.root.exists()


@pytest.mark.parametrize("required", [False, True])
def test_without_postgresql_the_tests_skip_or_under_require_fail(
        tmp_path: Path, required: bool) -> None:
    (tmp_path / "test_needs_pg.py").write_text(
        "import pg\n"
        "pg.DEBIAN_BINDIRS = '/nonexistent/postgresql/*/bin'\n"
        "pytest_plugins = ['pg']\n"
        "def test_needs_pg(postgres):\n"
        "    pass\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent)])}
    env.pop("JOBD_REQUIRE_POSTGRES", None)
    if required:
        env["JOBD_REQUIRE_POSTGRES"] = "1"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p",
                           "no:cacheprovider", "test_needs_pg.py"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    why = "no PostgreSQL server in /nonexistent/postgresql/*/bin: apt-get install postgresql"
    if required:
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert f"JOBD_REQUIRE_POSTGRES=1 but {why}" in proc.stdout
        assert "1 error" in proc.stdout
    else:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert why in proc.stdout and "1 skipped" in proc.stdout
