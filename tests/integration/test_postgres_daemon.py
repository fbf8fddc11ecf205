"""jobd on a PostgreSQL database, one node at a time (SPEC §11): a sync of a real git
repository with its progress seen through ``jobs.wait``, a cancel that takes the job's
process group down, a clean restart and a kill -9 that keep every job, a second jobd on
the same database joining as a second node (and one with other limits refused),
``jobd db check`` / ``db backup`` / ``db recover`` on it, and the dsn's password in no log
or message. Several nodes at work together: ``test_three_nodes.py``."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

import pg
from conftest import (FAST_CONFIG, Daemon, clone, commit_files, follow, git, group_alive,
                      make_upstream, phases_of, result_of, wait_for, wait_terminal)
from test_engine_restart import held_indexer, jobs_during_a_crash, resumes_after_restart

pytest_plugins = ["pg"]

#: in every test's dsn: the test server trusts its socket, so the password is never
#: checked, but jobd is given it as a real one would be, and must show it nowhere
PASSWORD = "s3cret-pw-9f2"


@pytest.fixture
def dsn(pg_dsn: str) -> str:
    return f"{pg_dsn}&password={PASSWORD}"


def postgres_config(dsn: str, root: Path, extra: str = FAST_CONFIG) -> str:
    """A config for a jobd whose files live in ``root`` (``Daemon(root)``'s layout) and
    whose jobs live in the PostgreSQL database ``dsn``."""
    return (f"{extra}\n[storage]\nbackend = \"postgres\"\ndsn = \"{dsn}\"\n"
            f"state_dir = \"{root / 'state'}\"\n")


@pytest.fixture
def make_pg_daemon(make_daemon: Callable[..., Daemon], dsn: str, tmp_path: Path
                   ) -> Callable[..., Daemon]:
    """``make_daemon`` for a jobd on this test's database (``extra``: the config's other
    sections, FAST_CONFIG's by default)."""
    count = iter(range(100))

    def make(extra: str = FAST_CONFIG, start: bool = True, db: str | None = None,
             env: dict[str, str] | None = None) -> Daemon:
        root = tmp_path / f"pg{next(count)}"
        return make_daemon(config=postgres_config(db or dsn, root, extra), start=start,
                           root=root, env=env)
    return make


def connect(dsn: str) -> Any:
    import psycopg
    return psycopg.connect(dsn, autocommit=True)


def stored(dsn: str, job_id: str) -> tuple[str, int] | None:
    """(status, attempts) of a job as its PostgreSQL row holds them."""
    with connect(dsn) as conn:
        return conn.execute("SELECT status, attempts FROM jobs WHERE id = %s",
                            (job_id,)).fetchone()


def jobd(*args: str, env: dict[str, str] | None = None,
         timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "jobd", *args], capture_output=True,
                          text=True, env=env, timeout=timeout, stdin=subprocess.DEVNULL)


def jobd_of(d: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    """``jobd`` run with a daemon's config, socket and (ignored) --db."""
    return jobd("--config", str(d.config), "--socket", str(d.socket), "--db", str(d.db),
                *args, env=d.env)


def said(proc: subprocess.CompletedProcess[str]) -> list[str]:
    """What a jobd said to people on stderr: its lines but the JSON log's."""
    return [line for line in proc.stderr.splitlines() if not line.startswith("{")]


def masked(dsn: str) -> str:
    return dsn.replace(PASSWORD, "***")


# -- a sync, with its progress, and what the node keeps on disk ---------------------------------

def progress_indexer(tmp_path: Path) -> str:
    """An indexer that reports five steps a little apart: the config's [sync] section."""
    script = tmp_path / "indexer.sh"
    script.write_text("for p in 20 40 60 80 100; do\n"
                      '  echo "{\\"progress\\": $p, \\"message\\": \\"step $p\\"}"\n'
                      "  sleep 0.15\n"
                      "done\n")
    return f'\n[sync]\nindex_command = ["sh", "{script}"]\n'


def test_a_sync_runs_on_postgres_with_its_progress_seen_through_wait(
        make_pg_daemon: Callable[..., Daemon], dsn: str, tmp_path: Path) -> None:
    d = make_pg_daemon(FAST_CONFIG + progress_indexer(tmp_path))
    upstream = make_upstream(tmp_path / "upstream")
    repo = clone(upstream, d.repos / "root" / "proj")
    new = commit_files(upstream, {"docs/new.md": "one\n", "src/a.py": None})

    job = result_of(d, "jobs.submit", type="sync", project_id="proj")
    done, progress = follow(d, job["id"])

    assert done["status"] == "completed", done
    assert (done["result"]["new_revision"], done["result"]["commits_pulled"]) == (new, 1)
    assert git("rev-parse", "HEAD", cwd=repo) == new and not (repo / "src" / "a.py").exists()
    # the indexer's steps reached the waiter as they happened, never backwards: a sync's
    # indexing phase fills 40-95 % of its bar (handlers/sync.py)
    assert progress == sorted(progress) and progress[-1] == 100
    assert len({p for p in progress if 40 < p <= 95}) >= 3, progress
    assert phases_of(d, job["id"]) == ["init", "git_sync", "indexing", "finalizing"]
    # the job lives in PostgreSQL; the node's folder has its log and no database file
    assert stored(dsn, job["id"]) == ("completed", 1)
    assert (d.state / "logs" / f"{job['id']}.log").exists()
    assert not d.db.exists() and not list(d.state.glob("*.db*"))


def test_the_node_logs_its_backend_and_the_ignored_db_once_and_never_the_password(
        make_pg_daemon: Callable[..., Daemon], dsn: str) -> None:
    d = make_pg_daemon()
    result_of(d, "jobs.submit", type="noop")
    assert d.stop() == 0

    events = d.log_events()
    ignored = [e for e in events if e.get("event") == "db_option_ignored"]
    assert len(ignored) == 1 and ignored[0]["given"] == f"--db {d.db}", ignored
    (started,) = [e for e in events if e.get("event") == "jobd_started"]
    assert (started["backend"], started["database"], started["state_dir"]) == (
        "postgres", masked(dsn), str(d.state))
    shown = jobd_of(d, "config", "check")
    assert shown.returncode == 0, shown.stderr
    assert f'dsn = "{masked(dsn)}"' in shown.stdout.splitlines()
    assert PASSWORD not in d.log() + shown.stdout + shown.stderr


def test_a_reload_keeps_the_database_it_started_on(
        make_pg_daemon: Callable[..., Daemon], dsn: str, tmp_path: Path) -> None:
    d = make_pg_daemon()
    text = d.config.read_text()
    elsewhere = f"postgresql:///elsewhere?host={tmp_path}&password={PASSWORD}"
    d.config.write_text(text.replace(dsn, elsewhere).replace("[execution]\n",
                                                             "[execution]\nworkers = 7\n"))
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)
    reloaded = wait_for(lambda: [e for e in d.log_events() if e.get("event") == "config_reloaded"],
                        what="the reload")
    assert reloaded[0]["workers"] == 7  # the reloadable part took
    kept = {e.get("key") for e in d.log_events()
            if e.get("event") == "config_change_needs_restart"}
    assert kept == {"storage"}
    job = result_of(d, "jobs.submit", type="noop")
    assert wait_terminal(d, job["id"])["status"] == "completed"
    assert stored(dsn, job["id"]) == ("completed", 1)  # still the database it started on
    assert PASSWORD not in d.log()


# -- cancel, restarts ---------------------------------------------------------------------------

def test_cancel_of_a_running_job_takes_its_process_group_down(
        make_pg_daemon: Callable[..., Daemon], dsn: str, tmp_path: Path) -> None:
    d = make_pg_daemon()
    marker = tmp_path / "pgid"
    # a group of two: the shell (its leader, whose pid it writes) and a child
    job = result_of(d, "jobs.submit", type="command", options={
        "argv": ["sh", "-c", f"sleep 60 & echo $$ > {marker}; wait"]})
    pgid = int(wait_for(lambda: marker.exists() and marker.read_text().strip(),
                        what="the command to start"))
    assert len(wait_for(lambda: len(group_alive(pgid)) >= 2 and group_alive(pgid),
                        what="the command's child")) == 2

    stopped = result_of(d, "jobs.cancel", job_id=job["id"], wait=True)

    assert stopped["status"] == "cancelled", stopped
    assert group_alive(pgid) == []
    assert stored(dsn, job["id"]) == ("cancelled", 1)
    events = result_of(d, "jobs.events", job_id=job["id"])
    assert [e["status"] for e in events][-1] == "cancelled"


def test_a_clean_restart_keeps_every_job_and_the_pause(
        make_pg_daemon: Callable[..., Daemon], dsn: str) -> None:
    d = make_pg_daemon()
    done = [result_of(d, "jobs.submit", type="noop", as_user=f"u{i}") for i in range(3)]
    for job in done:
        assert wait_terminal(d, job["id"])["status"] == "completed"
    result_of(d, "admin.pause")
    waiting = result_of(d, "jobs.submit", type="noop")
    before = {j["id"]: j for j in result_of(d, "jobs.list", limit=100)["jobs"]}
    assert d.stop() == 0

    d.start()
    after = {j["id"]: j for j in result_of(d, "jobs.list", limit=100)["jobs"]}
    assert after == before
    assert after[waiting["id"]]["status"] == "queued"
    assert stored(dsn, waiting["id"]) == ("queued", 0)  # kept by PostgreSQL
    assert "unclean_stop_detected" not in d.log()
    result_of(d, "admin.resume")  # the pause outlived the restart: the job waited for this
    assert wait_terminal(d, waiting["id"])["status"] == "completed"


def test_kill_9_mid_sync_recovers_on_restart_from_the_checkpoint(
        make_pg_daemon: Callable[..., Daemon], dsn: str, tmp_path: Path) -> None:
    config, pids, release = held_indexer(tmp_path)
    d = make_pg_daemon(config)
    job, new, command, orphan, command_pid = jobs_during_a_crash(d, tmp_path, pids)
    assert stored(dsn, job["id"]) == ("running", 1)

    d.kill()
    d.start()

    assert any(e.get("event") == "unclean_stop_detected" for e in d.log_events())
    # the sync resumed after its pulled commit (one fetch, attempt 2); the command failed
    resumes_after_restart(d, job, new, command, pids, release)
    assert stored(dsn, job["id"]) == ("completed", 2)
    assert group_alive(orphan) == [] and group_alive(command_pid) == []


# -- one node per database, one daemon per state folder ------------------------------------------

def test_a_second_jobd_on_the_database_joins_as_a_node_and_one_with_other_limits_is_refused(
        make_pg_daemon: Callable[..., Daemon], dsn: str) -> None:
    """Several jobd on one database are the nodes of a cluster (SPEC §11): a second one
    registers a node of its own and sees the first's jobs; one whose cluster-wide settings
    differ is refused with one line naming the first difference, and changes nothing."""
    first = make_pg_daemon()
    job = result_of(first, "jobs.submit", type="command", options={"argv": ["sleep", "60"]})
    wait_for(lambda: result_of(first, "jobs.get", job_id=job["id"])["status"] == "running",
             what="the job to run")
    second = make_pg_daemon()  # its own state folder and socket
    nodes = result_of(second, "admin.stats")["nodes"]
    assert len(nodes) == 2 and sorted(n["running"] for n in nodes) == [0, 1], nodes
    assert result_of(second, "jobs.get", job_id=job["id"])["status"] == "running"

    other = make_pg_daemon(FAST_CONFIG + "max_running_per_user = 5\n", start=False)
    other.state.mkdir(parents=True)
    refused = jobd(*other.argv()[3:], env=other.env)

    assert refused.returncode == 1
    (line,) = said(refused)
    assert line.startswith("jobd: ") and \
        "[execution] max_running_per_user: 5 here, 3 on node" in line, line
    assert PASSWORD not in line
    assert not other.socket.exists()
    assert len(result_of(first, "admin.stats")["nodes"]) == 2
    assert stored(dsn, job["id"]) == ("running", 1)


def test_a_second_jobd_on_the_same_state_folder_is_refused_naming_the_holder(
        make_pg_daemon: Callable[..., Daemon], dsn: str, tmp_path: Path) -> None:
    first = make_pg_daemon()
    other_socket = Path(str(first.socket).replace("jobd.sock", "other.sock"))
    refused = jobd("--config", str(first.config), "--socket", str(other_socket), "serve",
                   env=first.env)
    assert refused.returncode == 1
    assert refused.stderr.splitlines() == [
        f"jobd: state folder {first.state} is in use by jobd (pid {first.proc.pid}, database "
        f"{masked(dsn)}); stop it first (systemctl stop jobd), or give this one a folder of "
        "its own ([storage] state_dir)"]
    assert not other_socket.exists()
    assert (first.state / "jobd.lock").read_text() == f"{first.proc.pid}\n{masked(dsn)}\n"


def test_an_unreachable_database_stops_jobd_and_its_db_tools_with_one_line_each(
        make_pg_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    gone = f"postgresql:///jobd?host={tmp_path}/nowhere&user=jobd&password={PASSWORD}"
    d = make_pg_daemon(start=False, db=gone)
    d.state.mkdir(parents=True)
    proc = jobd(*d.argv()[3:], env=d.env)
    assert proc.returncode == 1
    (line,) = said(proc)
    assert line.startswith("jobd: ") and "Traceback" not in proc.stderr
    assert PASSWORD not in proc.stderr
    assert not d.socket.exists()
    # libpq's hint, on a line of its own in its text, stays on the line it belongs to
    check = jobd_of(d, "db", "check")
    assert check.returncode == 1 and len(said(check)) == 2, check.stderr
    assert said(check)[1] == f"jobd: {masked(gone)}: the check found problems (above)"
    backup = jobd_of(d, "db", "backup", str(tmp_path / "b.dump"))
    assert backup.returncode == 1 and len(said(backup)) == 1, backup.stderr
    assert said(backup)[0].startswith(f"jobd: {masked(gone)}: pg_dump failed: ")
    assert PASSWORD not in check.stderr + backup.stderr
    assert not (tmp_path / "b.dump").exists() and not list(tmp_path.glob(".b.dump*"))


# -- jobd db check / backup / recover -------------------------------------------------------------

@pytest.fixture
def scratch_database(postgres: pg.PostgresServer) -> Iterator[str]:
    """An empty database to restore into; its dsn."""
    name = "restored"
    with connect(postgres.dsn_for("postgres")) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield postgres.dsn_for(name)
    finally:
        with connect(postgres.dsn_for("postgres")) as admin:
            admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def test_db_check_and_backup_while_serving_and_a_restore_of_the_backup(
        make_pg_daemon: Callable[..., Daemon], dsn: str, tmp_path: Path,
        scratch_database: str) -> None:
    d = make_pg_daemon()
    jobs = [result_of(d, "jobs.submit", type="noop", as_user=f"u{i}") for i in range(3)]
    for job in jobs:
        wait_terminal(d, job["id"])

    check = jobd_of(d, "db", "check")
    assert (check.returncode, check.stdout, check.stderr) == (0, f"{masked(dsn)}: ok\n", "")

    target = tmp_path / "backups" / "jobd.dump"
    target.parent.mkdir()
    # the real pg_dump, behind one that notes what it was given
    seen = tmp_path / "wrapped"
    seen.mkdir()
    (seen / "pg_dump").write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {seen}/argv\n"
                                  f"printf '%s' \"$PGPASSWORD\" > {seen}/password\n"
                                  f'exec {pg_program("pg_dump")} "$@"\n')
    (seen / "pg_dump").chmod(0o755)
    d.env["PATH"] = f"{seen}:{d.env.get('PATH', '/usr/bin:/bin')}"
    made = jobd_of(d, "db", "backup", str(target))
    assert made.returncode == 0, made.stderr
    # the password went by the environment, never the command line others can read
    assert PASSWORD not in (seen / "argv").read_text()
    assert (seen / "password").read_text() == PASSWORD
    assert made.stdout == f"{masked(dsn)} -> {target}: {target.stat().st_size} bytes\n"
    assert target.stat().st_mode & 0o077 == 0  # every job's data: the owner's alone
    assert result_of(d, "ping")
    again = jobd_of(d, "db", "backup", str(target))
    assert (again.returncode, again.stderr) == (
        1, f"jobd: {target}: already exists; choose a new file\n")

    restored = subprocess.run(
        [pg_program("pg_restore"), "--no-owner", f"--dbname={scratch_database}", str(target)],
        capture_output=True, text=True, timeout=60)
    assert restored.returncode == 0, restored.stderr
    with connect(scratch_database) as conn:
        assert {r[0] for r in conn.execute("SELECT id FROM jobs")} == {j["id"] for j in jobs}
    # and jobd runs on what was restored
    with_restored = make_pg_daemon(db=scratch_database)
    assert result_of(with_restored, "jobs.get", job_id=jobs[0]["id"])["status"] == "completed"
    assert PASSWORD not in check.stdout + made.stdout + made.stderr


def pg_program(name: str) -> str:
    from jobd.store.tools import _program
    return _program(name)


def test_db_check_names_a_broken_invariant(make_pg_daemon: Callable[..., Daemon], dsn: str
                                          ) -> None:
    d = make_pg_daemon()
    job = result_of(d, "jobs.submit", type="noop")
    wait_terminal(d, job["id"])
    with connect(dsn) as conn:
        # a hand edit: the row goes, the counts the store keeps beside it do not
        conn.execute("DELETE FROM jobs WHERE id = %s", (job["id"],))

    check = jobd_of(d, "db", "check")

    assert check.returncode == 1 and check.stdout == ""
    lines = check.stderr.splitlines()
    assert any("type and status counts" in line for line in lines), lines
    assert lines[-1] == f"jobd: {masked(dsn)}: the check found problems (above)"
    assert PASSWORD not in check.stderr


def test_db_backup_into_a_missing_folder_and_without_pg_dump_is_one_line(
        make_pg_daemon: Callable[..., Daemon], dsn: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    d = make_pg_daemon(start=False)
    target = tmp_path / "no" / "such" / "b.dump"
    proc = jobd_of(d, "db", "backup", str(target))
    assert (proc.returncode, proc.stderr.splitlines()) == (
        1, [f"jobd: {target}: no such folder {target.parent}; create it first"])

    from jobd.store import StoreError, tools
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(tools, "PG_BINDIRS", str(tmp_path / "postgresql" / "*" / "bin"))
    with pytest.raises(StoreError, match=r"^pg_dump not found on PATH nor in .*: install "
                                         r"PostgreSQL's client programs"):
        tools.backup_postgres(dsn, tmp_path / "b.dump")
    assert not (tmp_path / "b.dump").exists()


def test_db_recover_says_it_is_for_sqlite_only(make_pg_daemon: Callable[..., Daemon]) -> None:
    d = make_pg_daemon(start=False)
    proc = jobd_of(d, "db", "recover")
    assert proc.returncode == 1
    (line,) = proc.stderr.splitlines()
    assert line.startswith("jobd: db recover works on a SQLite file only;"), line
    assert "pg_restore" in line and not d.state.exists()


def test_a_storage_block_jobd_cannot_use_stops_serve_with_one_line(tmp_path: Path) -> None:
    conf = tmp_path / "jobd.toml"
    conf.write_text('[storage]\nbackend = "postgres"\ndsn = "dbname=jobd"\n')
    proc = jobd("--config", str(conf), "--socket", str(tmp_path / "s.sock"), "--db",
                str(tmp_path / "state" / "jobd.db"), "serve")
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        f'jobd: {conf}: storage.state_dir is not set, but backend = "postgres" needs it: the '
        "folder of this node's logs, repositories and lock, e.g. "
        'state_dir = "/var/lib/jobd"']
    assert not (tmp_path / "state").exists() and not (tmp_path / "s.sock").exists()
