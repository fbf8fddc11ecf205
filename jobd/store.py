"""The SQLite store: schema, migrations, compare-and-set transitions, queries, upkeep.

The only importer of ``sqlite3``. One writer thread owns the one write connection and
commits whatever writes are waiting in one transaction (group commit: with
``synchronous=full`` one fsync then covers many submissions); each write runs in its own
savepoint so one refused change does not undo its neighbours, and no caller is answered
before the commit that holds its write. Reads use a connection per thread and never wait
for the writer (WAL).

Timestamps are integer microseconds since the epoch. ``seq`` (the rowid) is insertion
order: ``jobs.list`` pages newest first by it, so jobs sharing a ``created_at`` still page
exactly. A job's ``version`` is ``max(version + 1, now)``: it rises on every change and,
being tied to the clock, stays above any value handed out before a crash.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
import queue
import shutil
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import structlog

from jobd.errors import Conflict, JobdError, LimitExceeded, NotFound, Unavailable
from jobd.models import TERMINAL, Job, JobStatus, readable, sources
from jobd.state import make_private_dir

__all__ = ["Corrupt", "Listeners", "Store", "StoreError", "backup", "check", "now_us", "recover"]

log = structlog.get_logger()
T = TypeVar("T")


def now_us() -> int:
    return time.time_ns() // 1000


class StoreError(Exception):
    """The database cannot be opened or used; the message says which file and why."""


class Corrupt(StoreError):
    """The database file is damaged."""


def _repair_json(conn: sqlite3.Connection) -> None:
    """Make stored options and metadata that SQLite's JSON functions refuse valid again.

    Before numbers were checked, NaN and Infinity could be stored, and every jobs.list page
    holding such a row failed. Python's parser takes them: non-finite numbers become null
    and the rest stays as it was (a string holding "NaN" too). Text that does not parse
    even so becomes ``{"unreadable": "<the text>"}``, so nothing is lost silently.
    """
    broken, repair = _REPAIR_JSON_SQL
    for seq, options, metadata in conn.execute(broken).fetchall():
        conn.execute(repair, (_repaired(options), _repaired(metadata), seq))
        log.warning("store_json_repaired", seq=seq)


#: the rows ``_repair_json`` finds (the text of each column SQLite refuses, else NULL),
#: and how it writes one back
_REPAIR_JSON_SQL = (
    "SELECT seq, CASE WHEN json_valid(options) THEN NULL ELSE options END, "
    "CASE WHEN json_valid(metadata) THEN NULL ELSE metadata END FROM jobs "
    "WHERE NOT json_valid(options) OR NOT json_valid(metadata)",
    "UPDATE jobs SET options = ifnull(?, options), metadata = ifnull(?, metadata) "
    "WHERE seq = ?")


def _repaired(text: str | None) -> str | None:
    """``text`` (None: valid as it is) as valid JSON: see ``_repair_json``."""
    if text is None:
        return None
    try:
        value = _finite(json.loads(text))
    except (ValueError, RecursionError):
        value = {"unreadable": text}
    return _dumps(value)


def _finite(value: Any) -> Any:
    """``value`` with every NaN and infinite number replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(v) for key, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


#: one step of a migration: SQL (one or more statements), or Python given the connection
Step = str | Callable[[sqlite3.Connection], None]

# Each entry is one migration (a step, or several in order), applied in its own
# transaction; user_version counts them.
MIGRATIONS: tuple[Step | tuple[Step, ...], ...] = (
    # 1: jobs, their history and their checkpoints
    """
    CREATE TABLE jobs (
        seq INTEGER PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        type TEXT NOT NULL,
        user_id TEXT NOT NULL,
        project_id TEXT,
        status TEXT NOT NULL,
        progress REAL NOT NULL DEFAULT 0,
        phase TEXT,
        message TEXT,
        priority INTEGER NOT NULL DEFAULT 0,
        options TEXT NOT NULL DEFAULT '{}',
        metadata TEXT NOT NULL DEFAULT '{}',
        result TEXT,
        error TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        recoveries INTEGER NOT NULL DEFAULT 0,
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        version INTEGER NOT NULL,
        description TEXT,
        timeout_s REAL,
        idempotency_key TEXT,
        created_at INTEGER NOT NULL,
        started_at INTEGER,
        completed_at INTEGER,
        updated_at INTEGER NOT NULL
    );
    CREATE TABLE job_events (
        job INTEGER NOT NULL REFERENCES jobs(seq) ON DELETE CASCADE,
        at INTEGER NOT NULL,
        status TEXT NOT NULL,
        phase TEXT,
        progress REAL NOT NULL,
        message TEXT,
        actor TEXT NOT NULL
    );
    CREATE TABLE job_checkpoints (
        job INTEGER NOT NULL REFERENCES jobs(seq) ON DELETE CASCADE,
        phase TEXT NOT NULL,
        data TEXT NOT NULL,
        saved_at INTEGER NOT NULL,
        PRIMARY KEY (job, phase)
    ) WITHOUT ROWID;
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
    -- jobs.list: newest first within a user, a status, a project
    CREATE INDEX jobs_user ON jobs (user_id, seq);
    CREATE INDEX jobs_status ON jobs (status, seq);
    CREATE INDEX jobs_project ON jobs (project_id, seq) WHERE project_id IS NOT NULL;
    -- dispatch order and the dedupe lookup of a queued sync/index per (user, project)
    CREATE INDEX jobs_queued ON jobs (priority DESC, seq) WHERE status = 'queued';
    CREATE INDEX jobs_queued_project ON jobs (user_id, project_id, type) WHERE status = 'queued';
    -- retention
    CREATE INDEX jobs_finished ON jobs (status, completed_at)
        WHERE status IN ('completed', 'failed', 'cancelled');
    CREATE UNIQUE INDEX jobs_idempotency ON jobs (user_id, idempotency_key)
        WHERE idempotency_key IS NOT NULL;
    CREATE INDEX job_events_job ON job_events (job);
    """,
    # 2: the process group a running job left, so a restart can kill it
    """
    ALTER TABLE jobs ADD COLUMN pgid INTEGER;
    ALTER TABLE jobs ADD COLUMN pgid_start INTEGER;
    """,
    # 3: what each user's finished jobs weigh, against execution.max_stored_per_user; a
    # job weighs 1, plus 1 per 4 KiB of its options, metadata and description (kept in
    # step by triggers, so no write path can forget it)
    # (the rows are repaired before they are weighed)
    (_repair_json,
     """
    ALTER TABLE jobs ADD COLUMN weight INTEGER NOT NULL DEFAULT 1;
    UPDATE jobs SET weight = 1 + (length(CAST(options AS BLOB)) + length(CAST(metadata AS BLOB))
                                  + ifnull(length(CAST(description AS BLOB)), 0)) / 4096
        WHERE length(options) + length(metadata) + ifnull(length(description), 0) >= 1024;
    CREATE TABLE user_stored (user_id TEXT PRIMARY KEY, weight INTEGER NOT NULL) WITHOUT ROWID;
    INSERT INTO user_stored SELECT user_id, sum(weight) FROM jobs
        WHERE status IN ('completed', 'failed', 'cancelled') GROUP BY user_id;
    CREATE TRIGGER jobs_stored_in AFTER UPDATE OF status ON jobs
        WHEN NEW.status IN ('completed', 'failed', 'cancelled')
         AND OLD.status NOT IN ('completed', 'failed', 'cancelled')
    BEGIN
        INSERT INTO user_stored (user_id, weight) VALUES (NEW.user_id, NEW.weight)
            ON CONFLICT (user_id) DO UPDATE SET weight = weight + excluded.weight;
    END;
    CREATE TRIGGER jobs_stored_out AFTER UPDATE OF status ON jobs
        WHEN OLD.status IN ('completed', 'failed', 'cancelled')
         AND NEW.status NOT IN ('completed', 'failed', 'cancelled')
    BEGIN
        UPDATE user_stored SET weight = weight - OLD.weight WHERE user_id = OLD.user_id;
    END;
    CREATE TRIGGER jobs_stored_gone AFTER DELETE ON jobs
        WHEN OLD.status IN ('completed', 'failed', 'cancelled')
    BEGIN
        UPDATE user_stored SET weight = weight - OLD.weight WHERE user_id = OLD.user_id;
    END;
    """),
    # 4: jobs.list by start or end time, newest first, jobs without that time last
    """
    CREATE INDEX jobs_by_started ON jobs (ifnull(started_at, -1), seq);
    CREATE INDEX jobs_by_completed ON jobs (ifnull(completed_at, -1), seq);
    """,
)

#: jobs.list's orders by time: the sort key of each (newest first; -1, no time, sorts last)
ORDER_KEYS = {"created": "seq", "started": "ifnull(started_at, -1)",
              "completed": "ifnull(completed_at, -1)"}

#: a job's weight against max_stored_per_user: 1, plus 1 per this many bytes it carries
WEIGHT_BYTES = 4096
#: at most this many of a user's oldest finished jobs go in one write (the rest, next time)
_EXCESS_CHUNK = 250

# The jobs_finished index's own condition, written out so that SQLite may use that partial
# index when the status itself is a bound parameter.
_FINISHED = "status IN ('completed', 'failed', 'cancelled')"

# options, metadata and result come back as one JSON array: one decode per job, not three
# (listing 100 jobs is mostly decoding)
_COLUMNS = ("seq, id, type, user_id, project_id, status, progress, phase, message, priority, "
            "'[' || options || ',' || metadata || ',' || ifnull(result, 'null') || ']', "
            "error, attempts, recoveries, cancel_requested, version, description, timeout_s, "
            "idempotency_key, created_at, started_at, completed_at, updated_at")

_STATUS = {str(s): s for s in JobStatus}


def _iso_sql(column: str) -> str:
    """SQL for ``models.iso`` of a microsecond column (NULL stays NULL)."""
    return (f"strftime('%Y-%m-%dT%H:%M:%S', {column} / 1000000, 'unixepoch') || "
            f"printf('.%06dZ', {column} % 1000000)")


#: SPEC §2's wire shape of a job, built by SQLite in C: jobs.list answers pages of them
#: without decoding and re-encoding each job's JSON in Python. ``models.Job.to_dict`` is
#: the reference; a test holds the two equal. What only the daemon knows (queue position,
#: wait reason, live progress, ETA) is added for queued and running jobs by the manager.
_WIRE = ("json_object('id', id, 'type', type, 'user_id', user_id, 'project_id', project_id, "
         "'status', status, 'progress', round(progress, 2), 'phase', phase, "
         "'message', message, 'priority', priority, 'options', json(options), "
         "'metadata', json(metadata), 'result', json(result), 'error', error, "
         "'attempts', attempts, 'queue_position', NULL, 'wait_reason', NULL, "
         "'cancel_requested', json(CASE WHEN cancel_requested THEN 'true' ELSE 'false' END), "
         "'version', version, 'description', description, 'timeout_s', timeout_s, "
         f"'created_at', {_iso_sql('created_at')}, 'started_at', {_iso_sql('started_at')}, "
         f"'completed_at', {_iso_sql('completed_at')}, "
         f"'updated_at', {_iso_sql('updated_at')}, 'eta_s', NULL)")


def _job(row: Sequence[Any]) -> Job:
    options, metadata, result = json.loads(row[10])
    return Job(
        seq=row[0], id=row[1], type=row[2], user_id=row[3], project_id=row[4],
        status=_STATUS[row[5]], progress=row[6], phase=row[7], message=row[8],
        priority=row[9], options=options, metadata=metadata, result=result, error=row[11],
        attempts=row[12], recoveries=row[13], cancel_requested=bool(row[14]),
        version=row[15], description=row[16], timeout_s=row[17], idempotency_key=row[18],
        created_at=row[19], started_at=row[20], completed_at=row[21], updated_at=row[22],
    )


def _dumps(value: Any) -> str:
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    if _text(text) is text:
        return text
    # a lone surrogate somewhere: escape it in the text itself, so the stored JSON decodes
    # to valid text again (an escaped surrogate would decode back into a surrogate)
    return json.dumps(_clean(value), separators=(",", ":"), ensure_ascii=False)


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        return _text(value)
    if isinstance(value, dict):
        return {_clean(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


#: every text the store writes passes through here (valid UTF-8, SQLite's condition)
_text = readable


def _opt_text(value: str | None) -> str | None:
    return None if value is None else _text(value)


def weight(options: str, metadata: str, description: str | None) -> int:
    """What a job counts against ``max_stored_per_user``: 1, plus 1 per 4 KiB it carries."""
    size = len(options.encode()) + len(metadata.encode()) + len((description or "").encode())
    return 1 + size // WEIGHT_BYTES


def _storage_error(e: sqlite3.Error, path: Path) -> JobdError | sqlite3.Error:
    """A failed write as the client should hear it (a bug's error is passed on as it is)."""
    text = str(e)
    if "full" in text:
        return Unavailable(f"storage full: {path}: {text}; free space, then retry")
    if "readonly" in text or "read-only" in text:
        return Unavailable(f"storage read-only: {path}: {text}")
    if "disk I/O" in text or "unable to open" in text:
        return Unavailable(f"storage unavailable: {path}: {text}")
    return e


def _conditions(*, job_id: str | None = None, ids: Sequence[str] | None = None, statuses: Sequence[str] = (),
                type: str | None = None, user_id: str | None = None,
                project_id: str | None = None, created_after: int | None = None,
                created_before: int | None = None, id_prefix: str | None = None,
                exclude_types: Sequence[str] = ()) -> tuple[list[str], list[Any]]:
    """The WHERE terms and their arguments of the job filters every selection shares
    (jobs.list, and the filtered cancel and retry)."""
    where, args = [], []  # type: list[str], list[Any]
    if job_id is not None:
        where.append("id = ?")
        args.append(job_id)
    if ids is not None:
        where.append(f"id IN ({', '.join('?' * len(ids)) or 'NULL'})")
        args += ids
    if statuses:
        where.append(f"status IN ({', '.join('?' * len(statuses))})")
        args += statuses
    for column, value in (("type", type), ("user_id", user_id), ("project_id", project_id)):
        if value is not None:
            where.append(f"{column} = ?")
            args.append(value)
    if created_after is not None:
        where.append("created_at >= ?")
        args.append(created_after)
    if created_before is not None:
        where.append("created_at < ?")
        args.append(created_before)
    if id_prefix:
        where.append("id >= ? AND id < ?")
        args += [id_prefix, id_prefix + "\U0010ffff"]
    if exclude_types:
        where.append(f"type NOT IN ({', '.join('?' * len(exclude_types))})")
        args += exclude_types
    return where, args


@dataclasses.dataclass
class Tx:
    """What a write sees: the connection, and hooks that run once the commit holds."""

    conn: sqlite3.Connection
    now: int
    after_commit: list[Callable[[], None]] = dataclasses.field(default_factory=list)
    #: reverts in-memory changes made by a write whose savepoint (or commit) failed
    undo: list[Callable[[], None]] = dataclasses.field(default_factory=list)

    def rollback_to(self, hooks: int, undos: int) -> None:
        for fn in reversed(self.undo[undos:]):
            fn()
        del self.after_commit[hooks:], self.undo[undos:]


@dataclasses.dataclass(frozen=True)
class Listeners:
    """Listeners the store calls after a commit (the engine's dispatcher and the waiters)."""

    changed: Callable[[Job], None] = lambda job: None
    #: ids of jobs deleted (retention, max_stored_per_user): their files may go
    deleted: Callable[[list[str]], None] = lambda job_ids: None


class _Checkpointer(threading.Thread):
    """Copies the WAL back into the database file on its own connection.

    Left to itself SQLite checkpoints inside whichever commit takes the WAL past 1000
    pages: that commit, and every write queued behind it, then waits for the copy and its
    fsync (hundreds of milliseconds on a large database). Here the writer only notices the
    size and wakes this thread; a passive checkpoint never blocks the writer.
    """

    #: the WAL size that starts a checkpoint
    START_BYTES = 4 << 20
    #: the size the WAL is cut back to when it restarts after a complete checkpoint
    LIMIT_BYTES = 1 << 20

    def __init__(self, conn: sqlite3.Connection, wal: Path) -> None:
        super().__init__(name="jobd-store-checkpointer", daemon=True)
        self.conn = conn
        self.wal = wal
        self.wake = threading.Event()
        self.stopping = False

    def poke(self) -> None:
        """After a commit: start a checkpoint once the WAL has grown past START_BYTES."""
        try:
            if self.wal.stat().st_size >= self.START_BYTES:
                self.wake.set()
        except OSError:  # never stop the writer over a size
            pass

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        self.join()
        self.conn.close()

    def run(self) -> None:
        while True:
            self.wake.wait()
            self.wake.clear()
            if self.stopping:
                return
            try:
                self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            except sqlite3.Error as e:
                log.warning("store_checkpoint_failed", error=str(e))


class _Writer(threading.Thread):
    """Runs writes in order on the one write connection, many per transaction."""

    MAX_BATCH = 512

    def __init__(self, conn: sqlite3.Connection, path: Path, clock: Callable[[], int],
                 checkpointer: _Checkpointer) -> None:
        super().__init__(name="jobd-store-writer", daemon=True)
        self.conn = conn
        self.path = path
        self.clock = clock
        self.checkpointer = checkpointer
        self.queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.longest_tx_s = 0.0

    def submit(self, fn: Callable[[Tx], T]) -> concurrent.futures.Future[T]:
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        self.queue.put((fn, fut))
        return fut

    def stop(self) -> None:
        self.queue.put(None)
        self.join()

    def run(self) -> None:
        stopping = False
        while not stopping:
            item = self.queue.get()
            batch = []
            while item is not None:
                batch.append(item)
                if len(batch) >= self.MAX_BATCH:
                    break
                try:
                    item = self.queue.get_nowait()
                except queue.Empty:
                    break
            else:
                stopping = True
            if batch:
                self._commit(batch)

    def _commit(self, batch: list[tuple[Callable[[Tx], Any], concurrent.futures.Future[Any]]]) -> None:
        conn = self.conn
        tx = Tx(conn, self.clock())
        outcomes: list[tuple[concurrent.futures.Future[Any], Any, BaseException | None]] = []
        started = time.perf_counter()
        try:
            conn.execute("BEGIN IMMEDIATE")
            for fn, fut in batch:
                if not fut.set_running_or_notify_cancel():
                    continue
                marks = len(tx.after_commit), len(tx.undo)
                conn.execute("SAVEPOINT op")
                try:
                    value = fn(tx)
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    if isinstance(e, sqlite3.Error):
                        if not conn.in_transaction:
                            raise  # SQLite rolled back the whole transaction (disk full, I/O)
                        e = _storage_error(e, self.path)
                    conn.execute("ROLLBACK TO op")
                    tx.rollback_to(*marks)
                    outcomes.append((fut, None, e))
                else:
                    outcomes.append((fut, value, None))
                conn.execute("RELEASE op")
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            except sqlite3.Error as again:
                # the writer must live on: the next BEGIN finds out whether the file recovered
                log.error("store_rollback_failed", error=str(again))
            tx.rollback_to(0, 0)
            failure = _storage_error(e, self.path)
            log.error("store_write_failed", error=str(e), writes=len(batch))
            for fn, fut in batch:
                if not fut.done():
                    fut.set_exception(failure)
            return
        finally:
            self.longest_tx_s = max(self.longest_tx_s, time.perf_counter() - started)
        for hook in tx.after_commit:
            try:
                hook()
            except Exception:  # a listener's bug must not stall the writer
                log.exception("store_listener_failed")
        for fut, value, exc in outcomes:
            if exc is None:
                fut.set_result(value)
            else:
                fut.set_exception(exc)
        self.checkpointer.poke()


class Store:
    """Jobs, their events and checkpoints in one SQLite file."""

    def __init__(self, path: str | os.PathLike[str], *, synchronous: str = "full",
                 clock: Callable[[], int] = now_us, listeners: Listeners | None = None,
                 max_stored_per_user: int | None = None) -> None:
        self.path = Path(path)
        #: finished jobs' weight kept per user (None: no limit); reloadable
        self.max_stored_per_user = max_stored_per_user
        self.synchronous = synchronous.upper()
        self.clock = clock
        self.listeners = listeners or Listeners()
        self.was_clean = True
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._writer: _Writer | None = None
        # queued counts per user, kept by the writer thread (the limits are checked there)
        self._queued: Counter[str] = Counter()

    # -- opening and closing -------------------------------------------------------------

    def open(self) -> "Store":
        """Open (creating if need be), migrate, and check the file after an unclean stop."""
        try:
            make_private_dir(self.path.parent)
        except OSError as e:
            raise StoreError(f"{self.path.parent}: cannot create the database directory: "
                             f"{e.strerror}") from None
        if not os.access(self.path.parent, os.W_OK | os.X_OK):
            raise StoreError(f"{self.path.parent}: no write permission for the database "
                             f"directory (SQLite needs it for its journal)")
        try:
            # a new database is the daemon's alone (SQLite would make it 0644 less the
            # umask); its -wal and -shm files take the same mode
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        except FileExistsError:
            pass
        except OSError as e:
            raise StoreError(f"{self.path}: cannot create the database: {e.strerror}") from None
        conn = self._connect()
        try:
            self._migrate(conn)
            clean = conn.execute("SELECT value FROM meta WHERE key = 'clean'").fetchone()
            self.was_clean = clean is None or clean[0] == "1"
            if not self.was_clean:
                problems = [r[0] for r in conn.execute("PRAGMA quick_check").fetchall()]
                if problems != ["ok"]:
                    raise Corrupt(f"{self.path}: the database is damaged ({problems[0].splitlines()[0]}); "
                                  f"stop jobd and run `jobd db recover`")
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('clean', '0')")
            self._queued = Counter(dict(conn.execute(
                "SELECT user_id, count(*) FROM jobs WHERE status = 'queued' GROUP BY user_id")))
            checkpointer = _Checkpointer(self._connect(), Path(f"{self.path}-wal"))
        except sqlite3.DatabaseError as e:
            conn.close()
            raise self._open_error(e) from None
        except BaseException:
            conn.close()
            raise
        checkpointer.start()
        self._writer = _Writer(conn, self.path, self.clock, checkpointer)
        self._writer.start()
        return self

    def _open_error(self, e: sqlite3.DatabaseError) -> StoreError:
        text = str(e)
        if "not a database" in text or "malformed" in text or "corrupt" in text:
            return Corrupt(f"{self.path}: not a usable jobd database ({text}); "
                           f"run `jobd db check` and `jobd db recover`, or move it aside")
        if "readonly" in text or "unable to open" in text:
            return StoreError(f"{self.path}: cannot open the database for writing ({text}); "
                              f"check the file's owner and permissions")
        if "full" in text:
            return StoreError(f"{self.path}: storage full ({text})")
        return StoreError(f"{self.path}: {text}")

    def _connect(self, *, readonly: bool = False) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                   timeout=10.0)
            conn.execute("PRAGMA busy_timeout = 10000")
            conn.execute("PRAGMA foreign_keys = ON")
            if readonly:
                conn.execute("PRAGMA query_only = ON")
            else:
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if mode.lower() != "wal":
                    raise StoreError(f"{self.path}: cannot switch to WAL mode (got {mode})")
                conn.execute(f"PRAGMA synchronous = {self.synchronous}")
                # checkpoints are the _Checkpointer's job, off the writer's path
                conn.execute("PRAGMA wal_autocheckpoint = 0")
                conn.execute(f"PRAGMA journal_size_limit = {_Checkpointer.LIMIT_BYTES}")
        except sqlite3.DatabaseError as e:
            raise self._open_error(e) from None
        return conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise StoreError(f"{self.path}: schema version {version} is newer than this jobd "
                             f"knows ({len(MIGRATIONS)}); upgrade jobd")
        for number in range(version + 1, len(MIGRATIONS) + 1):
            conn.execute("BEGIN IMMEDIATE")
            migration = MIGRATIONS[number - 1]
            try:
                for step in migration if isinstance(migration, tuple) else (migration,):
                    if callable(step):
                        step(conn)
                        continue
                    for statement in _statements(step):
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {number}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            log.info("store_migrated", path=str(self.path), version=number)

    def close(self) -> None:
        """Stop the writer after its queue drains, and mark the stop clean."""
        if self._writer is None:
            return
        writer, self._writer = self._writer, None
        writer.stop()
        writer.checkpointer.stop()
        try:
            writer.conn.execute("PRAGMA optimize")
            writer.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            writer.conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('clean', '1')")
        except sqlite3.Error as e:
            log.warning("store_close_incomplete", error=str(e))
        writer.conn.close()
        with self._readers_lock:
            for conn in self._readers:
                conn.close()
            self._readers.clear()
        self._local = threading.local()

    def upkeep(self) -> None:
        """Database housekeeping: refresh planner statistics, fold the WAL back."""
        def fn(tx: Tx) -> None:
            tx.conn.execute("PRAGMA optimize")
        self.write(fn)
        # a checkpoint cannot run inside the writer's transaction; any connection may run it
        conn = sqlite3.connect(self.path, timeout=10.0)
        try:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        finally:
            conn.close()

    @property
    def longest_write_s(self) -> float:
        """The longest write transaction so far (for the benchmarks)."""
        return self._writer.longest_tx_s if self._writer else 0.0

    # -- plumbing ------------------------------------------------------------------------

    def _read(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect(readonly=True)
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    def write(self, fn: Callable[[Tx], T]) -> T:
        """Run ``fn`` in the next group-committed transaction; return once it is durable."""
        return self.write_async(fn).result()

    def write_async(self, fn: Callable[[Tx], T]) -> concurrent.futures.Future[T]:
        if self._writer is None:
            raise Unavailable("the store is closed (jobd is shutting down)")
        return self._writer.submit(fn)

    @staticmethod
    def _fetch(conn: sqlite3.Connection, job_id: str) -> Job:
        row = conn.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise NotFound(f"no job {job_id}", field="job_id")
        return _job(row)

    def _event(self, tx: Tx, job: Job, actor: str, message: str | None = None) -> None:
        tx.conn.execute(
            "INSERT INTO job_events (job, at, status, phase, progress, message, actor) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (job.seq, tx.now, str(job.status), _opt_text(job.phase), job.progress,
             _opt_text(message if message is not None else job.message), _text(actor)))

    def _changed(self, tx: Tx, job: Job) -> Job:
        tx.after_commit.append(lambda: self.listeners.changed(job))
        return job

    def _count_queued(self, tx: Tx, user_id: str, delta: int) -> None:
        # applied now (later writes in the same batch must see it), undone if the write fails
        self._queued[user_id] += delta
        tx.undo.append(lambda: self._queued.subtract({user_id: delta}))

    # -- jobs ----------------------------------------------------------------------------

    def submit_job(self, job: Job, *, actor: str, dedupe: bool = False,
                   max_queued_per_user: int | None = None,
                   max_queued_total: int | None = None,
                   refuse_new: Unavailable | None = None) -> tuple[Job, bool]:
        """Record ``job`` (``created``, then ``queued``, in one transaction).

        Returns ``(job, deduplicated)``: the job first created with the same idempotency
        key by the same user, or with ``dedupe`` the queued job of the same type for the
        same (user, project) — which becomes a full reindex if either asked for one.
        ``refuse_new`` (maintenance) is raised for anything but an idempotent resend.
        """
        return self.submit_job_async(job, actor=actor, dedupe=dedupe,
                                     max_queued_per_user=max_queued_per_user,
                                     max_queued_total=max_queued_total,
                                     refuse_new=refuse_new).result()

    def submit_job_async(self, job: Job, *, actor: str, dedupe: bool = False,
                         max_queued_per_user: int | None = None,
                         max_queued_total: int | None = None,
                         refuse_new: Unavailable | None = None
                         ) -> concurrent.futures.Future[tuple[Job, bool]]:
        """``submit_job`` for a caller that awaits the commit rather than blocking on it."""
        return self.write_async(lambda tx: self._submit(tx, job, actor, dedupe,
                                                        max_queued_per_user, max_queued_total,
                                                        refuse_new))

    def _submit(self, tx: Tx, job: Job, actor: str, dedupe: bool,
                per_user: int | None, total: int | None,
                refuse_new: Unavailable | None = None) -> tuple[Job, bool]:
        conn = tx.conn
        job = dataclasses.replace(job, description=_opt_text(job.description),
                                  idempotency_key=_opt_text(job.idempotency_key))
        if job.idempotency_key is not None:
            row = conn.execute(f"SELECT {_COLUMNS} FROM jobs WHERE user_id = ? "
                               f"AND idempotency_key = ?",
                               (job.user_id, job.idempotency_key)).fetchone()
            if row is not None:
                return _job(row), True
        # SPEC §4's order: idempotency key, then maintenance and limits, then dedupe
        if refuse_new is not None:
            raise refuse_new
        if dedupe and job.project_id is not None:
            row = conn.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE user_id = ? AND project_id = ? AND type = ? "
                f"AND status = 'queued' ORDER BY seq LIMIT 1",
                (job.user_id, job.project_id, job.type)).fetchone()
            if row is not None:
                found = _job(row)
                if job.options.get("full_reindex") and not found.options.get("full_reindex"):
                    options = dict(found.options, full_reindex=True)
                    conn.execute("UPDATE jobs SET options = ?, version = max(version + 1, ?), "
                                 "updated_at = ? WHERE seq = ?",
                                 (_dumps(options), tx.now, tx.now, found.seq))
                    found = self._fetch(conn, found.id)
                    self._changed(tx, found)
                return found, True
        if per_user is not None and self._queued[job.user_id] >= per_user:
            raise LimitExceeded(f"user {job.user_id} already has {self._queued[job.user_id]} "
                                f"queued jobs (max_queued_per_user = {per_user})")
        if total is not None and sum(self._queued.values()) >= total:
            raise LimitExceeded(f"the queue is full ({total} jobs queued; max_queued_total)")
        options, metadata, description = _dumps(job.options), _dumps(job.metadata), job.description
        try:
            cur = conn.execute(
                "INSERT INTO jobs (id, type, user_id, project_id, status, priority, options, "
                "metadata, description, timeout_s, idempotency_key, version, created_at, "
                "updated_at, weight) VALUES (?, ?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job.id, job.type, job.user_id, job.project_id, job.priority, options,
                 metadata, description, job.timeout_s, job.idempotency_key,
                 tx.now, tx.now, tx.now, weight(options, metadata, description)))
        except sqlite3.IntegrityError as e:
            if "jobs.id" in str(e):
                raise Conflict(f"a job with id {job.id} already exists", field="id") from None
            raise
        seq = cur.lastrowid
        conn.executemany(
            "INSERT INTO job_events (job, at, status, phase, progress, message, actor) "
            "VALUES (?, ?, ?, NULL, 0, NULL, ?)",
            ((seq, tx.now, "created", actor), (seq, tx.now, "queued", actor)))
        stored = dataclasses.replace(job, seq=seq, status=JobStatus.QUEUED, version=tx.now,
                                     created_at=tx.now, updated_at=tx.now)
        self._count_queued(tx, job.user_id, +1)
        return self._changed(tx, stored), False

    def _forget_excess(self, tx: Tx, user_id: str, limit: int, *,
                       keep_seq: int | None = None) -> list[str]:
        """Delete ``user_id``'s oldest finished jobs while they weigh more than ``limit``.

        At most ``_EXCESS_CHUNK`` go in one write; the files of those deleted go after the
        commit (``Listeners.deleted``).
        """
        row = tx.conn.execute("SELECT weight FROM user_stored WHERE user_id = ?",
                              (user_id,)).fetchone()
        if row is None or row[0] <= limit:
            return []
        excess = row[0] - limit
        victims: list[str] = []
        freed = 0
        for seq, job_id, w in tx.conn.execute(
                f"SELECT seq, id, weight FROM jobs WHERE user_id = ? AND {_FINISHED} "
                "AND seq IS NOT ? ORDER BY seq LIMIT ?", (user_id, keep_seq, _EXCESS_CHUNK)):
            victims.append(job_id)
            freed += w
            if freed >= excess:
                break
        if victims:
            tx.conn.execute(f"DELETE FROM jobs WHERE id IN ({', '.join('?' * len(victims))})",
                            victims)
            def forgotten() -> None:
                log.info("jobs_forgotten", user_id=user_id, count=len(victims),
                         reason="max_stored_per_user", limit=limit)
                self.listeners.deleted(victims)
            tx.after_commit.append(forgotten)
        return victims

    def get_job(self, job_id: str) -> Job:
        return self._fetch(self._read(), job_id)

    def transition(self, job_id: str, to: JobStatus, *, actor: str,
                   message: str | None = None, error: str | None = None,
                   result: dict[str, Any] | None = None,
                   expect: Iterable[JobStatus] | None = None,
                   recovered: bool = False) -> Job:
        """Move a job to ``to`` by compare-and-set, with its event row, in one transaction."""
        return self.write(lambda tx: self._transition(tx, job_id, to, actor, message, error,
                                                      result, expect, recovered))

    def _transition(self, tx: Tx, job_id: str, to: JobStatus, actor: str,
                    message: str | None, error: str | None, result: dict[str, Any] | None,
                    expect: Iterable[JobStatus] | None, recovered: bool) -> Job:
        before = tx.conn.execute("SELECT status, cancel_requested FROM jobs WHERE id = ?",
                                 (job_id,)).fetchone()
        if (before is not None and before[0] == "running" and before[1]
                and to in (JobStatus.COMPLETED, JobStatus.FAILED)):
            # a job whose cancel was asked for ends cancelled, whatever its process did
            to, message, error, result = JobStatus.CANCELLED, "cancelled", None, None
        allowed = tuple(sources(to)) if expect is None else tuple(
            s for s in expect if s in sources(to))
        sets = ["status = ?", "version = max(version + 1, ?)", "updated_at = ?"]
        args: list[Any] = [str(to), tx.now, tx.now]
        if to is JobStatus.RUNNING:
            sets += ["started_at = ?", "attempts = attempts + 1", "completed_at = NULL",
                     "pgid = NULL", "pgid_start = NULL"]
            args.append(tx.now)
        elif to in TERMINAL:
            sets += ["completed_at = ?", "cancel_requested = 0", "pgid = NULL",
                     "pgid_start = NULL"]
            args.append(tx.now)
            if to is JobStatus.COMPLETED:
                sets.append("progress = 100")
        elif to is JobStatus.QUEUED:
            # from running (resume after a stop): keep phase and progress to resume from;
            # from failed/cancelled (retry): a fresh attempt
            sets += ["progress = CASE WHEN status = 'running' THEN progress ELSE 0 END",
                     "phase = CASE WHEN status = 'running' THEN phase ELSE NULL END",
                     "error = NULL", "result = NULL", "completed_at = NULL",
                     "cancel_requested = 0", "pgid = NULL", "pgid_start = NULL"]
            if recovered:
                sets.append("recoveries = recoveries + 1")
        message, error = _opt_text(message), _opt_text(error)
        if message is not None or to is JobStatus.QUEUED:
            sets.append("message = ?")
            args.append(message)
        if error is not None:
            sets.append("error = ?")
            args.append(error)
        if result is not None:
            sets.append("result = ?")
            args.append(_dumps(result))
        placeholders = ", ".join("?" * len(allowed)) or "NULL"
        row = tx.conn.execute(
            f"UPDATE jobs SET {', '.join(sets)} WHERE id = ? AND status IN ({placeholders}) "
            f"RETURNING {_COLUMNS}",
            (*args, job_id, *map(str, allowed))).fetchone()
        if row is None:
            current = self._fetch(tx.conn, job_id)  # NotFound if there is none
            raise Conflict(f"job {job_id} is {current.status}; it cannot become {to}",
                           detail={"status": str(current.status)})
        job = _job(row)
        self._event(tx, job, actor, message if message is not None else error)
        if to in TERMINAL and self.max_stored_per_user is not None:
            self._forget_excess(tx, job.user_id, self.max_stored_per_user, keep_seq=job.seq)
        if before[0] == "queued" and to is not JobStatus.QUEUED:
            self._count_queued(tx, job.user_id, -1)
        elif to is JobStatus.QUEUED:
            self._count_queued(tx, job.user_id, +1)
            if before[0] != "running":  # a retry starts over; a resume keeps its checkpoints
                self.clear_checkpoints(tx, job_id)
        return self._changed(tx, job)

    def next_version(self, previous: int) -> int:
        """The version after ``previous``: what every write stores (``max(version + 1, now)``)."""
        return max(previous + 1, self.clock())

    def _request_cancel(self, tx: Tx, job_id: str, actor: str) -> Job:
        """Mark a running job's cancel as asked for (the engine stops it)."""
        row = tx.conn.execute(
            f"UPDATE jobs SET cancel_requested = 1, version = max(version + 1, ?), "
            f"updated_at = ? WHERE id = ? AND status = 'running' AND cancel_requested = 0 "
            f"RETURNING {_COLUMNS}", (tx.now, tx.now, job_id)).fetchone()
        if row is None:
            return self._fetch(tx.conn, job_id)
        job = _job(row)
        self._event(tx, job, actor, "cancel requested")
        return self._changed(tx, job)

    def update_progress(self, job_id: str, *, progress: float, phase: str | None,
                        message: str | None, actor: str | None = None
                        ) -> concurrent.futures.Future[Job | None]:
        """Store a running job's latest progress; with ``actor`` (a phase change) also an event.

        Returns a future: progress ticks are not worth waiting for.
        """
        def fn(tx: Tx) -> Job | None:
            row = tx.conn.execute(
                f"UPDATE jobs SET progress = ?, phase = ?, message = ?, "
                f"version = max(version + 1, ?), updated_at = ? "
                f"WHERE id = ? AND status = 'running' RETURNING {_COLUMNS}",
                (progress, _opt_text(phase), _opt_text(message), tx.now, tx.now, job_id)
            ).fetchone()
            if row is None:
                return None
            job = _job(row)
            if actor is not None:
                self._event(tx, job, actor)
            return job
        return self.write_async(fn)

    def set_process(self, job_id: str, pgid: int | None, start: int | None) -> None:
        """Record (or clear) the process group a running job's subprocess lives in."""
        self.write(lambda tx: tx.conn.execute(
            "UPDATE jobs SET pgid = ?, pgid_start = ? WHERE id = ?", (pgid, start, job_id)))

    def processes(self) -> list[tuple[str, int, int | None]]:
        """(job id, pgid, start time) of every running job with a recorded process group."""
        return self._read().execute(
            "SELECT id, pgid, pgid_start FROM jobs WHERE status = 'running' AND pgid IS NOT NULL"
        ).fetchall()

    def list_jobs(self, **filters: Any) -> list[Job]:
        """Jobs matching every given filter, newest first, from ``before_seq`` (keyset).

        Filters: ``statuses``, ``type``, ``user_id``, ``project_id``, ``created_after``,
        ``created_before``, ``id_prefix``, ``ids``, ``before_seq``, ``limit`` (default 50).
        """
        return [_job(r[2:]) for r in self._list(_COLUMNS, **filters)]

    def list_wire(self, **filters: Any) -> list[tuple[int, int, str, str]]:
        """``list_jobs`` as ``(sort key, seq, status, the job's wire JSON)``, encoded by
        SQLite; ``order`` (``ORDER_KEYS``) and ``before`` (the (key, seq) of the previous
        page's last job) page by another time than creation."""
        return self._list(f"status, {_WIRE}", **filters)

    def list_ids(self, **filters: Any) -> list[str]:
        """The ids of every job matching ``filters`` (as ``list_jobs``), newest first."""
        return [r[2] for r in self._list("id", limit=-1, **filters)]

    def _list(self, columns: str, *, order: str = "created", before: tuple[int, int] | None = None,
              before_seq: int | None = None, limit: int = 50, **filters: Any) -> list[Any]:
        key = ORDER_KEYS[order]
        where, args = _conditions(**filters)
        if before_seq is not None:
            before = (before_seq, before_seq)
        if before is not None:
            if key == "seq":
                where.append("seq < ?")
                args.append(before[1])
            else:  # a row value: the index on (key, seq) pages it
                where.append(f"({key}, seq) < (?, ?)")
                args += before
        sql = f"SELECT {key}, seq, {columns} FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += f" ORDER BY {key} DESC{', seq DESC' if key != 'seq' else ''} LIMIT ?"
        return self._read().execute(sql, (*args, limit)).fetchall()

    # -- cancel and retry, of one job or of every job a filter matches -------------------

    def cancel_jobs(self, *, actor: str, limit: int, dry_run: bool = False,
                    **filters: Any) -> tuple[list[Job], bool]:
        """Cancel, in one transaction, the active jobs matching ``filters`` (``job_id`` for
        one): queued ones become cancelled, running ones get their cancel requested (the
        engine stops them). Jobs already stopping are not matched again.

        Returns (the jobs as they are now, oldest first, at most ``limit``; whether more
        matched). With ``dry_run`` nothing changes and the jobs are returned as found.
        """
        def fn(tx: Tx) -> tuple[list[Job], bool]:
            rows, more = self._matching(
                tx, "(status = 'queued' OR status = 'running' AND cancel_requested = 0)",
                limit, filters)
            if dry_run:
                return rows, more
            done = []
            for job in rows:
                if job.status is JobStatus.QUEUED:
                    done.append(self._transition(tx, job.id, JobStatus.CANCELLED, actor,
                                                 "cancelled", None, None, [JobStatus.QUEUED],
                                                 False))
                else:
                    done.append(self._request_cancel(tx, job.id, actor))
            return done, more
        return self.write(fn)

    def retry_jobs(self, *, actor: str, limit: int, max_queued_per_user: int | None,
                   dry_run: bool = False, **filters: Any) -> tuple[list[Job], bool]:
        """Put the failed and cancelled jobs matching ``filters`` back to queued, in one
        transaction: all of them or, when a user would pass ``max_queued_per_user``, none
        (LimitExceeded). Returns as ``cancel_jobs`` does."""
        def fn(tx: Tx) -> tuple[list[Job], bool]:
            rows, more = self._matching(tx, "status IN ('failed', 'cancelled')", limit, filters)
            if max_queued_per_user is not None:
                adding = Counter(job.user_id for job in rows)
                for user_id, count in adding.items():
                    if self._queued[user_id] + count > max_queued_per_user:
                        raise LimitExceeded(
                            f"user {user_id} already has {self._queued[user_id]} queued jobs; "
                            f"retrying {count} more would pass max_queued_per_user "
                            f"({max_queued_per_user}); retry fewer, or later")
            if dry_run:
                return rows, more
            return [self._transition(tx, job.id, JobStatus.QUEUED, actor, "retried", None,
                                     None, [JobStatus.FAILED, JobStatus.CANCELLED], False)
                    for job in rows], more
        return self.write(fn)

    @staticmethod
    def _matching(tx: Tx, state: str, limit: int, filters: dict[str, Any]
                  ) -> tuple[list[Job], bool]:
        """Up to ``limit`` jobs in ``state`` matching ``filters``, oldest first; and whether
        more matched."""
        where, args = _conditions(**filters)
        where.append(state)
        rows = tx.conn.execute(f"SELECT {_COLUMNS} FROM jobs WHERE {' AND '.join(where)} "
                               f"ORDER BY seq LIMIT ?", (*args, limit + 1)).fetchall()
        return [_job(r) for r in rows[:limit]], len(rows) > limit

    def queued_jobs(self) -> list[Job]:
        """Every queued job, in stored dispatch order (priority, then age)."""
        return [_job(r) for r in self._read().execute(
            f"SELECT {_COLUMNS} FROM jobs WHERE status = 'queued' ORDER BY priority DESC, seq")]

    def running_jobs(self) -> list[Job]:
        return [_job(r) for r in self._read().execute(
            f"SELECT {_COLUMNS} FROM jobs WHERE status = 'running' ORDER BY seq")]

    def events(self, job_id: str) -> list[dict[str, Any]]:
        conn = self._read()
        job = self._fetch(conn, job_id)
        return [{"at": at, "status": status, "phase": phase, "progress": progress,
                 "message": message, "actor": actor}
                for at, status, phase, progress, message, actor in conn.execute(
                    "SELECT at, status, phase, progress, message, actor FROM job_events "
                    "WHERE job = ? ORDER BY rowid", (job.seq,))]

    def queued_count(self, user_id: str | None = None) -> int:
        return self._queued[user_id] if user_id is not None else sum(self._queued.values())

    def counts(self) -> dict[str, int]:
        """How many jobs are stored, by status."""
        return dict(self._read().execute("SELECT status, count(*) FROM jobs GROUP BY status"))

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in (self.path, Path(f"{self.path}-wal"))
                   if p.exists())

    # -- checkpoints ---------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        """One of the daemon's own stored settings (the pause, maintenance), None if unset."""
        row = self._read().execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def set_meta(self, key: str, value: str | None) -> None:
        """Store one of the daemon's own settings (None: remove it); durable on return."""
        def fn(tx: Tx) -> None:
            if value is None:
                tx.conn.execute("DELETE FROM meta WHERE key = ?", (key,))
            else:
                tx.conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                                (key, _text(value)))
        self.write(fn)

    def save_checkpoint(self, job_id: str, phase: str, data: dict[str, Any]) -> None:
        self.write(lambda tx: tx.conn.execute(
            "INSERT OR REPLACE INTO job_checkpoints (job, phase, data, saved_at) "
            "SELECT seq, ?, ?, ? FROM jobs WHERE id = ?",
            (phase, _dumps(data), tx.now, job_id)))

    def load_checkpoints(self, job_id: str) -> dict[str, dict[str, Any]]:
        return {phase: json.loads(data) for phase, data in self._read().execute(
            "SELECT c.phase, c.data FROM job_checkpoints c JOIN jobs j ON j.seq = c.job "
            "WHERE j.id = ? ORDER BY c.saved_at", (job_id,))}

    def clear_checkpoints(self, tx: Tx, job_id: str) -> None:
        tx.conn.execute("DELETE FROM job_checkpoints WHERE job = "
                        "(SELECT seq FROM jobs WHERE id = ?)", (job_id,))

    # -- retention -----------------------------------------------------------------------

    def cleanup(self, *, keep_before: int, keep_failed_before: int, dry_run: bool = False,
                chunk: int = 250) -> Iterator[list[str]]:
        """Delete terminal jobs finished before their cutoff, a chunk per transaction.

        Completed and cancelled jobs go when ``completed_at < keep_before``, failed ones
        when ``completed_at < keep_failed_before``; events and checkpoints cascade. Yields
        the ids of each chunk deleted (or that would be, with ``dry_run``).
        """
        for status, cutoff in (("completed", keep_before), ("cancelled", keep_before),
                               ("failed", keep_failed_before)):
            if dry_run:
                ids = [r[0] for r in self._read().execute(
                    f"SELECT id FROM jobs WHERE {_FINISHED} AND status = ? AND completed_at < ?",
                    (status, cutoff))]
                if ids:
                    yield ids
                continue
            while ids := self.write(lambda tx: self._delete_chunk(tx, status, cutoff, chunk)):
                yield ids
        # then users whose finished jobs still weigh more than they may keep (a lowered
        # limit, or jobs that finished before the limit existed)
        limit = self.max_stored_per_user
        if limit is None or dry_run:
            return
        for (user_id,) in self._read().execute(
                "SELECT user_id FROM user_stored WHERE weight > ?", (limit,)).fetchall():
            while ids := self.write(lambda tx: self._forget_excess(tx, user_id, limit)):
                yield ids

    def stored_weight(self, user_id: str) -> int:
        """What ``user_id``'s finished jobs weigh against ``max_stored_per_user``."""
        row = self._read().execute("SELECT weight FROM user_stored WHERE user_id = ?",
                                   (user_id,)).fetchone()
        return row[0] if row else 0

    def _delete_chunk(self, tx: Tx, status: str, cutoff: int, chunk: int) -> list[str]:
        ids = [r[0] for r in tx.conn.execute(
            f"DELETE FROM jobs WHERE seq IN (SELECT seq FROM jobs WHERE {_FINISHED} "
            f"AND status = ? AND completed_at < ? ORDER BY completed_at LIMIT ?) RETURNING id",
            (status, cutoff, chunk)).fetchall()]
        if ids:
            tx.after_commit.append(lambda: self.listeners.deleted(ids))
        return ids


def _statements(script: str) -> list[str]:
    out, buf = [], ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            if buf.strip():
                out.append(buf.strip())
            buf = ""
    return out


# -- offline tools: jobd db check | backup | recover ---------------------------------------

def check(path: Path) -> list[str]:
    """``PRAGMA integrity_check``: ``["ok"]`` or the problems found."""
    if not path.exists():
        raise StoreError(f"{path}: no such database")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return [r[0] for r in conn.execute("PRAGMA integrity_check")]
        finally:
            conn.close()
    except sqlite3.DatabaseError as e:
        return [str(e)]


def backup(path: Path, target: Path) -> int:
    """Copy a live database with SQLite's online backup API; returns the bytes written."""
    if not path.exists():
        raise StoreError(f"{path}: no such database")
    if target.exists():
        raise StoreError(f"{target}: already exists; choose a new file")
    if not target.parent.is_dir():
        raise StoreError(f"{target}: no such folder {target.parent}; create it first")
    if not os.access(target.parent, os.W_OK | os.X_OK):
        raise StoreError(f"{target}: cannot write in {target.parent} (permission denied)")
    try:
        src = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        dst = sqlite3.connect(target)
    except sqlite3.Error as e:
        raise StoreError(f"{target}: cannot back up {path} there: {e}") from None
    try:
        # one step, from one read snapshot: copied in slices, a backup starts over after
        # every commit of the live daemon and never ends on a busy database
        src.backup(dst)
    except sqlite3.Error as e:
        dst.close()
        target.unlink(missing_ok=True)
        raise StoreError(f"{path}: backup to {target} failed: {e}") from None
    finally:
        src.close()
    dst.close()
    return target.stat().st_size


def recover(path: Path) -> dict[str, Any]:
    """Copy every readable row into a fresh database and move the damaged file aside.

    Returns ``{"saved": {table: rows}, "lost": {table: rows or "unknown"}, "moved_to": path}``.
    """
    if not path.exists():
        raise StoreError(f"{path}: no such database")
    fresh = path.with_name(path.name + ".recovering")
    fresh.unlink(missing_ok=True)
    new = Store(fresh)
    new.open()
    new.close()
    dst = sqlite3.connect(fresh, isolation_level=None)
    dst.execute("PRAGMA foreign_keys = OFF")
    saved: dict[str, int] = {}
    lost: dict[str, Any] = {}
    totals: dict[str, int | str] = {}
    try:
        src = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.DatabaseError as e:
        raise StoreError(f"{path}: cannot be opened at all: {e}") from None
    new_columns = {t: [r[1] for r in dst.execute(f"PRAGMA table_info({t})")]
                   for t in ("jobs", "job_events", "job_checkpoints", "meta")}
    for table, columns in new_columns.items():
        saved[table] = 0
        try:
            old_columns = [r[1] for r in src.execute(f"PRAGMA table_info({table})")]
            cols = [c for c in columns if c in old_columns]
            total = totals[table] = _safe_count(src, table)
            key = "seq" if table == "jobs" else "rowid" if table == "job_events" else None
            rows = _readable_rows(src, table, cols, key)
            names = ", ".join(cols)
            dst.execute("BEGIN")
            for row in rows:
                try:
                    dst.execute(f"INSERT OR IGNORE INTO {table} ({names}) VALUES "
                                f"({', '.join('?' * len(cols))})", row)
                    saved[table] += 1
                except sqlite3.Error:
                    pass
            dst.execute("COMMIT")
            lost[table] = (total - saved[table]) if isinstance(total, int) else "unknown"
        except sqlite3.DatabaseError as e:
            if dst.in_transaction:
                dst.execute("COMMIT")
            lost[table] = f"unknown ({e})"
    src.close()
    # orphans whose job was lost are no use without it: they count as lost
    for table in ("job_events", "job_checkpoints"):
        dst.execute(f"DELETE FROM {table} WHERE job NOT IN (SELECT seq FROM jobs)")
        saved[table] = dst.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        before = totals.get(table)
        if isinstance(before, int):
            lost[table] = before - saved[table]
    dst.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('clean', '1')")
    dst.close()
    aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%dT%H%M%S')}")
    for suffix in ("", "-wal", "-shm"):
        p = Path(f"{path}{suffix}")
        if p.exists():
            shutil.move(p, f"{aside}{suffix}")
    os.replace(fresh, path)
    for suffix in ("-wal", "-shm"):
        Path(f"{fresh}{suffix}").unlink(missing_ok=True)
    return {"saved": saved, "lost": lost, "moved_to": str(aside)}


def _safe_count(conn: sqlite3.Connection, table: str) -> int | str:
    """How many rows ``table`` held: the higher count of its table scan and of an index.

    Either may be damaged; an index still counts the rows of a damaged table page.
    """
    counts = []
    for how in ("NOT INDEXED", ""):
        try:
            counts.append(conn.execute(f"SELECT count(*) FROM {table} {how}").fetchone()[0])
        except sqlite3.DatabaseError:
            pass
    return max(counts) if counts else "unknown"


def _readable_rows(conn: sqlite3.Connection, table: str, cols: list[str],
                   key: str | None) -> Iterator[tuple[Any, ...]]:
    """Every row that can be read, stepping over damaged pages by key where possible."""
    # NOT INDEXED: rows are read from the table's own b-tree, never through an index,
    # which may be the damaged part
    names = ", ".join(cols)
    if key is None:
        try:
            yield from conn.execute(f"SELECT {names} FROM {table} NOT INDEXED").fetchall()
        except sqlite3.DatabaseError:
            return
        return
    select = f"SELECT {key}, {names} FROM {table} NOT INDEXED WHERE {key} >= ? ORDER BY {key}"
    after, failures = -(1 << 63), 0
    while True:
        try:
            for row in conn.execute(select, (after,)):
                after, failures = row[0] + 1, 0
                yield row[1:]
            return
        except sqlite3.DatabaseError:
            # the page holding ``after`` (or the next one) is damaged: step over it a key at
            # a time, so that no readable row is skipped, then in growing strides across a
            # long damaged range
            failures += 1
            after += 1 if failures <= 1024 else 1 << min(failures - 1024, 62)
            if after >= 1 << 63:
                return
