"""The store: jobs, their events and checkpoints, behind one interface.

``interface.JobStore`` is what the manager, engine, dispatcher and maintenance use.
``base.BaseStore`` holds the rules of every transition, listing and cleanup once for
every backend, over each backend's named queries (``sql/``) and the group-commit
``writer.Writer`` (with a backend's small driver). The backends: ``sqlite.SqliteStore``
(also ``Store``), on ``db.py`` (connections, SQLite's driver, migrations, the
checkpointer), and ``postgres.PostgresStore`` (SPEC §11), which alone imports psycopg and
is imported only when configured (not from here). ``errors`` holds the store's
exceptions; ``tools`` the offline ``jobd db`` tools.
"""

from __future__ import annotations

from jobd.store.errors import (Corrupt, DuplicateId, JobNotFound, ReadOnly, StateConflict,
                               StorageFull, StorageUnavailable, StoreClosed, StoreError)
from jobd.store.sqlite import Listeners, SqliteStore, Store, now_us

__all__ = ["Corrupt", "DuplicateId", "JobNotFound", "Listeners", "ReadOnly", "SqliteStore",
           "StateConflict", "StorageFull", "StorageUnavailable", "Store", "StoreClosed",
           "StoreError", "now_us"]
