"""Queue pages benchmark: what a long, shared queue costs a list page.

Starts a real jobd with dispatch paused, queues one job for each of ``--users`` users and
``--queued`` jobs for one more user, then measures ``jobs.list`` of 1,000 jobs (p50 of
``--rounds`` calls): that user's queued jobs in queue order and by creation, and an
admin's first 1,000 queued jobs in queue order and by creation. Every queued job's place
and wait reason is counted by the daemon for its answer. Beside them, as the reference, a
page of as many finished jobs of one user, which carry no live fields. Also the p50 of a
submit of a user's first job (its answer holds its place) with the queue full, beside
the same with ``--submits`` users queued.

No SPEC §9 goal names this figure; ``jobs.list`` at 1M is ``rpc_bench.py``'s. It shows
that a page of queued jobs costs about what a page of finished ones costs, not O(users)
per job (each such call held the interpreter lock, and so every other client, for a
second or more before the places were counted in one walk).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import Jobd, Row, machine, print_table, workdir  # noqa: E402

CONFIG = """
[execution]
max_queued_per_user = 100000
max_queued_total = 1000000
max_stored_per_user = 100000
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=3000, help="users with one job queued")
    parser.add_argument("--queued", type=int, default=1000,
                        help="jobs queued by the one user whose page is read (default 1000)")
    parser.add_argument("--rounds", type=int, default=7, help="calls per figure (default 7)")
    parser.add_argument("--submits", type=int, default=200,
                        help="submits timed before and after the queue fills (default 200)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    root = workdir(args.keep)
    daemon = Jobd(root, CONFIG)
    load = machine()
    try:
        daemon.start()
        conn = daemon.connect()
        print(f"finishing {args.queued} jobs of the reference user ...", flush=True)
        for _ in range(args.queued):
            conn.call("jobs.submit", type="noop", as_user="done")
        while conn.call("admin.stats")["jobs"]["completed"] < args.queued:
            time.sleep(0.1)
        conn.call("admin.pause")

        def submit_p50(prefix: str) -> float:
            """p50 of a submit of a user with nothing queued yet (its answer holds the
            job's place and wait reason)."""
            times = []
            for i in range(args.submits):
                started = time.perf_counter()
                conn.call("jobs.submit", type="noop", as_user=f"{prefix}{i}")
                times.append(time.perf_counter() - started)
            return statistics.median(times)
        first = submit_p50("early")
        print(f"queueing {args.users} users' jobs and {args.queued} of one user ...",
              flush=True)
        for i in range(args.users):
            conn.call("jobs.submit", type="noop", as_user=f"user{i}")
        for _ in range(args.queued):
            conn.call("jobs.submit", type="noop", as_user="big")
        crowded = submit_p50("late")
        page = min(1000, args.queued)

        def p50(**params: object) -> float:
            times = []
            for _ in range(args.rounds):
                started = time.perf_counter()
                answer = conn.call("jobs.list", limit=page, **params)
                times.append(time.perf_counter() - started)
                assert len(answer["jobs"]) == page, len(answer["jobs"])
            return statistics.median(times)
        reference = p50(as_user="done")
        users = args.users + 2 * args.submits + 1
        rows = [Row(f"{page} queued of one user (among {users}), {order} order, p50",
                    f"{p50(as_user='big', order=order) * 1000:.1f} ms", "",
                    f"{page} finished jobs of one user {reference * 1000:.1f} ms")
                for order in ("queue", "created")]
        rows += [Row(f"admin: the first {page} of {users - 1 + args.queued} queued, "
                     f"{order} order, p50",
                     f"{p50(order=order, **extra) * 1000:.1f} ms", "", "")
                 for order, extra in (("queue", {}), ("created", {"status": "queued"}))]
        rows.append(Row(f"submit of a user's first job, {args.users + args.submits}+ "
                        f"users queued, p50", f"{crowded * 1000:.2f} ms", "",
                        f"with {args.submits} users queued {first * 1000:.2f} ms"))
        conn.close()
        print_table(f"queue_bench: {load}", rows)
        return 0
    finally:
        daemon.stop()
        if args.keep:
            print(f"work folder: {root}")


if __name__ == "__main__":
    sys.exit(main())
