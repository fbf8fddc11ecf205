"""builtin:manifest's manifests in cluster mode (SPEC §11: manifests live in the
database), on two real jobd nodes on one PostgreSQL database sharing one repositories
folder: an index on node B after a sync on node A rehashes only the files changed since
A's manifest, and ``admin.purge`` through B removes the manifests A wrote. No node keeps
a manifest file in its own state folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import pytest

from cluster_nodes import Cluster
from conftest import clone, commit_files, make_upstream, result_of, wait_terminal

pytest_plugins = ["pg"]


@pytest.fixture
def cluster(pg_dsn: str, tmp_path: Path) -> Iterator[Cluster]:
    nodes = Cluster(tmp_path / "cluster", pg_dsn)
    yield nodes
    nodes.close()


def manifests(cluster: Cluster) -> dict[str, dict[str, object]]:
    """The manifests in the database: project -> its document's files."""
    return {project: json.loads(document)["files"] for project, document in cluster.rows(
        "SELECT project_id, document FROM manifests WHERE user_id = 'root'")}


def test_an_index_on_another_node_rehashes_only_what_changed_and_purge_reaches_all(
        cluster: Cluster, tmp_path: Path) -> None:
    files = {f"f{i}.txt": f"file {i}\n" for i in range(6)}
    upstream = make_upstream(tmp_path / "upstream", files)
    repo = clone(upstream, cluster.repos / "root" / "proj")
    other = clone(make_upstream(tmp_path / "other", {"x.txt": "x\n"}),
                  cluster.repos / "root" / "other")
    commit_files(upstream, {"f1.txt": "file 1, changed upstream\n"})

    # node A alone: it runs both syncs
    a = cluster.add(workers=1)
    for project in ("proj", "other"):
        job = result_of(a, "jobs.submit", type="sync", project_id=project)
        done = wait_terminal(a, job["id"])
        assert done["status"] == "completed", done
    assert done["result"]["index"]["rehashed"] == 1  # other's one file
    first = manifests(cluster)
    assert set(first) == {"proj", "other"} and len(first["proj"]) == 6
    a.halt()

    # node B alone, on the same database and repositories: one file changed since
    b = cluster.add(workers=1)
    (repo / "f4.txt").write_text("file 4, changed in the work tree\n")
    job = result_of(b, "jobs.submit", type="index", project_id="proj")
    done = wait_terminal(b, job["id"])
    assert done["status"] == "completed", done
    assert done["result"]["index"] == {"files_indexed": 6, "added": 0, "changed": 1,
                                       "removed": 0, "rehashed": 1}
    after = manifests(cluster)
    assert {n for n in after["proj"] if after["proj"][n] != first["proj"][n]} == {"f4.txt"}
    for node in (a, b):
        assert not (node.state / "manifests").exists()

    # purge through B: A's manifest of other goes too, from the database every node reads
    assert result_of(b, "admin.purge", user_id="root")["deleted"] == 3
    assert manifests(cluster) == {}
    assert other.exists()  # the repositories stay: purge removes jobd's records alone
