"""Hostile answers benchmark (SPEC §9): answers nobody reads must not cost the others.

Starts a real jobd with the default [server] limits, stores 1,000 queued jobs with 60 KiB
of metadata each (dispatch paused), then opens 64 connections of one user, each sending
one batch of 20 ``jobs.list`` of 1,000 jobs and never reading a byte. Meanwhile another
connection pings every 20 ms. Printed: the daemon's RSS before, at its peak and at the
end, and ping latency under that load beside ping latency on the idle daemon.

SPEC §9 goal: RSS <= 150 MB; other clients' calls <= 100 ms meanwhile.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import Conn, Jobd, machine, pct, request, rss_mb, workdir  # noqa: E402

CONFIG = """
[execution]
max_queued_per_user = 100000
"""


def pings(path: Path, seconds: float, pid: int) -> tuple[list[float], float]:
    """Ping latencies (ms, fresh connection each) for ``seconds``, and the peak RSS seen."""
    out, peak = [], 0.0
    line = request("ping", {})
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.perf_counter()
        conn = Conn(path, timeout=30)
        try:
            conn.roundtrip(line)
        finally:
            conn.close()
        out.append((time.perf_counter() - started) * 1000)
        peak = max(peak, rss_mb(pid))
        time.sleep(0.02)
    return out, peak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000, help="jobs stored (default 1000)")
    parser.add_argument("--metadata", type=int, default=60 * 1024, metavar="BYTES",
                        help="metadata per job (default 61440)")
    parser.add_argument("--connections", type=int, default=64, help="hostile connections (64)")
    parser.add_argument("--batch", type=int, default=20, help="jobs.list per batch (20)")
    parser.add_argument("--duration", type=float, default=10.0, metavar="S",
                        help="seconds the unread answers are held (default 10)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()

    root = workdir(args.keep)
    daemon = Jobd(root, CONFIG)
    load = machine()
    try:
        daemon.start()
        conn = daemon.connect()
        conn.call("admin.pause")
        pad = "m" * (args.metadata - 16)
        print(f"storing {args.jobs} jobs with {args.metadata} bytes of metadata ...", flush=True)
        for i in range(args.jobs):
            conn.call("jobs.submit", type="noop", as_user="hostile", metadata={"p": pad})
        conn.close()
        idle, base = pings(daemon.socket, 2.0, daemon.pid)
        batch = (json.dumps([{"jsonrpc": "2.0", "id": i, "method": "jobs.list",
                              "params": {"as_user": "hostile", "limit": 1000}}
                             for i in range(args.batch)]) + "\n").encode()
        hogs = []
        for _ in range(args.connections):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(daemon.socket))
            s.sendall(batch)
            hogs.append(s)
        print(f"{args.connections} connections sent a batch of {args.batch} jobs.list "
              f"and read nothing; pinging for {args.duration:g} s ...", flush=True)
        loaded, peak = pings(daemon.socket, args.duration, daemon.pid)
        for s in hogs:
            s.close()
        time.sleep(1.0)
        end = rss_mb(daemon.pid)
        print(f"\nhostile_bench: {args.connections} connections x {args.batch} jobs.list of "
              f"{args.jobs} jobs; {load}")
        print(f"{'':28}{'p50':>9}{'p99':>9}{'max':>9}   n")
        for name, values in (("ping, idle daemon (ref)", idle), ("ping, under hostile load", loaded)):
            print(f"{name:28}{pct(values, 50):8.2f}ms{pct(values, 99):7.2f}ms"
                  f"{max(values):7.2f}ms   {len(values)}")
        print(f"RSS: {base:.0f} MB before, {peak:.0f} MB at peak, {end:.0f} MB after "
              f"(goal <= 150 MB); ping max {max(loaded):.1f} ms (goal <= 100 ms)")
        return 0 if peak <= 150 and max(loaded) <= 100 else 1
    finally:
        daemon.stop()
        if args.keep:
            print(f"work folder: {root}")


if __name__ == "__main__":
    sys.exit(main())
