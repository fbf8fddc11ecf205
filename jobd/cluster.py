"""Cluster mode (SPEC §11): this daemon as one node of several on one PostgreSQL database.

Owns the node's identity, its lease and what follows from it (docs/cluster.md, sections
5 and 6); used only with ``[storage] backend = "postgres"``, so a SQLite daemon never
imports it.

- **Registration**: every start is a new node id (``register``), refused while a live node
  runs with other cluster-wide settings (``settings``: ``[execution]`` but ``workers``,
  ``[auth]``, ``[types]``, ``[retention]``, ``[sync]`` and the handlers' registry, by
  SHA-256 of their canonical JSON); the refusal names the first difference.
- **Heartbeat** on a connection of its own (a long write batch never delays a lease):
  every ``[cluster] heartbeat`` it renews the lease, by the database's clock, and reads
  back the node's running jobs and their cancel requests (the fallback for a cancel
  whose notification was lost).
- **The node's own deadline** (``deadline``, ``CLOCK_BOOTTIME``): after a renewal that
  held, the time it was *sent* + ``lease`` − ``heartbeat``; every job's supervisor is
  given it (``process.run(lease=)``) and stops the job's processes on its own once it
  passes, so a frozen or cut-off node's programs stop before its lease ends.
- **Claims** (``claim_in``): the database picks what starts, under the queue lock, over
  every node's jobs (``PostgresStore.claim_in``); each claimed attempt's writes are fenced
  by (node id, attempt) and the lease.
- **A lost lease** (no row from a heartbeat, the deadline passed first, or a write was
  fenced and the next heartbeat fails): the node ends its lease now in the database's
  clock (it fences itself), its deadline goes to 0 so every supervisor stops its
  processes at once, it claims nothing more, stops its attempts (their fenced writes
  change nothing: nothing is recorded for them) and waits for them; then it registers a
  new node id and recovers its previous one at once, as a restart does.
- **Rescue** (docs/cluster.md, section 7): after each heartbeat the node reads the other
  live nodes' beats and watches each on its own clock; a node whose lease ended more
  than ``cancel_grace`` + 1 s ago by the database's clock *and* whose beat this node has
  seen stand still for ``lease`` + ``cancel_grace`` + 1 s is ended and its running jobs
  taken over in one transaction under the queue lock, guarded by the beat it watched
  (``expired_node``): requeued to resume, failed when not resumable or recovered
  ``max_recoveries`` times, cancelled when a cancel was asked. Then its sessions are
  ended. Never by how long a job has run.
- **Notifications** (``listen``, docs/cluster.md, section 8): one connection per node
  only ``LISTEN``s to ``jobd`` (a job changed: its waiters here re-read it; a job this
  node runs is re-read for a cancel asked through another node), ``jobd_queue`` (a job
  queued or a slot freed: claim) and ``jobd_meta`` (the pause or maintenance changed).
  Every ``[cluster] poll``, and after the connection is back (LISTEN first, then this),
  the node claims, wakes every waiter to re-read its job, and re-reads the settings, so
  a lost notification only delays. Payloads are ``<job id>:<version>`` or a meta key.
- **Live progress** (``progressed``, ``annotate``): a running job's progress goes to the
  unlogged ``job_progress`` table on a connection of its own, at most every
  ``PROGRESS_EVERY`` per node (the latest value wins), with a ``jobd`` notification and
  the next version of the database's sequence, which this node's own waiters then hear
  (``on_reported``); another node answering for the job takes that row when it is newer
  than the job's and is the running attempt's own.
- **Logs** (``ship``): every ``LOG_EVERY`` the node copies what its running jobs' logs
  gained into the database in chunks at absolute offsets (fenced), and the rest in the
  transaction that writes an attempt's end, before it: ``jobs.logs`` on any node reads
  them (``read_log``), and ``eof`` still means the story is complete.
- **Restart recovery** (``recover``) covers only this host's and state folder's earlier
  node ids (and jobs a one-node jobd left running): their recorded process groups are
  killed, then they are taken over at once, without waiting for their leases.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import os
import socket
import threading
import time
from typing import Any, Callable, Mapping

import psycopg
import structlog

from jobd import joblogs, orphans
from jobd.attempt import crash_end, end_story
from jobd.config import Config, ConfigError
from jobd.models import Job, JobStatus
from jobd.store.errors import StoreError
from jobd.store.postgres import (QUERIES, SESSION_NAME, PostgresStore, describe, from_pg,
                                 stuck_after)
from jobd.store.writer import Tx

__all__ = ["NodeRefused", "Node", "REGISTER_KEY", "first_difference", "settings",
           "settings_hash"]

log = structlog.get_logger()

#: taken (transaction-scoped) by a node's registration: the settings check and the insert
REGISTER_KEY = 0x6A6F6264_00000004
#: what a node LISTENs to: a job changed, the queue moved, a setting changed
CHANNELS = ("jobd", "jobd_queue", "jobd_meta")
#: how often running jobs' logs are copied into the database, and the largest chunk
LOG_EVERY = 0.25
LOG_CHUNK = 65536
#: live progress is written at most this often (coalesced: the latest value wins)
PROGRESS_EVERY = 0.02


class NodeRefused(StoreError):
    """This node may not join the cluster (its cluster-wide settings differ)."""


def _burst(conn: psycopg.Connection[Any], timeout: float) -> list[tuple[str, str]]:
    """The notifications on ``conn``: waited for up to ``timeout`` seconds, then every one
    already come in with the first (none: the time ran out)."""
    notes = [(n.channel, n.payload) for n in conn.notifies(timeout=timeout, stop_after=1)]
    if notes:
        notes += [(n.channel, n.payload) for n in conn.notifies(timeout=0)]
    return notes


def boottime() -> float:
    """The clock of the node's own deadline: monotonic, and counting a suspended machine."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def settings(config: Config, handlers: Mapping[str, Any]) -> dict[str, Any]:
    """The settings every node of a cluster must share, as plain JSON values."""
    execution = dataclasses.asdict(config.execution)
    del execution["workers"]  # per node
    return json.loads(json.dumps({
        "execution": execution,
        "auth": dataclasses.asdict(config.auth),
        "types": {name: dataclasses.asdict(spec) for name, spec in config.types.items()},
        "retention": dataclasses.asdict(config.retention),
        "sync": dataclasses.asdict(config.sync),
        "handlers": {name: {"exclusive": bool(h.exclusive), "resumable": bool(h.resumable)}
                     for name, h in handlers.items()},
    }, default=str))


def settings_hash(values: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``settings``."""
    text = json.dumps(values, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _flat(values: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    if isinstance(values, dict) and values:
        out: dict[tuple[str, ...], Any] = {}
        for key, value in values.items():
            out.update(_flat(value, prefix + (str(key),)))
        return out
    return {prefix: values}


def first_difference(mine: Mapping[str, Any], theirs: Mapping[str, Any]) -> str | None:
    """The first setting (in sorted order) that differs, as ``[section] key: A here, B
    on``; None when they are the same."""
    a, b = _flat(dict(mine)), _flat(dict(theirs))
    for key in sorted(a.keys() | b.keys()):
        if a.get(key, "(unset)") != b.get(key, "(unset)"):
            name = f"[{key[0]}] {'.'.join(key[1:])}" if len(key) > 1 else f"[{key[0]}]"
            return (f"{name}: {json.dumps(a.get(key, '(unset)'))} here, "
                    f"{json.dumps(b.get(key, '(unset)'))} on")
    return None


class Node:
    """This daemon's node of the cluster: its id, lease, heartbeat and claims.

    ``clock`` is the deadline's clock (``boottime``); tests pass their own.
    """

    def __init__(self, config: Config, store: PostgresStore, handlers: Mapping[str, Any],
                 *, clock: Callable[[], float] = boottime) -> None:
        self.config = config
        self.store = store
        self.handlers = handlers
        self.clock = clock
        self.host = socket.gethostname()
        self.id: int | None = None
        #: told the id of each job this node runs whose cancel the database says was asked
        self.on_cancel: Callable[[str], None] = lambda job_id: None
        #: the lease is lost: stop every attempt and wait for their (fenced) ends
        self.on_lost: Callable[[], None] = lambda: None
        #: a new node id is registered after a loss, or jobs were rescued: claim
        self.on_claimable: Callable[[], None] = lambda: None
        #: told the jobs other nodes' notifications say changed, as read once they were
        #: heard, and the ids of those no longer stored (this node's waiters, queue mirror
        #: and change log follow them)
        self.on_jobs: Callable[[list[Job], list[str]], None] = lambda jobs, gone: None
        #: the pause or maintenance may have changed: re-read them
        self.on_meta: Callable[[], None] = lambda: None
        #: each heartbeat renewed the lease: told every live node's workers together
        self.on_beat: Callable[[int], None] = lambda slots: None
        #: a running job's live progress was reported, with the version the database gave it
        self.on_reported: Callable[[str, int], None] = lambda job_id, version: None
        #: a notification may have been lost: every waiter re-reads its job
        self.on_resync: Callable[[], None] = lambda: None
        self._listener: threading.Thread | None = None
        self._shipper: threading.Thread | None = None
        #: job id -> how much of its log (absolute offset) is in the database
        self._shipped: dict[str, int] = {}
        #: job id -> its latest live progress not written yet
        self._pending: dict[str, dict[str, Any]] = {}
        self._progressed = threading.Event()
        self._reporter: threading.Thread | None = None
        self._listening: psycopg.Connection[Any] | None = None
        #: other nodes' beats as this node last saw them change: id -> (beat, since)
        self._watch: dict[int, tuple[int, float]] = {}
        self._until: float | None = None
        self._lost = False
        self._conn: psycopg.Connection[Any] | None = None
        self._conn_lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        store.on_fenced = lambda job_id: self._wake.set()
        store.on_ending = self._ship_last_in

    # -- what the engine asks ------------------------------------------------------------

    @property
    def lost(self) -> bool:
        return self._lost

    def deadline(self) -> float | None:
        """Until when (``CLOCK_BOOTTIME``) this node may run its jobs' processes: what every
        supervisor is given (``process.run(lease=)``); 0 once the lease is lost."""
        return self._until

    def lapsed(self) -> str:
        """A job's supervisor stopped its processes at the deadline: the lease is lost (the
        node fences itself before the job's end is written, so nothing is recorded for
        it). The reason, for the job's stop."""
        self._lose("its deadline passed before a heartbeat renewed the lease")
        return "the node lost its lease"

    def claim_in(self, tx: Tx, slots: int) -> list[Job]:
        """Start up to ``slots`` jobs for this node inside ``tx`` (none once the lease is lost)."""
        if self._lost or self.id is None:
            return []
        ex = self.config.execution
        return self.store.claim_in(
            tx, node=self.id, slots=slots, workers=ex.workers,
            max_running_per_user=ex.max_running_per_user,
            exclusive=sorted(name for name, h in self.handlers.items() if h.exclusive))

    def nodes(self) -> list[dict[str, Any]]:
        """admin.stats' ``nodes``: ``[{id, host, started_at, lease_until, running}]``."""
        return self.store.nodes()

    # -- registering, beating, stopping --------------------------------------------------

    def _session(self, purpose: str = "") -> psycopg.Connection[Any]:
        """A connection of the node's own, named for it (and ``purpose``), whose
        transactions PostgreSQL ends once idle for the lease: the node frozen inside one
        (the registration lock held, or a job's row share-locked by a progress report)
        must not hold up the other nodes, nor the rescue of its jobs, for longer."""
        name = f"jobd node {self.id}" if self.id is not None else "jobd node"
        conn = psycopg.connect(self.store.dsn, autocommit=True, connect_timeout=10,
                               application_name=f"{name} {purpose}".strip()[:63])
        stuck_after(conn, self.config.cluster.lease)
        return conn

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            if self._conn is not None:
                self._conn.close()
            self._conn = self._session()
            # a heartbeat that cannot be answered in time is as good as lost
            self._conn.execute(f"SET statement_timeout = "
                               f"{int(self.config.cluster.heartbeat * 1000)}")
        return self._conn

    def register(self) -> int:
        """Register a new node id with its first lease; NodeRefused naming the first
        differing setting while a live node runs with other cluster-wide settings."""
        mine = settings(self.config, self.handlers)
        digest = settings_hash(mine)
        lease = self.config.cluster
        where = describe(self.store.dsn)
        sent = self.clock()
        try:
            with self._conn_lock:
                conn = self._connection()
                with conn.transaction():
                    conn.execute(QUERIES["lock_register"], {"key": REGISTER_KEY})
                    row = conn.execute(QUERIES["register_node"], {
                        "host": self.host, "state_dir": str(self.config.state_dir),
                        "pid": os.getpid(), "workers": self.config.execution.workers,
                        "hash": digest, "settings": json.dumps(mine),
                        "lease_us": int(lease.lease * 1_000_000)}).fetchone()
                    other = None if row is not None else conn.execute(
                        QUERIES["differing_settings"], {"hash": digest, "node": None}).fetchone()
                if row is not None:
                    conn.execute(f"SET application_name = 'jobd node {int(row[0])}'")
        except psycopg.Error as e:
            raise StoreError(f"{where}: cannot register this node: "
                             f"{from_pg(e, where)}") from None
        if row is None:
            assert other is not None
            node, host, theirs = other
            what = first_difference(mine, theirs) or "the settings"
            raise NodeRefused(
                f"{where}: this node's cluster-wide settings differ from the live nodes': "
                f"{what} node {node} (host {host}); give every node the same [execution] "
                "(but workers), [auth], [types], [retention] and [sync], then start it again")
        self.id, self._lost = int(row[0]), False
        self._until = sent + lease.lease - lease.heartbeat
        log.info("node_registered", node_id=self.id, host=self.host,
                 state_dir=str(self.config.state_dir), lease_s=lease.lease)
        return self.id

    def check_reload(self, config: Config) -> None:
        """Refuse (ConfigError) a reloaded config whose cluster-wide settings differ from
        another live node's, naming the first difference; else this node uses it from now
        on (its own row says so, for the next node that registers or reloads)."""
        mine = settings(config, self.handlers)
        digest = settings_hash(mine)
        try:
            with self._conn_lock:
                conn = self._connection()
                # one at a time, with registrations: a node registering with the old
                # settings while this one changes them would pass both checks
                with conn.transaction():
                    conn.execute(QUERIES["lock_register"], {"key": REGISTER_KEY})
                    other = conn.execute(QUERIES["differing_settings"],
                                         {"hash": digest, "node": self.id}).fetchone()
                    if other is None:
                        conn.execute(QUERIES["set_node_settings"], {
                            "hash": digest, "settings": json.dumps(mine), "node": self.id,
                            "workers": config.execution.workers})
        except psycopg.Error as e:
            raise ConfigError(f"the config was not reloaded: the cluster's settings could "
                              f"not be checked ({str(e).strip()}); send SIGHUP again") from None
        if other is not None:
            node, host, theirs = other
            what = first_difference(mine, theirs) or "the settings"
            raise ConfigError(f"the config was not reloaded: {what} node {node} (host {host});"
                              " cluster-wide settings change on every node alike")
        self.config = config

    def start(self) -> None:
        """Beat every ``[cluster] heartbeat`` and listen for notifications, each on a
        thread of its own, until ``stop``."""
        self._thread = threading.Thread(target=self._loop, name="jobd-heartbeat", daemon=True)
        self._thread.start()
        self._listener = threading.Thread(target=self.listen, name="jobd-listen", daemon=True)
        self._listener.start()
        self._shipper = threading.Thread(target=self._ship_loop, name="jobd-logs", daemon=True)
        self._shipper.start()
        self._reporter = threading.Thread(target=self._report_loop, name="jobd-progress",
                                          daemon=True)
        self._reporter.start()

    # -- live progress -------------------------------------------------------------------

    def progressed(self, job_id: str, live: Any) -> None:
        """A job this node runs made progress (``live``: the engine's ``Live``): written
        within ``PROGRESS_EVERY``, for every node's waiters."""
        fence = self.store.fences.get(job_id)
        if live is None or fence is None or fence[0] != self.id:
            return
        self._pending[job_id] = {"job_id": job_id, "node": fence[0], "attempt": fence[1],
                                 "progress": live.progress, "phase": live.phase,
                                 "message": live.message}
        self._progressed.set()

    def _report_loop(self) -> None:
        conn: psycopg.Connection[Any] | None = None
        named = None  #: the node id its session is named for
        while not self._stopping.is_set():
            self._progressed.wait(1.0)
            self._progressed.clear()
            batch, self._pending = self._pending, {}
            if not batch or self._stopping.is_set():
                continue
            reported = []
            try:
                if conn is None or conn.closed or conn.broken or named != self.id:
                    if conn is not None:
                        conn.close()
                    named = self.id
                    conn = self._session("progress")
                # one transaction per job: each share-locks its job's row (report_progress),
                # and a transaction locking several could deadlock with a batch writing them.
                # Commits wait for the WAL only when the sequence logged its next values
                # (one in 32): a version given out is never given again after a crash.
                for job_id, values in batch.items():
                    with conn.transaction():
                        row = conn.execute(QUERIES["report_progress"], values).fetchone()
                        if row is not None:  # this node's echo, known before it comes
                            self.store.echoes.sent(job_id, int(row[0]))
                    if row is not None:
                        reported.append((job_id, int(row[0])))
            except psycopg.Error as e:  # the durable flush still carries it, later
                log.debug("live_progress_unwritten", node_id=self.id, error=str(e).strip())
            for job_id, version in reported:
                self.on_reported(job_id, version)
            self._stopping.wait(PROGRESS_EVERY)
        if conn is not None:
            conn.close()

    def annotate(self, out: dict[str, Any]) -> None:
        """A running job another node runs, as ``Engine.annotate`` answers it: its live
        progress from the database when that is newer than its row."""
        try:
            live = self.store.live_progress(out["id"], out["version"])
        except StoreError:
            return  # the row's own values stand
        if live is not None:
            progress, phase, message, version = live
            out.update(progress=round(progress, 2), phase=phase, message=message,
                       version=version)

    # -- logs ----------------------------------------------------------------------------

    def _ship_loop(self) -> None:
        while not self._stopping.wait(LOG_EVERY):
            self.ship()

    def ship(self) -> None:
        """Copy what the logs of this node's running jobs gained into the database."""
        for job_id, (node, _) in list(self.store.fences.items()):
            if node != self.id:
                continue
            if joblogs.end(joblogs.path(self.config.log_dir, job_id)) <= self._shipped.get(
                    job_id, 0):
                continue
            try:
                self.store.write(functools.partial(self._ship_in, job_id=job_id))
            except StoreError as e:  # the end copies the rest, or the next turn does
                log.debug("job_log_copy_failed", job_id=job_id, error=str(e))

    def _ship_in(self, tx: Tx, job_id: str) -> None:
        """In ``tx``: copy the part of ``job_id``'s log not in the database yet (fenced)."""
        fence = self.store.fences.get(job_id)
        if fence is None or fence[0] != self.id:
            return
        path = joblogs.path(self.config.log_dir, job_id)
        shipped = before = self._shipped.get(job_id, 0)
        keep_from = max(0, joblogs.end(path) - self.config.execution.max_log_bytes)
        while True:
            try:
                data, next_offset = joblogs.read(path, shipped, LOG_CHUNK)
            except OSError as e:  # the copy waits; the job's own writes must not
                log.warning("job_log_copy_failed", job_id=job_id, error=str(e))
                break
            if not data or not self.store.append_log_in(
                    tx, job_id, next_offset - len(data), data, keep_from):
                break
            shipped = next_offset
        if shipped != before:
            self._shipped[job_id] = shipped
            tx.undo.append(lambda: self._shipped.__setitem__(job_id, before))

    def _ship_last_in(self, tx: Tx, job_id: str) -> None:
        """In the transaction of an attempt's end, before it: the rest of its log."""
        self._ship_in(tx, job_id)
        self._pending.pop(job_id, None)
        tx.run("forget_progress", job_id=job_id)
        tx.after_commit.append(lambda: self._forget_log(job_id))

    def _forget_log(self, job_id: str) -> None:
        self._shipped.pop(job_id, None)

    def seed_log(self, job_id: str) -> None:
        """An attempt of ``job_id`` starts on this node: what the database holds of its log
        past this node's file (attempts run on other nodes) goes into the file first, so
        that the file and the database's copy go on from the same offset, every attempt's
        output in both."""
        path = joblogs.path(self.config.log_dir, job_id)
        at = joblogs.end(path)
        missing: list[bytes] = []
        gap_to = None  #: the copy keeps the log only from here on: so will the file
        try:
            copied_to = self.store.log_end(job_id)
            while at < copied_to and (copied := self.store.read_log(job_id, at, LOG_CHUNK)
                                      ) and copied[0]:
                data, next_at = copied
                if next_at - len(data) > at:  # max_log_bytes dropped what comes between
                    missing, gap_to = [], next_at - len(data)
                missing.append(data)
                at = next_at
        except StoreError as e:  # the attempt runs all the same; its log starts here
            log.warning("job_log_seed_failed", job_id=job_id, error=str(e))
            copied_to = 0
            missing, gap_to = [], None
        if gap_to is not None:
            joblogs.continue_at(path, gap_to)
        if missing:
            joblog = joblogs.JobLog(path, self.config.execution.max_log_bytes)
            try:
                joblog.write(b"".join(missing))
            finally:
                joblog.close()
        # what the file holds past the copy (an attempt of this node's whose last output
        # a crash kept from the database) is copied first
        self._shipped[job_id] = min(copied_to, joblogs.end(path))

    def log_end(self, job_id: str) -> int:
        """How far ``job_id``'s log reaches in the database (0: none of it)."""
        return self.store.log_end(job_id)

    def tell(self, job_id: str, text: str) -> None:
        """A line of a job's story that no attempt writes (a cancel while it was queued),
        after its log in the database, which every node reads and a later attempt's log
        goes on from (``seed_log``); not in this node's file, which another node's attempt
        may have left behind. Logged, not raised, if it cannot be written."""
        data = joblogs.note_lines(text)

        def told(fut: concurrent.futures.Future[None]) -> None:
            if (error := fut.exception()) is not None:
                log.warning("job_log_tell_failed", job_id=job_id, error=str(error))
        try:
            self.store.write_async(lambda tx: self.store.tell_log_in(tx, job_id, data)
                                   ).add_done_callback(told)
        except StoreError as e:  # closed: the daemon stops
            log.warning("job_log_tell_failed", job_id=job_id, error=str(e))

    def read_log(self, job_id: str, offset: int, limit: int) -> tuple[bytes, int] | None:
        """A job's log as the database holds it (``jobs.logs`` for a job another node ran),
        or None when none of it is there."""
        return self.store.read_log(job_id, offset, limit)

    # -- notifications -------------------------------------------------------------------

    def listen(self) -> None:
        """LISTEN on a connection of its own, and act on each notification; every ``poll``
        resync; a lost connection is opened again (and resynced) until ``stop``."""
        poll = self.config.cluster.poll
        lost = False
        while not self._stopping.is_set():
            try:
                named = self.id  # a new id (rejoin): a session named for it, resynced
                with self._session("listen") as conn:
                    self._listening = conn
                    for channel in CHANNELS:
                        conn.execute(f"LISTEN {channel}")
                    if lost:
                        log.info("cluster_listener_reconnected", node_id=self.id)
                    lost = False
                    while not self._stopping.is_set() and self.id == named:
                        self.resync()  # first after LISTEN: nothing falls in between
                        until = time.monotonic() + poll
                        while not self._stopping.is_set() and self.id == named and (
                                left := until - time.monotonic()) > 0:
                            self.heard(_burst(conn, left))
            except psycopg.Error as e:
                if self._stopping.is_set():
                    break
                if not lost:
                    log.warning("cluster_listener_lost", node_id=self.id, error=str(e).strip())
                lost = True
                self._stopping.wait(min(poll, 1.0))
            finally:
                self._listening = None

    def heard(self, notes: list[tuple[str, str]]) -> None:
        """Act on a burst of notifications, (channel, payload) each: the jobs other nodes
        changed read once, in one query (a job this node runs, also to see whether its
        cancel was asked); one claim and one re-read of the pause for the whole burst."""
        changed: dict[str, None] = {}
        claimable = meta = False
        for channel, payload in notes:
            if channel == "jobd":
                job_id, _, version = payload.partition(":")
                if not version.isdigit():  # not a node's (another client of the database)
                    continue
                # another node's change, not older than this node's own last one; of a job
                # this node runs, any but its own last one (a cancel asked by another node
                # may be heard only after this node's own later write)
                sent, fence = self.store.echoes.last(job_id), self.store.fences.get(job_id)
                if int(version) > sent or (fence is not None and fence[0] == self.id
                                           and int(version) != sent):
                    changed[job_id] = None
            elif channel == "jobd_queue":
                claimable = True
            elif channel == "jobd_meta":
                meta = True
        if changed:
            self._follow(list(changed))
        if claimable:
            self.on_claimable()
        if meta:
            self.on_meta()

    def _follow(self, job_ids: list[str]) -> None:
        try:
            jobs = self.store.get_jobs(job_ids)
        except StoreError as e:  # the waiters re-read, the heartbeat reads the cancels
            log.warning("cluster_follow_failed", node_id=self.id, error=str(e))
            self.on_resync()
            return
        found = {job.id for job in jobs}
        self.on_jobs(jobs, [job_id for job_id in job_ids if job_id not in found])
        for job in jobs:
            fence = self.store.fences.get(job.id)
            if job.cancel_requested and fence is not None and fence[0] == self.id:
                self.on_cancel(job.id)

    def resync(self) -> None:
        """What a lost notification would have told: claim, every waiter re-reads its job,
        the pause and maintenance re-read."""
        self.on_claimable()
        self.on_resync()
        try:
            self.on_meta()
        except StoreError as e:
            log.warning("cluster_resync_incomplete", node_id=self.id, error=str(e))

    def _loop(self) -> None:
        every = self.config.cluster.heartbeat
        while not self._stopping.is_set():
            self._wake.wait(every)
            self._wake.clear()
            if self._stopping.is_set():
                break
            try:
                if self._lost:
                    self.rejoin()
                elif self.beat():
                    self.rescue()
            except Exception:  # the heartbeat never dies: the next turn tries again
                log.exception("node_heartbeat_crashed", node_id=self.id)

    def beat(self) -> bool:
        """One heartbeat: the lease renewed (True), or lost; a heartbeat that fails (the
        database unreachable) changes nothing until the node's own deadline passes."""
        lease = self.config.cluster
        sent = self.clock()
        try:
            with self._conn_lock:
                rows = self._connection().execute(QUERIES["heartbeat"], {
                    "node": self.id, "lease_us": int(lease.lease * 1_000_000)}).fetchall()
        except psycopg.Error as e:
            log.warning("node_heartbeat_failed", node_id=self.id, error=str(e).strip())
            if self._until is not None and self.clock() >= self._until:
                self._lose("no heartbeat renewed the lease before the node's deadline")
            return False
        if not rows:
            self._lose("the database holds no lease for it (lapsed, or rescued)")
            return False
        if not self._lost:
            self._until = sent + lease.lease - lease.heartbeat
        for _, _, job_id, _, cancel_requested, _ in rows:
            if job_id is not None and cancel_requested:
                self.on_cancel(job_id)
        self.on_beat(int(rows[0][5] or 0))
        return True

    def _lose(self, why: str) -> None:
        """The lease is lost: every supervisor stops its processes now, no claim starts
        anything, and the node's row is ended so that no write of it can land."""
        if self._lost:
            return
        self._lost, self._until = True, 0.0
        log.warning("node_lease_lost", node_id=self.id, reason=why)
        self._execute("drop_lease", node=self.id)
        self._wake.set()

    def _execute(self, query: str, **params: Any) -> list[Any] | None:
        """A statement of the node's own on its connection: its rows, None if it failed
        (logged; what it would have done happens by the lease's end anyway)."""
        for last in (False, True):
            try:
                with self._conn_lock:
                    cur = self._connection().execute(QUERIES[query], params)
                    return cur.fetchall() if cur.description else []
            except psycopg.Error as e:
                if not last and self._conn is not None and self._conn.broken:
                    continue  # a connection a restart broke: once more on a new one
                log.warning("node_statement_failed", node_id=self.id, statement=query,
                            error=str(e).strip())
        return None

    def rejoin(self) -> None:
        """After a lost lease: stop every attempt and wait for their fenced ends, register a
        new node id (refused: tried again at the next heartbeat) and recover the previous
        one at once (its processes are dead: the supervisors stopped them)."""
        self.on_lost()
        old = self.id
        try:
            self.register()
        except StoreError as e:
            log.error("node_register_failed", previous_node_id=old, error=str(e))
            return
        self.recover("lost", old)
        self.on_claimable()

    # -- rescue and recovery ---------------------------------------------------------------

    def _margin(self) -> float:
        """How long after a lease's end its node may be rescued: ``cancel_grace`` + 1 s."""
        return self.config.execution.cancel_grace + 1.0

    def _decide(self, why: str, node: int | None) -> Callable[[Job], tuple[
            JobStatus, dict[str, Any], bytes]]:
        """How a rescue or a recovery ends each job (``crash_end``), and the line that
        closes the attempt in its log, as a worker's end would write it."""
        max_recoveries = self.config.execution.max_recoveries

        def decide(job: Job) -> tuple[JobStatus, dict[str, Any], bytes]:
            handler = self.handlers.get(job.type)
            end, fields = crash_end(job, handler is not None and handler.resumable,
                                    max_recoveries, why, node)
            said = fields.get("message") or fields.get("error")
            return end, fields, joblogs.note_lines(end_story(end, said))
        return decide

    def recover(self, why: str = "restart", previous: int | None = None) -> list[Job]:
        """Restart recovery: kill the recorded process groups of this host's and state
        folder's earlier nodes' running jobs, then take those jobs over at once (and any a
        one-node jobd left running); the jobs as they are now. ``why``: ``lost`` after a
        lost lease (``previous``: the node id it had), ``restart`` at a start."""
        assert self.id is not None
        where: dict[str, Any] = {"host": self.host, "state_dir": str(self.config.state_dir),
                                 "node": self.id}
        for job_id, pgid, start in self.store.earlier_processes(**where):
            killed = orphans.kill_orphan_group(pgid, start)
            if killed:
                log.warning("orphan_processes_killed", job_id=job_id, pgid=pgid, count=killed)
        nodes, moved = self.store.write(lambda tx: self.store.rescue_in(
            tx, "earlier_nodes", self._decide(why, previous), orphans=True, **where))
        for _, job in moved:
            orphans.kill_marked(job.id)  # what the recorded group missed
            log.info("job_recovered" if job.status is JobStatus.QUEUED else "job_" + str(
                job.status), job_id=job.id, user_id=job.user_id, type=job.type,
                reason=why)
        for node in nodes:
            log.info("node_rescued", node_id=node, by=self.id, reason=why,
                     jobs=sum(1 for owner, _ in moved if owner == node))
        return [job for _, job in moved]

    def rescue(self) -> list[Job]:
        """Watch the other live nodes' beats (on this node's clock) and rescue each whose
        lease ended more than the margin ago and whose beat stood still as long."""
        margin = self._margin()
        rows = self._execute("live_nodes", node=self.id, margin_us=int(margin * 1_000_000))
        if rows is None:
            return []
        now, wait = self.clock(), self.config.cluster.lease + margin
        seen, moved = {}, []
        for node, beat, expired in rows:
            before = self._watch.get(node)
            since = before[1] if before is not None and before[0] == beat else now
            seen[node] = (beat, since)
            if expired and now - since >= wait:
                moved += self._rescue(node, beat, margin)
        self._watch = seen
        if moved:
            self.on_claimable()
        return moved

    def _rescue(self, node: int, beat: int, margin: float) -> list[Job]:
        names = self._execute("node_names", node=node) or []
        nodes, moved = self.store.write(lambda tx: self.store.rescue_in(
            tx, "expired_node", self._decide("lost", node), dead=node, beat=beat,
            margin_us=int(margin * 1_000_000)))
        if not nodes:
            return []  # it beat meanwhile, or another node rescued it first
        log.warning("node_rescued", node_id=node, jobs=len(moved), by=self.id, reason="lost",
                    requeued=sum(j.status is JobStatus.QUEUED for _, j in moved))
        # its heartbeat's, and its store's (named by host and pid: never this process's own)
        sessions = [f"jobd node {node}", f"jobd node {node} listen"] + [name for host, pid in names
                                            if (name := f"jobd on {host} pid {pid}"[:63])
                                            != SESSION_NAME]
        self._execute("end_sessions", names=sessions)
        return [job for _, job in moved]

    def stop(self) -> None:
        """A clean stop: the heartbeat ends, then the node's row (after the engine wrote
        its jobs' ends, which the lease fences)."""
        self._stopping.set()
        self._wake.set()
        for thread in (self._thread, self._listener, self._shipper, self._reporter):
            if thread is not None:
                thread.join(timeout=self.config.cluster.poll + 5)
        if self.id is not None and not self._lost:
            self._execute("end_node", node=self.id)
        with self._conn_lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
