"""Lifecycle benchmark: the daemon's memory and its database's size over many jobs' lives.

Starts a real jobd (synchronous=full, 8 workers) on an empty database and a bare asyncio
NDJSON echo server as the reference, and measures in the same run:

  * RSS idle: the daemon's resident set once it has been idle a while, beside the echo
    server's (a bare Python asyncio process: the floor any Python daemon starts from)
  * RSS growth: ``--warmup`` ``noop`` jobs (default 10,000) submitted from 8 connections
    and run to their end, then the RSS is the base; then ``--jobs`` more (default
    20,000; SPEC §9's figure: 100,000), and the growth of the RSS over the base
  * size per 10,000 jobs with their events: the database after the daemon's clean stop
    (its WAL folded back), divided by the jobs it holds, beside the bytes of the jobs' own
    JSON (options, metadata, result) in it
  * jobs/s and the daemon's CPU per job over the measured lifecycles, for reference

Every job carries the metadata a CIDX web server sends (who asked, the request id) and
is owned by one of 64 users, as ``as_user``. SPEC §9 goals: RSS idle <= 60 MB, growth
after 100,000 job lifecycles <= 10 %, <= 10 MB per 10,000 jobs with their events.
"""

from __future__ import annotations

import argparse
import contextlib
import sqlite3
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import (us, BenchError, Conn, EchoServer, Jobd, Row, cpu_seconds,  # noqa: E402
                      drive, machine, noop_submit, print_table, rss_mb, workdir)

CONFIG = """
[execution]
workers = 8
max_running_per_user = 8
max_queued_per_user = 100000000
max_queued_total = 100000000
"""

#: how often the bench asks whether every job has ended (admin.stats counts every stored
#: job today: polled harder it would be a load of its own)
POLL_S = 0.25
#: how long the daemon is left alone before its idle RSS is read
IDLE_S = 3.0
USERS = [f"bench-u{u:02d}".encode() for u in range(64)]


def lifecycles(daemon: Jobd, conn: Conn, count: int, clients: int) -> tuple[float, float]:
    """Submit ``count`` noop jobs from ``clients`` connections and wait until every one
    has completed: (seconds, the daemon's CPU seconds meanwhile)."""
    before = conn.call("admin.stats")["jobs"]["completed"]

    def make(c: int, n: int) -> bytes:
        user = USERS[(c * 8 + n) % len(USERS)]
        metadata = (b'{"request_id":"%s","client":"cidx-web/2.4","requested_by":"%s",'
                    b'"repo_alias":"backend-api"}' % (str(uuid.uuid4()).encode(), user))
        return noop_submit(n, user, metadata)

    cpu = cpu_seconds(daemon.pid)
    started = time.perf_counter()
    _, _, errors = drive(daemon.socket, make, connections=clients, total=count)
    if errors:
        raise BenchError(f"{len(errors)}+ submits refused, e.g. {errors[0]}")
    deadline = time.monotonic() + 60 + count / 100
    while True:
        stats = conn.call("admin.stats")
        if stats["jobs"]["completed"] - before >= count:
            break
        if stats["jobs"]["failed"] or stats["jobs"]["cancelled"]:
            raise BenchError(f"noop jobs ended otherwise: {stats['jobs']}; see {daemon.stderr}")
        if time.monotonic() > deadline:
            raise BenchError(f"not every job completed in time: {stats['jobs']}")
        time.sleep(POLL_S)
    return time.perf_counter() - started, cpu_seconds(daemon.pid) - cpu


def main() -> int:
    parser = argparse.ArgumentParser(
        description="jobd lifecycle benchmark: RSS idle and its growth over many noop jobs' "
                    "lives, and the database's size per 10,000 jobs with their events, "
                    "beside a bare asyncio echo server and the jobs' own bytes.")
    parser.add_argument("--jobs", type=int, default=20_000, metavar="N",
                        help="lifecycles measured after the warm-up (default 20000; "
                             "SPEC §9's figure: 100000)")
    parser.add_argument("--warmup", type=int, default=10_000, metavar="N",
                        help="lifecycles before the base RSS is read (default 10000)")
    parser.add_argument("--round", type=int, default=10_000, metavar="N",
                        help="lifecycles between two RSS readings (default 10000)")
    parser.add_argument("--clients", type=int, default=8,
                        help="connections submitting, one call in flight each (default 8)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work folder (database, daemon log) and print its path")
    args = parser.parse_args()
    if args.jobs < 1 or args.warmup < 1 or args.round < 1:
        parser.error("--jobs, --warmup and --round must be at least 1")

    root = workdir(args.keep)
    daemon = Jobd(root, CONFIG)
    load = machine()
    trace: list[tuple[int, float]] = []   # (lifecycles so far, RSS MB)
    try:
        with EchoServer(root) as echo:
            daemon.start()
            conn = daemon.connect()
            time.sleep(IDLE_S)
            idle, echo_rss = rss_mb(daemon.pid), rss_mb(echo.pid)
        print(f"idle: RSS {idle:.1f} MB; warm-up, {args.warmup:,} noop jobs ...", flush=True)
        lifecycles(daemon, conn, args.warmup, args.clients)
        base = rss_mb(daemon.pid)
        trace.append((args.warmup, base))
        print(f"  after {args.warmup:,}: RSS {base:.1f} MB", flush=True)
        took = cpu = 0.0
        done = 0
        while done < args.jobs:
            n = min(args.round, args.jobs - done)
            secs, used = lifecycles(daemon, conn, n, args.clients)
            took, cpu, done = took + secs, cpu + used, done + n
            trace.append((args.warmup + done, rss_mb(daemon.pid)))
            print(f"  after {args.warmup + done:,}: RSS {trace[-1][1]:.1f} MB "
                  f"({n / secs:,.0f} jobs/s)", flush=True)
        final = trace[-1][1]
        conn.close()
    finally:
        daemon.stop()   # a clean stop folds the WAL back into the database
    wal = Path(f"{daemon.db}-wal")
    size = daemon.db.stat().st_size + (wal.stat().st_size if wal.exists() else 0)
    with contextlib.closing(sqlite3.connect(f"file:{daemon.db}?mode=ro", uri=True)) as db:
        jobs, payload = db.execute(
            "SELECT count(*), sum(length(CAST(options AS BLOB)) + "
            "length(CAST(metadata AS BLOB)) + ifnull(length(CAST(result AS BLOB)), 0)) "
            "FROM jobs").fetchone()
        events = db.execute("SELECT count(*) FROM job_events").fetchone()[0]
    if jobs != args.warmup + args.jobs:
        raise BenchError(f"the database holds {jobs:,} jobs, not the "
                         f"{args.warmup + args.jobs:,} that ran")

    growth = final / base - 1
    full = args.jobs >= 100_000
    per_10k = size / jobs * 10_000
    rows = [
        Row("RSS idle", f"{idle:.1f} MB", "≤ 60 MB", f"echo server {echo_rss:.1f} MB",
            idle <= 60),
        Row(f"RSS growth after {args.jobs:,} lifecycles", f"{growth:+.1%}",
            "≤ 10 %" + ("" if full else " @100k"),
            f"{base:.1f} → {final:.1f} MB (base after {args.warmup:,} warm-up); "
            f"peak {max(r for _, r in trace):.1f} MB",
            growth <= 0.10 if full else None),
        Row("size per 10,000 jobs", f"{per_10k / 1e6:.2f} MB", "≤ 10 MB",
            f"jobs' own JSON {payload / jobs * 10_000 / 1e6:.2f} MB; "
            f"{events / jobs:.1f} events per job; {size / 1e6:,.1f} MB for {jobs:,}",
            per_10k <= 10e6),
        Row("end to end, measured lifecycles", f"{args.jobs / took:,.0f} jobs/s", "",
            f"{args.clients} conns, polled every {POLL_S:g} s"),
        Row("daemon CPU per job", us(cpu / args.jobs)),
    ]
    print_table(f"lifecycle_bench: synchronous=full, 8 workers, {args.warmup:,} + "
                f"{args.jobs:,} noop jobs; {load}", rows)
    if args.keep:
        print(f"\nwork folder kept: {root} (daemon log: {daemon.stderr})")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"lifecycle_bench: {e}", file=sys.stderr)
        sys.exit(1)
