"""The store: jobs, their events and checkpoints, behind one interface.

``interface.JobStore`` is what the manager, engine, dispatcher and maintenance use;
``sqlite.SqliteStore`` (also ``Store``) is the backend, on ``db.py`` (connections, the
writer, the checkpointer) and ``sql/`` (every query by name, numbered migrations).
``errors`` holds the store's exceptions; ``tools`` the offline ``jobd db`` tools.
"""

from __future__ import annotations

from jobd.store.errors import (Corrupt, DuplicateId, JobNotFound, ReadOnly, StateConflict,
                               StorageFull, StorageUnavailable, StoreClosed, StoreError)
from jobd.store.sqlite import Listeners, SqliteStore, Store, now_us

__all__ = ["Corrupt", "DuplicateId", "JobNotFound", "Listeners", "ReadOnly", "SqliteStore",
           "StateConflict", "StorageFull", "StorageUnavailable", "Store", "StoreClosed",
           "StoreError", "now_us"]
