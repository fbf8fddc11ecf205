"""The daemon as an operator meets it (SPEC §1, §7): one daemon per state folder, the db
tools beside a live daemon, options anywhere, private files, SIGHUP reloads."""

from __future__ import annotations

import os
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from conftest import FAST_CONFIG, Daemon, group_alive, wait_for

SLOW = ["sh", "-c", "sleep 30"]


def ok(d: Daemon, method: str, **params: Any) -> Any:
    resp = d.raw(method, **params)
    assert "result" in resp, f"{method} {params}: {resp}"
    return resp["result"]


def jobd(*args: str, env: dict[str, str] | None = None,
         timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "jobd", *args], env=env or os.environ.copy(),
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def other_socket() -> Path:
    return Path(tempfile.mkdtemp(prefix="jobd-", dir="/tmp")) / "b.sock"


def running_command(d: Daemon) -> dict[str, Any]:
    job = ok(d, "jobs.submit", type="command", options={"argv": SLOW})
    return wait_for(lambda: (j := ok(d, "jobs.get", job_id=job["id"]))["status"] == "running"
                    and j, what="the command to run")


# -- one daemon per state folder ----------------------------------------------------------

def test_a_second_daemon_on_the_same_database_refuses_and_touches_nothing(
        make_daemon: Callable[..., Daemon]) -> None:
    first = make_daemon()
    job = running_command(first)
    pgid = wait_for(lambda: _pgid(first, job["id"]), what="the job's process group")

    started = time.monotonic()
    second = jobd("--config", str(first.config), "--socket", str(other_socket()),
                  "--db", str(first.db), "serve", env=first.env)
    assert time.monotonic() - started < 10
    assert second.returncode == 1
    lines = second.stderr.strip().splitlines()
    assert lines == [f"jobd: database {first.db} is in use by jobd (pid {first.proc.pid}); "
                     "stop it first (systemctl stop jobd), or give this one a folder of its own "
                     "(--db)"]
    # the first daemon's job runs on, its processes untouched, and it still answers
    assert group_alive(pgid)
    assert ok(first, "jobs.get", job_id=job["id"])["status"] == "running"
    assert "unclean_stop_detected" not in first.log() + second.stderr


def test_another_database_in_the_same_folder_is_refused_naming_the_holders(
        make_daemon: Callable[..., Daemon]) -> None:
    # logs, repositories and manifests live beside the database: one daemon per folder
    first = make_daemon()
    other_db = first.state / "other.db"
    second = jobd("--config", str(first.config), "--socket", str(other_socket()),
                  "--db", str(other_db), "serve", env=first.env)
    assert second.returncode == 1
    assert (f"state folder {first.state} is in use by jobd (pid {first.proc.pid}, "
            f"database {first.db})") in second.stderr
    assert not other_db.exists()


def test_a_lock_left_by_a_killed_daemon_is_taken_over(
        make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon()
    d.kill()
    lock = d.state / "jobd.lock"
    assert lock.exists()
    lock.chmod(0o666)  # left wider than jobd makes it
    d.start()
    assert lock.read_text().splitlines() == [str(d.proc.pid), str(d.db)]
    assert stat.S_IMODE(lock.stat().st_mode) == 0o600


def test_a_second_daemon_refused_by_a_folder_in_use_makes_no_folder_of_its_own(
        make_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    first = make_daemon()
    config = tmp_path / "second.toml"
    config.write_text(first.config.read_text() + f'\n[storage]\nstate_dir = "{first.state}"\n')
    new_folder = tmp_path / "second-db"
    second = jobd("--config", str(config), "--socket", str(other_socket()),
                  "--db", str(new_folder / "jobd.db"), "serve", env=first.env)
    assert second.returncode == 1
    assert f"state folder {first.state} is in use by jobd" in second.stderr
    assert not new_folder.exists()


def _answers(d: Daemon) -> bool:
    try:
        return "result" in d.raw("ping")
    except OSError:
        return False


def _pgid(d: Daemon, job_id: str) -> int | None:
    with sqlite3.connect(f"file:{d.db}?mode=ro", uri=True) as conn:
        row = conn.execute("SELECT pgid FROM jobs WHERE id = ?", (job_id,)).fetchone()
    return row[0] if row else None


def test_recover_refuses_while_a_daemon_runs_whatever_its_socket(
        make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon()
    ok(d, "jobs.submit", type="noop")
    env = {k: v for k, v in d.env.items() if k != "JOBD_SOCKET"}
    # no socket of the daemon's in sight: the lock alone must tell
    proc = jobd("db", "recover", "--db", str(d.db), "--socket", str(other_socket()), env=env)
    assert proc.returncode == 1
    assert f"database {d.db} is in use by jobd (pid {d.proc.pid})" in proc.stderr
    assert "recover works on a stopped database only" in proc.stderr
    assert not list(d.state.glob("jobd.db.damaged-*"))
    # the daemon's data stayed where it was, and later writes land there
    after = ok(d, "jobs.submit", type="noop")
    d.stop()
    with sqlite3.connect(d.db) as conn:
        assert conn.execute("SELECT count(*) FROM jobs WHERE id = ?",
                            (after["id"],)).fetchone() == (1,)


def test_recover_on_a_healthy_database_changes_nothing(make_daemon: Callable[..., Daemon]
                                                       ) -> None:
    d = make_daemon()
    ok(d, "jobs.submit", type="noop")
    d.stop()
    before = d.db.read_bytes()
    proc = jobd("db", "recover", "--db", str(d.db), env=d.env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{d.db}: integrity check ok; nothing to recover"
    assert d.db.read_bytes() == before
    assert not list(d.state.glob("jobd.db.damaged-*"))


def test_recover_on_a_mistyped_path_makes_nothing(tmp_path: Path) -> None:
    # a typo in the folder, then in the file name of an existing folder
    for db in (tmp_path / "stat" / "jobd.db", tmp_path / "jobs.db"):
        proc = jobd("db", "recover", "--db", str(db))
        assert proc.returncode == 1
        assert f"{db}: no such database" in proc.stderr and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []  # no folder, no jobd.lock


def test_recover_reads_tables_not_indexes_and_fails_when_rows_are_lost(tmp_path: Path) -> None:
    from jobd.store import Store
    db = tmp_path / "state" / "jobd.db"
    store = Store(db, synchronous="normal").open()
    import uuid
    from jobd.models import Job, JobStatus
    for n in range(400):
        store.submit_job(Job(id=str(uuid.uuid4()), type="noop", user_id=f"u{n % 7}",
                             project_id=f"p{n}", status=JobStatus.CREATED, created_at=0,
                             updated_at=0, version=0, metadata={"pad": "x" * 300}),
                         actor="jobd")
    store.close()
    with sqlite3.connect(db, isolation_level=None) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page = conn.execute("PRAGMA page_size").fetchone()[0]
        # a leaf page of the jobs table itself, in the middle of it
        pages = [r[0] for r in conn.execute(
            "SELECT pageno FROM dbstat WHERE name = 'jobs' AND pagetype = 'leaf'")]
    victim = pages[len(pages) // 2]
    with open(db, "r+b") as f:
        f.seek((victim - 1) * page)
        f.write(b"\xff" * page)
    proc = jobd("db", "recover", "--db", str(db))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    # the rows come from the table itself; the indexes still count those of the lost page
    lines = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": saved" in line)
    n_saved = int(lines["jobs"].split()[1].rstrip(","))
    assert 300 < n_saved < 400 and lines["jobs"] == f"saved {n_saved}, lost {400 - n_saved}"
    assert lines["job_events"] == f"saved {2 * n_saved}, lost {800 - 2 * n_saved}"
    assert "recovered with losses" in proc.stderr
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert conn.execute("SELECT count(*) FROM jobs").fetchone() == (n_saved,)


def test_backup_into_a_missing_folder_is_one_line(make_daemon: Callable[..., Daemon],
                                                  tmp_path: Path) -> None:
    d = make_daemon()
    target = tmp_path / "no" / "such" / "folder" / "b.db"
    proc = jobd("db", "backup", str(target), "--db", str(d.db), env=d.env)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        f"jobd: {target}: no such folder {target.parent}; create it first"]


# -- options anywhere -----------------------------------------------------------------------

def test_global_options_work_after_the_command(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon(start=False)
    d.state.mkdir(parents=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobd", "serve", "--socket", str(d.socket), "--db", str(d.db),
         "--config", str(d.config), "--log-format", "json"],
        env=d.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    d.proc = proc
    try:
        wait_for(lambda: _answers(d), what="the daemon to answer")
        check = jobd("db", "check", "--db", str(d.db), env=d.env)
        assert check.returncode == 0 and check.stdout.strip() == f"{d.db}: ok", check.stderr
        # before and after: the one after the command wins
        check = jobd("--db", "/nonexistent/x.db", "db", "check", "--db", str(d.db), env=d.env)
        assert check.returncode == 0, check.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    assert jobd("--version").stdout.strip().startswith("jobd ")


# -- private files outside systemd ----------------------------------------------------------

def test_a_new_state_folder_is_private(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon(start=False)
    d.db = d.state / "fresh" / "jobd.db"  # a folder jobd makes itself
    d.start()
    ok(d, "jobs.submit", type="noop")
    assert stat.S_IMODE(d.db.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(d.db.stat().st_mode) == 0o600
    assert stat.S_IMODE((d.db.parent / "jobd.lock").stat().st_mode) == 0o600


# -- SIGHUP ---------------------------------------------------------------------------------

def test_sighup_reloads_workers_and_running_jobs_go_on(make_daemon: Callable[..., Daemon]
                                                       ) -> None:
    d = make_daemon(config=FAST_CONFIG.replace("[execution]", "[execution]\nworkers = 1"))
    first = running_command(d)
    second = ok(d, "jobs.submit", type="command", options={"argv": SLOW})
    time.sleep(0.3)
    assert ok(d, "jobs.get", job_id=second["id"])["status"] == "queued"

    d.config.write_text(FAST_CONFIG.replace("[execution]", "[execution]\nworkers = 2"))
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: ok(d, "jobs.get", job_id=second["id"])["status"] == "running",
             what="the second job to start after the reload")
    assert ok(d, "jobs.get", job_id=first["id"])["status"] == "running"
    assert d.proc.poll() is None
    assert "config_reloaded" in d.log()
    assert ok(d, "admin.stats")["config"]["error"] is None
    assert ok(d, "admin.stats")["workers"] == 2


def test_sighup_with_a_broken_config_keeps_the_old_one(make_daemon: Callable[..., Daemon]
                                                       ) -> None:
    d = make_daemon()
    d.config.write_text("[execution]\nworkers = -3\n")
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "config_reload_failed" in d.log(), what="the reload to be refused")
    assert d.proc.poll() is None and ok(d, "ping")
    assert "execution.workers must be positive" in d.log()
    shown = ok(d, "admin.stats")["config"]
    assert shown["file"] == str(d.config) and "execution.workers must be positive" in shown["error"]
    # a path template naming what jobd does not fill, a duration past any number: refused
    # at the reload, not when a path or a time is first made from them
    for text, problem in (('[sync]\nallowed_roots = ["{nope}/x"]\n', "names {nope}"),
                          ("[retention]\ncleanup_every = inf\n", "not a duration")):
        d.config.write_text(text)
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: problem in (ok(d, "admin.stats")["config"]["error"] or ""),
                 what=f"the reload to be refused: {problem}")
        assert d.proc.poll() is None and ok(d, "ping")
    # and a socket change is kept until a restart, with a warning
    d.config.write_text(FAST_CONFIG + '\n[storage]\nsynchronous = "normal"\n')
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "config_change_needs_restart" in d.log(), what="the restart warning")
    assert ok(d, "ping")


# -- max_stored_per_user ----------------------------------------------------------------------

def test_a_user_keeps_at_most_max_stored_finished_jobs(make_daemon: Callable[..., Daemon]
                                                       ) -> None:
    d = make_daemon(config=FAST_CONFIG.replace("[execution]",
                                               "[execution]\nmax_stored_per_user = 3"))
    ids = []
    for n in range(5):
        job = ok(d, "jobs.submit", type="command", as_user="greedy",
                 options={"argv": ["sh", "-c", f"echo run {n}"]})
        wait_for(lambda: ok(d, "jobs.get", job_id=job["id"])["status"] == "completed",
                 what=f"job {n} to complete")
        ids.append(job["id"])
    other = ok(d, "jobs.submit", type="noop", as_user="modest")
    kept = [j["id"] for j in ok(d, "jobs.list", user_id="greedy")["jobs"]]
    assert kept == ids[:1:-1]  # the three newest, newest first
    for gone in ids[:2]:
        assert d.raw("jobs.get", job_id=gone)["error"]["code"] == -32004
        assert not (d.state / "logs" / f"{gone}.log").exists()
    assert (d.state / "logs" / f"{ids[-1]}.log").exists()
    assert ok(d, "jobs.get", job_id=other["id"])["user_id"] == "modest"
    assert "jobs_forgotten" in d.log()


def _catches_sighup(pid: int) -> bool:
    with open(f"/proc/{pid}/status") as f:
        caught = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
    return bool(caught & 1 << (signal.SIGHUP - 1))


def test_a_sighup_while_jobd_starts_is_held_and_reloads_once_it_serves(
        make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon(start=False)
    d.config.unlink(missing_ok=True)
    os.mkfifo(d.config)  # jobd waits at reading its config: still starting
    d.state.mkdir(parents=True, exist_ok=True)
    with open(d.stderr, "ab") as err:
        d.proc = subprocess.Popen(d.argv(), env=d.env, stdout=err, stderr=err,
                                  stdin=subprocess.DEVNULL)
    wait_for(lambda: d.proc.poll() is not None or _catches_sighup(d.proc.pid),
             what="jobd to hold SIGHUP while it starts")
    d.proc.send_signal(signal.SIGHUP)
    time.sleep(0.2)
    assert d.proc.poll() is None, d.log()
    with open(d.config, "w") as fifo:  # the config jobd reads as it starts
        fifo.write(FAST_CONFIG.replace("[execution]", "[execution]\nworkers = 1"))
    reloaded = d.config.with_name("next.toml")
    reloaded.write_text(FAST_CONFIG.replace("[execution]", "[execution]\nworkers = 3"))
    os.replace(reloaded, d.config)  # what the held SIGHUP's reload reads
    def workers() -> int | None:
        try:
            return ok(d, "admin.stats")["workers"]
        except OSError:  # not serving yet
            return None
    wait_for(lambda: d.proc.poll() is not None or workers() == 3, timeout=20,
             what="the held SIGHUP's reload")
    assert d.proc.poll() is None and "config_reloaded" in d.log()


def test_a_reloaded_log_level_applies_at_once(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon()
    ok(d, "ping")

    def opened() -> int:
        ok(d, "ping")  # a new connection: a debug line
        return d.log().count('"connection_opened"')
    assert opened() == 0
    for level, more in (("debug", True), ("info", False)):
        d.config.write_text(FAST_CONFIG + f'\n[server]\nlog_level = "{level}"\n')
        before = d.log().count('"config_reloaded"')
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: d.log().count('"config_reloaded"') > before, what="the reload")
        seen = opened()
        assert (opened() > seen) is more, level
