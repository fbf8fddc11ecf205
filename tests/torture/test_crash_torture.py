"""Crash torture: kill -9 the daemon under load, again and again (issue 7, "Done when").

Each round starts jobd, runs a load for a moment — submits of noop jobs and of programs
that fork, detach with setsid (one with a cleared environment) and report progress,
cancels and retries — then kills the daemon with SIGKILL at a random moment. After every
crash: the database passes ``PRAGMA integrity_check``, no process of any job survives
(the per-job supervisors take them down; JOBD_JOB_ID marks and recorded pids are
checked), and after the restart every acknowledged job exists and nothing is
``running`` that the new daemon did not start. At the end every job ends.

CI runs a few rounds; the full count is one command:
``JOBD_TORTURE_ROUNDS=200 .venv/bin/pytest tests/torture``.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import random
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from conftest import Daemon, wait_for

ROUNDS = int(os.environ.get("JOBD_TORTURE_ROUNDS", "8"))
CONFIG = """
[execution]
workers = 4
max_running_per_user = 4
cancel_grace = "0.5s"
shutdown_grace = "5s"
"""


def program(pids: Path, n: int) -> list[str]:
    """A job program that forks, detaches and reports progress, then ends (some fail) or
    lingers until it is cancelled or its daemon dies."""
    script = (
        f"setsid sh -c 'echo $$ >> {pids}; exec sleep 300' & "
        f"env -i /usr/bin/setsid /bin/sh -c 'echo $$ >> {pids}; exec sleep 300' & "
        f"sh -c 'sleep 300' & echo $! >> {pids}; "
        'echo \'{"progress": 30, "message": "forked"}\'; '
        f"sleep {0.05 * (n % 7)}; "
        'echo \'{"progress": 80}\'; '
        f"{'exit 3' if n % 5 == 0 else 'exec sleep 300' if n % 4 == 1 else 'true'}")
    return ["sh", "-c", script]


class Load(threading.Thread):
    """Calls jobd as fast as it answers until stopped; keeps what was acknowledged."""

    def __init__(self, d: Daemon, pids: Path, rng: random.Random, acked: dict[str, str]) -> None:
        super().__init__(daemon=True)
        self.d, self.pids, self.rng, self.acked = d, pids, rng, acked
        self.halt = threading.Event()
        self.n = len(acked)

    def call(self, method: str, **params: Any) -> Any:
        try:
            answer = self.d.raw(method, **params)
        except (OSError, ValueError):  # the daemon died under the call: not acknowledged
            return None
        return answer.get("result")

    def run(self) -> None:
        while not self.halt.is_set():
            self.n += 1
            roll = self.rng.random()
            ids = list(self.acked)
            if roll < 0.35:
                job = self.call("jobs.submit", type="command",
                                options={"argv": program(self.pids, self.n)})
            elif roll < 0.6:
                job = self.call("jobs.submit", type="noop",
                                options={"seconds": self.rng.choice([0, 0.1, 0.4])})
            elif roll < 0.8 and ids:
                self.call("jobs.cancel", job_id=self.rng.choice(ids))
                continue
            elif ids:
                self.call("jobs.retry", job_id=self.rng.choice(ids))
                continue
            else:
                continue
            if job is not None:
                self.acked[job["id"]] = job["type"]
            time.sleep(0.005)


def integrity(db: Path) -> str:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]


def survivors(pids: Path, job_ids: set[str]) -> list[int]:
    """Live processes that belong to a job: recorded in ``pids`` or marked in their
    environment."""
    recorded = {int(p) for p in pids.read_text().split()} if pids.exists() else set()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_bytes()
            environ = Path(f"/proc/{entry.name}/environ").read_bytes()
        except OSError:
            continue
        if stat[stat.rindex(b")") + 2:][:1] in (b"Z", b"X"):
            continue
        marks = {v.split(b"=", 1)[1].decode() for v in environ.split(b"\0")
                 if v.startswith(b"JOBD_JOB_ID=")}
        if int(entry.name) in recorded or marks & job_ids:
            found.append(int(entry.name))
    return found


def jobs(d: Daemon, **filters: Any) -> dict[str, dict[str, Any]]:
    """Every job matching ``filters``, by id (page by page)."""
    found: dict[str, dict[str, Any]] = {}
    cursor = None
    while True:
        page = d.raw("jobs.list", limit=1000, fields=["id", "status", "started_at"],
                     **filters, **({"cursor": cursor} if cursor else {}))["result"]
        found.update((j["id"], j) for j in page["jobs"])
        if not (cursor := page["next_cursor"]):
            return found


def started_at(job: dict[str, Any]) -> float:
    return datetime.datetime.fromisoformat(job["started_at"].replace("Z", "+00:00")).timestamp()


def test_kill_9_under_load_loses_nothing_and_leaves_nothing(tmp_path: Path) -> None:
    rng = random.Random(int(os.environ.get("JOBD_TORTURE_SEED", "7")))
    d = Daemon(tmp_path / "jobd", config=CONFIG)
    pids = tmp_path / "pids"
    pids.touch()
    acked: dict[str, str] = {}
    began = time.monotonic()
    d.start()
    try:
        for round_ in range(ROUNDS):
            load = Load(d, pids, rng, acked)
            load.start()
            time.sleep(rng.uniform(0.1, 0.6))
            d.kill()
            load.halt.set()
            load.join(10)

            assert integrity(d.db) == "ok", f"round {round_}"
            wait_for(lambda: not survivors(pids, set(acked)), timeout=3,
                     what=f"round {round_}: every job process to die with the daemon")

            restarted = time.time()
            d.start()
            lost = set(acked) - set(jobs(d))
            assert not lost, f"round {round_}: acknowledged jobs lost: {lost}"
            stale = [i for i, j in jobs(d, status="running").items()
                     if started_at(j) < restarted - 0.01]
            assert stale == [], f"round {round_}: running without a worker: {stale}"

        # the last daemon lives on: every job ends (lingering ones once cancelled), and
        # leaves nothing behind
        def all_ended() -> bool:
            for job_id in jobs(d, status="running"):
                d.raw("jobs.cancel", job_id=job_id)
            return not jobs(d, status=["queued", "running"])

        wait_for(all_ended, timeout=60, interval=0.5, what="every job to end")
        wait_for(lambda: not survivors(pids, set(acked)), timeout=3,
                 what="no job process to outlive its job")
        assert d.stop() == 0
        assert integrity(d.db) == "ok"
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.kill()
    took = time.monotonic() - began
    statuses = {}
    with contextlib.closing(sqlite3.connect(d.db)) as conn:
        statuses = dict(conn.execute("SELECT status, count(*) FROM jobs GROUP BY status"))
    print(f"\ncrash torture: {ROUNDS} kill -9 rounds, {len(acked)} acknowledged jobs "
          f"{json.dumps(statuses)}, {took:.1f}s")
