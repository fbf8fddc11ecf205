"""A job context for handler tests: the engine's interface on real subprocesses.

It runs programs with ``jobd.process.run`` (own process group, output in a real job
log, progress parsed) and records what a handler reports — phases, progress,
checkpoints and every argv — so tests can assert on it. ``cancel_when`` lets a test
cancel the job at the moment a given command starts.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import structlog

from jobd import joblogs, process
from jobd.config import Config
from jobd.handlers import Cancelled, JobFailed
from jobd.models import Job, JobStatus
from jobd.store import Store


def make_job(type_: str, options: dict[str, Any], *, user_id: str = "alice",
             project_id: str | None = "proj") -> Job:
    return Job(id=str(uuid.uuid4()), type=type_, user_id=user_id, project_id=project_id,
               status=JobStatus.RUNNING, created_at=0, updated_at=0, version=1,
               options=options)


@dataclasses.dataclass
class Report:
    phase: str | None
    percent: float | None
    message: str | None


class Context:
    """Implements ``jobd.handlers.JobContext`` for one attempt of one job."""

    def __init__(self, job: Job, config: Config, *,
                 checkpoints: dict[str, dict[str, Any]] | None = None,
                 cancel_when: Callable[[list[str]], bool] | None = None,
                 timeout: float = 60.0) -> None:
        self.job = job
        self.config = config
        self.log = structlog.get_logger().bind(job_id=job.id, user_id=job.user_id)
        self.joblog = joblogs.JobLog(joblogs.path(config.log_dir, job.id),
                                     config.execution.max_log_bytes)
        self.stop = threading.Event()
        self.deadline = time.monotonic() + timeout
        self.checkpoints = dict(checkpoints or {})
        self.cancel_when = cancel_when
        self.phase: str | None = None
        self.reports: list[Report] = []
        self.phases: list[str] = []
        self.saved: list[str] = []
        self.argvs: list[list[str]] = []
        # a SQLite jobd's manifests: files under the state folder (no database is opened)
        self.manifests = Store(config.db, state_dir=config.state_dir)

    @property
    def cancelled(self) -> bool:
        return self.stop.is_set()

    @property
    def progress(self) -> float:
        """The job's progress as the engine would show it: never going backwards."""
        return max((r.percent for r in self.reports if r.percent is not None), default=0.0)

    def set_phase(self, phase: str, message: str | None = None) -> None:
        self.phase = phase
        self.phases.append(phase)
        self.reports.append(Report(phase, None, message))

    def set_progress(self, percent: float, message: str | None = None) -> None:
        assert 0.0 <= percent <= 100.0, percent
        self.reports.append(Report(self.phase, percent, message))

    def set_message(self, message: str) -> None:
        self.reports.append(Report(self.phase, None, message))

    def save_checkpoint(self, phase: str, data: dict[str, Any]) -> None:
        self.checkpoints[phase] = data
        self.saved.append(phase)

    def load_checkpoints(self) -> dict[str, dict[str, Any]]:
        return dict(self.checkpoints)

    def load_manifest(self) -> str | None:
        return self.manifests.load_manifest(self.job.user_id, self.job.project_id or "")

    def save_manifest(self, document: str) -> None:
        self.manifests.save_manifest(self.job.id, self.job.user_id, self.job.project_id or "",
                                     document)

    def run(self, argv: list[str], *, cwd: str | None = None, env: dict[str, str] | None = None,
            on_progress: Callable[[float | None, str | None], None] | None = None,
            capture: bool = False, check: bool = True,
            whole: bool = False) -> process.Completed:
        self.argvs.append(list(argv))
        if self.cancel_when is not None and self.cancel_when(list(argv)):
            self.stop.set()
        done = process.run(argv, cwd=cwd, env=env, log=self.joblog, stop=self.stop,
                           deadline=self.deadline, grace=self.config.execution.cancel_grace,
                           on_progress=on_progress, capture=capture)
        if done.cancelled or done.timed_out:
            raise Cancelled(f"{argv[0]} was stopped")
        if check and done.returncode != 0:
            raise JobFailed(f"{argv[0]} exited with {done.returncode}: {self.last_line()}")
        return done

    def last_line(self) -> str:
        lines = [ln for ln in self.log_text().splitlines() if ln.strip()]
        return lines[-1].strip() if lines else ""

    def log_text(self) -> str:
        path = Path(self.joblog.path)  # created by the first write only
        return path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""

    def ran(self, word: str) -> bool:
        """Whether any git (or other) command with ``word`` among its arguments ran."""
        return any(word in argv for argv in self.argvs)
