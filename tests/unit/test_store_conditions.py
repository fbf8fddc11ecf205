"""The store when things go wrong: a file that is not a database, a directory it may not
write, a full disk, a duplicate id, damaged pages; and the offline tools check, backup and
recover. All about SQLite's file but the duplicate id, tested on both backends."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
import tempfile
import textwrap
import threading
import uuid
from pathlib import Path

import pytest

from conftest import OTHER_UID_PYTHON
from jobd.models import Job, JobStatus
from jobd.store import Corrupt, DuplicateId, StorageFull, Store, StoreError
from jobd.store.tools import backup, check, recover
from pg import StoreDb

pytest_plugins = ["pg"]


def new_job(user: str = "alice", metadata: dict[str, str] | None = None,
            job_id: str | None = None) -> Job:
    return Job(id=job_id or str(uuid.uuid4()), type="noop", user_id=user, project_id=None,
               status=JobStatus.CREATED, created_at=0, updated_at=0, version=0,
               metadata=metadata or {})


def filled(db: Path, jobs: int, payload: int = 1000) -> list[str]:
    """A cleanly closed database of ``jobs`` jobs, each with its events and a checkpoint."""
    store = Store(db, synchronous="off").open()
    ids = []
    try:
        for n in range(jobs):
            job = store.submit_job(new_job(metadata={"n": str(n), "pad": "x" * payload}),
                                   actor="alice")[0]
            store.save_checkpoint(job.id, "init", {"n": n})
            ids.append(job.id)
    finally:
        store.close()
    return ids


def bulk(db: Path, jobs: int, payload: int) -> None:
    """Many finished jobs at once, written straight into the store's schema."""
    Store(db).open().close()
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as conn:
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO jobs (id, type, user_id, status, version, created_at, updated_at, "
            "completed_at, "
            "metadata) VALUES (?, 'noop', 'bulk', 'completed', 1, 1, 1, 1, ?)",
            ((str(uuid.uuid4()), "x" * payload) for _ in range(jobs)))
        conn.execute("COMMIT")


def damage_pages(db: Path, table: str, pages: int) -> int:
    """Overwrite ``pages`` leaf pages from the middle of ``table`` with garbage; the number
    of rows they held."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        size = conn.execute("PRAGMA page_size").fetchone()[0]
        leaves = conn.execute(
            "SELECT pageno, ncell FROM dbstat WHERE name = ? AND pagetype = 'leaf' "
            "ORDER BY pageno", (table,)).fetchall()
    assert len(leaves) > pages * 3
    middle = len(leaves) // 2
    with open(db, "r+b") as f:
        for page, _ in leaves[middle:middle + pages]:
            f.seek((page - 1) * size)
            f.write(os.urandom(size))
    return sum(cells for _, cells in leaves[middle:middle + pages])


def test_a_file_that_is_not_a_database_is_refused_with_advice(tmp_path: Path) -> None:
    db = tmp_path / "jobd.db"
    db.write_bytes(b"this is not SQLite\n" * 500)
    with pytest.raises(Corrupt) as refused:
        Store(db).open()
    message = str(refused.value)
    assert str(db) in message and "jobd db recover" in message
    assert isinstance(refused.value, StoreError)
    assert db.read_bytes() == b"this is not SQLite\n" * 500  # never replaced silently


def test_damage_found_after_an_unclean_stop_stops_the_open(tmp_path: Path) -> None:
    db = tmp_path / "jobd.db"
    filled(db, 300)
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as conn:
        conn.execute("UPDATE meta SET value = '0' WHERE key = 'clean'")  # as if killed
    damage_pages(db, "jobs", 2)
    with pytest.raises(Corrupt) as refused:
        Store(db).open()
    assert str(db) in str(refused.value) and "jobd db recover" in str(refused.value)


def test_a_directory_without_write_permission_is_a_clear_error(
        readable_jobd: dict[str, str]) -> None:
    # a place an unprivileged user can reach (pytest's tmp_path is private to root)
    top = Path(tempfile.mkdtemp(prefix="jobd-perm-"))
    try:
        top.chmod(0o755)
        locked = top / "state"
        locked.mkdir(mode=0o755)
        db = locked / "jobd.db"
        if os.geteuid() == 0:
            if not shutil.which("setpriv"):
                pytest.skip("setpriv (util-linux) is needed to drop root for this check")
            child = textwrap.dedent(f"""
                import sys
                from jobd.store import Store, StoreError
                try:
                    Store({str(db)!r}).open()
                except StoreError as e:
                    print(e)
                    sys.exit(3)
            """)
            run = subprocess.run(
                ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                 OTHER_UID_PYTHON, "-c", child],
                capture_output=True, text=True, timeout=60, cwd="/",
                env={**os.environ, **readable_jobd})
            assert run.returncode == 3, run.stderr
            message = run.stdout
        else:
            locked.chmod(0o555)
            with pytest.raises(StoreError) as refused:
                Store(db).open()
            message = str(refused.value)
        assert str(locked) in message and "write permission" in message
        assert not db.exists()
    finally:
        (top / "state").chmod(0o755)
        shutil.rmtree(top)


@pytest.mark.root
@pytest.mark.disk_size("2m")
def test_a_full_disk_refuses_writes_keeps_what_is_stored_and_recovers(
        small_disk: Path) -> None:
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * 600 * 1024)
    store = Store(small_disk / "jobd.db").open()
    try:
        stored: list[Job] = []
        big = {"blob": "m" * 60_000}
        for _ in range(100):
            try:
                stored.append(store.submit_job(new_job(metadata=big), actor="alice")[0])
            except StorageFull as e:
                assert "storage full" in str(e)
                break
        else:
            pytest.fail("100 jobs of 60 KB fitted on a 2 MiB disk")
        assert stored
        # one write larger than the whole disk fails inside the transaction, not at commit
        with pytest.raises(StorageFull, match="storage full"):
            store.submit_job(new_job(metadata={"blob": "h" * 3_000_000}), actor="alice")

        # every acknowledged job is still there and reads still work
        for job in stored:
            assert store.get_job(job.id).metadata == big
        assert [j.id for j in store.list_jobs(limit=1000)] == [j.id for j in reversed(stored)]
        assert store.queued_count("alice") == len(stored)  # refused writes were not counted

        filler.unlink()
        after = store.submit_job(new_job(metadata={"small": "yes"}), actor="alice")[0]
        assert store.get_job(after.id).status is JobStatus.QUEUED
        assert store.queued_count("alice") == len(stored) + 1
        assert store.cancel_job(stored[0].id, actor="alice").status is (
            JobStatus.CANCELLED)
    finally:
        store.close()


def test_a_duplicate_id_is_a_conflict_naming_it(store_db: StoreDb) -> None:
    """On both backends (PostgreSQL's: its unique violation, told by SQLSTATE 23505 on
    the id's constraint)."""
    store = store_db.open()
    try:
        first = store.submit_job(new_job(job_id="0123abcd-dup"), actor="alice")[0]
        with pytest.raises(DuplicateId, match="0123abcd-dup"):
            store.submit_job(new_job(user="bob", job_id="0123abcd-dup"), actor="bob")
        assert store.get_job("0123abcd-dup") == first
        assert store.queued_count("bob") == 0
    finally:
        store.close()


def test_check_healthy_and_damaged(tmp_path: Path) -> None:
    db = tmp_path / "jobd.db"
    filled(db, 400)
    assert check(db) == ["ok"]
    damage_pages(db, "jobs", 3)
    problems = check(db)
    assert problems != ["ok"] and all(isinstance(p, str) and p for p in problems)
    with pytest.raises(StoreError, match="no such database"):
        check(tmp_path / "missing.db")
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(os.urandom(8192))
    assert check(garbage) != ["ok"]


def test_backup_of_a_database_being_written(tmp_path: Path) -> None:
    db, target = tmp_path / "jobd.db", tmp_path / "backup.db"
    # ~50 MB: copied a slice at a time, a backup of this restarts after every commit and
    # never ends while jobs keep coming
    bulk(db, 12_000, 3000)
    store = Store(db, synchronous="normal").open()
    stop = threading.Event()
    written = [0]

    def writer() -> None:
        while not stop.is_set():
            store.submit_job(new_job(), actor="alice")
            written[0] += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        while written[0] < 20:  # the writer is really writing before the backup starts
            stop.wait(0.005)
        copier = threading.Thread(target=lambda: backup(db, target), daemon=True)
        copier.start()
        copier.join(timeout=30)
        assert not copier.is_alive(), "the backup never finished while jobs were written"
    finally:
        stop.set()
        thread.join()
        store.close()
    assert check(target) == ["ok"]
    assert target.stat().st_mode & 0o777 == 0o600  # every job's data: not for other users
    copy = Store(target).open()
    try:
        queued = copy.queued_count("alice")
        assert copy.counts()["completed"] == 12_000 and 20 <= queued <= written[0]
        # one snapshot: each copied submit has both of its events
        with contextlib.closing(sqlite3.connect(target)) as conn:
            assert conn.execute("SELECT count(*) FROM job_events").fetchone()[0] == 2 * queued
    finally:
        copy.close()
    with pytest.raises(StoreError, match="already exists"):
        backup(db, target)


def test_recover_saves_the_readable_rows_and_moves_the_damage_aside(tmp_path: Path) -> None:
    db = tmp_path / "jobd.db"
    ids = filled(db, 400)
    held = damage_pages(db, "jobs", 2)
    report = recover(db)

    saved, lost = report["saved"], report["lost"]
    # the rows of the two pages are lost, and at most the first row after them (the
    # seek past the damage lands on the damaged page's end), nothing more
    assert 0 < lost["jobs"] <= held + 1 and saved["jobs"] + lost["jobs"] == 400
    moved = Path(report["moved_to"])
    assert moved.exists() and moved.parent == db.parent and check(moved) != ["ok"]
    assert check(db) == ["ok"]

    store = Store(db).open()
    try:
        assert store.was_clean
        kept = [j for j in store.list_jobs(limit=1000)]
        assert len(kept) == saved["jobs"] and {j.id for j in kept} <= set(ids)
        for job in kept[::25]:
            assert [e["status"] for e in store.events(job.id)] == ["created", "queued"]
            assert store.load_checkpoints(job.id) == {"init": {"n": int(job.metadata["n"])}}
        assert store.queued_count("alice") == len(kept)
        assert saved["job_events"] == 2 * len(kept)
        assert saved["job_checkpoints"] == len(kept)
        store.submit_job(new_job(), actor="alice")  # and it takes new work
    finally:
        store.close()
