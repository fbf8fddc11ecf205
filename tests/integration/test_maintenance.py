"""admin.maintenance against a real daemon (SPEC §4): refused submits and retries with the
reason, idempotent resends still answered, ``drained``, the switch and the pause across a
restart (the start-up log and systemd's STATUS=), and jobctl end to end.
"""

from __future__ import annotations

import shutil
import signal
import socket
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from conftest import Daemon, error_of, result_of, wait_for, wait_terminal

JOBCTL = str(Path(sys.executable).parent / "jobctl")
REASON = "upgrade to 2.1"


def command(d: Daemon, code: str, **extra: Any) -> dict[str, Any]:
    return result_of(d, "jobs.submit", type="command", as_user="maint",
                     options={"argv": [sys.executable, "-c", code]}, **extra)


def started(d: Daemon) -> dict[str, Any]:
    return next(e for e in reversed(d.log_events()) if e.get("event") == "jobd_started")


def test_maintenance_refuses_submits_and_retries_with_the_reason(daemon: Daemon) -> None:
    failed = command(daemon, "raise SystemExit(3)")
    assert wait_terminal(daemon, failed["id"])["status"] == "failed"
    first = command(daemon, "pass", idempotency_key="k1")
    wait_terminal(daemon, first["id"])
    assert result_of(daemon, "admin.maintenance") == {
        "maintenance": False, "reason": None, "running": 0, "queued": 0, "drained": True}

    on = result_of(daemon, "admin.maintenance", enabled=True, reason=REASON)
    assert on == {"maintenance": True, "reason": REASON, "running": 0, "queued": 0,
                  "drained": True}
    refused = error_of(daemon, "jobs.submit", type="noop", as_user="maint")
    assert refused["code"] == -32050 and REASON in refused["message"]
    assert refused["data"]["http_status"] == 503
    # an idempotent resend (same user, same key) still gets its job
    again = command(daemon, "pass", idempotency_key="k1")
    assert again["id"] == first["id"] and again["deduplicated"] is True
    # ... but the same key of another user is a new job: refused
    assert error_of(daemon, "jobs.submit", type="noop", as_user="other",
                    idempotency_key="k1")["code"] == -32050
    for params in ({"job_id": failed["id"]}, {"filter": {"status": "failed"}}):
        err = error_of(daemon, "jobs.retry", **params)
        assert err["code"] == -32050 and REASON in err["message"], params
    assert result_of(daemon, "jobs.get", job_id=failed["id"])["status"] == "failed"
    assert result_of(daemon, "admin.stats")["maintenance"] is True
    assert result_of(daemon, "admin.maintenance")["reason"] == REASON  # a report changes nothing

    off = result_of(daemon, "admin.maintenance", enabled=False)
    assert off["maintenance"] is False and off["reason"] is None
    assert result_of(daemon, "jobs.retry", job_id=failed["id"])["status"] == "queued"
    assert result_of(daemon, "admin.stats")["maintenance"] is False
    events = [e for e in daemon.log_events() if e.get("event", "").startswith("maintenance_")]
    assert [(e["event"], e["reason"]) for e in events] == [
        ("maintenance_enabled", REASON), ("maintenance_disabled", None)]
    assert all(e["actor"] for e in events)


def test_maintenance_params_and_rights(daemon: Daemon) -> None:
    for params, field in (({"enabled": "yes"}, "enabled"),
                          ({"enabled": True, "reason": "x" * 201}, "reason"),
                          ({"enabled": True, "reason": 7}, "reason"),
                          ({"enabled": True, "reason": "\ud800"}, "reason"),
                          ({"reason": "why"}, "reason"),
                          ({"enabled": False, "reason": "why"}, "reason")):
        err = error_of(daemon, "admin.maintenance", **params)
        assert (err["code"], err["data"]["field"]) == (-32602, field), params
    assert result_of(daemon, "admin.maintenance", enabled=True, reason="x" * 200)["reason"]
    # an admin acting for a user has that user's rights: no maintenance switch
    assert error_of(daemon, "admin.maintenance", enabled=False,
                    as_user="someone")["code"] == -32003
    assert result_of(daemon, "admin.maintenance")["maintenance"] is True


def test_jobs_go_on_and_drained_says_when_none_runs_or_can_start(daemon: Daemon) -> None:
    running = command(daemon, "import time; time.sleep(1.5)")
    wait_for(lambda: result_of(daemon, "jobs.get", job_id=running["id"])["status"] == "running")
    result_of(daemon, "admin.pause")
    queued = command(daemon, "pass")
    report = result_of(daemon, "admin.maintenance", enabled=True)
    assert report["maintenance"] is True and report["reason"] is None
    assert (report["running"], report["queued"], report["drained"]) == (1, 1, False)
    assert wait_terminal(daemon, running["id"])["status"] == "completed"
    # paused: the queued job cannot start, so nothing more will run
    report = result_of(daemon, "admin.maintenance")
    assert (report["running"], report["queued"], report["drained"]) == (0, 1, True)
    result_of(daemon, "admin.resume")
    # queued jobs go on while maintenance is on
    assert wait_terminal(daemon, queued["id"])["status"] == "completed"
    assert result_of(daemon, "admin.maintenance")["drained"] is True


def test_pause_and_maintenance_survive_a_restart_and_start_up_says_so(
        make_daemon: Callable[..., Daemon]) -> None:
    path = Path(tempfile.mkdtemp(prefix="jobd-notify-", dir="/tmp")) / "notify"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(path))
    listener.settimeout(15)

    def status_line() -> str:
        while True:
            lines = listener.recv(4096).decode().split("\n")
            if "READY=1" in lines:
                return next(line for line in lines if line.startswith("STATUS="))

    try:
        d = make_daemon(env={"NOTIFY_SOCKET": str(path)})
        assert "paused" not in status_line()
        assert started(d)["paused"] is False and started(d)["maintenance"] is False
        result_of(d, "admin.pause")
        queued = command(d, "pass")
        result_of(d, "admin.maintenance", enabled=True, reason=REASON)
        assert d.stop() == 0

        d.start()
        status = status_line()
        assert "paused" in status and f"maintenance ({REASON})" in status
        log = started(d)
        assert (log["paused"], log["maintenance"], log["maintenance_reason"]) == (
            True, True, REASON)
        assert result_of(d, "admin.stats")["paused"] is True
        assert result_of(d, "admin.maintenance") == {
            "maintenance": True, "reason": REASON, "running": 0, "queued": 1, "drained": True}
        assert result_of(d, "jobs.get", job_id=queued["id"])["wait_reason"] == "paused"
        assert error_of(d, "jobs.submit", type="noop", as_user="maint")["code"] == -32050

        result_of(d, "admin.resume")
        result_of(d, "admin.maintenance", enabled=False)
        assert wait_terminal(d, queued["id"])["status"] == "completed"
        d.stop(signal.SIGKILL)  # the switches were durable when answered, not at the stop
        d.start()
        assert "paused" not in status_line()
        log = started(d)
        assert (log["paused"], log["maintenance"]) == (False, False)
        assert command(d, "pass")["status"] in ("queued", "running", "completed")
    finally:
        listener.close()
        shutil.rmtree(path.parent, ignore_errors=True)


def jobctl(d: Daemon, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([JOBCTL, "--socket", str(d.socket), *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_jobctl_maintenance_on_off_wait_drained_and_exit_75(daemon: Daemon) -> None:
    slow = command(daemon, "import time; time.sleep(1)")
    on = jobctl(daemon, "maintenance", "on", "--reason", REASON, "--wait-drained")
    assert on.returncode == 0, on.stderr
    assert f"maintenance on ({REASON})" in on.stdout and "drained" in on.stdout
    # --wait-drained came back once the running job had ended
    assert result_of(daemon, "jobs.get", job_id=slow["id"])["status"] == "completed"
    submit = jobctl(daemon, "submit", "noop")
    assert submit.returncode == 75, (submit.stdout, submit.stderr)
    assert REASON in submit.stderr
    report = jobctl(daemon, "--json", "maintenance")
    assert report.returncode == 0
    assert json.loads(report.stdout)["maintenance"] is True
    off = jobctl(daemon, "maintenance", "off")
    assert off.returncode == 0 and "maintenance off" in off.stdout
    assert jobctl(daemon, "submit", "noop").returncode == 0
