"""Restarts through the real daemon: kill -9 mid-job and recovery, SIGTERM and requeue,
and the scheduled cleanup (SPEC §6)."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any, Callable

from jobd.joblogs import is_note
from jobd.supervise import SCRIPT as SUPERVISOR

from conftest import (FAST_CONFIG, Daemon, clone, commit_files, error_of, git, group_alive,
                      joblog, make_upstream, pid_alive, result_of, wait_for, wait_terminal)


def held_indexer(tmp_path: Path, *, saves_on_term: bool = False) -> tuple[str, Path, Path]:
    """(config, pid file, release file): an indexer that records its pid in the pid file,
    then runs until the release file exists; ``saves_on_term``: told to stop, it exits 0
    (as an indexer that saved its place would)."""
    pids, release = tmp_path / "indexer.pids", tmp_path / "release"
    script = tmp_path / "indexer.sh"
    script.write_text(("trap 'exit 0' TERM\n" if saves_on_term else "")
                      + f"echo $$ >> {pids}\n"
                      f"while [ ! -e {release} ]; do sleep 0.05; done\n"
                      'echo \'{"progress": 100, "message": "indexed"}\'\n')
    config = FAST_CONFIG + f'\n[sync]\nindex_command = ["sh", "{script}"]\n'
    return config, pids, release


def read_pids(path: Path) -> list[int]:
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def sync_in_indexing(d: Daemon, tmp_path: Path, pids: Path) -> tuple[dict[str, Any], str]:
    """A sync of a fresh project that pulled one commit and now runs its (held) indexer:
    (the job, the upstream revision)."""
    upstream = make_upstream(tmp_path / "upstream")
    clone(upstream, d.repos / "root" / "proj")
    new = commit_files(upstream, {"new.txt": "new\n"})
    job = result_of(d, "jobs.submit", type="sync", project_id="proj")
    wait_for(lambda: read_pids(pids), what="the indexer to start")
    assert result_of(d, "jobs.get", job_id=job["id"])["phase"] == "indexing"
    return job, new


def fetches(log: str) -> int:
    """How many times jobd ran ``git fetch`` for the job, as its own log notes tell."""
    return sum(1 for line in log.splitlines() if is_note(line)
               and line.split("] ", 1)[1].startswith("$ git") and " fetch " in line)


def messages(d: Daemon, job_id: str) -> list[tuple[str, str | None]]:
    return [(e["status"], e["message"]) for e in result_of(d, "jobs.events", job_id=job_id)]


def supervisors(d: Daemon) -> list[int]:
    """The daemon's per-job supervisor processes."""
    assert d.proc is not None
    found = []
    for entry in os.scandir("/proc"):
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_bytes()
            cmdline = Path(f"/proc/{entry.name}/cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        if ppid == d.proc.pid and os.fsencode(SUPERVISOR) in cmdline:
            found.append(int(entry.name))
    return found


def jobs_during_a_crash(d: Daemon, tmp_path: Path, pids: Path
                        ) -> tuple[dict[str, Any], str, dict[str, Any], int, int]:
    """A sync in its (held) indexer and a running command: (sync, upstream revision,
    command, indexer pid, command pid)."""
    job, new = sync_in_indexing(d, tmp_path, pids)
    marker = tmp_path / "command.pid"
    command = result_of(d, "jobs.submit", type="command", options={
        "argv": ["sh", "-c", f"echo $$ > {marker}; exec sleep 60"]})
    wait_for(lambda: read_pids(marker), what="the command to start")
    (orphan,) = read_pids(pids)
    (command_pid,) = read_pids(marker)
    return job, new, command, orphan, command_pid


def resumes_after_restart(d: Daemon, job: dict[str, Any], new: str, command: dict[str, Any],
                          pids: Path, release: Path) -> None:
    assert ("queued", "recovered after restart") in messages(d, job["id"])
    failed = wait_terminal(d, command["id"])
    assert failed["status"] == "failed" and failed["error"] == "interrupted by daemon restart"

    wait_for(lambda: len(read_pids(pids)) == 2, what="the resumed indexer to start")
    release.touch()
    done = wait_terminal(d, job["id"])
    assert done["status"] == "completed", done
    assert done["attempts"] == 2
    assert (done["result"]["new_revision"], done["result"]["commits_pulled"]) == (new, 1)
    log = joblog(d, job["id"])
    assert "resuming after the finished phases init, git_sync" in log
    assert fetches(log) == 1, log
    assert git("rev-parse", "HEAD", cwd=d.repos / "root" / "proj") == new


def test_kill_9_mid_sync_takes_its_programs_down_and_resumes_from_the_checkpoint(
        make_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    config, pids, release = held_indexer(tmp_path)
    d = make_daemon(config=config)
    job, new, command, orphan, command_pid = jobs_during_a_crash(d, tmp_path, pids)

    d.kill()
    # each program's supervisor outlives jobd just long enough to kill it
    wait_for(lambda: not pid_alive(orphan) and not pid_alive(command_pid), timeout=2,
             what="the supervisors to kill the programs of the dead daemon")
    d.start()
    resumes_after_restart(d, job, new, command, pids, release)


def test_kill_9_of_the_daemon_and_its_supervisors_is_cleaned_up_at_restart(
        make_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    config, pids, release = held_indexer(tmp_path)
    d = make_daemon(config=config)
    job, new, command, orphan, command_pid = jobs_during_a_crash(d, tmp_path, pids)
    stopped = supervisors(d)
    assert len(stopped) == 2, stopped
    for pid in stopped:  # frozen, so they cannot clean up: as if killed with jobd
        os.kill(pid, signal.SIGSTOP)
    d.kill()
    for pid in stopped:
        os.kill(pid, signal.SIGKILL)
    assert pid_alive(orphan) and pid_alive(command_pid)
    d.start()

    # the restarted daemon killed what the dead one left behind
    wait_for(lambda: not pid_alive(orphan) and not pid_alive(command_pid), timeout=5,
             what="the orphaned processes to be killed")
    assert group_alive(orphan) == [] and group_alive(command_pid) == []
    killed = {e.get("job_id") for e in d.log_events()
              if e.get("event") == "orphan_processes_killed"}
    assert {job["id"], command["id"]} <= killed
    resumes_after_restart(d, job, new, command, pids, release)


def test_sigterm_requeues_running_jobs_and_they_complete_after_restart(
        make_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    # the indexer exits 0 when told to stop: a step of the sync, not its end
    config, pids, release = held_indexer(tmp_path, saves_on_term=True)
    d = make_daemon(config=config)
    sync, new = sync_in_indexing(d, tmp_path, pids)
    noop = result_of(d, "jobs.submit", type="noop", options={"seconds": 1.0})
    command = result_of(d, "jobs.submit", type="command", options={"argv": ["sleep", "60"]})
    wait_for(lambda: all(result_of(d, "jobs.get", job_id=j["id"])["status"] == "running"
                         for j in (noop, command)), what="the jobs to start")

    assert d.stop(signal.SIGTERM, timeout=15) == 0
    assert not d.socket.exists()
    (indexer,) = read_pids(pids)
    assert not pid_alive(indexer) and group_alive(indexer) == []

    release.touch()
    d.start()
    for job in (sync, noop):
        assert ("queued", "interrupted by shutdown") in messages(d, job["id"])
        done = wait_terminal(d, job["id"])
        assert done["status"] == "completed", done
        assert done["attempts"] == 2
    assert fetches(joblog(d, sync["id"])) == 1
    assert result_of(d, "jobs.get", job_id=sync["id"])["result"]["new_revision"] == new
    # a command is not resumable: it may not be safe to run twice
    stopped = result_of(d, "jobs.get", job_id=command["id"])
    assert stopped["status"] == "failed"
    assert stopped["error"] == "interrupted by daemon shutdown"


def test_a_shutdown_gives_a_program_shutdown_grace_to_stop_not_cancel_grace(
        make_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    """A program told to stop by a shutdown that saves its work in its grace and exits 0
    has completed, with its result: a ``command`` is not failed, and a resumable type is
    not run again (SPEC §6 requeues *interrupted* jobs; this one finished)."""
    program = tmp_path / "saver.sh"
    program.write_text(
        'trap \'sleep 2; touch "$1.saved"; echo "{\\"result\\": {\\"saved\\": true}}"; '
        'exit 0\' TERM\n'
        'echo run >> "$1.runs"; touch "$1.started"\n'
        'sleep 30 & wait; sleep 30 & wait\n')
    # cancel_grace 1s, shutdown_grace 5s
    d = make_daemon(config=FAST_CONFIG + f'\n[types.saver]\nargv = ["sh", "{program}", '
                    f'"{tmp_path}/saver"]\nresumable = true\n')
    command = result_of(d, "jobs.submit", type="command", options={
        "argv": ["sh", str(program), str(tmp_path / "command")]})
    saver = result_of(d, "jobs.submit", type="saver")
    for name in ("command", "saver"):
        wait_for((tmp_path / f"{name}.started").exists, what=f"the {name} program to start")
    assert d.stop(signal.SIGTERM, timeout=15) == 0
    for name in ("command", "saver"):
        assert (tmp_path / f"{name}.saved").exists(), "killed before its shutdown_grace was up"
    d.start()
    for job in (command, saver):
        done = wait_terminal(d, job["id"])
        assert (done["status"], done["result"], done["attempts"]) == (
            "completed", {"saved": True}, 1), done
    time.sleep(0.5)  # a requeued saver would be running again by now
    assert (tmp_path / "saver.runs").read_text() == "run\n"


def test_cleanup_on_schedule_forgets_old_jobs_and_their_logs(
        make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon(config=FAST_CONFIG + '\n[retention]\nkeep = "1s"\nkeep_failed = "1s"\n'
                                         'cleanup_every = "1s"\n')
    done = wait_terminal(d, result_of(d, "jobs.submit", type="command",
                                      options={"argv": ["echo", "some output"]})["id"])
    log = d.state / "logs" / f"{done['id']}.log"
    assert done["status"] == "completed" and log.exists()
    active = result_of(d, "jobs.submit", type="noop", options={"seconds": 4})

    wait_for(lambda: "error" in d.raw("jobs.get", job_id=done["id"]), timeout=6, interval=0.1,
             what="the completed job to be cleaned up")
    assert error_of(d, "jobs.get", job_id=done["id"])["code"] == -32004
    assert not log.exists()
    # the sweep logs its end once it is over, a moment after its last chunk's files went
    wait_for(lambda: any(e.get("event") == "cleanup_finished" and e.get("deleted", 0) >= 1
                         for e in d.log_events()), timeout=5, what="cleanup_finished logged")
    # an active job is never touched
    assert result_of(d, "jobs.get", job_id=active["id"])["status"] in ("queued", "running")


def test_after_sigterm_no_queued_job_starts_while_the_last_calls_are_answered(
        make_daemon: Callable[..., Daemon]) -> None:
    """SPEC §6: a stop first stops dispatching. The server gives the calls under way a few
    seconds (here a client that does not read its big answer); a job ending meanwhile
    must not hand its slot to a queued one, which the stop would then cut short."""
    d = make_daemon(config=FAST_CONFIG.replace("[execution]", "[execution]\nworkers = 1"))
    result_of(d, "admin.pause")
    for _ in range(150):  # a jobs.list answer of about 9 MB
        result_of(d, "jobs.submit", type="noop", metadata={"blob": "x" * 60_000})
    result_of(d, "jobs.cancel", filter={"status": "queued"})
    result_of(d, "admin.resume")
    first = result_of(d, "jobs.submit", type="noop", options={"seconds": 1.5})
    queued = result_of(d, "jobs.submit", type="command", options={"argv": ["sleep", "30"]})
    wait_for(lambda: result_of(d, "jobs.get", job_id=first["id"])["status"] == "running",
             what="the first job to start")
    with socket.socket(socket.AF_UNIX) as reader:
        reader.connect(str(d.socket))
        reader.sendall(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "jobs.list",
                                   "params": {"limit": 1000}}).encode() + b"\n")
        time.sleep(0.3)
        assert d.stop(signal.SIGTERM, timeout=15) == 0
    # never started before the stop: it starts after the restart, its first attempt
    d.start()
    wait_for(lambda: result_of(d, "jobs.get", job_id=queued["id"])["status"] == "running",
             what="the queued job to start after the restart")
    events = result_of(d, "jobs.events", job_id=queued["id"])
    assert [e["status"] for e in events] == ["created", "queued", "running"], events
    assert result_of(d, "jobs.get", job_id=queued["id"])["attempts"] == 1
