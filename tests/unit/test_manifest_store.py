"""builtin:manifest's manifests in the store (SPEC §7, §11), on both backends: a saved
document is read back whole and replaced whole, per (user, project); admin.purge's
``purge_manifests`` removes one user's alone; the indexer, given the store's manifests,
rehashes only what changed and hashes everything again after a damaged one. SQLite
keeps each as the file SPEC §7 names, under the daemon's state folder; PostgreSQL as a
row every store on the database reads, and a cluster node's save is fenced like the
job's other writes: a node that lost its lease, or whose attempt was taken over, writes
nothing over the manifest."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from jobd import daemon
from jobd.config import Config, Storage
from jobd.handlers.index import IndexHandler
from jobd.models import Job, JobStatus
from jobd.store import Listeners, StoreError

import pg
from handler_context import Context
from test_cluster import Cluster, claim, cluster, rows, submit  # noqa: F401 - a fixture
from test_handlers import clone, config, upstream  # noqa: F401 - fixtures
from test_store import move, new_job

pytest_plugins = ["pg"]

postgres_only = pytest.mark.parametrize("backend", ["postgres"], indirect=True)


def document(files: int, *, revision: str = "r1") -> str:
    """A manifest as the indexer writes it, of ``files`` entries (3000 are about 0.5 MB)."""
    return json.dumps({"format": 1, "revision": revision, "files": {
        f"src/dir{i % 97}/file{i}.py": {"type": "file", "size": i, "mtime_ns": i * 1000,
                                        "lines": i % 300, "sha256": f"{i:064x}"}
        for i in range(files)}}, separators=(",", ":"))


def running(store: Any, user: str = "alice", project: str = "org/repo") -> str:
    """The id of a running index job of (user, project)."""
    job = store.submit_job(new_job(user=user, type="index", project=project), actor=user)[0]
    return str(move(store, job.id, JobStatus.RUNNING).id)


def test_a_manifest_is_read_back_whole_and_replaced_whole(store_db: pg.StoreDb) -> None:
    store = store_db.open()
    try:
        job = running(store)
        assert store.load_manifest("alice", "org/repo") is None
        big = document(20_000)  # a few MB: one row, one file
        assert len(big) > 3_000_000
        store.save_manifest(job, "alice", "org/repo", big)
        assert store.load_manifest("alice", "org/repo") == big
        other = running(store, "bob")
        store.save_manifest(other, "bob", "org/repo", document(2, revision="bob's"))
        store.save_manifest(job, "alice", "org/repo", document(3, revision="r2"))
        assert json.loads(store.load_manifest("alice", "org/repo"))["revision"] == "r2"
        assert json.loads(store.load_manifest("bob", "org/repo"))["revision"] == "bob's"
        assert store.load_manifest("alice", "org/other") is None
    finally:
        store.close()
    again = store_db.open()  # kept across a restart, as the next index needs it
    try:
        assert json.loads(again.load_manifest("alice", "org/repo"))["revision"] == "r2"
    finally:
        again.close()


def test_purge_removes_every_manifest_of_that_user_alone(store_db: pg.StoreDb) -> None:
    store = store_db.open()
    try:
        for user, project in (("alice", "p1"), ("alice", "org/p2"), ("bob", "p1")):
            store.save_manifest(running(store, user, project), user, project, document(1))
        store.purge_manifests("alice")
        assert store.load_manifest("alice", "p1") is None
        assert store.load_manifest("alice", "org/p2") is None
        assert store.load_manifest("bob", "p1") == document(1)
        store.purge_manifests("carol")  # no manifest: nothing to do
        store.purge_manifests("alice")
    finally:
        store.close()


class StoreContext(Context):
    """The handler tests' context, its manifests the store's as the engine's context has
    them."""

    def __init__(self, job: Job, config: Config, store: Any) -> None:
        super().__init__(job, config)
        self.store = store

    def load_manifest(self) -> str | None:
        return self.store.load_manifest(self.job.user_id, self.job.project_id or "")

    def save_manifest(self, document: str) -> None:
        self.store.save_manifest(self.job.id, self.job.user_id, self.job.project_id or "",
                                 document)


def index(store: Any, config: Config) -> tuple[dict[str, Any], StoreContext]:
    """An index job of alice's proj run to its end, as running in ``store``."""
    options = IndexHandler().validate({}, user_id="alice", project_id="proj", trusted=False,
                                      config=config)
    job = store.submit_job(new_job(type="index", project="proj", options=options),
                           actor="alice")[0]
    ctx = StoreContext(move(store, job.id, JobStatus.RUNNING), config, store)
    return IndexHandler().run(ctx), ctx


def test_the_indexer_rehashes_only_what_changed_since_the_stored_manifest(
        store_db: pg.StoreDb, config: Config, clone: Path) -> None:
    # SQLite's manifests under the config's state folder, as the daemon's store has them
    store = store_db.open(**({"state_dir": config.state_dir} if store_db.backend == "sqlite"
                             else {}))
    try:
        first, _ = index(store, config)
        assert first["index"]["rehashed"] == 4
        (clone / "b.txt").write_text("beta, longer now\n")
        second, _ = index(store, config)
        assert second["index"] == {"files_indexed": 4, "added": 0, "changed": 1,
                                   "removed": 0, "rehashed": 1}
        stored = json.loads(store.load_manifest("alice", "proj"))
        assert stored["files"]["b.txt"]["size"] == len("beta, longer now\n")
        # the file SPEC §7 names on SQLite; none with PostgreSQL, whose row every node reads
        assert (config.state_dir / "manifests" / "alice" / "proj.json").exists() == (
            store_db.backend == "sqlite")

        store.save_manifest(running(store, "alice", "proj"), "alice", "proj", "{damaged")
        third, ctx = index(store, config)
        assert third["index"]["rehashed"] == 4
        assert "manifest: ignoring the unreadable manifest of alice/proj" in (
            ctx.joblog.path.read_text())
    finally:
        store.close()


def test_a_sqlite_daemon_keeps_manifests_in_its_state_folder(tmp_path: Path) -> None:
    config = Config(socket=tmp_path / "jobd.sock", db=tmp_path / "db" / "jobd.db",
                    storage=Storage(state_dir=str(tmp_path / "state")))
    store = daemon.make_store(config, Listeners()).open()
    try:
        store.save_manifest(running(store), "alice", "org/repo", document(1))
    finally:
        store.close()
    assert (tmp_path / "state" / "manifests" / "alice" / "org%2Frepo.json").read_text() == (
        document(1))
    assert not (tmp_path / "db" / "manifests").exists()


@pg.sqlite_only
def test_sqlite_keeps_each_manifest_as_the_file_spec_names(store_db: pg.StoreDb,
                                                          tmp_path: Path) -> None:
    state = tmp_path / "state"
    store = store_db.open(state_dir=state)
    try:
        job = running(store, "Jane Doe", "org/repo")
        store.save_manifest(job, "Jane Doe", "org/repo", document(2))
        path = state / "manifests" / "Jane%20Doe" / "org%2Frepo.json"
        assert path.read_text() == document(2)
        assert [p.name for p in path.parent.iterdir()] == ["org%2Frepo.json"]
        path.write_bytes(b"\xff not UTF-8")  # damaged: read as text the indexer rejects
        assert store.load_manifest("Jane Doe", "org/repo") == "\ufffd not UTF-8"
        with pytest.raises(StoreError, match="cannot name a manifest file"):
            store.save_manifest(job, "Jane Doe", "", document(1))
        store.purge_manifests("Jane Doe")
        assert not (state / "manifests" / "Jane%20Doe").exists()
    finally:
        store.close()


@postgres_only
def test_postgres_keeps_the_document_as_written_where_every_store_reads_it(
        store_db: pg.StoreDb) -> None:
    from jobd.store.postgres import PostgresStore
    a = store_db.open()
    b = PostgresStore(store_db.target)
    b.node_key += 1000  # a second writer on the database, as another node
    b.open()
    try:
        text = document(5)
        a.save_manifest(running(a), "alice", "org/repo", text)
        assert b.load_manifest("alice", "org/repo") == text
        assert store_db.rows("SELECT user_id, project_id, document FROM manifests") == [
            ("alice", "org/repo", text)]
        b.purge_manifests("alice")
        assert a.load_manifest("alice", "org/repo") is None
    finally:
        b.close()
        a.close()


@postgres_only
def test_only_a_running_job_writes_its_manifest(store_db: pg.StoreDb) -> None:
    store = store_db.open()
    try:
        job = running(store)
        move(store, job, JobStatus.COMPLETED)
        with pytest.raises(StoreError, match="is completed: only a running job writes its "
                                             "manifest; nothing was written"):
            store.save_manifest(job, "alice", "org/repo", document(1))
        assert store.load_manifest("alice", "org/repo") is None
    finally:
        store.close()


def test_a_node_that_lost_its_lease_writes_no_manifest(cluster: Cluster) -> None:
    from jobd.store.errors import Fenced
    a = cluster.node(lease="1s", heartbeat="0.3s")
    a.register()
    job = submit(a.store)
    claim(a)
    fenced: list[str] = []
    a.store.on_fenced = fenced.append
    a.store.save_manifest(job.id, "alice", "p", document(1))  # the lease holds: written
    time.sleep(1.1)  # no heartbeat: the lease lapses by the database's clock
    with pytest.raises(Fenced, match="nothing was written"):
        a.store.save_manifest(job.id, "alice", "p", document(2, revision="late"))
    assert fenced == [job.id]
    assert rows(cluster.dsn, "SELECT document FROM manifests") == [(document(1),)]


def test_a_node_whose_attempt_was_taken_over_writes_no_manifest(cluster: Cluster) -> None:
    from jobd.store.errors import Fenced
    a = cluster.node()
    a.register()
    job = submit(a.store)
    claim(a)
    a.store.save_manifest(job.id, "alice", "p", document(1, revision="a's"))
    # the job as another node holds it after a rescue: a later attempt, which wrote its own
    rows(cluster.dsn, "UPDATE jobs SET attempts = attempts + 1 WHERE id = %s RETURNING 1",
         job.id)
    rows(cluster.dsn, "UPDATE manifests SET document = %s RETURNING 1",
         document(2, revision="the new owner's"))
    with pytest.raises(Fenced):
        a.store.save_manifest(job.id, "alice", "p", document(3, revision="a's late"))
    assert a.beat()  # the node's own lease is fine: the attempt alone is no longer its own
    assert json.loads(a.store.load_manifest("alice", "p"))["revision"] == "the new owner's"
