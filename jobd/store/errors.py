"""The store's exceptions, and the one function that turns SQLite's errors into them.

The store raises no wire errors and knows no field names: the manager turns these into
``JobdError``s (``jobd.manager.jobd_error``). SQLite's errors are told apart by their
result code's name (``sqlite3.Error.sqlite_errorname``), never by their message text.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

__all__ = ["Corrupt", "DuplicateId", "Fenced", "JobNotFound", "ReadOnly", "StateConflict",
           "StorageFull", "StorageUnavailable", "StoreClosed", "StoreError", "from_sqlite"]


class StoreError(Exception):
    """The database cannot be opened or used; the message says which file and why."""


class StorageUnavailable(StoreError):
    """A write failed for a reason that may pass: storage full, read-only, I/O, closed."""


class StorageFull(StorageUnavailable):
    """The disk holding the database is full."""


class ReadOnly(StorageUnavailable):
    """The database cannot be written (permissions, a read-only mount)."""


class StoreClosed(StorageUnavailable):
    """The store is closed: the daemon is shutting down."""

    def __init__(self) -> None:
        super().__init__("the store is closed (jobd is shutting down)")


class Corrupt(StoreError):
    """The database file is damaged."""


class JobNotFound(StoreError):
    """No job has this id."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job {job_id}")
        self.job_id = job_id


class StateConflict(StoreError):
    """The job's status does not allow the change asked for; it was left as it was."""

    def __init__(self, job_id: str, status: str, wanted: str) -> None:
        super().__init__(f"job {job_id} is {status}; it cannot become {wanted}")
        #: the job's status now, and the status (or change) asked for
        self.job_id, self.status, self.wanted = job_id, status, wanted


class Fenced(StateConflict):
    """A cluster node's write for a job it ran was refused: that attempt is no longer this
    node's, or the node's lease lapsed (SPEC §11). Nothing was written, and nothing more
    may be for that attempt; a StateConflict, so that the engine records nothing."""

    def __init__(self, job_id: str, node_id: int, attempt: int) -> None:
        StoreError.__init__(self, f"job {job_id}: attempt {attempt} is no longer node "
                                  f"{node_id}'s (its lease lapsed or the job was rescued); "
                                  "nothing was written")
        self.job_id, self.status, self.wanted = job_id, "fenced", "changed"
        self.node_id, self.attempt = node_id, attempt


class DuplicateId(StoreError):
    """A job with this id is stored already."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"a job with id {job_id} already exists")
        self.job_id = job_id


def from_sqlite(e: sqlite3.Error, path: Path, *, opening: bool = False,
                job_id: str | None = None) -> StoreError | sqlite3.Error:
    """``e`` as the store's exception (a bug's error, such as a refused CHECK, is passed
    on as it is). ``opening``: the error came from opening the file, where even a
    passing condition stops the start; ``job_id``: the job being inserted (a unique key
    refused is its id taken: its idempotency key was looked up first)."""
    name = getattr(e, "sqlite_errorname", None) or ""
    text = str(e)
    if name == "SQLITE_CONSTRAINT_UNIQUE" and job_id is not None:
        return DuplicateId(job_id)
    if name in ("SQLITE_CORRUPT", "SQLITE_NOTADB") or name.startswith("SQLITE_CORRUPT_"):
        return Corrupt(f"{path}: not a usable jobd database ({text}); "
                       f"run `jobd db check` and `jobd db recover`, or move it aside")
    if opening:
        if name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM")):
            return StoreError(f"{path}: cannot open the database for writing ({text}); "
                              f"check the file's owner and permissions")
        if name == "SQLITE_FULL":
            return StoreError(f"{path}: storage full ({text})")
        return StoreError(f"{path}: {text}")
    if name == "SQLITE_FULL":
        return StorageFull(f"storage full: {path}: {text}; free space, then retry")
    if name.startswith("SQLITE_READONLY"):
        return ReadOnly(f"storage read-only: {path}: {text}")
    if name.startswith(("SQLITE_IOERR", "SQLITE_CANTOPEN")):
        return StorageUnavailable(f"storage unavailable: {path}: {text}")
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        # past the busy timeout: another program (an operator's sqlite3 shell) holds the lock
        return StorageUnavailable(f"storage busy: {path}: {text}; another program holds "
                                  f"the database's lock; retry once it lets go")
    return e
