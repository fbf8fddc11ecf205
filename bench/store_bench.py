"""Store benchmark: the SQLite store alone, without the daemon around it.

Prints, each beside its SPEC §9 goal and a reference measured in the same run:

  * submits (insert + commit) per second, one at a time, synchronous=full and normal,
    beside a bare sqlite3 INSERT + COMMIT and an fdatasync of the same disk
  * get_job p50, and list p50 (the newest 100 of one user, and one keyset page further
    back) on a database of ``--jobs`` jobs (default 1,000,000) of ~100 users
  * cleanup of the expired tenth of that database (100,000 jobs at 1M): total seconds
    and the longest write transaction
  * database size per 10,000 jobs that went through a real lifecycle (5 events each)

The big database is built quickly with bulk INSERTs on a raw connection, in the schema
``Store`` itself creates. ``python bench/store_bench.py [--jobs 1000000] [--keep]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sqlite3
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import (us, ROOT, BenchError, Row, fsync_latency, machine, pct,  # noqa: E402
                      print_table, workdir)

sys.path.insert(0, str(ROOT))
from jobd.models import Job, JobStatus  # noqa: E402
from jobd.store import Store  # noqa: E402

_DAY_US = 86_400_000_000
_SYNC_OPTIONS = {"branch": "main", "full_reindex": False, "remote": "origin",
                 "strategy": "ff-only"}


def _json(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))


def _sync_result(rng: random.Random) -> dict[str, object]:
    return {"old_revision": f"{rng.getrandbits(160):040x}",
            "new_revision": f"{rng.getrandbits(160):040x}",
            "files_changed": rng.randrange(40), "files_added": rng.randrange(5),
            "files_deleted": rng.randrange(3), "files_indexed": rng.randrange(50),
            "seconds": {"init": 0.01, "git_sync": round(rng.uniform(0.2, 4), 3),
                        "indexing": round(rng.uniform(1, 60), 3), "finalizing": 0.02}}


def _metadata(rng: random.Random, user: str) -> dict[str, str]:
    # what the CIDX web server sends: who asked, from where, for which request
    return {"request_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            "client": "cidx-web/2.4", "requested_by": user, "repo_alias": "backend-api"}


def new_job(user: str, project: str | None, rng: random.Random, type: str = "sync") -> Job:
    return Job(id=str(uuid.UUID(int=rng.getrandbits(128), version=4)), type=type,
               user_id=user, project_id=project, status=JobStatus.CREATED, created_at=0,
               updated_at=0, version=0, options=dict(_SYNC_OPTIONS) if type == "sync" else {},
               metadata=_metadata(rng, user))


# -- building a big database ---------------------------------------------------------------

def _fast_id(rng: random.Random) -> str:
    h = f"{rng.getrandbits(128):032x}"
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}"


def build(db: Path, jobs: int, users: int, expired: int) -> float:
    """``jobs`` jobs of ``users`` users, ~5 events each; the oldest ``expired`` of them are
    past every retention, the rest recent. The seconds it took."""
    started = time.perf_counter()
    Store(db).open().close()
    rng = random.Random(1)
    now = time.time_ns() // 1000
    # payloads drawn from a pool: encoding a million of them would be most of the build
    results = [_json(_sync_result(rng)) for _ in range(997)]
    metadata = {f"user{u:03d}": [_json(_metadata(rng, f"user{u:03d}")) for _ in range(7)]
                for u in range(users)}
    options = {"sync": _json(_SYNC_OPTIONS), "index": "{}", "noop": "{}"}
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA synchronous = OFF")  # a crash here only means building it again
    conn.execute("PRAGMA cache_size = -1048576")  # 1 GiB: the indexes stay in memory
    conn.execute("BEGIN")
    for base in range(0, jobs, 50_000):
        rows, events = [], []
        for seq in range(base + 1, min(jobs, base + 50_000) + 1):
            if seq <= expired:  # 60 to 40 days old: past keep (7d) and keep_failed (30d)
                created = now - 60 * _DAY_US + (seq * 20 * _DAY_US) // max(expired, 1)
            else:               # the last 6 days
                created = now - 6 * _DAY_US + ((seq - expired) * 6 * _DAY_US) // jobs
            user = f"user{rng.randrange(users):03d}"
            kind, fate = rng.random(), rng.random()
            job_type = "sync" if kind < 0.8 else "index" if kind < 0.95 else "noop"
            project = None if job_type == "noop" else f"project{int(kind * 1000) % 12}"
            status = ("queued" if seq > jobs - 500 else "failed" if fate < 0.05
                      else "cancelled" if fate < 0.07 else "completed")
            started_at = created + 2_000
            done = created + 5_000_000 + int(fate * 115_000_000)
            error = "git fetch failed: could not resolve host" if status == "failed" else None
            if status == "queued":
                rows.append((seq, _fast_id(rng), job_type, user, project, status, 0.0, None,
                             None, options[job_type], metadata[user][seq % 7], None, None, 0,
                             created, created, None, None, created))
                events += [(seq, created, "created", None, 0.0, None, "service:cidx"),
                           (seq, created, "queued", None, 0.0, None, "service:cidx")]
                continue
            rows.append((
                seq, _fast_id(rng), job_type, user, project, status,
                100.0 if status == "completed" else 40.0, "finalizing", "indexed 12 files",
                options[job_type], metadata[user][seq % 7],
                results[seq % 997] if status == "completed" else None, error, 1, done,
                created, started_at, done, done))
            events += [(seq, created, "created", None, 0.0, None, "service:cidx"),
                       (seq, created, "queued", None, 0.0, None, "service:cidx"),
                       (seq, started_at, "running", None, 0.0, None, "jobd"),
                       (seq, started_at + 500_000, "running", "indexing", 40.0, None, "jobd"),
                       (seq, done, status, "finalizing", 100.0, error, "jobd")]
        conn.executemany(
            "INSERT INTO jobs (seq, id, type, user_id, project_id, status, progress, phase, "
            "message, options, metadata, result, error, attempts, version, created_at, "
            "started_at, completed_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        conn.executemany(
            "INSERT INTO job_events (job, at, status, phase, progress, message, actor) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)", events)
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    Store(db).open().close()  # as a daemon leaves it: optimized, marked clean
    return time.perf_counter() - started


# -- the figures -------------------------------------------------------------------------

def submit_rate(folder: Path, synchronous: str, n: int) -> tuple[float, list[float]]:
    """Sequential submits on a fresh store: (per second, seconds each)."""
    store = Store(folder / f"submit-{synchronous}.db", synchronous=synchronous).open()
    rng = random.Random(2)
    jobs = [new_job("alice", "p1", rng) for _ in range(n)]
    took = []
    try:
        for job in jobs:
            t = time.perf_counter()
            store.submit_job(job, actor="alice")
            took.append(time.perf_counter() - t)
    finally:
        store.close()
    return n / sum(took), took


def bare_sqlite_rate(folder: Path, synchronous: str, n: int) -> float:
    """INSERT + COMMIT per second on a bare WAL table: the floor under a submit."""
    conn = sqlite3.connect(folder / f"bare-{synchronous}.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    conn.execute("CREATE TABLE t (id TEXT PRIMARY KEY, body TEXT)")
    body = "x" * 400
    t = time.perf_counter()
    for _ in range(n):
        conn.execute("BEGIN")
        conn.execute("INSERT INTO t VALUES (?, ?)", (str(uuid.uuid4()), body))
        conn.execute("COMMIT")
    took = time.perf_counter() - t
    conn.close()
    return n / took


def lifecycle_size(folder: Path, n: int) -> tuple[float, float]:
    """Bytes per job after ``n`` jobs ran a sync's life through the store, 8 at a time, and
    how many of them are the jobs' own JSON (options, metadata, result)."""
    db = folder / "size.db"
    store = Store(db, synchronous="normal").open()

    def worker(k: int) -> None:
        rng = random.Random(100 + k)
        for i in range(k, n, 8):
            user = f"user{i % 100:03d}"
            job = store.submit_job(new_job(user, f"project{i % 12}", rng), actor="service:cidx",
                                   dedupe=False)[0]
            store.transition(job.id, JobStatus.RUNNING, actor="jobd")
            for progress in (10.0, 20.0, 30.0):
                store.update_progress(job.id, progress=progress, phase="git_sync",
                                      message=f"Receiving objects: {progress:.0f}%")
            store.update_progress(job.id, progress=40.0, phase="indexing",
                                  message="indexing 12 files", actor="jobd").result()
            store.transition(job.id, JobStatus.COMPLETED, actor="jobd",
                             message="indexed 12 files", result=_sync_result(rng))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    events = store.events(store.list_jobs(limit=1)[0].id)
    store.close()
    if len(events) != 5:
        raise BenchError(f"a job's life left {len(events)} events, not 5: {events}")
    with contextlib.closing(sqlite3.connect(db)) as conn:
        payload = conn.execute("SELECT avg(length(options) + length(metadata) + "
                               "ifnull(length(result), 0)) FROM jobs").fetchone()[0]
    return db.stat().st_size / n, payload


def timed(fn: Callable[..., Any], calls: list[tuple[Any, ...]]) -> list[float]:
    """Seconds each call of ``fn`` took."""
    out = []
    for args in calls:
        t = time.perf_counter()
        fn(*args)
        out.append(time.perf_counter() - t)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description="jobd store benchmark: submits, get/list at scale, cleanup, size")
    parser.add_argument("--jobs", type=int, default=1_000_000, metavar="N",
                        help="jobs in the big database (default 1,000,000)")
    parser.add_argument("--users", type=int, default=100, help="users owning them")
    parser.add_argument("--submits", type=int, default=2000, metavar="N",
                        help="sequential submits per synchronous mode")
    parser.add_argument("--samples", type=int, default=2000, metavar="N",
                        help="calls timed for each get/list figure")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    folder = workdir(args.keep)
    expired = args.jobs // 10
    big = args.jobs >= 1_000_000
    print(f"store_bench: {machine()}; work folder {folder}")

    fsync = fsync_latency(folder)
    rates = {}
    for mode in ("full", "normal"):
        rate, took = submit_rate(folder, mode, args.submits)
        rates[mode] = (rate, took, bare_sqlite_rate(folder, mode, args.submits))

    print(f"building {args.jobs:,} jobs of {args.users} users ...", flush=True)
    build_s = build(folder / "big.db", args.jobs, args.users, expired)
    big_mb = (folder / "big.db").stat().st_size / 1e6

    t = time.perf_counter()
    store = Store(folder / "big.db").open()
    open_s = time.perf_counter() - t
    try:
        rng = random.Random(3)
        users = [f"user{rng.randrange(args.users):03d}" for _ in range(args.samples)]
        with contextlib.closing(sqlite3.connect(folder / "big.db")) as conn:
            ids = [r[0] for r in conn.execute(
                "SELECT id FROM jobs WHERE seq IN (%s)" % ",".join(
                    str(rng.randrange(1, args.jobs + 1)) for _ in range(args.samples)))]
            # the reference: the same rows fetched as bare tuples, nothing decoded
            bare_s = timed(lambda u: conn.execute(
                "SELECT * FROM jobs WHERE user_id = ? ORDER BY seq DESC LIMIT 100",
                (u,)).fetchall(), [(u,) for u in users])
        # keyset pages from the newer half: every user has 100 jobs before any of them
        middle = [rng.randrange(args.jobs // 2, args.jobs) for _ in range(args.samples)]
        get_s = timed(store.get_job, [(i,) for i in ids])
        newest_s = timed(lambda u: _check_page(store.list_jobs(user_id=u, limit=100)),
                         [(u,) for u in users])
        page_s = timed(lambda u, s: _check_page(store.list_jobs(user_id=u, before_seq=s,
                                                                limit=100)),
                       list(zip(users, middle)))
        failed_s = timed(lambda s: store.list_jobs(statuses=["failed"], before_seq=s,
                                                   limit=100), [(s,) for s in middle[:200]])
    finally:
        store.close()

    # cleanup on a store opened for it alone, so its longest write is cleanup's own
    store = Store(folder / "big.db").open()
    now = time.time_ns() // 1000
    try:
        chunks = []
        t = time.perf_counter()
        for ids_deleted in store.cleanup(keep_before=now - 7 * _DAY_US,
                                         keep_failed_before=now - 30 * _DAY_US):
            chunks.append(len(ids_deleted))
        cleanup_s = time.perf_counter() - t
        longest = store.longest_write_s
        left = store.counts()
    finally:
        store.close()
    if sum(chunks) != expired:
        raise BenchError(f"cleanup deleted {sum(chunks):,} jobs, not the {expired:,} expired")

    per_job, payload = lifecycle_size(folder, 10_000)

    full_rate, full_took, full_bare = rates["full"]
    normal_rate, normal_took, normal_bare = rates["normal"]
    at = "" if big else " (goal is @1M)"
    rows = [
        Row("submits/s, sequential, full", f"{full_rate:,.0f}/s "
            f"(p50 {us(pct(full_took, 50))}, p99 {us(pct(full_took, 99))})", "",
            f"bare sqlite3 {full_bare:,.0f}/s; fdatasync p50 {us(pct(fsync, 50))}"),
        Row("submits/s, sequential, normal", f"{normal_rate:,.0f}/s "
            f"(p50 {us(pct(normal_took, 50))}, p99 {us(pct(normal_took, 99))})", "",
            f"bare sqlite3 {normal_bare:,.0f}/s"),
        Row("open, clean stop", f"{open_s * 1000:,.0f} ms", "≤ 1,000 ms" + at,
            f"{args.jobs:,} jobs, {big_mb:,.0f} MB", open_s <= 1.0 if big else None),
        Row("get_job p50", us(pct(get_s, 50)), "", f"p99 {us(pct(get_s, 99))}"),
        Row("newest 100 of one user p50", us(pct(newest_s, 50)), "≤ 1,000 µs" + at,
            f"p99 {us(pct(newest_s, 99))}; bare sqlite3 rows p50 {us(pct(bare_s, 50))}",
            pct(newest_s, 50) <= 0.001 if big else None),
        Row("keyset page of one user p50", us(pct(page_s, 50)), "≤ 1,000 µs" + at,
            f"p99 {us(pct(page_s, 99))}", pct(page_s, 50) <= 0.001 if big else None),
        Row("page of failed jobs p50", us(pct(failed_s, 50)), "",
            f"p99 {us(pct(failed_s, 99))}"),
        Row(f"cleanup of {expired:,} expired", f"{cleanup_s:.2f} s in {len(chunks)} chunks",
            "≤ 3 s" + ("" if expired == 100_000 else " (goal is 100k)"),
            f"{sum(chunks) / cleanup_s:,.0f} jobs/s; {sum(left.values()):,} left",
            cleanup_s <= 3.0 if expired >= 100_000 else None),
        Row("longest cleanup transaction", f"{longest * 1000:,.1f} ms", "≤ 50 ms", "",
            longest <= 0.05),
        Row("size per 10,000 jobs", f"{per_job * 10_000 / 1e6:.2f} MB",
            "≤ 10 MB", f"of it the jobs' own JSON {payload * 10_000 / 1e6:.2f} MB "
            f"({payload:.0f} B/job); bulk-built {big_mb * 1e4 / args.jobs:.2f} MB",
            per_job * 10_000 <= 10e6),
    ]
    print_table(f"store_bench: {args.jobs:,} jobs ({build_s:.0f} s to build), "
                f"{args.users} users, {os.cpu_count()} CPUs", rows)
    return 0


def _check_page(jobs: list[Job]) -> None:
    if len(jobs) != 100:
        raise BenchError(f"a page held {len(jobs)} jobs, not 100: too few jobs per user")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"store_bench: {e}", file=sys.stderr)
        sys.exit(1)
