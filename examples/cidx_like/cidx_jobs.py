"""JobdJobManager: CIDX's ``BackgroundJobManager`` API, with jobd keeping the jobs.

A CIDX server keeps its routes and its callers: ``submit_job``, ``get_job_status``,
``list_jobs`` and ``cancel_job`` take and return what CIDX's own do (statuses
``pending``/``running``/..., fields ``job_id``, ``operation_type``, ``username``, ...).
Underneath, every call goes to jobd through one ``AsyncClientPool`` as jobd's *service*
account, on a view of the pool acting for the web user (``pool.acting(username,
as_admin=...)``, ``as_admin`` for CIDX's admins), so jobd decides whose jobs each one
sees. docs/cidx.md has the tables this module implements.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from jobd.client import (AsyncClient, AsyncClientPool, Conflict, Forbidden, InvalidParams,
                         NotFound)

#: jobd's status -> CIDX's (a stored jobd job is never ``created``; SPEC §2)
STATUS = {"created": "pending", "queued": "pending", "running": "running",
          "completed": "completed", "failed": "failed", "cancelled": "cancelled"}
#: CIDX's status filter -> jobd's
JOBD_STATUS = {"pending": "queued", "running": "running", "completed": "completed",
               "failed": "failed", "cancelled": "cancelled"}
#: CIDX's page size cap (``MAX_PAGE_SIZE``)
MAX_PAGE_SIZE = 50


class DuplicateJobError(Exception):
    """CIDX's: the same operation already waits or runs for this repository (HTTP 409)."""

    def __init__(self, operation_type: str, repo_alias: str | None, existing_job_id: str | None):
        self.existing_job_id = existing_job_id
        super().__init__(f"A '{operation_type}' job is already running for repository "
                         f"'{repo_alias}' (job_id: {existing_job_id}). Please wait for it "
                         "to complete.")


@dataclasses.dataclass(frozen=True)
class Layout:
    """CIDX's folders under its data dir, raw (not jobd's encoded segments)."""

    data_dir: Path

    def golden(self, alias: str) -> str:
        return str(self.data_dir / "golden-repos" / alias)

    def activated(self, username: str, user_alias: str) -> str:
        return str(self.data_dir / "activated-repos" / username / user_alias)


#: what one CIDX operation is in jobd: (jobd type, project_id, options), from
#: (layout, username, repo_alias, the operation's parameters)
Operation = Callable[[Layout, str, str, dict[str, Any]], tuple[str, str | None, dict[str, Any]]]


def _given(params: dict[str, Any], *names: str) -> dict[str, Any]:
    return {name: params[name] for name in names if params.get(name) is not None}


OPERATIONS: dict[str, Operation] = {
    "add_golden_repo": lambda lay, user, alias, p: (
        "add_golden_repo", None, {"alias": alias, "repo_url": p["repo_url"],
                                  **_given(p, "branch")}),
    "global_repo_refresh": lambda lay, user, alias, p: (
        "refresh_golden_repo", None, {"alias": alias}),
    "remove_golden_repo": lambda lay, user, alias, p: (
        "remove_golden_repo", None, {"alias": alias}),
    # a branch change is a sync of the golden work tree onto another branch
    "change_branch": lambda lay, user, alias, p: (
        "sync", alias, {"repo_path": lay.golden(alias), "branch": p["branch"],
                       "remote": "origin"}),
    # the activated tree is the job's work tree: exclusive with the syncs of that tree
    "activate_repository": lambda lay, user, alias, p: (
        "activate_repository", alias, {"repo_path": lay.activated(user, alias),
                                       "golden_alias": p["golden_alias"],
                                       **_given(p, "branch")}),
    "deactivate_repository": lambda lay, user, alias, p: (
        "deactivate_repository", alias, {"repo_path": lay.activated(user, alias)}),
    "sync_repository": lambda lay, user, alias, p: (
        "sync", alias, {"repo_path": lay.activated(user, alias),
                        "full_reindex": bool(p.get("full_reindex"))}),
    "reindex": lambda lay, user, alias, p: (
        "index", alias, {"repo_path": lay.activated(user, alias),
                         "full_reindex": bool(p.get("clear"))}),
}


def _time(value: str | None) -> str | None:
    """jobd's ``...Z`` as CIDX's ``datetime.isoformat()`` writes it (``+00:00``)."""
    return value[:-1] + "+00:00" if value and value.endswith("Z") else value


def to_cidx(job: dict[str, Any]) -> dict[str, Any]:
    """A jobd job (SPEC §2) in the shape of CIDX's ``get_job_status``."""
    meta = job.get("metadata") or {}
    result = job.get("result")
    status = STATUS[job["status"]]
    if status == "completed" and isinstance(result, dict) and result.get("partial") is True:
        status = "completed_partial"
    return {
        "job_id": job["id"],
        "operation_type": meta.get("operation_type", job["type"]),
        "status": status,
        "created_at": _time(job["created_at"]),
        "started_at": _time(job["started_at"]),
        "completed_at": _time(job["completed_at"]),
        "progress": int(job["progress"]),
        "result": result,
        "error": job["error"],
        "username": job["user_id"],
        "repo_alias": meta.get("repo_alias", job["project_id"]),
        "current_phase": job["phase"],
        "phase_detail": job["message"],
        "actor_username": meta.get("actor_username", job["user_id"]),
        # jobd's, new to CIDX: where a pending job stands and why it waits
        "queue_position": job["queue_position"],
        "wait_reason": job["wait_reason"],
    }


class JobdJobManager:
    """CIDX's ``BackgroundJobManager`` methods over jobd."""

    def __init__(self, layout: Layout, socket: str | os.PathLike[str] | None = None,
                 pool_size: int = 8) -> None:
        self.layout = layout
        self.socket = socket
        self.jobd = AsyncClientPool(pool_size, socket=socket)

    async def submit_job(self, operation_type: str, *, submitter_username: str,
                         repo_alias: str, is_admin: bool = False,
                         actor_username: str | None = None, **params: Any) -> str:
        """The new job's id; DuplicateJobError when the same work already waits or runs."""
        if operation_type not in OPERATIONS:
            raise InvalidParams(f"unknown operation {operation_type!r}", field="operation_type")
        type_, project_id, options = OPERATIONS[operation_type](
            self.layout, submitter_username, repo_alias, params)
        metadata = {"operation_type": operation_type, "repo_alias": repo_alias,
                    "actor_username": actor_username or submitter_username}
        try:
            job = await self.jobd.acting(submitter_username, as_admin=is_admin).submit(
                type_, project_id, options=options, metadata=metadata, on_duplicate="reject")
        except Conflict as e:
            raise DuplicateJobError(operation_type, repo_alias, e.job_id) from None
        return str(job["id"])

    async def get_job_status(self, job_id: str, username: str,
                             is_admin: bool = False) -> dict[str, Any] | None:
        """The job, or None when there is none or it is not the user's (as CIDX: one 404)."""
        try:
            job = await self.jobd.acting(username, as_admin=is_admin).get(job_id)
        except (NotFound, Forbidden, InvalidParams):
            return None
        return to_cidx(job)

    async def list_jobs(self, username: str, status_filter: str | None = None,
                        limit: int = 10, offset: int = 0,
                        is_admin: bool = False) -> dict[str, Any]:
        """``{jobs, total, limit, offset}``, newest first; admins see every user's jobs."""
        limit = min(max(limit, 1), MAX_PAGE_SIZE)
        status = None
        if status_filter is not None:
            if status_filter not in JOBD_STATUS:
                raise InvalidParams(f"unknown status {status_filter!r} (one of "
                                    f"{', '.join(JOBD_STATUS)})", field="status")
            status = JOBD_STATUS[status_filter]
        jobd = self.jobd.acting(username, as_admin=is_admin)
        page = await jobd.list(status=status, limit=limit, offset=offset, with_total=True)
        return {"jobs": [to_cidx(j) for j in page["jobs"]], "total": page["total"],
                "limit": limit, "offset": offset}

    async def cancel_job(self, job_id: str, username: str,
                         is_admin: bool = False) -> dict[str, Any]:
        """CIDX's ``{success, message}``; a running job stops within jobd's cancel_grace."""
        jobd = self.jobd.acting(username, as_admin=is_admin)
        try:
            await jobd.cancel(job_id)
        except (NotFound, Forbidden, InvalidParams):
            return {"success": False, "message": "Job not found or not authorized"}
        except Conflict:
            job = await jobd.get(job_id)
            return {"success": False,
                    "message": f"Cannot cancel job in {STATUS[job['status']]} status"}
        return {"success": True, "message": "Job cancelled successfully"}

    async def follow_job(self, job_id: str, username: str,
                         is_admin: bool = False) -> AsyncIterator[dict[str, Any]]:
        """The job at every change until it ends (jobd's ``watch``: long polls by version).

        A follower holds a long poll open for up to 30 s at a time, so it gets its own
        connection: on the pool (``pool.acting(...).watch``) each poll would hold one of
        the pool's few connections, and a handful of followers would stall every call.
        """
        async with AsyncClient(self.socket, as_user=username, as_admin=is_admin) as own:
            async for job in own.watch(job_id):
                yield to_cidx(job)

    async def close(self) -> None:
        await self.jobd.close()
