"""Engine benchmark: pickup, end-to-end throughput against huey, cancel, progress visibility.

Starts a real jobd (synchronous=full) and measures:

  * pickup: submit -> running with a free worker (``started_at - created_at``), over
    sequential ``noop`` jobs
  * end to end: ``noop`` jobs submitted from several connections and executed, per
    second, beside huey's SqliteHuey (synchronous=FULL too) with the same number of
    workers, fed from as many threads, in the same run
  * cancel: a running ``command`` job (``sh -c 'sleep ...'``, which SIGTERM ends) ->
    ``jobs.get`` says cancelled and its process group is gone
  * progress visibility: a ``command`` job prints ``{"progress": n, "message": "<its
    time.time()>"}`` lines; a ``jobs.wait`` client computes now - that time

SPEC §9 goals: pickup p50 <= 2 ms; >= 2,000 jobs/s end to end and >= 1.5x huey (aim:
2x); cancel <= 250 ms; progress visible <= 10 ms.
"""

from __future__ import annotations

import argparse
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from _harness import (ms, BenchError, Conn, Jobd, Row, cpu_seconds, drive, iso_us,  # noqa: E402
                      machine, noop_submit, pct, print_table, workdir)

CONFIG = """
[execution]
workers = {workers}
max_running_per_user = {workers}
max_queued_per_user = 100000000
max_queued_total = 100000000
"""

TERMINAL = ("completed", "failed", "cancelled")

#: how often the end-to-end runs look whether every job (task) has finished
POLL_S = 0.02

# Prints progress lines stamped with the time it printed them, then exits.
_PROGRESS = """
import json, sys, time
count, every = int(sys.argv[1]), float(sys.argv[2])
time.sleep(0.3)
for i in range(1, count + 1):
    print(json.dumps({"progress": 100.0 * i / (count + 1), "message": repr(time.time())}),
          flush=True)
    time.sleep(every)
"""


def wait_terminal(conn: Conn, job: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
    """Long-poll ``jobs.wait`` until the job is terminal."""
    deadline = time.monotonic() + timeout
    while job["status"] not in TERMINAL:
        if time.monotonic() > deadline:
            raise BenchError(f"job {job['id']} still {job['status']} after {timeout:g}s")
        job = conn.call("jobs.wait", job_id=job["id"], after_version=job["version"],
                        timeout_s=10)
    return job


def pickup(conn: Conn, count: int) -> list[float]:
    """Seconds from created_at to started_at of ``count`` sequential noop jobs."""
    out = []
    for _ in range(count):
        job = wait_terminal(conn, conn.call("jobs.submit", type="noop"))
        if job["status"] != "completed":
            raise BenchError(f"a noop job ended {job['status']}: {job.get('error')}")
        out.append((iso_us(job["started_at"]) - iso_us(job["created_at"])) / 1e6)
    return out


def finished(conn: Conn) -> dict[str, int]:
    return conn.call("admin.stats")["jobs"]


def jobd_rate(daemon: Jobd, conn: Conn, total: int, clients: int) -> tuple[float, float, float]:
    """(jobs/s submitted and executed, submits/s, daemon CPU µs per job)."""
    before = finished(conn)
    users = [f"bench-c{c}".encode() for c in range(clients)]

    def make(c: int, n: int) -> bytes:
        return noop_submit(n, users[c])

    cpu = cpu_seconds(daemon.pid)
    started = time.perf_counter()
    done, submit_s, errors = drive(daemon.socket, make, connections=clients, total=total)
    if errors:
        raise BenchError(f"{len(errors)}+ submits refused, e.g. {errors[0]}")
    deadline = time.monotonic() + 300
    while True:
        now = finished(conn)
        ended = sum(now[s] - before[s] for s in TERMINAL)
        if ended >= total:
            break
        if time.monotonic() > deadline:
            raise BenchError(f"only {ended} of {total} jobs ended within 300 s")
        # admin.stats counts every stored job: polled more often it would slow the daemon
        time.sleep(POLL_S)
    elapsed = time.perf_counter() - started
    cpu = cpu_seconds(daemon.pid) - cpu
    if now["completed"] - before["completed"] != total:
        raise BenchError(f"{ended - (now['completed'] - before['completed'])} noop jobs did "
                         f"not complete; see the daemon log {daemon.stderr}")
    return total / elapsed, done / submit_s, cpu / total * 1e6


def huey_rate(root: Path, total: int, workers: int, clients: int) -> tuple[float, float] | str:
    """(huey tasks/s enqueued and executed, consumer CPU µs per task), or why it was skipped."""
    try:
        import huey  # noqa: F401
    except ImportError:
        return "huey not importable: pip install -r bench/requirements.txt"
    db = root / "huey.db"
    os.environ["JOBD_BENCH_HUEY_DB"] = str(db)
    import _huey_app  # creates the tables before the consumer opens them

    log = root / "huey.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(BENCH), os.environ.get("PYTHONPATH")) if p)}
    # -n: no periodic tasks; -d/-m: poll an empty queue every 10-100 ms rather than
    # huey's default of up to 10 s, so idle back-off cannot slow it down
    argv = [sys.executable, "-m", "huey.bin.huey_consumer", "_huey_app.huey", "-w",
            str(workers), "-k", "thread", "-n", "-d", "0.01", "-m", "0.1", "-l", str(log)]
    consumer = subprocess.Popen(argv, env=env, cwd=root, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not (log.exists() and "started with" in log.read_text()):
            if consumer.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"the huey consumer did not start; see {log}")
            time.sleep(0.01)
        share = [total // clients + (c < total % clients) for c in range(clients)]

        def enqueue(count: int) -> None:
            for _ in range(count):
                _huey_app.noop()

        threads = [threading.Thread(target=enqueue, args=(n,)) for n in share]
        reader = sqlite3.connect(db)
        cpu = cpu_seconds(consumer.pid)
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        deadline = time.monotonic() + 300
        while reader.execute("SELECT count(*) FROM kv WHERE queue = ?",
                             (_huey_app.NAME,)).fetchone()[0] < total:
            if time.monotonic() > deadline:
                raise BenchError("huey did not run every task within 300 s")
            time.sleep(POLL_S)
        elapsed = time.perf_counter() - started
        cpu = cpu_seconds(consumer.pid) - cpu
        reader.close()
    finally:
        consumer.send_signal(signal.SIGINT)  # huey's graceful stop
        try:
            consumer.wait(30)
        except subprocess.TimeoutExpired:
            consumer.kill()
            consumer.wait()
    return total / elapsed, cpu / total * 1e6


def _group_of(marker: str, timeout: float = 10.0) -> int:
    """The process group of the process whose command line holds ``marker``."""
    deadline = time.monotonic() + timeout
    needle = marker.encode()
    while time.monotonic() < deadline:
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                    if needle not in f.read():
                        continue
                with open(f"/proc/{entry.name}/stat", "rb") as f:
                    return int(f.read().rsplit(b")", 1)[1].split()[2])
            except OSError:
                continue
        time.sleep(0.005)
    raise BenchError(f"no process running {marker!r} appeared within {timeout:g}s")


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def cancel(conn: Conn, count: int) -> list[float]:
    """Seconds from ``jobs.cancel`` until cancelled and the process group is gone."""
    out = []
    for n in range(count):
        marker = f"1000.{os.getpid()}{n:03d}"   # `sleep` takes fractions: a unique command line
        job = conn.call("jobs.submit", type="command",
                        options={"argv": ["sh", "-c", f"sleep {marker}"]})
        pgid = _group_of(marker)
        while job["status"] != "running":
            job = conn.call("jobs.wait", job_id=job["id"], after_version=job["version"],
                            timeout_s=10)
        gone_at = cancelled_at = None
        started = time.perf_counter()
        conn.call("jobs.cancel", job_id=job["id"])
        while gone_at is None or cancelled_at is None:
            if gone_at is None and _group_gone(pgid):
                gone_at = time.perf_counter()
            if cancelled_at is None and conn.call("jobs.get", job_id=job["id"])["status"] \
                    == "cancelled":
                cancelled_at = time.perf_counter()
            if time.perf_counter() - started > 30:
                raise BenchError(f"job {job['id']} not cancelled and gone within 30 s")
            time.sleep(0.0005)
        out.append(max(gone_at, cancelled_at) - started)
    return out


def progress(conn: Conn, count: int, every: float, least: float = 0.9) -> list[float]:
    """Seconds from a progress line's print until a jobs.wait client has it; at least
    ``least`` of the ``count`` lines must be seen (a later line may pass an earlier one
    that had not been written yet)."""
    job = conn.call("jobs.submit", type="command", options={
        "argv": [sys.executable, "-c", _PROGRESS, str(count), str(every)]})
    out, seen = [], None
    while job["status"] not in TERMINAL:
        job = conn.call("jobs.wait", job_id=job["id"], after_version=job["version"],
                        timeout_s=10)
        arrived = time.time()
        message = job.get("message")
        if message != seen and job["status"] == "running":
            seen = message
            try:
                out.append(arrived - float(message))
            except (TypeError, ValueError):
                pass  # the handler's own "running ..." line
    if job["status"] != "completed":
        raise BenchError(f"the progress job ended {job['status']}: {job.get('error')}")
    if len(out) < count * least:
        raise BenchError(f"saw only {len(out)} of {count} progress updates")
    return out


def latency_options(parser: argparse.ArgumentParser, *, pickups: int) -> None:
    """The options of the pickup, cancel and progress figures (cluster_bench's too)."""
    parser.add_argument("--pickups", type=int, default=pickups, metavar="N",
                        help=f"sequential noop jobs for the pickup figure (default {pickups})")
    parser.add_argument("--cancels", type=int, default=5, metavar="N",
                        help="running command jobs to cancel (default 5)")
    parser.add_argument("--updates", type=int, default=100, metavar="N",
                        help="progress lines the progress job prints (default 100)")
    parser.add_argument("--every", type=float, default=0.02, metavar="S",
                        help="seconds between progress lines (default 0.02)")


def main() -> int:
    parser = argparse.ArgumentParser(
        description="jobd engine benchmark: pickup, end-to-end noop jobs/s beside huey's "
                    "SqliteHuey, cancel latency and progress visibility.")
    parser.add_argument("--jobs", type=int, default=2000, metavar="N",
                        help="noop jobs (and huey tasks) for the end-to-end rate (default 2000)")
    parser.add_argument("--clients", type=int, default=8,
                        help="connections (huey: threads) submitting, one call in flight each "
                             "(default 8)")
    parser.add_argument("--workers", type=int, default=8,
                        help="jobd workers and huey consumer threads (default 8)")
    latency_options(parser, pickups=200)
    parser.add_argument("--no-huey", action="store_true", help="skip the huey reference")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work folder (database, logs) and print its path")
    args = parser.parse_args()

    root = workdir(args.keep)
    daemon = Jobd(root, CONFIG.format(workers=args.workers))
    load = machine()
    try:
        daemon.start()
        conn = daemon.connect()
        print(f"pickup, {args.pickups} sequential noop jobs ...", flush=True)
        pickup(conn, min(20, args.pickups))  # warm-up
        picks = pickup(conn, args.pickups)
        print(f"end to end, {args.jobs} noop jobs from {args.clients} connections, "
              f"{args.workers} workers ...", flush=True)
        rate, submit_rate, cpu_per_job = jobd_rate(daemon, conn, args.jobs, args.clients)
        print(f"cancel, {args.cancels} running command jobs ...", flush=True)
        cancels = cancel(conn, args.cancels)
        print(f"progress visibility, {args.updates} updates ...", flush=True)
        seen = progress(conn, args.updates, args.every)
        conn.close()
    finally:
        daemon.stop()
    if args.no_huey:
        huey: tuple[float, float] | str = "skipped (--no-huey)"
    else:
        print(f"huey reference, {args.jobs} tasks from {args.clients} threads, "
              f"{args.workers} consumer threads ...", flush=True)
        huey = huey_rate(root, args.jobs, args.workers, args.clients)

    if isinstance(huey, str):
        print(f"huey reference skipped: {huey}", flush=True)
        huey_ref, vs_huey, huey_met = huey, "", None
    else:
        huey_ref = f"huey {huey[0]:,.0f}/s"
        vs_huey = f"×{rate / huey[0]:.2f} huey"
        huey_met = rate >= 1.5 * huey[0]
    rows = [
        Row("pickup p50", ms(pct(picks, 50)), "≤ 2 ms", "", pct(picks, 50) <= 0.002),
        Row("pickup p99", ms(pct(picks, 99))),
        Row(f"end to end, {args.clients} conns", f"{rate:,.0f} jobs/s", "≥ 2,000/s",
            f"{huey_ref} (jobd submits alone: {submit_rate:,.0f}/s)", rate >= 2000),
        Row("end to end vs huey", vs_huey or "—", "≥ ×1.5 (aim ×2)", "", huey_met),
        Row("daemon CPU per job", f"{cpu_per_job:,.0f} µs", "",
            f"huey consumer {huey[1]:,.0f} µs" if not isinstance(huey, str) else ""),
        Row("cancel p50", ms(pct(cancels, 50)), "≤ 250 ms",
            f"max {ms(max(cancels))} of {len(cancels)}", pct(cancels, 50) <= 0.25),
        Row("progress visible p50", ms(pct(seen, 50)), "≤ 10 ms",
            f"p99 {ms(pct(seen, 99))}, max {ms(max(seen))}", pct(seen, 50) <= 0.010),
    ]
    print_table(f"engine_bench: synchronous=full, {args.workers} workers; {load}", rows)
    if args.keep:
        print(f"\nwork folder kept: {root} (daemon log: {daemon.stderr})")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"engine_bench: {e}", file=sys.stderr)
        sys.exit(1)
