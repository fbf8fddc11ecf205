"""The daemon's life (SPEC §1, §6, §7): start, stop, crash, refuse, recover, systemd.

Every test runs the real ``jobd`` command: clean stops and kill -9, stale and live
sockets, bad config and damaged databases, the ``jobd db`` tools, and systemd's socket
activation and notify protocol (with systemd's own ``systemd-socket-activate`` and a
datagram socket standing in for systemd's).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import pytest

import jobd
from conftest import FAST_CONFIG, GIT_ENV, Daemon, wait_for


def ok(d: Daemon, method: str, **params: Any) -> Any:
    resp = d.raw(method, **params)
    assert "result" in resp, f"{method} {params}: {resp}"
    return resp["result"]


def events(d: Daemon, since: int = 0) -> list[str]:
    """The names of the daemon's log events, from line ``since`` of its log on."""
    return [e.get("event", "") for e in d.log_events()[since:]]


def jobd_cli(d: Daemon, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """``jobd --config C --socket S --db D ARGS``, as the daemon ``d`` would be started."""
    return subprocess.run(
        [sys.executable, "-m", "jobd", "--config", str(d.config), "--socket", str(d.socket),
         "--db", str(d.db), *args],
        env=d.env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def until_status(d: Daemon, job_id: str, *statuses: str, timeout: float = 15.0) -> dict[str, Any]:
    return wait_for(lambda: (job := ok(d, "jobs.get", job_id=job_id))["status"] in statuses
                    and job, timeout, what=f"job {job_id} to be {statuses}")


def damage_index(db: Path, *, unclean: bool) -> None:
    """Overwrite the root page of an index with garbage (tables stay readable)."""
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        if unclean:
            conn.execute("UPDATE meta SET value = '0' WHERE key = 'clean'")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        root = conn.execute(
            "SELECT rootpage FROM sqlite_master WHERE name = 'jobs_user'").fetchone()[0]
    finally:
        conn.close()
    with open(db, "r+b") as f:
        f.seek((root - 1) * page_size)
        f.write(b"\xff" * page_size)


def process_with(marker: str) -> bool:
    """Whether a process whose command line contains ``marker`` is alive."""
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if marker.encode() in cmdline and state != "Z":
                return True
    return False


def test_sigterm_then_kill_9_then_restart(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon()
    resumable = ok(d, "jobs.submit", type="noop", options={"seconds": 30})
    until_status(d, resumable["id"], "running")

    # SIGTERM: exit 0, socket gone, running resumable job back to queued, clean mark
    assert d.stop(signal.SIGTERM) == 0
    assert not d.socket.exists()
    assert "jobd_stopped" in events(d)
    mark = len(d.log_events())
    d.start()
    after_clean = events(d, mark)
    assert "jobd_started" in after_clean and "unclean_stop_detected" not in after_clean
    history = ok(d, "jobs.events", job_id=resumable["id"])
    assert any(e["status"] == "queued" and e["message"] == "interrupted by shutdown"
               and e["actor"] == "jobd" for e in history), history

    # kill -9 with jobs running: the next start notices, recovers and cleans up
    until_status(d, resumable["id"], "running")
    marker = f"{time.time_ns()}"
    command = ok(d, "jobs.submit", type="command", options={
        "argv": [sys.executable, "-c", f"import time; time.sleep(60)  # {marker}"]})
    until_status(d, command["id"], "running")
    wait_for(lambda: process_with(marker), what="the command's process")
    d.kill()
    assert d.socket.exists()  # left behind: the next start finds it stale
    # the job's supervisor sees its daemon die and kills the program at once (SPEC §5)
    wait_for(lambda: not process_with(marker), 5, what="the crashed daemon's job to be killed")
    mark = len(d.log_events())
    d.start()
    after_crash = events(d, mark)
    assert "unclean_stop_detected" in after_crash
    assert "stale_socket_removed" in after_crash
    failed = ok(d, "jobs.get", job_id=command["id"])
    assert failed["status"] == "failed" and "restart" in failed["error"]
    recovered = until_status(d, resumable["id"], "running")
    assert recovered["attempts"] == 3
    assert any(e["message"] == "recovered after restart"
               for e in ok(d, "jobs.events", job_id=resumable["id"]))


def test_stale_socket_is_replaced_and_a_live_one_refuses_a_second_daemon(
        make_daemon: Callable[..., Daemon]) -> None:
    first = make_daemon(start=False)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(first.socket))
    stale.close()  # the file stays; nobody listens
    assert first.socket.exists()
    first.start()
    assert "stale_socket_removed" in events(first)
    job = ok(first, "jobs.submit", type="noop")
    until_status(first, job["id"], "completed")

    files = [Path(f"{first.db}{suffix}") for suffix in ("", "-wal", "-shm")]
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in files if p.exists()}
    second = make_daemon(start=False)
    second.db = first.db  # the same database too: it must not be touched
    second.socket = first.socket
    proc = subprocess.run(second.argv(), env=second.env, capture_output=True, text=True,
                          timeout=30, stdin=subprocess.DEVNULL)
    assert proc.returncode == 1, proc.stderr
    # one daemon per state folder (SPEC §1): the lock refuses before the socket is looked at
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("jobd: "), proc.stderr
    assert f"database {first.db} is in use by jobd (pid {first.proc.pid})" in last, last
    assert "store_migrated" not in proc.stderr and "jobd_started" not in proc.stderr
    # its own database but the live socket: that socket answers, so it is already running
    third = make_daemon(start=False)
    third.socket = first.socket
    proc = subprocess.run(third.argv(), env=third.env, capture_output=True, text=True,
                          timeout=30, stdin=subprocess.DEVNULL)
    assert proc.returncode == 1, proc.stderr
    assert "already running" in proc.stderr and str(first.socket) in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("jobd: ")
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in files if p.exists()} == before
    assert ok(first, "jobs.get", job_id=job["id"])["status"] == "completed"
    assert first.socket.exists()


def test_a_path_that_is_not_a_socket_is_left_alone(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon(start=False)
    d.socket.write_text("precious\n")
    proc = jobd_cli(d, "serve")
    assert proc.returncode == 1
    assert "not a socket" in proc.stderr and str(d.socket) in proc.stderr
    assert d.socket.read_text() == "precious\n"
    assert not d.db.exists()


BAD_CONFIGS = {  # the key the one line must name -> the config
    "execution.workerz": "[execution]\nworkerz = 4\n",
    "execution.cancel_grace": '[execution]\ncancel_grace = "3 parsecs"\n',
    "server.max_batch": '[server]\nmax_batch = "many"\n',
    "x = … is outside any section": "x = 1\n[server]\n",
}


def test_a_bad_config_stops_jobd_with_one_line(make_daemon: Callable[..., Daemon]) -> None:
    daemons = {key: make_daemon(config=config, start=False) for key, config in BAD_CONFIGS.items()}
    procs = {key: subprocess.Popen(d.argv(), env=d.env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
             for key, d in daemons.items()}  # at once: each is a Python start-up
    for key, proc in procs.items():
        d = daemons[key]
        _, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 1, (key, stderr)
        lines = stderr.strip().splitlines()
        assert len(lines) == 1, stderr
        assert str(d.config) in lines[0] and key in lines[0], lines[0]
        assert not d.socket.exists() and not d.db.exists()


def test_a_corrupt_database_stops_jobd_and_names_the_cure(
        make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon(start=False)
    d.state.mkdir(parents=True)
    garbage = b"this is not an SQLite database\n" * 200
    d.db.write_bytes(garbage)
    proc = jobd_cli(d, "serve")
    assert proc.returncode == 1
    assert str(d.db) in proc.stderr and "jobd db recover" in proc.stderr
    assert d.db.read_bytes() == garbage  # never a silent new database
    assert not d.socket.exists()


def test_damage_found_by_quick_check_after_an_unclean_stop(
        make_daemon: Callable[..., Daemon]) -> None:
    from jobd.store import Store
    d = make_daemon(start=False)
    Store(d.db).open().close()
    damage_index(d.db, unclean=True)
    damaged = d.db.read_bytes()
    proc = jobd_cli(d, "serve")
    assert proc.returncode == 1
    assert str(d.db) in proc.stderr and "jobd db recover" in proc.stderr
    assert d.db.read_bytes() == damaged
    assert not d.socket.exists()


def test_db_check_backup_while_serving_and_recover(make_daemon: Callable[..., Daemon],
                                                   tmp_path: Path) -> None:
    d = make_daemon()
    jobs = [ok(d, "jobs.submit", type="noop", as_user=f"user{i}") for i in range(3)]
    for job in jobs:
        until_status(d, job["id"], "completed")

    check = jobd_cli(d, "db", "check")
    assert check.returncode == 0 and check.stdout.strip() == f"{d.db}: ok", check.stderr

    backup = tmp_path / "backup.db"
    made = jobd_cli(d, "db", "backup", str(backup))
    assert made.returncode == 0, made.stderr
    assert str(backup) in made.stdout
    with sqlite3.connect(backup) as conn:
        stored = {r[0] for r in conn.execute("SELECT id FROM jobs")}
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert stored == {j["id"] for j in jobs}
    assert ok(d, "ping")  # still serving

    copy = Daemon(tmp_path / "copy", FAST_CONFIG)
    copy.state.mkdir(parents=True)
    shutil.copy(backup, copy.db)
    damage_index(copy.db, unclean=False)
    broken = jobd_cli(copy, "db", "check")
    assert broken.returncode == 1 and "jobd db recover" in broken.stderr

    recovered = jobd_cli(copy, "db", "recover")
    assert recovered.returncode == 0, recovered.stderr
    assert "jobs: saved 3, lost 0" in recovered.stdout
    aside = [p for p in copy.state.iterdir() if p.name.startswith("jobd.db.damaged-")
             and not p.name.endswith(("-wal", "-shm"))]
    assert len(aside) == 1 and str(aside[0].name) in recovered.stdout
    assert jobd_cli(copy, "db", "check").returncode == 0
    with sqlite3.connect(copy.db) as conn:
        assert {r[0] for r in conn.execute("SELECT id FROM jobs")} == stored
        assert conn.execute("SELECT value FROM meta WHERE key = 'clean'").fetchone() == ("1",)


def test_a_start_logs_no_scheduler_chatter(make_daemon: Callable[..., Daemon]) -> None:
    """APScheduler's INFO lines at every start are for debugging only."""
    d = make_daemon()
    assert "jobd_started" in d.log()
    for chatter in ("Adding job tentatively", "Added job", "Scheduler started"):
        assert chatter not in d.log()
    d.stop()
    debugging = make_daemon(env={"JOBD_LOG_LEVEL": "debug"})
    assert "Scheduler started" in debugging.log()


def test_config_check_prints_the_effective_settings_or_one_line(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('[execution]\nworkers = 2\ncancel_grace = "5s"\n'
                    '[sync]\nallowed_roots = ["/srv/src"]\n')
    # the global option after the command, as SPEC §1 allows
    proc = subprocess.run([sys.executable, "-m", "jobd", "config", "check", "--config",
                           str(good)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"# {good}"
    for line in ("[server]", "[storage]", "[execution]", "workers = 2", 'cancel_grace = "5s"',
                 'shutdown_grace = "10s"', "[retention]", 'keep = "7d"', "[auth]", "[sync]",
                 'allowed_roots = ["/srv/src"]', 'default_timeout = "6h"'):
        assert line in lines, line
    bad = tmp_path / "bad.toml"
    bad.write_text('[execution]\nworkers = "many"\n')
    proc = subprocess.run([sys.executable, "-m", "jobd", "--config", str(bad), "config",
                           "check"], capture_output=True, text=True, timeout=30)
    assert (proc.returncode, proc.stdout) == (1, "")
    assert proc.stderr.count("\n") == 1 and "execution.workers" in proc.stderr


def test_config_check_masks_secrets() -> None:
    from jobd.cli import _SECRETS
    dsn = _SECRETS[("storage", "dsn")]
    assert dsn("host=/run/postgresql password=s3cret dbname=jobd") == (
        "host=/run/postgresql password=*** dbname=jobd")
    assert dsn("postgresql://jobd:s3cret@db/jobd") == "postgresql://jobd:***@db/jobd"
    assert _SECRETS[("sync", "index_env")]({"TOKEN": "s3cret"}) == {"TOKEN": "***"}
    assert _SECRETS[("types", "env")]({"A": "b"}) == {"A": "***"}


def test_version() -> None:
    proc = subprocess.run([sys.executable, "-m", "jobd", "version"], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0
    assert proc.stdout == f"jobd {jobd.__version__}\n"


# -- systemd -----------------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                    reason="systemd-socket-activate not installed (apt-get install systemd)")
def test_socket_activation_starts_on_first_connect_and_leaves_the_socket(tmp_path: Path) -> None:
    d = Daemon(tmp_path / "d", FAST_CONFIG)
    d.state.mkdir(parents=True)
    passed = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path),
              "JOBD_DB": str(d.db), "JOBD_CONFIG": str(d.config), **GIT_ENV}
    argv = ["systemd-socket-activate", "-l", str(d.socket)]
    for name, value in passed.items():
        argv += ["-E", f"{name}={value}"]
    argv += [sys.executable, "-m", "jobd", "--log-format", "json", "serve"]
    with open(d.stderr, "wb") as err:
        d.proc = subprocess.Popen(argv, stdout=err, stderr=err, stdin=subprocess.DEVNULL)
    try:
        wait_for(d.socket.exists, what="systemd-socket-activate to listen")
        assert "jobd_started" not in events(d)  # nothing runs before the first connect
        answer = d.raw("ping")  # execs jobd, which answers on the socket it was passed
        assert answer["result"]["caller"]["role"] == "admin"
        assert "socket_adopted" in events(d) and "socket_bound" not in events(d)
        # the socket clients reach, not the configured default it never bound
        started = [e for e in d.log_events() if e.get("event") == "jobd_started"]
        assert [e["socket"] for e in started] == [str(d.socket)]
        job = ok(d, "jobs.submit", type="noop")
        until_status(d, job["id"], "completed")
        assert d.stop(signal.SIGTERM) == 0  # Popen's pid is the daemon: it was exec'd
        assert d.socket.exists()  # systemd's socket, not jobd's to remove
        assert "jobd_stopped" in events(d)
    finally:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()


def test_notify_socket_gets_ready_watchdog_and_stopping(make_daemon: Callable[..., Daemon]
                                                        ) -> None:
    path = Path(tempfile.mkdtemp(prefix="jobd-notify-", dir="/tmp")) / "notify"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(path))
    listener.settimeout(15)
    received: list[str] = []

    def until(word: str) -> None:
        while not any(word in m.split("\n") for m in received):
            received.append(listener.recv(4096).decode())

    try:
        d = make_daemon(env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "200000"})
        until("READY=1")
        ready = next(m for m in received if "READY=1" in m.split("\n"))
        assert any(line.startswith("STATUS=") for line in ready.split("\n"))
        until("WATCHDOG=1")
        assert d.stop(signal.SIGTERM) == 0
        until("STOPPING=1")
        stopping = next(i for i, m in enumerate(received) if "STOPPING=1" in m.split("\n"))
        assert received.index(ready) < stopping
    finally:
        listener.close()
        shutil.rmtree(path.parent, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="a socket root may not connect to needs root without its override")
def test_a_socket_jobd_may_not_connect_to_is_refused_in_one_line_naming_it(
        make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon(start=False)
    theirs = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    theirs.bind(str(d.socket))
    theirs.listen()
    try:
        d.socket.chmod(0)  # as another user's daemon's socket is to this one
        proc = subprocess.run(  # root without the power to ignore file modes
            ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--",
             *d.argv()], env=d.env, capture_output=True, text=True, timeout=30,
            stdin=subprocess.DEVNULL)
    finally:
        theirs.close()
    assert proc.returncode == 1, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"jobd: {d.socket} is a socket jobd may not connect to "
                           "(permission denied)"), line
    assert d.socket.exists()


def _config_folder(d: Daemon) -> list[str]:
    return ["--config", str(d.root)]


def _long_socket(d: Daemon) -> list[str]:
    return ["--socket", str(d.root / ("s" * 120))]


def _no_runtime_folder(d: Daemon) -> list[str]:
    d.env["XDG_RUNTIME_DIR"] = str(d.root / "gone")
    return ["--socket", str(d.root / "gone" / "jobd" / "jobd.sock")]


@pytest.mark.parametrize("bad, told", [
    (_config_folder, "cannot read"),
    (_long_socket, "cannot listen on"),
    (_no_runtime_folder, "does not exist (is XDG_RUNTIME_DIR right?)"),
], ids=["config-folder", "long-socket", "no-runtime-folder"])
def test_a_start_up_refusal_is_one_line_naming_its_cause(
        make_daemon: Callable[..., Daemon], bad: Any, told: str) -> None:
    d = make_daemon(start=False)
    d.root.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([*d.argv(), *bad(d)], env=d.env, capture_output=True, text=True,
                          timeout=30, stdin=subprocess.DEVNULL)
    assert proc.returncode == 1, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("jobd: ") and told in line and "[Errno" not in line, line
