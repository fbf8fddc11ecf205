"""``jobd db recover`` keeps what the store keeps beside the rows: each user's stored
weight (max_stored_per_user) and the status counts (admin.stats), and it reports as saved
only the rows the fresh database took."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from jobd.models import JobStatus
from jobd.store import Store
from jobd.store.tools import recover

from test_store import Clock, new_job, raw, submit
from test_store_schema import OLD, old_database


def finished(store: Store, user: str, n: int) -> None:
    for _ in range(n):
        job = submit(store, new_job(user=user, type="noop", project=None,
                                    metadata={"pad": "x" * 5000}))
        store.start_job(job.id)
        store.finish_job(job.id, JobStatus.COMPLETED, result={})


def test_recover_keeps_each_users_stored_weight_and_the_counts(tmp_path: Path) -> None:
    db = tmp_path / "jobd.db"
    store = Store(db, synchronous="off", clock=Clock()).open()
    finished(store, "alice", 3)
    finished(store, "bob", 1)
    submit(store, new_job(user="bob", type="noop", project=None))
    weights = {u: store.stored_weight(u) for u in ("alice", "bob")}
    counts = store.counts()
    store.close()
    assert weights == {"alice": 6, "bob": 2}  # 1 per job, plus 1 per 4 KiB carried

    report = recover(db)
    assert report["saved"]["jobs"] == 5 and report["lost"]["jobs"] == 0

    # a lower limit now forgets alice's oldest, as it would have before the recovery
    store = Store(db, synchronous="off", clock=Clock(), max_stored_per_user=4).open()
    try:
        assert {u: store.stored_weight(u) for u in ("alice", "bob")} == weights
        assert store.counts() == counts
        deleted = [i for ids in store.cleanup(keep_before=0, keep_failed_before=0)
                   for i in ids]
        assert len(deleted) == 1 and store.stored_weight("alice") == 4
    finally:
        store.close()


def test_recover_of_an_old_database_repairs_rows_as_the_upgrade_does(tmp_path: Path) -> None:
    """A damaged database of schema 4 may hold rows outside the invariants schema 5 checks
    (a finished job without an end time, left by a bug): recovered, they are repaired as
    the upgrade repairs them, not dropped while counted as saved."""
    db = tmp_path / "old.db"
    old_database(db)
    with raw(db) as conn:
        conn.execute("UPDATE jobs SET completed_at = NULL WHERE id = ?", (OLD["completed"],))
        stored = conn.execute("SELECT count(*) FROM jobs").fetchone()[0]
    report = recover(db)
    assert (report["saved"]["jobs"], report["lost"]["jobs"]) == (stored, 0)
    store = Store(db).open()
    try:
        done = store.get_job(OLD["completed"])
        assert done.status is JobStatus.COMPLETED and done.completed_at == done.updated_at
        assert sum(store.counts().values()) == stored
        assert store.stored_weight("alice") == 1
    finally:
        store.close()


def test_recover_keeps_the_finished_counts_and_the_folded_keys(tmp_path: Path) -> None:
    from jobd.rules import Rules
    db = tmp_path / "jobd.db"
    store = Store(db, synchronous="off", clock=Clock()).open()
    finished(store, "alice", 2)
    rules = Rules(exclusive=frozenset({"sync"}))
    options = {"repo_path": str(tmp_path / "repo"), "full_reindex": False}
    first, _ = store.submit_job(new_job(user="bob", type="sync", options=options,
                                        idempotency_key="k1"), actor="bob", rules=rules)
    folded, was_folded = store.submit_job(new_job(user="bob", type="sync", options=options,
                                                  idempotency_key="k2"), actor="bob",
                                          rules=rules)
    assert was_folded and folded.id == first.id
    ends = store.finished(0)
    store.close()
    assert ends

    recover(db)
    store = Store(db, synchronous="off", clock=Clock()).open()
    try:
        assert store.finished(0) == ends
        again, was_found = store.submit_job(new_job(user="bob", type="noop", project=None,
                                                    idempotency_key="k2"), actor="bob",
                                            rules=rules)
        assert was_found and again.id == first.id
    finally:
        store.close()


_KILLED_RECOVERY = """
import os, signal, sys
from pathlib import Path
from jobd.store import tools
real = os.replace
def replace(src, dst):
    if Path(src).name.endswith(".recovering"):  # the fresh file's one rename into place
        os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst)
tools.os.replace = replace
tools.recover(Path(sys.argv[1]))
"""


def test_a_recovery_killed_before_its_last_rename_leaves_the_database_in_place(
        tmp_path: Path) -> None:
    """``jobd db recover`` killed (SIGKILL, a real process) just before the fresh file
    replaces the damaged one: the damaged database is still where jobd looks, with its
    jobs (not missing, which a start would take for a new install), and a recovery run
    again completes."""
    db = tmp_path / "jobd.db"
    store = Store(db, synchronous="off", clock=Clock()).open()
    finished(store, "alice", 3)
    store.close()
    killed = subprocess.run([sys.executable, "-c", _KILLED_RECOVERY, str(db)],
                            capture_output=True, text=True, timeout=60)
    assert killed.returncode == -9, killed.stderr
    with raw(db) as conn:
        assert conn.execute("SELECT count(*) FROM jobs").fetchone() == (3,)
    assert len(list(tmp_path.glob("jobd.db.damaged-*[0-9]"))) == 1  # the copy kept aside
    report = recover(db)
    assert report["saved"]["jobs"] == 3
    # the second recovery's copy does not take the first one's name within the second
    assert len(list(tmp_path.glob("jobd.db.damaged-*[0-9]"))) == 2
    with raw(db) as conn:
        assert conn.execute("SELECT count(*) FROM jobs").fetchone() == (3,)
