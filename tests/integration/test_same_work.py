"""Same-work dedupe and repository exclusivity through a real daemon and real git (SPEC §4
``jobs.submit``/``jobs.retry``, §5): a submit folds only into a queued job of the same
user, type, resolved repository path and options but ``full_reindex``; ``on_duplicate:
"reject"`` and a retry of such work answer -32009 naming the job; exclusive jobs wait on
the work tree they touch, not on (user, project)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from jobd import errors
from jobd.client import Client
from jobd.models import Job, JobStatus
from jobd.store import Store

from conftest import (FAST_CONFIG, Daemon, clone, error_of, git, make_upstream, result_of,
                      wait_for, wait_terminal)

#: an indexer that records when it ran on which work tree (its cwd, or its third
#: argument), slowly
INDEXER = """\
import json, os, sys, time
record, where = sys.argv[1], (sys.argv[3:] or [os.getcwd()])[0]
with open(record, "a") as f:
    f.write(json.dumps(["start", where, time.time()]) + "\\n")
time.sleep(float(sys.argv[2]))
with open(record, "a") as f:
    f.write(json.dumps(["end", where, time.time()]) + "\\n")
"""


def slow_daemon(make_daemon: Any, tmp_path: Path, *, seconds: float = 0.4,
                workers: int = 4) -> tuple[Daemon, Path]:
    """A daemon whose indexer takes ``seconds``, as does its exclusive ``[types]`` type
    ``refresh`` of ``repos/golden/{alias}``; the file their runs are recorded in."""
    indexer, record = tmp_path / "indexer.py", tmp_path / "runs.jsonl"
    indexer.write_text(INDEXER)
    argv = json.dumps([sys.executable, str(indexer), str(record), str(seconds)])
    refresh = json.dumps([sys.executable, str(indexer), str(record), str(seconds),
                          "{repo_path}"])
    d = make_daemon(config=FAST_CONFIG + f"workers = {workers}\n"
                    f"[sync]\nindex_command = {argv}\nfull_index_command = {argv}\n"
                    f"[types.refresh]\nargv = {refresh}\noptions = [\"alias\"]\n"
                    'roles = ["service", "admin"]\nrepo = "{state_dir}/repos/golden/{alias}"\n'
                    "exclusive = true\n")
    return d, record


def runs(record: Path) -> dict[str, list[tuple[float, float]]]:
    """Each work tree's runs as (start, end), from the indexer's record."""
    out: dict[str, list[tuple[float, float]]] = {}
    started: dict[str, list[float]] = {}
    for line in record.read_text().splitlines():
        what, where, at = json.loads(line)
        if what == "start":
            started.setdefault(where, []).append(at)
        else:  # runs that overlap end in any order: pair each end with the oldest start
            out.setdefault(where, []).append((started[where].pop(0), at))
    return out


def submit(d: Daemon, user: str, type: str = "sync", project: str = "proj",
           **params: Any) -> dict[str, Any]:
    return result_of(d, "jobs.submit", type=type, as_user=user, project_id=project, **params)


def repository(tmp_path: Path, d: Daemon, user: str, project: str = "proj") -> Path:
    upstream = make_upstream(tmp_path / f"upstream-{user}-{project}")
    return clone(upstream, d.repos / user / project)


def occupied(d: Daemon, tmp_path: Path) -> dict[str, Any]:
    """A running index job on a repository of its own, so that what is submitted next on
    the one worker stays queued."""
    repository(tmp_path, d, "blocker", "busy")
    job = submit(d, "blocker", "index", "busy")
    wait_for(lambda: result_of(d, "jobs.get", job_id=job["id"])["status"] == "running")
    return job


def test_a_submit_folds_only_into_the_same_work(make_daemon: Any, tmp_path: Path) -> None:
    d, _ = slow_daemon(make_daemon, tmp_path, seconds=3.0, workers=1)
    repo = repository(tmp_path, d, "alice")
    repository(tmp_path, d, "bob")
    git("remote", "add", "mirror", str(tmp_path / "upstream-alice-proj"), cwd=repo)
    elsewhere = clone(tmp_path / "upstream-alice-proj", d.repos / "other" / "proj")
    occupied(d, tmp_path)

    first = submit(d, "alice")
    assert first["deduplicated"] is False and first["options"]["repo_path"] == str(repo)
    # the same work, spelled as the template or as its path, and asking a full re-index
    again = submit(d, "alice", options={"full_reindex": True}, priority=5,
                   idempotency_key="again")
    named = submit(d, "alice", options={"repo_path": str(repo), "remote": "origin",
                                        "strategy": "ff-only"})
    assert (again["id"], named["id"]) == (first["id"], first["id"])
    assert again["deduplicated"] and named["deduplicated"]
    folded = result_of(d, "jobs.get", job_id=first["id"])
    assert folded["options"]["full_reindex"] is True and folded["priority"] == 5
    # the fold recorded the submit's key: a resend finds the job
    assert submit(d, "alice", idempotency_key="again")["id"] == first["id"]


    others = [submit(d, "alice", options={"branch": "main"}),
              submit(d, "alice", options={"strategy": "merge"}),
              submit(d, "alice", options={"remote": "mirror"}),
              submit(d, "alice", options={"repo_path": str(elsewhere)}),
              submit(d, "alice", "index"),
              submit(d, "bob")]
    assert all(not o["deduplicated"] for o in others)
    assert len({first["id"], *(o["id"] for o in others)}) == 7
    # a fold into a job that has a key of its own keeps the submit's key too: its resend
    # finds the job once it no longer waits (and no fold could find it)
    keyed = submit(d, "bob", idempotency_key="k1")
    assert keyed["id"] == others[-1]["id"] and keyed["deduplicated"]
    assert submit(d, "bob", idempotency_key="k2")["id"] == keyed["id"]
    result_of(d, "jobs.cancel", job_id=keyed["id"])
    for key in ("k1", "k2"):
        resent = submit(d, "bob", idempotency_key=key)
        assert (resent["id"], resent["status"]) == (keyed["id"], "cancelled"), key


def test_reject_names_the_queued_or_running_job_of_the_same_work(
        make_daemon: Any, tmp_path: Path) -> None:
    d, _ = slow_daemon(make_daemon, tmp_path, seconds=3.0, workers=1)
    repository(tmp_path, d, "alice")
    blocker = occupied(d, tmp_path)
    queued = submit(d, "alice")
    err = error_of(d, "jobs.submit", type="sync", as_user="alice", project_id="proj",
                   on_duplicate="reject")
    assert (err["code"], err["data"]["job_id"]) == (-32009, queued["id"]), err
    assert queued["id"] in err["message"] and "queued" in err["message"]
    # a client gets the same error, and the job it names
    with Client(socket=str(d.socket), as_user="alice") as client:
        with pytest.raises(errors.Conflict) as refused:
            client.submit("sync", "proj", on_duplicate="reject")
    assert (refused.value.job_id, refused.value.http_status) == (queued["id"], 409)
    # running counts as well for reject (a fold would queue behind it instead)
    err = error_of(d, "jobs.submit", type="index", as_user="blocker", project_id="busy",
                   on_duplicate="reject")
    assert (err["code"], err["data"]["job_id"]) == (-32009, blocker["id"]), err
    # another work is not refused; a bad value is named
    assert not submit(d, "alice", options={"branch": "main"}, on_duplicate="reject")[
        "deduplicated"]
    err = error_of(d, "jobs.submit", type="sync", as_user="alice", project_id="proj",
                   on_duplicate="drop")
    assert (err["code"], err["data"]["field"]) == (-32602, "on_duplicate"), err


def test_a_retry_of_work_already_queued_is_refused_naming_it(
        make_daemon: Any, tmp_path: Path) -> None:
    d, _ = slow_daemon(make_daemon, tmp_path, seconds=3.0, workers=1)
    repository(tmp_path, d, "alice")
    occupied(d, tmp_path)
    old = submit(d, "alice")
    result_of(d, "jobs.cancel", job_id=old["id"])
    new = submit(d, "alice")
    assert new["id"] != old["id"]
    err = error_of(d, "jobs.retry", job_id=old["id"])
    assert (err["code"], err["data"]["job_id"]) == (-32009, new["id"]), err
    assert result_of(d, "jobs.get", job_id=old["id"])["status"] == "cancelled"
    # once the other work is gone, the retry goes through
    result_of(d, "jobs.cancel", job_id=new["id"])
    assert result_of(d, "jobs.retry", job_id=old["id"])["status"] == "queued"


def test_repositories_of_the_same_folder_name_run_at_once(
        make_daemon: Any, tmp_path: Path) -> None:
    d, record = slow_daemon(make_daemon, tmp_path, seconds=1.0)
    alice, bob = repository(tmp_path, d, "alice"), repository(tmp_path, d, "bob")
    other = clone(tmp_path / "upstream-alice-proj", d.repos / "shared" / "proj")
    jobs = [submit(d, "alice"), submit(d, "bob"),
            # one user, one project id, two work trees of the same folder name
            submit(d, "alice", "index", options={"repo_path": str(other)})]
    for job in jobs:
        assert wait_terminal(d, job["id"])["status"] == "completed"
    spans = runs(record)
    assert set(spans) == {str(alice), str(bob), str(other)}
    starts = [s for (s, _), in spans.values()]
    ends = [e for (_, e), in spans.values()]
    assert max(starts) < min(ends), spans  # all three ran together


def test_one_work_tree_never_runs_two_jobs_whoever_owns_them(
        make_daemon: Any, tmp_path: Path) -> None:
    d, record = slow_daemon(make_daemon, tmp_path, seconds=0.2)
    shared = repository(tmp_path, d, "shared")
    golden = clone(tmp_path / "upstream-shared-proj", d.repos / "golden" / "org-repo")
    jobs = []
    for n in range(6):  # six owners, syncs and indexes, all on one work tree
        jobs.append(submit(d, f"user{n}", ("sync", "index")[n % 2], project=f"p{n}",
                           options={"repo_path": str(shared)}))
        time.sleep(0.05)
    # a [types] program's repository is the same work tree as a sync's of that path
    for n in range(2):
        jobs.append(submit(d, f"service{n}", "refresh", project=None,
                           options={"alias": "org-repo"}))
        jobs.append(submit(d, f"user{n}", options={"repo_path": str(golden)}, project="g"))
    for job in jobs:
        assert wait_terminal(d, job["id"], timeout=30)["status"] == "completed", job
    spans = runs(record)
    assert len(spans[str(golden)]) == 4, spans
    overlapping(sorted(spans[str(golden)]))
    spans = sorted(spans[str(shared)])
    assert len(spans) == 6, spans
    overlapping(spans)


def overlapping(spans: list[tuple[float, float]]) -> None:
    """Fail if any of the (start, end) spans, sorted, overlap."""
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert start >= end, spans


def test_a_sync_queued_before_paths_were_stored_waits_on_its_work_tree(
        make_daemon: Any, tmp_path: Path) -> None:
    d, record = slow_daemon(make_daemon, tmp_path, seconds=0.5)
    d.stop()
    repo = repository(tmp_path, d, "alice")
    # as an older jobd stored it: no repo_path, and no work key
    store = Store(d.db).open()
    try:
        old = store.submit_job(Job(id=str(uuid.uuid4()), type="sync", user_id="alice",
                                   project_id="proj", status=JobStatus.CREATED,
                                   created_at=0, updated_at=0, version=0,
                                   options={"branch": None, "remote": "origin",
                                            "full_reindex": False, "strategy": "ff-only"}),
                               actor="alice")[0]
    finally:
        store.close()
    d.start()
    new = submit(d, "alice", "index")
    for job_id in (old.id, new["id"]):
        assert wait_terminal(d, job_id)["status"] == "completed"
    spans = sorted(runs(record)[str(repo)])
    assert len(spans) == 2, spans
    overlapping(spans)


def test_jobctl_reject_duplicate_names_the_job_of_the_same_work(
        make_daemon: Any, tmp_path: Path) -> None:
    d, _ = slow_daemon(make_daemon, tmp_path, seconds=3.0, workers=1)
    repo = repository(tmp_path, d, "ops")
    occupied(d, tmp_path)
    jobctl = [str(Path(sys.executable).parent / "jobctl"), "--socket", str(d.socket),
              "--json", "sync", str(repo)]
    first = subprocess.run(jobctl, capture_output=True, text=True, timeout=30)
    assert first.returncode == 0, first.stderr
    queued = json.loads(first.stdout)["id"]
    folded = subprocess.run(jobctl, capture_output=True, text=True, timeout=30)
    assert json.loads(folded.stdout)["id"] == queued
    refused = subprocess.run([*jobctl, "--reject-duplicate"], capture_output=True, text=True,
                             timeout=30)
    assert refused.returncode != 0 and queued in refused.stderr, refused
