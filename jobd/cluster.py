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
  fenced and the next heartbeat fails): the node ends its own row (it fences itself), its
  deadline goes to 0 so every supervisor stops its processes at once, and it claims
  nothing more; its fenced writes change nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import threading
import time
from typing import Any, Callable, Mapping

import psycopg
import structlog

from jobd.config import Config
from jobd.models import Job
from jobd.store.errors import StoreError
from jobd.store.postgres import QUERIES, PostgresStore, describe, from_pg
from jobd.store.writer import Tx

__all__ = ["NodeRefused", "Node", "REGISTER_KEY", "first_difference", "settings",
           "settings_hash"]

log = structlog.get_logger()

#: taken (transaction-scoped) by a node's registration: the settings check and the insert
REGISTER_KEY = 0x6A6F6264_00000004


class NodeRefused(StoreError):
    """This node may not join the cluster (its cluster-wide settings differ)."""


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
        self._until: float | None = None
        self._lost = False
        self._conn: psycopg.Connection[Any] | None = None
        self._conn_lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        store.on_fenced = lambda job_id: self._wake.set()

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

    # -- registering, beating, stopping --------------------------------------------------

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            if self._conn is not None:
                self._conn.close()
            name = f"jobd node {self.id}" if self.id is not None else "jobd node"
            self._conn = psycopg.connect(self.store.dsn, autocommit=True, connect_timeout=10,
                                         application_name=name)
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
                        QUERIES["differing_settings"], {"hash": digest}).fetchone()
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

    def start(self) -> None:
        """Beat every ``[cluster] heartbeat`` on a thread of its own, until ``stop``."""
        self._thread = threading.Thread(target=self._loop, name="jobd-heartbeat", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        every = self.config.cluster.heartbeat
        while not self._stopping.is_set():
            self._wake.wait(every)
            self._wake.clear()
            if self._stopping.is_set() or self._lost:
                continue
            self.beat()

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
        for _, _, job_id, _, cancel_requested in rows:
            if job_id is not None and cancel_requested:
                self.on_cancel(job_id)
        return True

    def _lose(self, why: str) -> None:
        """The lease is lost: every supervisor stops its processes now, no claim starts
        anything, and the node's row is ended so that no write of it can land."""
        if self._lost:
            return
        self._lost, self._until = True, 0.0
        log.warning("node_lease_lost", node_id=self.id, reason=why)
        self._end()

    def _end(self) -> None:
        try:
            with self._conn_lock:
                self._connection().execute(QUERIES["end_node"], {"node": self.id})
        except psycopg.Error as e:  # its lease lapses on its own in the database's clock
            log.warning("node_end_unrecorded", node_id=self.id, error=str(e).strip())

    def stop(self) -> None:
        """A clean stop: the heartbeat ends, then the node's row (after the engine wrote
        its jobs' ends, which the lease fences)."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.id is not None and not self._lost:
            self._end()
        with self._conn_lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
