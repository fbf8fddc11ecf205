"""An indexer that goes over the files twice, as CIDX does (SPEC §5 passes): a real sync
and a real index job run ``tests/fake_cidx_index.py``, which prints CIDX's exact
``--progress-json`` lines, with ``index_passes = 2`` and ``index_env``."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from conftest import FAST_CONFIG, Daemon, clone, make_upstream, result_of

FAKE_CIDX = Path(__file__).resolve().parent.parent / "fake_cidx_index.py"
#: the indexing phase of a sync: 40-95 % of the job; its first pass fills 40-67.5
INDEXING, HALF, END = 40.0, 67.5, 95.0
FILES = 12


def _config(passes: int) -> str:
    return FAST_CONFIG + f"""
[sync]
index_command = [{json.dumps(sys.executable)}, {json.dumps(str(FAKE_CIDX))}, "--progress-json"]
index_passes = {passes}
index_env = {{ VOYAGE_API_KEY = "secret-key" }}
"""


def _watch(d: Daemon, job_id: str, timeout: float = 30.0
           ) -> tuple[dict[str, Any], list[tuple[float, str | None]]]:
    """Follow a job through jobs.wait to its end: (the job, each (progress, message) seen)."""
    deadline = time.monotonic() + timeout
    job = result_of(d, "jobs.wait", job_id=job_id)
    seen = [(job["progress"], job["message"])]
    while job["status"] not in ("completed", "failed", "cancelled"):
        assert time.monotonic() < deadline, job
        job = result_of(d, "jobs.wait", job_id=job_id, after_version=job["version"],
                        timeout_s=5)
        seen.append((job["progress"], job["message"]))
    return job, seen


@pytest.fixture
def repo_daemon(make_daemon: Callable[..., Daemon], tmp_path: Path
                ) -> Callable[[int], tuple[Daemon, Path]]:
    def make(passes: int) -> tuple[Daemon, Path]:
        record = tmp_path / f"record-{passes}.json"
        d = make_daemon(config=_config(passes),
                        env={"FAKE_CIDX_DELAY": "0.03", "FAKE_CIDX_RECORD": str(record)})
        files = {f"src/m{k}.py": f"print({k})\n" for k in range(FILES - 2)}
        files.update({"README.md": "hi\n", "docs/\u00dcn\u00efcode.md": "\u00fc\n"})
        clone(make_upstream(tmp_path / f"upstream-{passes}", files),
              d.repos / "root" / "proj")
        return d, record
    return make


def test_a_sync_rises_through_both_passes_of_a_cidx_indexer(
        repo_daemon: Callable[[int], tuple[Daemon, Path]]) -> None:
    d, record = repo_daemon(2)
    job = result_of(d, "jobs.submit", type="sync", project_id="proj")
    done, seen = _watch(d, job["id"])

    assert done["status"] == "completed", done
    progress = [p for p, _ in seen]
    assert progress == sorted(progress), "progress went backwards"
    first = [(p, m) for p, m in seen if INDEXING < p <= HALF]
    second = [(p, m) for p, m in seen if HALF < p < END]
    # each pass moved the job through its own half of the indexing phase
    assert len({p for p, _ in first}) >= 3 and len({p for p, _ in second}) >= 3, seen
    assert all(m.startswith("pass 1/2: ") for _, m in first if m and "files" in m), first
    assert any(m and m.startswith("pass 2/2: ") and "\U0001f4ca" in m for _, m in second), second
    # the escapes were read: the emoji and the file name as they are
    assert any(m and "\U0001f50d" in m for _, m in first)
    assert any(m and "docs/\u00dcn\u00efcode.md" in m for _, m in seen)
    assert done["result"]["files_indexed"] == FILES
    assert done["result"]["index"]["passes"] == 2
    assert json.loads(record.read_text()) == {"key": "secret-key", "argv": ["--progress-json"]}


def test_an_index_job_told_one_pass_names_the_second_and_never_goes_back(
        repo_daemon: Callable[[int], tuple[Daemon, Path]]) -> None:
    d, _ = repo_daemon(1)
    job = result_of(d, "jobs.submit", type="index", project_id="proj")
    done, seen = _watch(d, job["id"])
    assert done["status"] == "completed", done
    progress = [p for p, _ in seen]
    assert progress == sorted(progress)
    assert any(m and m.startswith("pass 2: ") for _, m in seen), seen
    assert done["result"]["files_indexed"] == FILES
