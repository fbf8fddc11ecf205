"""jobs.changes benchmark: does a crowd of waiting long polls slow the writer?

Starts a real jobd (synchronous=full) and measures durable jobs.submit of ``noop`` jobs
(which run and end at once: three changes each) per second from 8 connections, one call
in flight on each:

  * with nobody waiting on jobs.changes (the reference, in turns with the others)
  * with ``--waiters`` connections each long-polling jobs.changes for a user of its own
    who submits nothing (a web server's users who are idle): each change is checked
    against no waiter but those of its user, so the rate should not move
  * with ``--waiters`` connections long-polling every user's jobs (admins): each change
    wakes every one of them, which then reads the changed jobs and polls again; how many
    answers they got is printed beside the rate

SPEC §4's aim: one waiting connection costs nothing per change for other users' jobs
beyond a cheap check; 100 waiting web clients must not slow the writer.
"""

from __future__ import annotations

import argparse
import json
import selectors
import statistics
import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import (BenchError, Jobd, Row, drive, machine, noop_submit,  # noqa: E402
                      print_table, request, workdir)

CONFIG = """
[execution]
max_queued_per_user = 100000000
max_queued_total = 100000000
# the bench's own history stays whole: forgetting its oldest jobs would slow each phase
# more than the last
max_stored_per_user = 100000000

[server]
max_connections_per_uid = 1000
max_connections = 2000
"""


class Waiters:
    """``count`` connections, each long-polling jobs.changes from its last cursor, on one
    thread; ``answers`` counts the answers that held jobs."""

    def __init__(self, path: Path, count: int, scoped: bool) -> None:
        self.sel = selectors.DefaultSelector()
        self.answers = 0
        self.polls = 0  #: connections past their first answer: waiting
        self.stop = False
        self.params = [{"as_user": f"idle{n}"} if scoped else {} for n in range(count)]
        self.socks = []
        for n in range(count):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(path))
            self.socks.append(s)
            self.sel.register(s, selectors.EVENT_READ, [n, b"", False])
            # the first answers at once: the active jobs of an idle user (none), a cursor
            s.sendall(request("jobs.changes", self.params[n] or {"user_id": "idle"}))
        self.failure: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self._poll()
        except BaseException as e:  # told by close()
            self.failure = e

    def _poll(self) -> None:
        while not self.stop:
            for key, _ in self.sel.select(0.5):
                n, buf, _ = key.data
                data = key.fileobj.recv(1 << 22)  # type: ignore[union-attr]
                if not data:
                    raise BenchError("the daemon closed a waiting connection")
                buf += data
                if not buf.endswith(b"\n"):
                    key.data[1] = buf
                    continue
                key.data[1] = b""
                answer = json.loads(buf)
                if "error" in answer:
                    raise BenchError(f"jobs.changes refused: {answer['error']}")
                if answer["result"]["jobs"]:
                    self.answers += 1
                self.polls += not key.data[2]
                key.data[2] = True
                key.fileobj.sendall(request(  # type: ignore[union-attr]
                    "jobs.changes", dict(self.params[n], after=answer["result"]["cursor"],
                                         timeout_s=30, fields=["id", "status"])))

    def close(self) -> None:
        self.stop = True
        self.thread.join(5)
        for s in self.socks:
            s.close()
        if self.failure is not None:
            raise BenchError(f"a waiting poll failed: {self.failure}")


def submit_rate(daemon: Jobd, seconds: float, connections: int) -> float:
    done, took, errors = drive(daemon.socket, lambda c, n: noop_submit(n, b"bench"),
                               connections=connections, duration=seconds)
    if errors:
        raise BenchError(f"submits refused: {errors[0]}")
    return done / took


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=1.0, help="each rate's run")
    ap.add_argument("--rounds", type=int, default=5, help="runs of each, taken in turns")
    ap.add_argument("--waiters", type=int, default=100)
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args()

    root = workdir(args.keep)
    daemon = Jobd(root, CONFIG).start()
    try:
        submit_rate(daemon, min(1.0, args.seconds), args.connections)  # warm-up
        rows = []
        for scoped, who in ((True, "idle users' polls"), (False, "every-user polls")):
            # short runs taken in turns, with and without the polls, so that the drift
            # of a shared machine (fsync times) falls on both alike; medians compared
            alone, crowded, woke = [], [], 0
            for _ in range(args.rounds):
                alone.append(submit_rate(daemon, args.seconds, args.connections))
                waiters = Waiters(daemon.socket, args.waiters, scoped)
                time.sleep(0.3)  # every first answer is in, every poll waits
                if waiters.failure is not None or waiters.polls < args.waiters:
                    waiters.close()
                    raise BenchError(f"only {waiters.polls} of {args.waiters} polls wait")
                before = waiters.answers
                crowded.append(submit_rate(daemon, args.seconds, args.connections))
                woke += waiters.answers - before
                waiters.close()
            base, rate = statistics.median(alone), statistics.median(crowded)
            rows.append(Row("durable submits/s, nobody waiting (median)", f"{base:,.0f}"))
            rows.append(Row(f"durable submits/s, {args.waiters} {who} waiting (median)",
                            f"{rate:,.0f} ({rate / base:.0%})",
                            goal="no slower" if scoped else "",
                            reference="" if scoped else
                            f"{woke / (args.rounds * args.seconds):,.0f} answers/s to the polls",
                            met=rate >= 0.9 * base if scoped else None))
        print_table(f"changes_bench: waiting jobs.changes polls and the writer, {machine()}",
                    rows)
    finally:
        daemon.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
