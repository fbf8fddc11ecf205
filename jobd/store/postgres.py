"""The PostgreSQL store (SPEC §11): the rules of ``base.BaseStore`` on a PostgreSQL database.

The only module that imports psycopg (``jobd[postgres]``), imported only when the
daemon is configured with ``backend = "postgres"``. One writer connection runs the
group-committed batches, each in pipeline mode (``PgDriver`` under ``writer.Writer``: a
batch waits only for the answers its writes read, and for its commit); reads take a
connection of a ``psycopg_pool.ConnectionPool`` in autocommit, and never wait for the
writer.

- **Schema**: ``sql/postgres/migrations`` applied in order by ``migrate`` under a session
  advisory lock (``MIGRATE_KEY``), so that two jobd starting at once apply each one once;
  ``jobd_schema`` records them; a database whose schema is newer than this jobd is refused.
- **One node, or cluster nodes**: the writer's session holds ``NODE_KEY`` while the store
  is open: alone (``cluster=False``: a second store on the database is refused, for its
  starts are not claims and its writes are not fenced) or shared by cluster nodes
  (``cluster=True``, ``jobd.cluster``: any number of them, and no one-node store beside).
- **Queue limits exact across writers**: the queued counts are a table (``queued_counts``)
  the store's own statements keep in the write that changes them, read inside the write
  that checks a limit, after the first such read of a batch took the queue's
  transaction-scoped advisory lock (``QUEUE_KEY``, one for every user: a batch admits
  several users, and per-user locks taken in each batch's order would deadlock).
- **Errors** by SQLSTATE, never by message text (``from_pg``). A deadlock or a
  serialization failure runs the batch again; a lost connection (a PostgreSQL restart)
  fails the batch with StorageUnavailable, and the next batch connects again; a read on a
  connection the restart broke is read again on a fresh one.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import threading
import time
from typing import Any, Callable, Collection, Iterator, Mapping

import psycopg
import psycopg.conninfo
import psycopg.errors
import psycopg.generators
import psycopg_pool
import structlog
from psycopg.pq import TransactionStatus

from jobd.store import writer
from jobd.models import TERMINAL, Job, JobStatus
from jobd.store.base import CLEANUP_CHUNK, BaseStore, Listeners, _dumps, _job, now_us
from jobd.store.errors import (Corrupt, DuplicateId, Fenced, ReadOnly, StateConflict,
                               StorageFull, StorageUnavailable, StoreClosed, StoreError)
from jobd.store.sql import dialect

__all__ = ["Echoes", "FUNCTIONS", "MIGRATE_KEY", "NODE_KEY", "QUEUE_KEY", "TABLES",
           "PostgresStore", "check", "describe", "from_pg", "migrate", "schema_version",
           "stuck_after"]

log = structlog.get_logger()

QUERIES, MIGRATIONS = dialect("postgres")

# advisory lock keys: "jobd" in the high half, the lock's number in the low half
#: held by a session while it migrates the schema
MIGRATE_KEY = 0x6A6F6264_00000001
#: held by the open store's writer session: alone by a one-node store, shared by cluster nodes
NODE_KEY = 0x6A6F6264_00000002
#: taken by a write (transaction-scoped) before it reads the queued counts to admit jobs
QUEUE_KEY = 0x6A6F6264_00000003
#: held (tried, for a session) by the cluster node that sweeps: one node at a time
CLEANUP_KEY = 0x6A6F6264_00000005
#: how long an admin.cleanup asked for waits for another node's sweep to end
CLEANUP_WAIT_S = 10.0

#: jobd's tables, and the functions its schema defines (its triggers' and ``jobd_iso``):
#: a backup by table (``pg_dump -t``) leaves the functions out, so dump the database
TABLES = ("jobd_schema", "jobs", "job_events", "job_checkpoints", "job_keys", "meta",
          "queued_counts", "user_stored", "type_counts", "run_buckets", "finished_hours",
          "finished_days", "nodes", "dispatch_turns", "job_log_chunks", "job_progress",
          "manifests")
FUNCTIONS = ("jobd_iso", "jobs_counted_in", "jobs_status_moved")

#: how long an open waits for the one-node lock of a jobd that has just gone
NODE_WAIT_S = 3.0
#: SQLSTATEs of a transaction that lost a race with another one: run it again
_AGAIN = frozenset({"40P01", "40001"})
_CLEAN = (TransactionStatus.INTRANS, TransactionStatus.INERROR)
#: the session's state after a batch's COMMIT met an error: the COMMIT was not run
_NOT_RUN = (TransactionStatus.INERROR, TransactionStatus.IDLE)


def describe(dsn: str) -> str:
    """The database a DSN names, for messages and logs (never its password)."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.Error:
        return "the configured PostgreSQL database (its dsn does not parse)"
    where = info.get("host") or "the default host"
    port = f":{info['port']}" if info.get("port") else ""
    return f"PostgreSQL database {info.get('dbname') or '(default)'} on {where}{port}"


def from_pg(e: Exception, where: str) -> Exception:
    """``e`` as the store's exception, told apart by its SQLSTATE (a bug's error, such as
    a refused CHECK, is passed on as it is); ``where``: the database, as ``describe``."""
    if isinstance(e, StoreError):
        return e
    state = getattr(e, "sqlstate", None) or ""
    text = str(e).strip()
    if state == "53100":
        return StorageFull(f"storage full: {where}: {text}; free space, then retry")
    if state == "25006":
        return ReadOnly(f"storage read-only: {where}: {text}")
    if state in ("XX001", "XX002"):
        return Corrupt(f"{where}: data or index corrupted ({text}); see the server's log")
    if state in _AGAIN:
        return StorageUnavailable(f"storage busy: {where}: {text}; retry")
    if (state.startswith(("08", "53", "57", "58")) or state in ("55P03", "25P03")
            or (isinstance(e, psycopg.OperationalError) and not state)):
        # the server is gone, restarting, out of resources, or the connection broke (also:
        # ended by idle_in_transaction_session_timeout, PostgresStore.stuck_s)
        return StorageUnavailable(f"storage unavailable: {where}: {text}")
    return e


def _scalar(cur: psycopg.Cursor[Any]) -> Any:
    """The one value of a query that always returns one row."""
    row = cur.fetchone()
    assert row is not None
    return row[0]


def _connect(dsn: str, **kw: Any) -> psycopg.Connection[Any]:
    """A connection named for ``pg_stat_activity`` (host and pid: the one-node guard's
    message names who holds the database)."""
    return psycopg.connect(dsn, autocommit=True, application_name=_NAME, **kw)


_NAME = f"jobd on {socket.gethostname()} pid {os.getpid()}"[:63]
#: what this process's store sessions are called (a rescuer never ends its own)
SESSION_NAME = _NAME

#: the writes for a running job that a cluster node's fence guards (the ``{fence}`` of
#: their statements): by (node id, attempt), and the node's lease. (``report_progress``
#: is fenced too; the reporter, on a connection of its own, passes its fence itself.)
FENCED = frozenset({"finish_job", "requeue_job", "update_progress", "set_process",
                    "save_checkpoint", "append_log", "save_manifest"})
#: the fence of a job this store does not run as a cluster node: none
_UNFENCED = (None, None)
#: the statements a write sends in pipeline mode without waiting for their answer
#: (``PgDriver``): no caller reads what they return, or (``claim``) only once it has sent
#: them all
UNAWAITED = frozenset({"add_event", "submit_events", "count_queued", "forget_progress",
                       "trim_log", "claim", "lock_queue"})
#: of those, the ones that change no row
_UNCHANGING = frozenset({"lock_queue"})


def schema_version(dsn: str) -> int:
    """The newest migration applied to the database ``dsn`` names (0: none); this jobd's
    is ``len(MIGRATIONS)``. Raises StoreError if the database does not answer."""
    where = describe(dsn)
    try:
        with _connect(dsn, connect_timeout=10) as conn:
            return _applied(conn)
    except psycopg.Error as e:
        raise StoreError(f"{where}: {str(from_pg(e, where))}") from None


def _applied(conn: psycopg.Connection[Any]) -> int:
    if conn.execute("SELECT to_regclass('jobd_schema')").fetchone() == (None,):
        return 0
    return int(_scalar(conn.execute(QUERIES["schema_version"])))


def migrate(conn: psycopg.Connection[Any], where: str) -> None:
    """Apply the migrations not applied yet, each in its own transaction, under the
    migration lock (another jobd migrating meanwhile is waited for; it finds the work
    done). A schema newer than this jobd is refused. ``conn`` is in autocommit."""
    conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATE_KEY,))
    try:
        conn.execute("CREATE TABLE IF NOT EXISTS jobd_schema (version INTEGER PRIMARY KEY, "
                     "name TEXT NOT NULL, applied_at BIGINT NOT NULL)")
        version = _applied(conn)
        if version > len(MIGRATIONS):
            raise StoreError(f"{where}: schema version {version} is newer than this jobd "
                             f"knows ({len(MIGRATIONS)}); upgrade jobd")
        for number, name, script in MIGRATIONS[version:]:
            with conn.transaction():
                conn.execute(script)  # no arguments: run as one script of statements
                conn.execute("INSERT INTO jobd_schema (version, name, applied_at) "
                             "VALUES (%s, %s, %s)", (number, name, now_us()))
            log.info("store_migrated", database=where, version=number, migration=name)
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATE_KEY,))


def check(dsn: str) -> list[str]:
    """What is wrong with the jobd database ``dsn`` names ([] when fine): it answers, its
    schema is this jobd's, and the counts the store keeps agree with the jobs."""
    where = describe(dsn)
    try:
        with _connect(dsn, connect_timeout=10) as conn:
            version = _applied(conn)
            if version == 0:
                return [f"{where}: no jobd schema (jobd has never opened this database)"]
            if version != len(MIGRATIONS):
                what = ("newer than this jobd's: upgrade jobd" if version > len(MIGRATIONS)
                        else "older than this jobd's: start jobd once to migrate it")
                return [f"{where}: schema version {version} is {what} ({len(MIGRATIONS)})"]
            problems = []
            for name, sql in _INVARIANTS.items():
                n = _scalar(conn.execute(sql))
                if n:
                    problems.append(f"{where}: {n} {name}")
            return problems
    except psycopg.Error as e:
        return [f"{where}: {str(from_pg(e, where))}"]


#: ``check``'s invariants: each counts what breaks it
_INVARIANTS = {
    "users whose queued count is not their queued jobs": """
        SELECT count(*) FROM (SELECT user_id, count(*) AS n FROM jobs
            WHERE status = 'queued' GROUP BY user_id) j
        FULL JOIN (SELECT user_id, n FROM queued_counts WHERE n > 0) c USING (user_id)
        WHERE j.n IS DISTINCT FROM c.n""",
    "type and status counts that are not the stored jobs'": """
        SELECT count(*) FROM (SELECT type, status, count(*) AS n FROM jobs
            GROUP BY type, status) j
        FULL JOIN (SELECT type, status, n FROM type_counts WHERE n > 0) c
            USING (type, status)
        WHERE j.n IS DISTINCT FROM c.n""",
    "users whose stored weight is not their finished jobs'": """
        SELECT count(*) FROM (SELECT user_id, sum(weight) AS w FROM jobs
            WHERE status IN ('completed', 'failed', 'cancelled') GROUP BY user_id) j
        FULL JOIN (SELECT user_id, weight AS w FROM user_stored WHERE weight > 0) c
            USING (user_id)
        WHERE j.w IS DISTINCT FROM c.w""",
}


class PgTx(writer.Tx):
    """A write's transaction on PostgreSQL: ``run`` takes the names of
    ``sql/postgres/queries.sql`` and counts the rows the transaction's statements
    changed (PostgreSQL keeps no total), and a failed statement as a change: it aborted
    the transaction, which only a rollback (to a savepoint) undoes. In pipeline mode
    (``pipeline``) a statement is sent without waiting for its answer when it is one of
    ``UNAWAITED`` (a Sync behind it: ``_sync_unanswered``), else waited for with those
    before it."""

    conn: psycopg.Connection[Any]
    #: rows changed so far, failed statements included; a statement sent unanswered
    #: counts as one
    writes: int = 0
    #: the connection's pipeline while the batch runs in pipeline mode
    pipeline: psycopg.Pipeline | None = None
    #: the job whose attempt's end is being written (``PostgresStore.on_ending`` runs)
    ending: str | None = None
    #: when (monotonic) the server last answered the transaction
    answered_at: float = 0.0
    #: the queue's admission lock is held (``PostgresStore._queued_in``)
    admitting: bool = False
    #: job id -> (node id, attempt) of each attempt this cluster node runs (``Fences``)
    fences: Mapping[str, tuple[int, int]] = {}
    #: a rescue writes for jobs whose node is gone: its writes are not this node's own
    unfenced: bool = False
    #: (channel, payload) of each notification the commit sends (a cluster node's)
    notes: list[tuple[str, str]]
    #: the versions sequence's value taken as the transaction began: every version it
    #: writes is above it (``jobd_next_version``)
    floor: int = 0

    @property
    def version(self) -> int:
        return self.floor

    def run(self, query: str, **params: Any) -> psycopg.Cursor[Any]:
        return self._execute(query, params, wait=query not in UNAWAITED)

    def send(self, query: str, **params: Any) -> psycopg.Cursor[Any]:
        """``run`` without waiting for the answer in pipeline mode (the caller reads none)."""
        return self._execute(query, params, wait=False)

    def _execute(self, query: str, params: dict[str, Any], *, wait: bool
                 ) -> psycopg.Cursor[Any]:
        params["now"], params["floor"] = self.now, self.floor
        if query in FENCED:
            params["node"], params["attempt"] = (_UNFENCED if self.unfenced else
                                                 self.fences.get(params["job_id"], _UNFENCED))
        try:
            try:
                cur = self.conn.execute(QUERIES[query], params)
            except psycopg.DataError:
                escaped = _without_nul(params)
                if escaped is None:
                    raise
                cur = self.conn.execute(QUERIES[query], escaped)
            if self.pipeline is not None:
                if not wait:
                    self.writes += query not in _UNCHANGING
                    _sync_unanswered(self.conn)
                    return cur
                self.wait()  # an error of a statement sent before is raised here
        except psycopg.Error:
            self.writes += 1
            raise
        if cur.statusmessage and not cur.statusmessage.startswith("SELECT"):
            self.writes += cur.rowcount
        return cur

    def insert(self, query: str, **params: Any) -> int:
        return int(_scalar(self.run(query, **params)))

    def wait(self) -> None:
        """Wait for the answers of every statement sent in pipeline mode. All of them are
        sent first: psycopg's ``Pipeline.sync`` flushes what it sends once, and then waits
        for answers to a statement the server has not had whole (a 3 MB manifest hung)."""
        assert self.pipeline is not None
        self.conn.wait(psycopg.generators.send(self.conn.pgconn))
        self.pipeline.sync()
        self.answered_at = time.monotonic()


def _sync_unanswered(conn: psycopg.Connection[Any]) -> None:
    """End what was sent in pipeline mode with a Sync, without waiting for its answers
    (read later, in order, as each statement's). Only once it has had a Sync does the
    server count the session idle in its transaction (``idle_in_transaction_session_timeout``,
    ``PostgresStore.stuck_s``): a node frozen after it sent a statement it does not wait
    for would otherwise hold the queue lock for the whole freeze. psycopg's
    ``Pipeline.sync`` waits for every answer, so its two steps are taken here."""
    pipeline = conn._pipeline
    assert pipeline is not None
    pipeline._enqueue_sync()
    conn.wait(pipeline._communicate_gen())


def _without_nul(params: Mapping[str, Any]) -> dict[str, Any] | None:
    """``params`` with each NUL written as the escape ``readable()`` writes (``\\x00``), or
    None if none holds one. PostgreSQL text holds no NUL; a write or a read whose text
    does is refused by psycopg before it is sent, and only then escaped and sent again
    (no scan of every statement's text), so that what is written is what a read finds."""
    if not any(isinstance(v, str) and "\0" in v for v in params.values()):
        return None
    return {k: v.replace("\0", "\\x00") if isinstance(v, str) else v
            for k, v in params.items()}


class PgDriver:
    """The writer's side of PostgreSQL (``writer.Driver``): one connection in autocommit
    with transactions begun and ended by statement, reconnected when it broke.

    A batch runs in pipeline mode (group commit without a round trip per statement): its
    ``BEGIN``, the queue lock, the statements whose answers no write waits for
    (``UNAWAITED``), the notifications and the ``COMMIT`` go out behind the others, and
    the batch waits only where a write reads an answer, and for the commit. A statement's
    error is then raised where the batch next waits, maybe in a later write of the batch:
    any error rolls the batch back and runs it again with a savepoint per write, and those
    runs (and one after an error that reached the commit) wait for every statement, so
    that each error is its own write's.
    """

    error: type[Exception] = psycopg.Error

    def __init__(self, dsn: str, where: str, conn: psycopg.Connection[Any],
                 node_key: int, shared: bool, stuck_s: float | None = None) -> None:
        self.dsn, self.where, self.conn, self.node_key = dsn, where, conn, node_key
        self.shared, self.stuck_s = shared, stuck_s
        #: the store's fences, given to every transaction
        self.fences: Mapping[str, tuple[int, int]] = {}
        self._tx: PgTx | None = None
        #: the batch's COMMIT was sent (its outcome, if the connection broke, is unknown)
        self._committing = False
        #: BEGIN and the transaction's version floor (with the queue lock: a cluster node)
        self._begin = (QUERIES["begin_queued"].format(key=QUEUE_KEY) if shared
                       else QUERIES["begin"])
        self._admitting_at_savepoint = False
        self.committed: Callable[[], object] = lambda: None
        #: the pipeline the batch runs in, and what leaves it (None: each statement waited for)
        self._pipeline: psycopg.Pipeline | None = None
        self._leaving: contextlib.ExitStack | None = None
        #: the error of a statement that reached the commit unanswered: the batch runs
        #: again (``again``), its next run waiting for each statement
        self._deferred: psycopg.Error | None = None

    def changes(self) -> int:
        return self._tx.writes if self._tx is not None else 0

    def begin(self, now: int) -> PgTx:
        if self.conn.broken or self.conn.closed:
            self._pipeline = self._leaving = None  # they went with the connection
            self.conn.close()
            self.conn = _connect(self.dsn, connect_timeout=10)
            try:
                _hold_node(self.conn, self.where, self.node_key, self.shared, self.stuck_s)
            except StoreError as e:  # another jobd took the database meanwhile
                self.conn.close()
                raise psycopg.OperationalError(str(e)) from None
            log.info("store_reconnected", database=self.where)
        # a cluster node's batch takes the queue lock before its first write: every status
        # change also updates the shared count rows, and a batch holding them while it
        # waited for the lock (to claim, admit or rescue) would deadlock with a node
        # holding the lock that updates them too
        self._committing = False
        cur = self.conn.execute(self._begin)  # one round trip, before pipeline mode: a
        cur.nextset()  # script of statements; BEGIN's result, then the floor's
        self._tx = PgTx(self.conn, now)
        self._tx.floor, self._tx.answered_at = int(_scalar(cur)), time.monotonic()
        self._tx.fences = self.fences
        self._tx.notes = []
        self._tx.admitting = self.shared
        if self._deferred is None:
            self._leaving = contextlib.ExitStack()
            self._pipeline = self._tx.pipeline = self._leaving.enter_context(
                self.conn.pipeline())
        self._deferred = None
        return self._tx

    def _leave_pipeline(self) -> None:
        """Wait for every statement sent and leave pipeline mode: the error of any of them
        is raised here."""
        leaving, self._leaving, self._pipeline = self._leaving, None, None
        if self._tx is not None:
            self._tx.pipeline = None
        if leaving is not None:
            leaving.close()

    def _settle(self) -> None:
        """After an error: leave pipeline mode, the answers still on their way read (only
        then does the connection know the transaction's state); their errors are the one
        already raised, or follow from it."""
        try:
            self._leave_pipeline()
        except psycopg.Error:
            pass

    def commit(self) -> None:
        tx, pipelined = self._tx, self._pipeline is not None
        try:
            if (pipelined and tx is not None and self.stuck_s is not None
                    and time.monotonic() - tx.answered_at > self.stuck_s / 2):
                # the server may have ended the session as idle meanwhile (stuck_s): found
                # out before the COMMIT is sent, which a broken connection leaves unknown
                tx.wait()
            notes = tx.notes if tx is not None else None
            if notes:  # delivered with the commit, as one statement
                self.conn.execute(QUERIES["notify"], {"channels": [c for c, _ in notes],
                                                      "payloads": [p for _, p in notes]})
                if pipelined:
                    _sync_unanswered(self.conn)
            self._committing = True
            self.conn.execute("COMMIT")
            if pipelined:
                self._leave_pipeline()
        except psycopg.Error as e:
            if pipelined:
                self._settle()
                if not self.conn.broken and self.conn.info.transaction_status in _NOT_RUN:
                    # nothing committed: a statement sent unanswered failed, and the COMMIT
                    # was skipped (still in the failed transaction) or, behind that
                    # statement's Sync, ended it as a ROLLBACK; which write it was is told
                    # by a run that waits for each statement
                    self._deferred = e
            raise

    def rollback(self) -> None:
        self._settle()
        if not self.conn.broken and self.conn.info.transaction_status in _CLEAN:
            self.conn.execute("ROLLBACK")

    def savepoint(self) -> None:
        assert self._tx is not None
        if self._pipeline is not None:  # a write's error must be raised in that write
            self._leave_pipeline()
        self._admitting_at_savepoint = self._tx.admitting
        self.conn.execute("SAVEPOINT op")

    def rollback_to_savepoint(self) -> None:
        assert self._tx is not None
        # a transaction-scoped lock taken after the savepoint goes with it
        self._tx.admitting = self._admitting_at_savepoint
        self.conn.execute("ROLLBACK TO op")

    def release(self) -> None:
        self.conn.execute("RELEASE op")

    def ended(self, e: Exception) -> bool:
        self._settle()
        return (self.conn.broken or self.conn.info.transaction_status not in _CLEAN
                or getattr(e, "sqlstate", None) in _AGAIN)

    def again(self, e: Exception) -> bool:
        # a lost race; or a connection that broke (a restart of the server) before the
        # COMMIT was sent, or that the server ended as idle in the transaction (stuck_s:
        # it never ran the COMMIT), so that nothing of the batch committed: the next
        # begin reconnects, and the batch's callers never see it; or a statement sent
        # unanswered failed, its error reaching the commit (``commit``)
        state = getattr(e, "sqlstate", None)
        return (state in _AGAIN or state == "25P03"
                or self.conn.broken and not self._committing or e is self._deferred)

    def mapped(self, e: Exception) -> Exception:
        return from_pg(e, self.where)


def stuck_after(conn: psycopg.Connection[Any], seconds: float) -> None:
    """PostgreSQL ends a transaction of ``conn``'s session once it has been idle for
    ``seconds`` (``idle_in_transaction_session_timeout``): its locks go with it."""
    conn.execute(QUERIES["stuck_after"], {"ms": str(max(1, int(seconds * 1000)))})


def _hold_node(conn: psycopg.Connection[Any], where: str, key: int, shared: bool,
               stuck_s: float | None = None) -> None:
    """Take the node lock ``key`` on ``conn``'s session (``shared``: as a cluster node), or
    refuse: a jobd of the other kind (or, one-node, any other) uses the database. A jobd
    killed just before holds it on until PostgreSQL has seen its connection close: that
    is waited out for up to ``NODE_WAIT_S``. ``stuck_s``: the session's
    ``idle_in_transaction_session_timeout`` (``PostgresStore.stuck_s``)."""
    if stuck_s is not None:
        stuck_after(conn, stuck_s)
    deadline = time.monotonic() + NODE_WAIT_S
    while not _scalar(conn.execute(QUERIES["lock_node_shared" if shared else "lock_node"],
                                   {"key": key})):
        if time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    else:
        return
    holder = conn.execute(QUERIES["node_holder"], {"key": key}).fetchone()
    who = f" ({holder[0]})" if holder and holder[0] else ""
    if shared:
        raise StoreError(f"{where} is in use by a jobd that is no cluster node{who}; stop it "
                         "first (cluster nodes share a database only with each other)")
    raise StoreError(f"{where} is in use by another jobd{who}; stop it first (several jobd "
                     "on one database run as cluster nodes: jobd serve with "
                     "[storage] backend = \"postgres\")")


class _Closed:
    """The store's pool before open and after close."""

    def connection(self) -> Any:
        raise StoreClosed()


class Echoes:
    """The latest version of each job that this node announced itself (``jobd`` payloads),
    kept for the last ``KEEP`` jobs: a payload at or below it is this node's own echo."""

    KEEP = 50_000

    def __init__(self) -> None:
        self._sent: dict[str, int] = {}
        self._lock = threading.Lock()

    def sent(self, job_id: str, version: int) -> None:
        with self._lock:
            sent = self._sent
            if version > sent.get(job_id, -1):
                sent[job_id] = version
            if len(sent) > self.KEEP:  # the oldest entries go: at worst, a needless read
                for old in list(itertools.islice(sent, len(sent) - self.KEEP // 2)):
                    del sent[old]

    def own(self, job_id: str, version: int) -> bool:
        return self.last(job_id) >= version

    def last(self, job_id: str) -> int:
        """The latest version of ``job_id`` this node announced (-1: none kept)."""
        with self._lock:
            return self._sent.get(job_id, -1)


class PostgresStore(BaseStore):
    """Jobs, their events and checkpoints in a PostgreSQL database: of one jobd, or of a
    cluster node (``cluster``) among others."""

    queries = QUERIES
    order_keys = {"created": "seq", "started": "coalesce(started_at, -1)",
                  "completed": "coalesce(completed_at, -1)"}
    _param = "%({})s".format
    _integrity = psycopg.errors.UniqueViolation

    def __init__(self, dsn: str, *, clock: Callable[[], int] = now_us,
                 listeners: Listeners | None = None, max_stored_per_user: int | None = None,
                 pool_size: int = 4, cluster: bool = False,
                 stuck_s: float | None = None) -> None:
        super().__init__(clock=clock, listeners=listeners,
                         max_stored_per_user=max_stored_per_user)
        self.dsn = dsn
        #: PostgreSQL ends a write transaction idle this long (``idle_in_transaction_
        #: session_timeout``): a frozen node's batch, which holds the queue lock every
        #: other node's claims and rescues wait for, lasts no longer than its lease
        self.stuck_s = stuck_s
        self.pool_size = pool_size
        #: the database, as messages and logs name it (never with the password)
        self.where = describe(dsn)
        self._pool: psycopg_pool.ConnectionPool[Any] | _Closed = _Closed()
        self._driver: PgDriver | None = None
        #: the one-node lock this store holds (a test of two writers on one database, as
        #: cluster mode will have, gives the second another)
        self.node_key = NODE_KEY
        #: opened as a cluster node (``jobd.cluster``): the node lock is shared
        self.cluster = cluster
        #: job id -> (node id, attempt) of every attempt this store claimed as a cluster
        #: node (``claim_in``), until its end commits: each write for it is fenced by them
        #: (a refused write keeps its fence: nothing for that attempt may land, ever)
        self.fences: dict[str, tuple[int, int]] = {}
        #: told the job id of a fenced write that was refused (the node checks its lease)
        self.on_fenced: Callable[[str], None] = lambda job_id: None
        #: the versions this node's own notifications announced: their echo on its own
        #: LISTEN connection is told apart from another node's change
        self.echoes = Echoes()
        #: called in the transaction that writes the end of an attempt this node runs,
        #: before the end (the node copies the rest of the job's log into it)
        self.on_ending: Callable[[writer.Tx, str], None] = lambda tx, job_id: None

    # -- opening and closing -------------------------------------------------------------

    def open(self) -> PostgresStore:
        """Connect, migrate (under the migration lock), take the one-node lock, note
        whether the last stop was clean, and start the writer and the read pool."""
        try:
            conn = _connect(self.dsn, connect_timeout=10)
        except psycopg.Error as e:
            raise StoreError(f"{self.where}: cannot connect: {str(e).strip()}") from None
        try:
            migrate(conn, self.where)
            _hold_node(conn, self.where, self.node_key, self.cluster, self.stuck_s)
            clean = conn.execute(QUERIES["get_meta"], {"key": "clean"}).fetchone()
            self.was_clean = clean is None or clean[0] == "1"
            conn.execute(QUERIES["set_meta"], {"key": "clean", "value": "0"})
            pool: psycopg_pool.ConnectionPool[Any] = psycopg_pool.ConnectionPool(
                self.dsn, min_size=1, max_size=self.pool_size, open=False, name="jobd-read",
                kwargs={"autocommit": True, "application_name": _NAME})
            pool.open(wait=True, timeout=10)
        except psycopg.Error as e:
            conn.close()
            failure = from_pg(e, self.where)
            raise (failure if isinstance(failure, StoreError) else StoreError(
                f"{self.where}: {str(e).strip()}")) from None
        except BaseException:
            conn.close()
            raise
        self._pool = pool
        self._driver = PgDriver(self.dsn, self.where, conn, self.node_key, self.cluster,
                                self.stuck_s)
        self._driver.fences = self.fences
        self._writer = writer.Writer(self._driver, self.clock)
        self._writer.start()
        return self

    def close(self) -> None:
        """Stop the writer after its queue drains, mark the stop clean, let the database go."""
        if self._writer is None or self._driver is None:
            return
        store_writer, driver, self._writer, self._driver = (self._writer, self._driver,
                                                            None, None)
        store_writer.stop()
        try:
            if driver.conn.broken or driver.conn.closed:
                raise psycopg.OperationalError("the connection was lost")
            driver.conn.execute(QUERIES["set_meta"], {"key": "clean", "value": "1"})
        except psycopg.Error as e:
            log.warning("store_close_incomplete", error=str(e))
        driver.conn.close()  # the one-node lock goes with the session
        pool, self._pool = self._pool, _Closed()
        if isinstance(pool, psycopg_pool.ConnectionPool):
            pool.close()

    # -- what the rules read and count ---------------------------------------------------

    @contextlib.contextmanager
    def _reading(self) -> Iterator[psycopg.Connection[Any]]:
        with self._pool.connection() as conn:
            yield conn

    def _read(self, sql: str, params: Mapping[str, Any] | None, fetch: str) -> Any:
        # after a server restart every pooled connection is broken: each is dropped as it
        # fails, and the read goes on with the next (the last one a new connection)
        tries = self.pool_size + 1
        for n in range(tries):
            last = n == tries - 1
            try:
                with self._reading() as conn:
                    try:
                        cur = conn.execute(sql, params or {})
                    except psycopg.DataError:
                        escaped = _without_nul(params or {})
                        if escaped is None:
                            raise
                        cur = conn.execute(sql, escaped)
                    return cur.fetchall() if fetch == "all" else cur.fetchone()
            except psycopg_pool.PoolTimeout as e:
                raise StorageUnavailable(f"storage unavailable: {self.where}: {e}") from None
            except psycopg.OperationalError as e:
                # a connection a server restart broke: the pool drops it; read again
                if last or not _broken(e):
                    raise from_pg(e, self.where) from None
            except psycopg.Error as e:
                raise from_pg(e, self.where) from None
        raise AssertionError("unreachable")

    def _all(self, sql: str, params: Mapping[str, Any] | None = None) -> list[Any]:
        return self._read(sql, params, "all")  # type: ignore[no-any-return]

    def _one(self, sql: str, params: Mapping[str, Any] | None = None) -> Any:
        return self._read(sql, params, "one")

    def _duplicate(self, e: Exception, job_id: str) -> Exception:
        diag = getattr(e, "diag", None)
        if diag is not None and diag.constraint_name == "jobs_id_key":
            return DuplicateId(job_id)
        return from_pg(e, self.where)

    def _count_queued(self, tx: writer.Tx, user_id: str, delta: int) -> None:
        tx.run("count_queued", user_id=user_id, delta=delta)

    def _queued_in(self, tx: writer.Tx, user_id: str | None) -> int:
        assert isinstance(tx, PgTx)
        if not tx.admitting:
            tx.run("lock_queue", key=QUEUE_KEY)
            tx.admitting = True
        if user_id is None:
            return int(_scalar(tx.run("queued_total")))
        return int(_scalar(tx.run("queued_of_user", user_id=user_id)))

    # -- cluster mode: claims and fences (jobd.cluster) ------------------------------------

    def claim_in(self, tx: writer.Tx, *, node: int, slots: int, workers: int,
                 max_running_per_user: int, exclusive: list[str]) -> list[Job]:
        """Start up to ``slots`` jobs for cluster node ``node``, as the database picks them
        under the queue lock (``claim``: the dispatch rules over every node's jobs), inside
        the caller's write; the jobs as started, each fenced from now on by (node,
        attempt). ``exclusive``: the types whose jobs hold their repository."""
        assert isinstance(tx, PgTx)
        if not tx.admitting:
            tx.run("lock_queue", key=QUEUE_KEY)
            tx.admitting = True
        started: list[Job] = []
        # each claim a statement of its own (it sees the ones before it), all sent at once
        claims = [tx.run("claim", node=node, workers=workers,
                         max_running_per_user=max_running_per_user, exclusive=exclusive)
                  for _ in range(slots)]
        for claimed in claims:
            row = claimed.fetchone()
            if row is None:
                break
            job = _job(row)
            self._fence(tx, job.id, (node, job.attempts))
            self._event(tx, job, "jobd")
            self._count_queued(tx, job.user_id, -1)
            started.append(self._changed(tx, job))
        return started

    def _changed(self, tx: writer.Tx, job: Job) -> Job:
        """As every store, and a cluster node tells the others: ``jobd`` for every change
        of a job, ``jobd_queue`` too when it entered the queue or left a slot."""
        if self.cluster:
            assert isinstance(tx, PgTx)
            payload = f"{job.id}:{job.version}"
            self.echoes.sent(job.id, job.version)
            tx.notes.append(("jobd", payload))
            if job.status is JobStatus.QUEUED or job.status in TERMINAL:
                tx.notes.append(("jobd_queue", payload))
        return super()._changed(tx, job)

    def _progressed(self, tx: writer.Tx, job: Job) -> None:
        if self.cluster:
            assert isinstance(tx, PgTx)
            self.echoes.sent(job.id, job.version)
            tx.notes.append(("jobd", f"{job.id}:{job.version}"))

    def _meta_changed(self, tx: writer.Tx, key: str) -> None:
        if self.cluster:  # the pause, maintenance: every node re-reads them
            assert isinstance(tx, PgTx)
            tx.notes.append(("jobd_meta", key))

    def _fence(self, tx: writer.Tx, job_id: str, fence: tuple[int, int]) -> None:
        self.fences[job_id] = fence
        tx.undo.append(lambda: self._unfence(job_id, fence))

    def _unfence(self, job_id: str, fence: tuple[int, int]) -> None:
        if self.fences.get(job_id) == fence:
            del self.fences[job_id]

    def rescue_in(self, tx: writer.Tx, guard: str, decide: Callable[[Job], tuple[
                  JobStatus, dict[str, Any], bytes]], *, orphans: bool = False,
                  **params: Any) -> tuple[list[int], list[tuple[int | None, Job]]]:
        """Take over the running jobs of the nodes the guard ``guard`` (``expired_node``,
        ``earlier_nodes``) ends in this write, under the queue lock: each job ends as
        ``decide`` says (queued: requeued to resume, as a recovery), and the lines it gives
        close the attempt in the job's log (``tell_log_in``). ``orphans``: also the
        running jobs of no node. Returns the nodes ended, and each job taken over with the node
        it was running on (None: none) and as it is now."""
        assert isinstance(tx, PgTx)
        if not tx.admitting:
            tx.run("lock_queue", key=QUEUE_KEY)
            tx.admitting = True
        nodes = [int(r[0]) for r in tx.run(guard, **params)]
        if not nodes and not orphans:
            return [], []
        moved = []
        tx.unfenced = True
        try:
            for row in tx.run("nodes_jobs", nodes=nodes, orphans=orphans).fetchall():
                job = _job(row[1:])
                end, kw, told = decide(job)
                self.tell_log_in(tx, job.id, told)
                if end is JobStatus.QUEUED:
                    job = self.requeue_job_in(tx, job.id, reason=kw["message"], recovered=True)
                else:
                    job = self.finish_job_in(tx, job.id, end, **kw)
                # its live progress row goes, as with an end on its own node (its version
                # is above that row's: jobd_next_version)
                tx.run("forget_progress", job_id=job.id)
                moved.append((row[0], job))
        finally:
            tx.unfenced = False
        return nodes, moved

    def nodes(self) -> list[dict[str, Any]]:
        """admin.stats' ``nodes``: every cluster node not yet ended."""
        return [{"id": id, "host": host, "started_at": started, "lease_until": until,
                 "running": running}
                for id, host, started, until, running in self._all(QUERIES["stats_nodes"])]

    def cleanup(self, *, keep_before: int, keep_failed_before: int,
                statuses: Collection[str] | None = None, dry_run: bool = False,
                wait: bool = False, chunk: int = CLEANUP_CHUNK) -> Iterator[list[str]]:
        """As every store's; a cluster node sweeps only while no other does (a session's
        try-lock, held on a connection of its own for the sweep): a scheduled round skips
        if another node sweeps, one asked for (``wait``: admin.cleanup) tries again for up
        to ``CLEANUP_WAIT_S``, its connection back in the pool between tries, then answers
        that storage is busy."""
        sweep = super().cleanup(keep_before=keep_before, keep_failed_before=keep_failed_before,
                                statuses=statuses, dry_run=dry_run, chunk=chunk)
        if not self.cluster or dry_run:
            yield from sweep
            return
        deadline = time.monotonic() + CLEANUP_WAIT_S
        while True:
            with self._reading() as conn:
                if _scalar(conn.execute(QUERIES["cleanup_lock"], {"key": CLEANUP_KEY})):
                    try:
                        yield from sweep
                    finally:
                        conn.execute(QUERIES["cleanup_unlock"], {"key": CLEANUP_KEY})
                    return
            # the connection goes back to the pool between two tries
            if not wait:
                log.info("cleanup_skipped", reason="another node is sweeping")
                return
            if self._writer is None:
                raise StoreClosed()
            if time.monotonic() >= deadline:
                raise StorageUnavailable(
                    f"another node is cleaning up and did not end within "
                    f"{CLEANUP_WAIT_S:g}s; try again once its sweep is over")
            time.sleep(0.25)

    def append_log_in(self, tx: writer.Tx, job_id: str, pos: int, data: bytes,
                      keep_from: int) -> bool:
        """Copy bytes of a running job's log at absolute offset ``pos`` into the database
        (fenced), and drop the chunks wholly before ``keep_from`` (max_log_bytes); whether
        it was written. In the write of the attempt's end (fenced alike, after it) nothing
        waits for it: True."""
        assert isinstance(tx, PgTx)
        if tx.ending == job_id:
            tx.send("append_log", job_id=job_id, pos=pos, data=data)
            tx.send("trim_log", job_id=job_id, keep_from=keep_from)
            return True
        written = tx.run("append_log", job_id=job_id, pos=pos, data=data).rowcount > 0
        if written:
            tx.run("trim_log", job_id=job_id, keep_from=keep_from)
        return bool(written)

    def tell_log_in(self, tx: writer.Tx, job_id: str, data: bytes) -> None:
        """In ``tx``: ``data`` (lines of the job's story) after the end of its log in the
        database, when the database holds some of it; nothing waits for it."""
        assert isinstance(tx, PgTx)
        if data:
            tx.send("tell_log", job_id=job_id, data=data)

    def log_end(self, job_id: str) -> int:
        """The absolute offset after the last byte of ``job_id``'s log in the database."""
        return int(self._one(QUERIES["log_end"], {"job_id": job_id})[0])

    def read_log(self, job_id: str, offset: int, limit: int) -> tuple[bytes, int] | None:
        """(data, next_offset) of a job's log as the database holds it, from absolute
        ``offset`` (one in the dropped part starts at the oldest kept byte); None when
        none of it is there."""
        # each chunk holds one byte at least: ``limit`` of them are always enough
        chunks = self._all(QUERIES["read_log"], {"job_id": job_id, "offset": offset,
                                                 "limit": limit})
        if not chunks:
            return None if not self._one(QUERIES["has_log"], {"job_id": job_id})[0] else (
                b"", offset)
        start = max(offset, chunks[0][0])
        parts, at = [], chunks[0][0]
        for pos, data in chunks:
            if pos != at or at >= start + limit:
                break  # a gap (bytes dropped before they were copied): the rest is later
            parts.append(bytes(data))
            at += len(data)
        data = b"".join(parts)[start - chunks[0][0]:][:limit]
        return data, start + len(data)

    def next_version(self, previous: int) -> int:
        """A running job's live progress keeps its version in memory until its node
        reports it, when the versions sequence gives it one (``jobd.cluster``)."""
        return previous

    def live_progress(self, job_id: str, version: int) -> tuple[float, str | None,
                                                                str | None, int] | None:
        """A running job's live progress as its node last reported it, if newer than
        ``version``: (progress, phase, message, version)."""
        row = self._one(QUERIES["live_progress"], {"job_id": job_id, "version": version})
        return None if row is None else (row[0], row[1], row[2], row[3])

    def earlier_processes(self, *, host: str, state_dir: str, node: int
                          ) -> list[tuple[str, int, int | None]]:
        """(job id, pgid, start time) of the running jobs restart recovery takes over."""
        return self._all(QUERIES["earlier_processes"],
                         {"host": host, "state_dir": state_dir, "node": node})

    def _cas(self, tx: writer.Tx, query: str, job_id: str, wanted: str, **params: Any) -> Job:
        assert isinstance(tx, PgTx)
        fence = self.fences.get(job_id) if query in FENCED and not tx.unfenced else None
        if fence is None:
            return super()._cas(tx, query, job_id, wanted, **params)
        if query in ("finish_job", "requeue_job"):
            tx.ending = job_id
            try:
                self.on_ending(tx, job_id)
            finally:
                tx.ending = None
        try:
            job = super()._cas(tx, query, job_id, wanted, **params)
        except StateConflict:
            self.on_fenced(job_id)
            raise Fenced(job_id, *fence) from None
        if job.status is not JobStatus.RUNNING:  # the attempt's end: nothing more to fence
            tx.after_commit.append(lambda: self._unfence(job_id, fence))
        return job

    def save_checkpoint(self, job_id: str, phase: str, data: dict[str, Any]) -> None:
        fence = self.fences.get(job_id)
        saved = self.write(lambda tx: tx.run("save_checkpoint", job_id=job_id, phase=phase,
                                             data=_dumps(data)).rowcount)
        if fence is not None and not saved:
            self.on_fenced(job_id)
            raise Fenced(job_id, *fence)

    def load_manifest(self, user_id: str, project_id: str) -> str | None:
        """The manifest document of (``user_id``, ``project_id``) in the database, as any
        node last wrote it (None: none yet)."""
        row = self._one(QUERIES["load_manifest"], {"user_id": user_id,
                                                   "project_id": project_id})
        return None if row is None else str(row[0])

    def save_manifest(self, job_id: str, user_id: str, project_id: str, document: str
                      ) -> None:
        """Replace the manifest of (``user_id``, ``project_id``) with ``document``, for the
        running job ``job_id``: fenced by its (node, attempt) as a checkpoint is, so a node
        that lost the job raises Fenced and writes nothing over its new owner's manifest."""
        fence = self.fences.get(job_id)
        saved = self.write(lambda tx: tx.run("save_manifest", job_id=job_id, user_id=user_id,
                                             project_id=project_id,
                                             document=document).rowcount)
        if saved:
            return
        if fence is not None:
            self.on_fenced(job_id)
            raise Fenced(job_id, *fence)
        raise StoreError(f"job {job_id} is {self.get_job(job_id).status}: only a running job "
                         "writes its manifest; nothing was written")

    def purge_manifests(self, user_id: str) -> None:
        """Delete every manifest of ``user_id`` (admin.purge), whichever node wrote it."""
        self.write(lambda tx: tx.run("purge_manifests", user_id=user_id))

    def queued_count(self, user_id: str | None = None) -> int:
        if user_id is None:
            return int(self._one(QUERIES["queued_total"])[0])
        return int(self._one(QUERIES["queued_of_user"], {"user_id": user_id})[0])

    def size_bytes(self) -> int:
        return int(self._one(QUERIES["size"])[0])


def _broken(e: psycopg.OperationalError) -> bool:
    """``e`` came from a connection that is gone (a restart, a terminated backend)."""
    state = getattr(e, "sqlstate", None) or ""
    return not state or state.startswith(("08", "57P"))
