"""The reference queue for engine_bench: a durable SqliteHuey and a task that does nothing.

Loaded by the bench (to enqueue) and by ``huey_consumer`` (to run), both finding the
database through ``JOBD_BENCH_HUEY_DB``. ``fsync=True`` is SQLite's synchronous=FULL,
the durability jobd's default gives its jobs.
"""

from __future__ import annotations

import os

from huey import SqliteHuey

#: the queue (and result store) name inside the database
NAME = "jobd-bench"

huey = SqliteHuey(NAME, filename=os.environ["JOBD_BENCH_HUEY_DB"], fsync=True)


@huey.task()
def noop() -> bool:
    # a value, not None: huey stores it, and the stored results are what the bench counts
    return True
