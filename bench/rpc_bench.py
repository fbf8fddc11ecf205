"""RPC benchmark: ping and durable jobs.submit latency, and submits per second.

Starts a real jobd (synchronous=full, dispatch paused so submitted jobs stay queued) on a
database prefilled with finished jobs, and a bare asyncio NDJSON echo server as the
reference, and measures both in the same run:

  * ping and jobs.submit latency, one connection, one call at a time (p50/p99)
  * jobs.submit per second from several connections, one call in flight on each

SPEC §9 goals: submit p50 <= 0.8 ms and p99 <= 5 ms with 1,000,000 jobs stored
(``--prefill 1000000``); >= 4,000 durable submits/s from 8 connections.
"""

from __future__ import annotations

import argparse
import gc
import json
import sqlite3
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import (us, ROOT, BenchError, Conn, Jobd, Row, cpu_seconds, drive,  # noqa: E402
                      EchoServer, fsync_latency, machine, pct, print_table, request, workdir)

CONFIG = """
[storage]
synchronous = "{synchronous}"

[execution]
# the bench queues far more than an ordinary user may
max_queued_per_user = 100000000
max_queued_total = 100000000

[retention]
# the prefilled history must not be cleaned up under the benchmark
keep = "3650d"
keep_failed = "3650d"
"""

_DAY_US = 86_400_000_000


# Rows are made inside SQLite (a recursive CTE feeding INSERT ... SELECT), not in Python:
# a million jobs and four million events then take seconds, not minutes.
_JOBS = """
WITH RECURSIVE n(seq) AS (SELECT 1 UNION ALL SELECT seq + 1 FROM n WHERE seq < :n),
-- materialized: otherwise every use of h would draw new random bytes
u AS MATERIALIZED (SELECT seq, lower(hex(randomblob(16))) AS h FROM n),
r AS (SELECT seq, h, :first + seq * :step AS created,
             CASE WHEN seq % 10 < 7 THEN 'sync' WHEN seq % 10 < 9 THEN 'index'
                  ELSE 'noop' END AS type,
             CASE WHEN seq % 20 = 0 THEN 'failed' WHEN seq % 50 = 1 THEN 'cancelled'
                  ELSE 'completed' END AS status
      FROM u)
INSERT INTO jobs (seq, id, type, user_id, project_id, status, progress, phase, options,
                  result, error, attempts, version, created_at, started_at, completed_at,
                  updated_at)
SELECT seq,
       substr(h, 1, 8) || '-' || substr(h, 9, 4) || '-4' || substr(h, 14, 3) || '-'
           || substr('89ab', 1 + unicode(substr(h, 17, 1)) % 4, 1) || substr(h, 18, 3)
           || '-' || substr(h, 21, 12),
       type, 'user' || (seq * 7919 % :users),
       CASE WHEN type = 'noop' THEN NULL ELSE 'project' || (seq % 17) END,
       status, CASE WHEN status = 'completed' THEN 100.0 ELSE 40.0 END,
       CASE WHEN type = 'sync' THEN 'finalizing' END,
       CASE WHEN type = 'sync' THEN :options ELSE '{}' END,
       CASE WHEN status != 'completed' THEN NULL WHEN type = 'sync' THEN :result ELSE '{}' END,
       CASE WHEN status = 'failed' THEN 'git exited with status 1: network unreachable' END,
       1, created + 3000000, created, created + 1000, created + 3000000, created + 3000000
FROM r
"""

# created, queued, running, and how it ended: each job's history in order
_EVENTS = """
INSERT INTO job_events (job, at, status, message, progress, actor)
SELECT seq,
       CASE k WHEN 2 THEN started_at WHEN 3 THEN completed_at ELSE created_at END,
       CASE k WHEN 0 THEN 'created' WHEN 1 THEN 'queued' WHEN 2 THEN 'running'
              ELSE status END,
       CASE WHEN k = 3 THEN error END, CASE WHEN k = 3 THEN progress ELSE 0 END,
       CASE WHEN k < 2 THEN 'service:cidx' ELSE 'jobd' END
FROM jobs CROSS JOIN (SELECT 0 AS k UNION ALL SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3)
ORDER BY seq, k
"""


def prefill(db: Path, n: int, users: int = 1000) -> float:
    """Store ``n`` finished jobs with their four events each, fast; the seconds it took.

    The schema comes from ``jobd.store.Store`` itself (opened once, closed); the rows go
    in with bulk INSERTs on a raw connection, with the store's indexes dropped meanwhile
    and then created again from their own SQL. The jobs are mostly completed syncs of
    ``users`` users over the last six days, some failed or cancelled; ``meta.clean`` says
    the last stop was clean, as after ``jobd`` stopped normally.
    """
    sys.path.insert(0, str(ROOT))
    import logging

    import structlog

    from jobd.store import Store

    # the store logs its migrations; the bench's output is the table
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

    started = time.perf_counter()
    db.parent.mkdir(parents=True, exist_ok=True)
    Store(db).open().close()
    conn = sqlite3.connect(db, isolation_level=None)
    # a crash here only means building it again
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("PRAGMA cache_size = -524288")
    now = time.time_ns() // 1000
    first = now - 6 * _DAY_US   # within the default retention of 7 days
    options = json.dumps({"branch": "main", "full_reindex": False, "remote": "origin",
                          "strategy": "ff-only"}, separators=(",", ":"))
    result = json.dumps({"old_revision": "0" * 40, "new_revision": "1" * 40,
                         "files_changed": 3, "files_added": 1, "files_deleted": 0,
                         "files_indexed": 4, "seconds": {"git_sync": 0.8, "indexing": 2.1}},
                        separators=(",", ":"))
    conn.execute("BEGIN")
    indexes = conn.execute("SELECT name, sql FROM sqlite_master "
                           "WHERE type = 'index' AND sql IS NOT NULL").fetchall()
    for name, _ in indexes:
        conn.execute(f"DROP INDEX {name}")
    conn.execute(_JOBS, {"n": n, "first": first, "step": max(1, 6 * _DAY_US // max(n, 1)),
                         "users": users, "options": options, "result": result})
    conn.execute(_EVENTS)
    for _, sql in indexes:
        conn.execute(sql)
    conn.execute("COMMIT")
    conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('clean', '1')")
    conn.execute("PRAGMA optimize")  # as the store does when it closes
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return time.perf_counter() - started


def latencies(conn: Conn, lines: list[bytes], warmup: int) -> list[float]:
    """Seconds per round trip of each line after the first ``warmup`` ones."""
    out = []
    clock = time.perf_counter
    for n, line in enumerate(lines):
        t = clock()
        answer = conn.roundtrip(line)
        t = clock() - t
        if b'"error":{' in answer:
            raise BenchError(f"refused: {answer[:300].decode(errors='replace')}")
        if n >= warmup:
            out.append(t)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description="jobd RPC benchmark: ping/submit latency and durable submits per second, "
                    "each beside a bare asyncio NDJSON echo server measured in the same run.")
    parser.add_argument("--prefill", type=int, default=10_000, metavar="N",
                        help="finished jobs stored before the daemon starts (default 10000; "
                             "SPEC §9's figure: 1000000)")
    parser.add_argument("--requests", type=int, default=2000, metavar="N",
                        help="sequential calls per latency figure (default 2000)")
    parser.add_argument("--clients", type=int, default=8,
                        help="connections for the submit rate, one call in flight each (default 8)")
    parser.add_argument("--duration", type=float, default=3.0, metavar="S",
                        help="seconds of the submit-rate run (default 3)")
    parser.add_argument("--users", type=int, default=64,
                        help="owners the submitted jobs are spread over (as_user; default 64)")
    parser.add_argument("--synchronous", default="full", choices=("off", "normal", "full"),
                        help="the daemon's storage.synchronous (default full: durable)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work folder (database, daemon log) and print its path")
    args = parser.parse_args()
    warmup = min(200, args.requests)

    root = workdir(args.keep)
    daemon = Jobd(root, CONFIG.format(synchronous=args.synchronous))
    rows: list[Row] = []
    load = machine()
    try:
        daemon.db.parent.mkdir(parents=True, exist_ok=True)
        fsync = fsync_latency(daemon.db.parent)
        print(f"prefilling {args.prefill:,} finished jobs ...", flush=True)
        fill_s = prefill(daemon.db, args.prefill) if args.prefill else 0.0
        db_mb = daemon.db.stat().st_size / 1e6 if daemon.db.exists() else 0.0
        print(f"  {fill_s:.1f} s, {db_mb:,.0f} MB", flush=True)
        daemon.start()
        conn = daemon.connect()
        conn.call("admin.pause")
        users = [f"bench-u{i}" for i in range(args.users)]

        def submit_line(n: int, ident: int = 1) -> bytes:
            return (b'{"jsonrpc":"2.0","id":%d,"method":"jobs.submit","params":'
                    b'{"type":"noop","as_user":"%s"}}\n' % (ident, users[n % len(users)].encode()))

        ping_line = request("ping", {})
        gc.disable()
        with EchoServer(root) as echo:
            e_conn = Conn(echo.socket)
            count = warmup + args.requests
            print("ping latency ...", flush=True)
            ping = latencies(conn, [ping_line] * count, warmup)
            e_ping = latencies(e_conn, [ping_line] * count, warmup)
            print("submit latency ...", flush=True)
            submit = latencies(conn, [submit_line(n) for n in range(count)], warmup)
            e_submit = latencies(e_conn, [submit_line(n) for n in range(count)], warmup)
            print("list latency ...", flush=True)
            # the newest 100 jobs of one prefilled user, end to end
            list_lines = [request("jobs.list", {"user_id": f"user{n % 50}", "limit": 100})
                          for n in range(warmup + 500)]
            listed = latencies(conn, list_lines, warmup)
            e_conn.close()

            print(f"submit rate, {args.clients} connections, {args.duration:g} s ...", flush=True)
            per_conn = 1_000_003  # distinct owners per connection without a shared counter

            def make(c: int, n: int) -> bytes:
                return submit_line(c * per_conn + n, n)
            cpu = cpu_seconds(daemon.pid)
            done, secs, errors = drive(daemon.socket, make, connections=args.clients,
                                       duration=args.duration)
            cpu = cpu_seconds(daemon.pid) - cpu
            if errors:
                raise BenchError(f"{len(errors)}+ submits refused, e.g. {errors[0]}")
            e_cpu = cpu_seconds(echo.pid)
            e_done, e_secs, _ = drive(echo.socket, make, connections=args.clients,
                                      duration=args.duration)
            e_cpu = cpu_seconds(echo.pid) - e_cpu
        gc.enable()

        stats = conn.call("admin.stats")
        expected = count + done
        if stats["queued"] != expected:
            raise BenchError(f"{expected} jobs were submitted but {stats['queued']} are queued")
        conn.close()

        rate, e_rate = done / secs, e_done / e_secs
        # the goals hold for durable submits into a big database, 8 clients
        durable = args.synchronous == "full"
        big = durable and args.prefill >= 1_000_000
        judge_rate = durable and args.clients == 8
        rows = [
            Row("ping p50", us(pct(ping, 50)), "",
                f"echo {us(pct(e_ping, 50))} (×{pct(ping, 50) / pct(e_ping, 50):.1f})"),
            Row("ping p99", us(pct(ping, 99)), "",
                f"echo {us(pct(e_ping, 99))} (×{pct(ping, 99) / pct(e_ping, 99):.1f})"),
            Row("submit p50", us(pct(submit, 50)),
                "≤ 800 µs" + ("" if big else " @1M stored, full"),
                f"echo {us(pct(e_submit, 50))} (×{pct(submit, 50) / pct(e_submit, 50):.1f}); "
                f"fdatasync {us(pct(fsync, 50))}",
                pct(submit, 50) <= 0.0008 if big else None),
            Row("submit p99", us(pct(submit, 99)),
                "≤ 5,000 µs" + ("" if big else " @1M stored, full"),
                f"echo {us(pct(e_submit, 99))} (×{pct(submit, 99) / pct(e_submit, 99):.1f}); "
                f"fdatasync {us(pct(fsync, 99))}",
                pct(submit, 99) <= 0.005 if big else None),
            Row(f"submits/s, {args.clients} conns", f"{rate:,.0f}/s",
                "≥ 4,000/s" + ("" if judge_rate else " (8 conns, full)"),
                f"echo {e_rate:,.0f}/s (jobd at {rate / e_rate:.1%} of echo)",
                rate >= 4000 if judge_rate else None),
            Row("list newest 100 of a user, p50", us(pct(listed, 50)),
                "≤ 3,000 µs" + ("" if big else " @1M stored"), "end to end",
                pct(listed, 50) <= 0.003 if big else None),
            Row("daemon CPU per submit", us(cpu / done), "",
                f"echo {us(e_cpu / e_done)} per line"),
            Row("daemon start-up", f"{daemon.startup_s * 1000:,.0f} ms",
                "≤ 1,000 ms" + ("" if big else " @1M stored"), "process start to ping",
                daemon.startup_s <= 1.0 if big else None),
        ]
    finally:
        daemon.stop()
    print_table(f"rpc_bench: synchronous={args.synchronous}, {args.prefill:,} jobs prefilled "
                f"({fill_s:.1f} s), dispatch paused; {load}", rows)
    if args.keep:
        print(f"\nwork folder kept: {root} (daemon log: {daemon.stderr})")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"rpc_bench: {e}", file=sys.stderr)
        sys.exit(1)
