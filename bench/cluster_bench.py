"""Cluster benchmark (SPEC §9's cluster row, §11): three jobd nodes on one PostgreSQL.

Starts a private PostgreSQL (Debian's packages, its data on disk, with ``fsync``,
``synchronous_commit`` and ``full_page_writes`` on), or uses ``--dsn``, and on it:

  * a fourth node ``d`` with one slot, started first and kept busy by one long job, so
    every job submitted through it runs on another node (as a CIDX web node that only
    submits): the pickup, progress and cancel figures are all across nodes
  * claims/s: ``noop`` jobs queued while dispatch is paused, the database analyzed (as
    autovacuum keeps a database that has run for a while), then drained by nodes a, b
    and c with 4 slots each (12 slots), beside a bare claim loop in the same database:
    three connections, each claiming up to 4 rows of a plain table per transaction under
    the same kind of advisory lock, then ending them, with no jobd in between; and
    beside jobd's own schema, triggers and claim statement with one hop per batch (three
    processes of 4 slots, each batch's lock, ends, claims, events, counts and
    notifications sent at once and read after the COMMIT, no jobd around them), in a
    database of its own on the same server: what the claims could reach if a node's batch
    held the queue lock for the server's work alone (docs/cluster.md, section 14)
  * the CPU a claim cost in the nodes' drain and in the one-hop reference: PostgreSQL's
    server, the claiming processes, and the whole machine, with the rate the machine's
    cores could give at that cost (with a private server only: ``--dsn`` leaves
    PostgreSQL's out)
  * end to end: ``noop`` jobs submitted through a, b and c from 8 connections and run
  * pickup on another node: submit through d → ``started_at`` − ``created_at``
  * cross-node progress: a job on a, b or c prints ``{"progress": n, "message": "<its
    time.time()>"}``; a ``jobs.wait`` client on d computes now − that time
  * cross-node cancel: ``jobs.cancel`` through d of a job running on another node →
    cancelled and its process group gone
  * the single-node SQLite figures in the same run: end to end (as engine_bench.py
    measures it) and the same paused-then-drained claims/s

SPEC §9 goals: ≥ 1,000 claims/s with 12 slots; progress on another node ≤ 50 ms; cancel
through another node ≤ cancel_grace + 1 s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from _harness import (BenchError, Conn, Jobd, Row, cpu_seconds, drive, iso_us,  # noqa: E402
                      machine, ms, noop_submit, pct, print_table, workdir)
from engine_bench import cancel, latency_options, progress  # noqa: E402

#: cancel_grace of every node (a cluster-wide setting)
CANCEL_GRACE = 3.0

SQLITE_CONFIG = """
[execution]
workers = {workers}
max_running_per_user = 100
max_queued_per_user = 100000000
max_queued_total = 100000000
cancel_grace = "{grace}s"
"""

NODE_CONFIG = SQLITE_CONFIG + """
[storage]
backend = "postgres"
dsn = "{dsn}"
state_dir = "{state}"

[sync]
repo_path_template = "{shared}/repos/{{user_id}}/{{project_id}}"
allowed_roots = ["{shared}/repos"]

[cluster]
lease = "10s"
heartbeat = "2s"
poll = "1s"
"""

#: the bare claim loop's table: queued rows, claimed oldest first under one lock
_BARE_SCHEMA = """
DROP TABLE IF EXISTS bench_bare;
CREATE TABLE bench_bare (seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                         status text NOT NULL, node integer);
CREATE INDEX bench_bare_queued ON bench_bare (seq) WHERE status = 'queued';
"""
_BARE_CLAIM = """
UPDATE bench_bare SET status = 'running', node = %s
WHERE seq = (SELECT seq FROM bench_bare WHERE status = 'queued' ORDER BY seq LIMIT 1)
RETURNING seq
"""
#: a key of its own: the bare loop never waits on a jobd lock, nor jobd on it
_BARE_LOCK = "SELECT pg_advisory_xact_lock(1785, 99)"


class Postgres:
    """A private PostgreSQL for the run, from Debian's packages: its data on disk and
    durable (the figures are about durable commits), a Unix socket only, run as the
    ``postgres`` user when the bench runs as root. (tests/pg.py's server is the tests':
    on tmpfs, fsync off, and it needs pytest, which the bench venv has not.)"""

    BINDIRS = "/usr/lib/postgresql/*/bin"

    def __init__(self) -> None:
        found = sorted(Path("/").glob(self.BINDIRS.lstrip("/")),
                       key=lambda p: [int(n) for n in p.parent.name.split(".") if n.isdigit()])
        if not found:
            raise BenchError(f"no PostgreSQL server in {self.BINDIRS}: apt-get install "
                             "postgresql, or give --dsn")
        self.bindir = found[-1]
        # /var/tmp: on disk, and open to the postgres user (a work folder is root's alone)
        self.root = Path(tempfile.mkdtemp(prefix="jobd-bench-pg-", dir="/var/tmp"))
        self.root.chmod(0o755)
        self.data = self.root / "data"
        self.as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_postgres:
            shutil.chown(self.root, "postgres", "postgres")
        self.dsn = f"postgresql:///jobd?host={self.root}&user=postgres"

    def _run(self, program: str, *args: str) -> None:
        done = subprocess.run([*self.as_postgres, str(self.bindir / program), *args],
                              cwd=self.root, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise BenchError(f"{program} exited with {done.returncode}: {done.stderr.strip()}")

    def start(self) -> "Postgres":
        self._run("initdb", "--pgdata", str(self.data), "--username", "postgres", "--auth",
                  "trust", "--encoding", "UTF8", "--locale", "C")
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(f"listen_addresses = ''\nunix_socket_directories = '{self.root}'\n"
                       "fsync = on\nsynchronous_commit = on\nfull_page_writes = on\n")
        self._run("pg_ctl", "start", "--pgdata", str(self.data), "--log",
                  str(self.root / "postgres.log"), "--wait")
        self._run("createdb", "--host", str(self.root), "--username", "postgres", "jobd")
        return self

    def pid(self) -> int:
        """The postmaster's pid (the first line of its ``postmaster.pid``)."""
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "stop", "--pgdata", str(self.data), "--mode", "fast", "--wait")
        shutil.rmtree(self.root, ignore_errors=True)


def server_cpu(postmaster: int) -> float:
    """CPU seconds a PostgreSQL server has used: the postmaster's own and its ended
    backends' (reaped by it), and each live process under it."""
    total = cpu_seconds(postmaster, reaped=True)
    try:
        with open(f"/proc/{postmaster}/task/{postmaster}/children") as f:
            children = [int(pid) for pid in f.read().split()]
    except OSError:
        children = []
    for pid in children:
        try:
            total += cpu_seconds(pid)
        except OSError:  # ended meanwhile: its time is in the postmaster's reaped share
            pass
    return total


def machine_busy() -> float:
    """CPU seconds the machine's cores have been busy (not idle, not waiting for I/O)."""
    with open("/proc/stat") as f:
        ticks = [int(n) for n in f.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


class Meter:
    """The CPU a phase cost, per claim: PostgreSQL's server, the claiming processes (jobd
    nodes by pid, or this bench's own children once reaped), and the whole machine; and
    so the most the machine's cores could claim a second at that cost."""

    def __init__(self, postmaster: int | None,
                 pids: Callable[[], list[int]] | None = None) -> None:
        self.postmaster, self.pids = postmaster, pids
        self.server = self.clients = self.busy = self.elapsed = 0.0
        self.claims = 0

    def _clients(self) -> float:
        if self.pids is None:  # forked children, reaped by the end of the phase
            times = os.times()
            return times.children_user + times.children_system
        return sum(cpu_seconds(pid) for pid in self.pids())

    def start(self) -> None:
        self._at = (time.perf_counter(), machine_busy(), self._clients(),
                    server_cpu(self.postmaster) if self.postmaster else 0.0)

    def stop(self, claims: int) -> None:
        at, busy, clients, server = self._at
        self.elapsed = time.perf_counter() - at
        self.busy, self.clients = machine_busy() - busy, self._clients() - clients
        self.server = (server_cpu(self.postmaster) - server) if self.postmaster else 0.0
        self.claims = claims

    def said(self, clients: str) -> str:
        if not self.claims:
            return "not measured"

        def per(seconds: float) -> str:
            return f"{seconds / self.claims * 1e6:,.0f} µs"
        said = (f"{per(self.server)} PostgreSQL + {per(self.clients)} {clients} a claim"
                if self.postmaster else f"{per(self.clients)} {clients} a claim")
        bound = (os.cpu_count() or 1) * self.claims / self.busy if self.busy else 0
        return (f"{said}; machine {per(self.busy)} a claim, {self.busy / self.elapsed:.1f} "
                f"of {os.cpu_count()} cores busy: at most {bound:,.0f}/s at that cost")


#: one hop per batch (``one_hop_claims``): jobd's claim statement, with the claimed job's
#: event, queued count and notification in it, and the floor from the batch's own nextval
_ONE_HOP_LOCK = "SELECT nextval('job_versions') FROM (SELECT pg_advisory_xact_lock({key})) AS q"
_ONE_HOP_CLAIMED = """,
claimed AS ({update} RETURNING jobs.seq, jobs.id, jobs.user_id, jobs.version),
ev AS (INSERT INTO job_events (job, at, status, progress, actor)
       SELECT seq, %(now)s, 'running', 0, 'jobd' FROM claimed),
cnt AS (UPDATE queued_counts q SET n = q.n - 1 FROM claimed WHERE q.user_id = claimed.user_id)
SELECT seq, pg_notify('jobd', id || ':' || version) FROM claimed"""
_ONE_HOP_END = """WITH done AS (
    UPDATE jobs SET status = 'completed', progress = 100,
        version = jobd_next_version(seq, version, currval('job_versions')),
        updated_at = %(now)s, completed_at = %(now)s, cancel_requested = 0, pgid = NULL,
        pgid_start = NULL, node_id = NULL
    WHERE seq = ANY(%(seqs)s) AND status = 'running' AND node_id = %(node)s AND EXISTS (
        SELECT 1 FROM nodes WHERE id = %(node)s AND ended_at IS NULL
        AND lease_until > jobd_now_us())
    RETURNING seq, id, version),
ev AS (INSERT INTO job_events (job, at, status, progress, actor)
       SELECT seq, %(now)s, 'completed', 100, 'jobd' FROM done),
gone AS (DELETE FROM job_progress p USING done WHERE p.job = done.seq)
SELECT seq, pg_notify('jobd', id || ':' || version), pg_notify('jobd_queue', id || ':' || version)
FROM done"""


def _one_hop_claim_sql() -> str:
    from jobd.store.postgres import QUERIES
    head, found, update = QUERIES["claim"].partition("\nUPDATE jobs SET")
    if not found or "RETURNING" not in update:
        raise BenchError("jobd's claim statement changed shape: update one_hop_claims")
    update = "UPDATE jobs SET" + update.rpartition("RETURNING")[0]
    return (head + _ONE_HOP_CLAIMED.format(update=update)).replace(
        "%(floor)s", "currval('job_versions')")


def _one_hop_node(dsn: str, node: int, slots: int, claim: str, go: Any, out: Any) -> None:
    from psycopg import connect
    from jobd.store.postgres import QUEUE_KEY
    lock = _ONE_HOP_LOCK.format(key=QUEUE_KEY)
    claims = 0
    try:
        with connect(dsn, autocommit=True) as conn:
            go.wait()
            running: list[int] = []
            while True:
                now = time.time_ns() // 1000
                with conn.pipeline() as pipeline:
                    conn.execute("BEGIN")
                    conn.execute(lock)
                    if running:  # the noop jobs it claimed last time have ended
                        conn.execute(_ONE_HOP_END, {"now": now, "seqs": running, "node": node})
                    cursors = [conn.execute(claim, {
                        "node": node, "workers": slots + len(running), "now": now,
                        "max_running_per_user": 100, "exclusive": ["sync", "index"]})
                        for _ in range(slots)]
                    conn.execute("COMMIT")
                    pipeline.sync()
                    claimed = [row[0] for cur in cursors for row in cur.fetchall()]
                if not claimed and not running:
                    break
                claims += len(claimed)
                running = claimed
        out.put((claims, None))
    except BaseException as e:  # reported by the caller
        out.put((claims, repr(e)))


def one_hop_claims(dsn: str, total: int, nodes: int, slots: int, meter: Meter) -> float:
    """Claims per second of jobd's own schema, triggers and claim statement when a batch is
    one hop: ``nodes`` processes with ``slots`` each, every batch the lock and its floor,
    the ends of the noop jobs it claimed last (events, progress rows, notifications) and
    the claims of its slots (each with its event, count and notification), sent at once
    and read after the COMMIT; no jobd around it. In a database of its own on the same
    server, dropped after."""
    import psycopg
    try:
        return _one_hop_claims(dsn, total, nodes, slots, meter)
    except psycopg.Error as e:  # say so and go on: the other figures are still measured
        raise BenchError(f"the one-hop claim loop could not run: {e}") from None


def _one_hop_claims(dsn: str, total: int, nodes: int, slots: int, meter: Meter) -> float:
    import multiprocessing
    import queue
    import uuid
    from psycopg import connect, conninfo
    from jobd.models import Job, JobStatus
    from jobd.rules import Rules
    from jobd.store.postgres import PostgresStore
    claim = _one_hop_claim_sql()
    own = conninfo.make_conninfo(dsn, dbname="jobd_one_hop")
    with connect(dsn, autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS jobd_one_hop")
        conn.execute("CREATE DATABASE jobd_one_hop")
    try:
        store = PostgresStore(own, cluster=True).open()
        try:
            rules = Rules()
            for first in range(0, total, 500):
                jobs = [Job(id=str(uuid.uuid4()), type="noop", user_id=f"bench-h{n % 8}",
                            project_id=None, status=JobStatus.CREATED, created_at=0,
                            updated_at=0, version=0)
                        for n in range(first, min(total, first + 500))]
                store.write(lambda tx, jobs=jobs: [store.submit_job_in(tx, job, "bench", rules)
                                                   for job in jobs])
        finally:
            store.close()
        with connect(own, autocommit=True) as conn:
            ids = [conn.execute(
                "INSERT INTO nodes (host, state_dir, pid, workers, settings_hash, settings, "
                "started_at, lease_until) VALUES ('bench', %s, %s, %s, '-', '{}', "
                "jobd_now_us(), jobd_now_us() + 3600000000) RETURNING id",
                (f"one-hop-{n}", n, slots)).fetchone()[0] for n in range(nodes)]
            conn.execute("VACUUM ANALYZE")
        fork = multiprocessing.get_context("fork")
        go, out = fork.Event(), fork.Queue()
        procs = [fork.Process(target=_one_hop_node, args=(own, node, slots, claim, go, out))
                 for node in ids]
        for proc in procs:
            proc.start()
        time.sleep(0.5)  # connected
        started = time.perf_counter()
        meter.start()
        go.set()
        try:
            results = [out.get(timeout=300) for _ in procs]
            elapsed = time.perf_counter() - started
        except queue.Empty:
            raise BenchError("the one-hop claim loop did not end within 300 s") from None
        finally:
            for proc in procs:
                proc.join(timeout=5)
                if proc.is_alive():
                    proc.kill()
        meter.stop(total)  # its processes reaped: their CPU is this process's children's
        failed = [error for _, error in results if error]
        if failed:
            raise BenchError(f"the one-hop claim loop failed: {failed[0]}")
        with connect(own, autocommit=True) as conn:
            done = conn.execute("SELECT count(*) FROM jobs WHERE status = 'completed'").fetchone()[0]
        if done != total or sum(n for n, _ in results) != total:
            raise BenchError(f"the one-hop claim loop ended {done} of {total} jobs")
        return total / elapsed
    finally:
        with connect(dsn, autocommit=True) as conn:
            conn.execute("DROP DATABASE IF EXISTS jobd_one_hop WITH (FORCE)")


def settings_of(dsn: str) -> str:
    from psycopg import connect
    with connect(dsn, autocommit=True) as conn:
        values = [conn.execute(f"SHOW {n}").fetchone()[0]
                  for n in ("server_version", "fsync", "synchronous_commit")]
    return f"PostgreSQL {values[0]}, fsync={values[1]}, synchronous_commit={values[2]}"


def bare_claims(dsn: str, total: int, nodes: int, slots: int) -> float:
    """Rows claimed per second by ``nodes`` connections, each claiming up to ``slots``
    per transaction under one advisory lock and then ending them in a second."""
    from psycopg import connect
    with connect(dsn, autocommit=True) as conn:
        conn.execute(_BARE_SCHEMA)
        conn.execute("INSERT INTO bench_bare (status) SELECT 'queued' "
                     "FROM generate_series(1, %s)", (total,))
        conn.execute("VACUUM ANALYZE bench_bare")
    errors: list[BaseException] = []

    def node(n: int) -> None:
        try:
            with connect(dsn, autocommit=True) as conn:
                while True:
                    with conn.transaction():
                        conn.execute(_BARE_LOCK)
                        got = [r[0] for _ in range(slots)
                               for r in conn.execute(_BARE_CLAIM, (n,)).fetchall()]
                    if not got:
                        return
                    conn.execute("UPDATE bench_bare SET status = 'done' WHERE seq = ANY(%s)",
                                 (got,))
        except BaseException as e:  # reported by the caller
            errors.append(e)

    threads = [threading.Thread(target=node, args=(n,)) for n in range(nodes)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise BenchError(f"the bare claim loop failed: {errors[0]}")
    with connect(dsn, autocommit=True) as conn:
        done = conn.execute("SELECT count(*) FROM bench_bare WHERE status = 'done'").fetchone()[0]
        conn.execute("DROP TABLE bench_bare")
    if done != total:
        raise BenchError(f"the bare claim loop ended {done} of {total} rows")
    return total / elapsed


def finished(conn: Conn) -> int:
    jobs = conn.call("admin.stats")["jobs"]
    return sum(jobs[s] for s in ("completed", "failed", "cancelled"))


def wait_ended(conn: Conn, before: int, total: int, timeout: float = 180) -> None:
    """Until ``total`` jobs more than ``before`` have ended. ``admin.stats`` is asked every
    0.1 s until 90 % of them have, then every 0.02 s: asked at 50/s throughout, its
    answers took a fifth of the machine from the nodes being measured."""
    deadline = time.monotonic() + timeout
    while (ended := finished(conn) - before) < total:
        if time.monotonic() > deadline:
            raise BenchError(f"only {ended:,} of {total:,} jobs ended within {timeout:g} s "
                             f"({ended / timeout:,.1f}/s)")
        time.sleep(0.1 if ended < total * 0.9 else 0.02)


def analyzed(dsn: str) -> None:
    """The database's statistics taken anew, as autovacuum keeps them in a database that
    has run for a while. The bench's database is a minute old: its statistics and the
    nodes' cached plans date from when it held a few hundred jobs, and the drain's
    statements then read the table whole (a claim's row, a follower's read)."""
    from psycopg import connect
    with connect(dsn, autocommit=True) as conn:
        conn.execute("ANALYZE")


def drained(submit: list[Jobd], control: Conn, total: int, clients: int,
            meter: Meter | None = None, dsn: str | None = None) -> float:
    """Jobs started and run per second: ``total`` noop jobs queued through ``submit``'s
    nodes while paused, then (their PostgreSQL database ``dsn`` analyzed) dispatch resumed
    and the queue drained (``meter``: the CPU the drain cost)."""
    control.call("admin.pause")
    users = [f"bench-c{c}".encode() for c in range(clients)]
    share = [total // len(submit) + (n < total % len(submit)) for n in range(len(submit))]
    try:
        for node, count in zip(submit, share):
            _, _, errors = drive(node.socket, lambda c, n: noop_submit(n, users[c]),
                                 connections=clients, total=count)
            if errors:
                raise BenchError(f"submits refused, e.g. {errors[0]}")
        before = finished(control)
        if dsn is not None:
            analyzed(dsn)
    finally:
        if meter is not None:
            meter.start()
        started = time.perf_counter()
        control.call("admin.resume")  # whatever happened: the next figures need dispatch
    wait_ended(control, before, total)
    rate = total / (time.perf_counter() - started)
    if meter is not None:
        meter.stop(total)
    return rate


def end_to_end(submit: list[Jobd], control: Conn, total: int, clients: int) -> float:
    """noop jobs submitted through ``submit``'s nodes (``clients`` connections in all,
    one call in flight each) and run, per second."""
    users = [f"bench-e{c}".encode() for c in range(clients)]
    before = finished(control)
    started = time.perf_counter()
    threads, errors = [], []
    per_node = max(1, clients // len(submit))
    share = [total // len(submit) + (n < total % len(submit)) for n in range(len(submit))]

    def feed(node: Jobd, count: int, first: int) -> None:
        _, _, refused = drive(node.socket, lambda c, n: noop_submit(n, users[first + c]),
                              connections=per_node, total=count)
        errors.extend(refused)

    for n, (node, count) in enumerate(zip(submit, share)):
        threads.append(threading.Thread(target=feed, args=(node, count, n * per_node)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise BenchError(f"submits refused, e.g. {errors[0]}")
    wait_ended(control, before, total)
    return total / (time.perf_counter() - started)


def pickups(conn: Conn, count: int) -> list[float]:
    """Seconds from created_at to started_at of ``count`` sequential noop jobs submitted
    through ``conn``'s node."""
    out = []
    for _ in range(count):
        job = conn.call("jobs.submit", type="noop")
        while job["status"] not in ("completed", "failed", "cancelled"):
            job = conn.call("jobs.wait", job_id=job["id"], after_version=job["version"],
                            timeout_s=10)
        if job["status"] != "completed":
            raise BenchError(f"a noop job ended {job['status']}: {job.get('error')}")
        out.append((iso_us(job["started_at"]) - iso_us(job["created_at"])) / 1e6)
    return out


def measured(figure: str, unit: str, measure: Callable[[], Any]) -> Any:
    """One figure's rate or samples, said as soon as it is measured; or why it could not
    be measured (the others still are)."""
    print(f"{figure} ...", flush=True)
    try:
        value = measure()
    except BenchError as e:
        print(f"  not measured: {e}", flush=True)
        return str(e)
    print(f"  {show(value, unit)}", flush=True)
    return value


def show(value: Any, unit: str) -> str:
    """A rate (``/s``) or the median of samples (``s``), or the reason it is missing."""
    if isinstance(value, str):
        return "not measured"
    if unit == "/s":
        return f"{value:,.0f}/s"
    return ms(pct(value, 50))


def rate_row(figure: str, rate: float | str, goal: str, least: float | None,
             reference: str) -> Row:
    if isinstance(rate, str):
        return Row(figure, "not measured", goal, rate[:200], False if least else None)
    return Row(figure, f"{rate:,.0f}/s", goal, reference,
               None if least is None else rate >= least)


def latency_row(figure: str, samples: list[float] | str, goal: str, bound: float | None,
                q: float, reference: str = "") -> Row:
    """A latency's row: its ``q``-th percentile against ``bound``, or why it is missing."""
    if isinstance(samples, str):
        return Row(figure, "not measured", goal, samples[:200], False if bound else None)
    return Row(figure if q == 50 else f"{figure} max", ms(pct(samples, q)), goal,
               f"p50 {ms(pct(samples, 50))}, p99 {ms(pct(samples, 99))}, max "
               f"{ms(max(samples))} of {len(samples)}{reference}",
               None if bound is None else pct(samples, q) <= bound)


def main() -> int:
    parser = argparse.ArgumentParser(
        description="jobd cluster benchmark: claims/s with 3 nodes x 4 slots beside a bare "
                    "claim loop, end to end, pickup, progress and cancel across nodes, beside "
                    "one SQLite node's figures.")
    parser.add_argument("--dsn", help="an existing, empty PostgreSQL database to use (default: "
                                      "start a private server)")
    parser.add_argument("--jobs", type=int, default=3000, metavar="N",
                        help="noop jobs for claims/s and end to end (default 3000)")
    parser.add_argument("--clients", type=int, default=8,
                        help="connections submitting, one call in flight each (default 8)")
    latency_options(parser, pickups=100)
    parser.add_argument("--keep", action="store_true",
                        help="keep the work folder (logs, the private database) and print it")
    args = parser.parse_args()

    root = workdir(args.keep)
    server = None
    nodes: list[Jobd] = []
    (root / "sqlite").mkdir()
    single = Jobd(root / "sqlite", SQLITE_CONFIG.format(workers=12, grace=CANCEL_GRACE))
    load = machine()
    try:
        if args.dsn:
            dsn = args.dsn
        else:
            server = Postgres()
            print(f"starting PostgreSQL in {server.root} ...", flush=True)
            dsn = server.start().dsn
        durability = settings_of(dsn)
        shared = root / "shared"
        (shared / "repos").mkdir(parents=True)

        def node(name: str, workers: int) -> Jobd:
            (root / name).mkdir()
            made = Jobd(root / name, NODE_CONFIG.format(
                workers=workers, grace=CANCEL_GRACE, dsn=dsn, state=root / name / "state",
                shared=shared))
            nodes.append(made)
            return made.start()

        # d first, alone, so that the long job it takes is its own; then a, b and c
        d = node("d", 1)
        dconn = d.connect()
        holder = dconn.call("jobs.submit", type="command",
                            options={"argv": ["sh", "-c", "sleep 3600"]})
        while holder["status"] != "running":
            holder = dconn.call("jobs.wait", job_id=holder["id"],
                                after_version=holder["version"], timeout_s=10)
        workers = [node(name, 4) for name in "abc"]

        postmaster = server.pid() if server is not None else None
        hop_cpu, node_cpu = Meter(postmaster), Meter(postmaster, lambda: [n.pid for n in nodes])
        bare = measured("bare claim loop", "/s",
                        lambda: bare_claims(dsn, args.jobs, 3, 4))
        one_hop = measured("one hop per batch, jobd's schema", "/s",
                           lambda: one_hop_claims(dsn, args.jobs, 3, 4, hop_cpu))
        claims = measured("claims/s, 3 nodes x 4 slots", "/s", lambda: (
            drained(workers, dconn, min(300, args.jobs), args.clients),  # warm-up
            drained(workers, dconn, args.jobs, args.clients, node_cpu, dsn))[1])
        e2e = measured("end to end, 3 nodes", "/s",
                       lambda: end_to_end(workers, dconn, args.jobs, args.clients))
        picks = measured("pickup on another node", "s", lambda: (
            pickups(dconn, min(10, args.pickups)), pickups(dconn, args.pickups))[1])
        seen = measured("progress on another node", "s",
                        # a node writes a job's live progress at most every 20 ms
                        # (cluster.PROGRESS_EVERY), its latest values: lines printed as
                        # often are partly passed over
                        lambda: progress(dconn, args.updates, args.every, least=0.5))
        cancels = measured("cancel through another node", "s",
                           lambda: cancel(dconn, args.cancels))
        dconn.call("jobs.cancel", job_id=holder["id"])
        dconn.close()
        for made in nodes:
            made.stop()

        single.start()
        sconn = single.connect()
        single_claims = measured("claims/s, one SQLite node x 12", "/s", lambda: (
            drained([single], sconn, min(300, args.jobs), args.clients),
            drained([single], sconn, args.jobs, args.clients))[1])
        single_e2e = measured("end to end, one SQLite node", "/s",
                              lambda: end_to_end([single], sconn, args.jobs, args.clients))
        single_picks = measured("pickup, one SQLite node", "s",
                                lambda: pickups(sconn, args.pickups))
        sconn.close()
    finally:
        for made in [*nodes, single]:
            made.stop()
        if server is not None:
            server.stop()

    rows = [
        rate_row("claims/s, 3 nodes x 4 slots", claims, "≥ 1,000/s", 1000,
                 f"bare claim loop {show(bare, '/s')}; one hop per batch on jobd's schema "
                 f"{show(one_hop, '/s')}; one SQLite node {show(single_claims, '/s')}"),
        Row("CPU of the nodes' claims", node_cpu.said("the four jobd"), "", "one hop per "
            f"batch on jobd's schema: {hop_cpu.said('its three processes')}"),
        rate_row("end to end, 3 nodes", e2e, "", None,
                 f"one SQLite node {show(single_e2e, '/s')}"),
        latency_row("pickup on another node p50", picks, "", None, 50,
                    f"; one SQLite node p50 {show(single_picks, 's')}"),
        latency_row("progress on another node p50", seen, "≤ 50 ms", 0.05, 50),
        latency_row("cancel through another node", cancels,
                    f"≤ cancel_grace + 1 s ({CANCEL_GRACE + 1:g} s)", CANCEL_GRACE + 1, 100),
    ]
    print_table(f"cluster_bench: {durability}; {load}", rows)
    if args.keep:
        print(f"\nwork folder kept: {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    # a SIGTERM still stops the nodes and the private PostgreSQL (main's finally)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"cluster_bench: {e}", file=sys.stderr)
        sys.exit(1)
