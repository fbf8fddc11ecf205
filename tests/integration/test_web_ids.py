"""Ids as a web server has them, end to end through a real daemon and real git (SPEC §3a):
e-mail addresses, names with spaces, ``org/repo`` aliases, ``..``, unicode and 255-byte
ids are submitted, synced on their encoded folders, listed and logged; ids that differ
only in what the encoding separates never share a folder; bad ids are refused naming
the field."""

from __future__ import annotations

import hashlib
import json
import signal
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from conftest import (FAST_CONFIG, Daemon, clone, commit_files, error_of, git, joblog,
                      make_upstream, result_of, wait_for, wait_terminal)

LONG = "x" * 250 + "@mail"  # 255 characters, 255 bytes
LONG_ENCODED = "x" * 180 + "~" + hashlib.sha256(LONG.encode()).hexdigest()[:16]

#: (user_id, project_id, the folders they must sync in under <state dir>/repos), the
#: expected folders written out by hand from SPEC §3a
WEB_IDS = [
    ("alice@example.com", "org/repo", "alice%40example.com/org%2Frepo"),
    ("Jane Doe", "..", "Jane%20Doe/%2E."),
    ("../../etc", ".hidden", "%2E.%2F..%2Fetc/%2Ehidden"),  # only a leading dot
    ("Ünïcode", "日本", "%C3%9Cn%C3%AFcode/%E6%97%A5%E6%9C%AC"),
    (LONG, LONG, f"{LONG_ENCODED}/{LONG_ENCODED}"),
    ("bob", "plain-repo_1.0", "bob/plain-repo_1.0"),  # an old-rule id keeps its folder
]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon for the module; each test uses its own ids."""
    d = Daemon(tmp_path_factory.mktemp("jobd")).start()
    yield d
    assert d.stop() == 0


def sync_as(d: Daemon, user: str, project: str, **params: Any) -> dict[str, Any]:
    return result_of(d, "jobs.submit", type="sync", as_user=user, project_id=project,
                     **params)


def listed(d: Daemon, **filters: Any) -> list[str]:
    return [j["id"] for j in result_of(d, "jobs.list", **filters)["jobs"]]


@pytest.mark.parametrize("user, project, folder", WEB_IDS,
                         ids=["email-alias", "space-dotdot", "parent-hidden", "unicode",
                              "255-bytes", "old-rule"])
def test_a_web_id_syncs_in_its_encoded_folder_then_lists_and_logs(
        daemon: Daemon, tmp_path: Path, user: str, project: str, folder: str) -> None:
    upstream = make_upstream(tmp_path / "upstream")
    repo = clone(upstream, daemon.repos / folder)
    new = commit_files(upstream, {"docs/new.md": "new\n"})

    job = sync_as(daemon, user, project)
    assert (job["user_id"], job["project_id"]) == (user, project)
    done = wait_terminal(daemon, job["id"])
    assert done["status"] == "completed", (done, joblog(daemon, job["id"]))
    assert done["result"]["new_revision"] == new == git("rev-parse", "HEAD", cwd=repo)

    # nothing was made outside the encoded folder: repos/<one segment>/<one segment>
    user_dir = repo.parent
    assert user_dir.parent == daemon.repos and [p.name for p in user_dir.iterdir()] == [
        repo.name]
    manifest = daemon.state / "manifests" / f"{folder}.json"
    assert sorted(json.loads(manifest.read_text())["files"]) == [
        "README.md", "docs/new.md", "src/a.py"]

    assert job["id"] in listed(daemon, user_id=user, project_id=project)
    assert listed(daemon, as_user=user) == [job["id"]]
    assert str(repo) in joblog(daemon, job["id"])
    assert result_of(daemon, "jobs.logs", job_id=job["id"], as_user=user)["data"]


#: pairs of ids a careless encoding would put in one folder
CLOSE_PAIRS = [
    ("a/b", "a%2Fb"),          # an escape written out by hand
    ("John Roe", "John%20Roe"),
    ("..", "%2E."),
    ("Zoë", "Zoe\u0308"),  # the same text, decomposed
    ("x" * 201 + "1", "x" * 201 + "2"),        # differ only after the cut
]


@pytest.mark.parametrize("first, second", CLOSE_PAIRS,
                         ids=["slash", "space", "dotdot", "normalisation", "long"])
def test_ids_that_differ_only_in_what_the_encoding_separates_never_share_a_folder(
        daemon: Daemon, tmp_path: Path, first: str, second: str) -> None:
    # each user syncs (and clones) its own repository for a project of the same name
    project = f"shared-{CLOSE_PAIRS.index((first, second))}"
    revisions = []
    for number, user in enumerate((first, second)):
        upstream = make_upstream(tmp_path / f"up-{number}", {f"{number}.txt": user})
        job = sync_as(daemon, user, project, options={"url": str(upstream)})
        done = wait_terminal(daemon, job["id"])
        assert done["status"] == "completed", (done, joblog(daemon, job["id"]))
        revisions.append(done["result"]["new_revision"])

    folders = [p for p in daemon.repos.iterdir() if (p / project).exists()]
    assert len(folders) == 2, folders
    for number, user in enumerate((first, second)):
        mine = [p for p in folders if (p / project / f"{number}.txt").exists()]
        assert len(mine) == 1 and not (mine[0] / project / f"{1 - number}.txt").exists()
        assert git("rev-parse", "HEAD", cwd=mine[0] / project) == revisions[number]
        manifest = json.loads((daemon.state / "manifests" / mine[0].name /
                               f"{project}.json").read_text())
        assert list(manifest["files"]) == [f"{number}.txt"], user
        # and each user lists only its own sync
        jobs = result_of(daemon, "jobs.list", user_id=user, project_id=project)["jobs"]
        assert [j["user_id"] for j in jobs] == [user]


@pytest.mark.parametrize("params, field", [
    ({"as_user": "", "project_id": "p"}, "as_user"),
    ({"as_user": "a" * 256, "project_id": "p"}, "as_user"),
    ({"as_user": "eve\u202e", "project_id": "p"}, "as_user"),
    ({"as_user": "eve", "project_id": "p\u200b"}, "project_id"),
    ({"as_user": "eve", "project_id": " p"}, "project_id"),
    ({"as_user": "eve", "project_id": "p\n"}, "project_id"),
    ({"as_user": "eve", "project_id": "\u2028"}, "project_id"),
])
def test_bad_ids_are_refused_naming_the_field(daemon: Daemon, params: dict[str, Any],
                                              field: str) -> None:
    err = error_of(daemon, "jobs.submit", type="sync", **params)
    assert (err["code"], err["data"]["field"]) == (-32602, field), err
    assert "is not a valid id" in err["message"]


def test_a_lone_surrogate_in_an_id_is_refused(daemon: Daemon) -> None:
    raw = ('{"jsonrpc": "2.0", "id": 1, "method": "jobs.submit", "params": '
           '{"type": "sync", "as_user": "eve", "project_id": "a\\ud800"}}')
    err = daemon.send(raw)["error"]
    assert err["code"] == -32602 and err["data"]["field"] == "project_id", err


INDEXER = """\
import json, sys
print(json.dumps({"argv": sys.argv[1:]}))
"""


def test_an_id_that_would_begin_an_indexer_argument_may_not_start_with_a_dash(
        make_daemon: Any, tmp_path: Path) -> None:
    indexer = tmp_path / "indexer.py"
    indexer.write_text(INDEXER)
    d = make_daemon(config=FAST_CONFIG + (
        f'[sync]\nindex_command = ["{sys.executable}", "{indexer}", "{{project_id}}", '
        '"--user={user_id}"]\n'))
    # both types that run the indexer
    for type in ("sync", "index"):
        err = error_of(d, "jobs.submit", type=type, as_user="alice", project_id="-rf")
        assert (err["code"], err["data"]["field"]) == (-32602, "project_id"), (type, err)
        assert "'-'" in err["message"]

    # a dash inside an argument, or an id no argument begins with, is fine
    upstream = make_upstream(tmp_path / "upstream")
    clone(upstream, d.repos / "-alice" / "org%2Frepo")
    job = sync_as(d, "-alice", "org/repo")
    done = wait_terminal(d, job["id"])
    assert done["status"] == "completed", (done, joblog(d, job["id"]))
    assert '"argv": ["org/repo", "--user=-alice"]' in joblog(d, job["id"])


@pytest.mark.parametrize("type", ["sync", "index"])
def test_an_id_accepted_before_a_reload_put_it_first_in_an_argument_fails_its_job(
        make_daemon: Any, tmp_path: Path, type: str) -> None:
    """Submitted while the indexer's argv held no id, run after a reload put one first in
    an argument: the job fails before the indexer runs, naming the id."""
    indexer = tmp_path / "indexer.py"
    indexer.write_text(INDEXER)
    d = make_daemon()
    upstream = make_upstream(tmp_path / "upstream")
    clone(upstream, d.repos / "alice" / "-rf")
    result_of(d, "admin.pause")
    job = sync_as(d, "alice", "-rf") if type == "sync" else result_of(
        d, "jobs.submit", type="index", as_user="alice", project_id="-rf")
    d.config.write_text(FAST_CONFIG + (
        f'[sync]\nindex_command = ["{sys.executable}", "{indexer}", "{{project_id}}"]\n'))
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: d.log().count("config_reloaded") == 1, what="the reload")
    result_of(d, "admin.resume")
    done = wait_terminal(d, job["id"])
    assert done["status"] == "failed", done
    assert "project_id '-rf'" in done["error"] and "checked again as the job starts" in (
        done["error"]), done["error"]
    assert '"argv"' not in joblog(d, job["id"])
    # before anything ran: a sync fetched nothing
    assert "git_sync" not in [e.get("phase") for e in result_of(d, "jobs.events",
                                                                job_id=job["id"])]
