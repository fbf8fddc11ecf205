"""A CIDX-like web server: CIDX's job routes, answered through ``JobdJobManager``.

Standard library only (asyncio; one request per connection). The routes and answers
are CIDX's own (``server/routers/inline_jobs.py``, ``inline_repos.py``,
``inline_admin_ops.py``), and so are its HTTP statuses: 404 for a job that is not the
caller's, 403/400 from ``DELETE /api/jobs/{id}``, 409 for a duplicate. The web user is
named by the ``X-Cidx-User`` header (``X-Cidx-Admin: 1`` for CIDX's admins): a stand-in
for CIDX's own login check (JWT, sessions), which a real server keeps.

    python server.py --data-dir /srv/cidx/data [--socket /run/jobd/jobd.sock]
                     [--listen 127.0.0.1:8090]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from cidx_jobs import DuplicateJobError, JobdJobManager, Layout
from jobd.client import JobdError

_REASONS = {200: "OK", 202: "Accepted", 400: "Bad Request", 401: "Unauthorized",
            403: "Forbidden", 404: "Not Found", 409: "Conflict", 422: "Unprocessable Entity",
            429: "Too Many Requests", 500: "Internal Server Error",
            503: "Service Unavailable"}


class HttpError(Exception):
    def __init__(self, status: int, detail: str) -> None:
        self.status, self.detail = status, detail


class CidxLike:
    def __init__(self, jobs: JobdJobManager) -> None:
        self.jobs = jobs

    async def route(self, method: str, path: str, query: dict[str, str], body: dict[str, Any],
                    user: str, admin: bool) -> tuple[int, Any]:
        jobs = self.jobs
        if m := re.fullmatch(r"/api/jobs/([^/]+)", path):
            if method == "GET":
                job = await jobs.get_job_status(m[1], user, is_admin=admin)
                if job is None:
                    raise HttpError(404, f"Job not found: {m[1]}")
                return 200, job
            if method == "DELETE":
                answer = await jobs.cancel_job(m[1], user, is_admin=admin)
                if not answer["success"]:
                    raise HttpError(403 if "not found" in answer["message"] else 400,
                                    answer["message"])
                return 200, answer
        if path == "/api/jobs" and method == "GET":
            return 200, await jobs.list_jobs(user, query.get("status"),
                                             int(query.get("limit", 10)),
                                             max(int(query.get("offset", 0)), 0),
                                             is_admin=admin)
        if path == "/api/repos/activate" and method == "POST":
            alias = body.get("user_alias") or body["golden_repo_alias"]
            job_id = await jobs.submit_job("activate_repository", submitter_username=user,
                                           repo_alias=alias,
                                           golden_alias=body["golden_repo_alias"],
                                           branch=body.get("branch_name"))
            return 202, {"job_id": job_id, "message": f"Activating '{alias}'"}
        if (m := re.fullmatch(r"/api/repos/([^/]+)", path)) and method == "DELETE":
            alias = unquote(m[1])  # a user alias may hold "/": org%2Frepo
            job_id = await jobs.submit_job("deactivate_repository", submitter_username=user,
                                           repo_alias=alias)
            return 202, {"job_id": job_id, "message": f"Deactivating '{alias}'"}
        if path == "/api/repos/sync" and method == "POST":
            alias = body["repository_alias"]
            job_id = await jobs.submit_job("sync_repository", submitter_username=user,
                                           repo_alias=alias,
                                           full_reindex=body.get("full_reindex", False))
            return 202, {"job_id": job_id, "status": "pending", "repository_id": alias}
        if m := re.fullmatch(r"/api/admin/golden-repos(?:/([^/]+)(?:/(refresh|change-branch))?)?",
                             path):
            if not admin:
                raise HttpError(403, "Admin access required")
            alias, action = m[1] or body.get("alias"), m[2]
            operation = {(None, "POST"): "add_golden_repo", ("refresh", "POST"):
                         "global_repo_refresh", ("change-branch", "POST"): "change_branch",
                         (None, "DELETE"): "remove_golden_repo"}.get((action, method))
            if operation and alias:
                job_id = await jobs.submit_job(operation, submitter_username=user,
                                               repo_alias=alias, is_admin=True,
                                               repo_url=body.get("repo_url"),
                                               branch=body.get("branch"))
                return 202, {"job_id": job_id, "message": f"{operation} of '{alias}' started"}
        raise HttpError(404, "Not Found")

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            method, target, _ = (await reader.readline()).decode("latin-1").split(" ", 2)
            headers = {}
            while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            raw = await reader.readexactly(int(headers.get("content-length", 0)))
            url = urlsplit(target)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            user, admin = headers.get("x-cidx-user"), headers.get("x-cidx-admin") == "1"
            if stream := re.fullmatch(r"/api/jobs/([^/]+)/stream", url.path):
                return await self.stream(writer, stream[1], user, admin)
            try:
                if not user:
                    raise HttpError(401, "Not authenticated")
                body = json.loads(raw) if raw else {}
                status, answer = await self.route(method, url.path, query, body, user, admin)
            except HttpError as e:
                status, answer = e.status, {"detail": e.detail}
            except DuplicateJobError as e:
                status, answer = 409, {"detail": str(e)}
            except JobdError as e:  # each carries the HTTP status of SPEC §4's table
                status, answer = e.http_status, {"detail": e.message}
            except (KeyError, TypeError, ValueError) as e:  # a missing or malformed field
                status, answer = 422, {"detail": f"bad request: {e}"}
            self.head(writer, status, len(data := json.dumps(answer).encode()))
            writer.write(data)
            await writer.drain()
        finally:
            writer.close()

    async def stream(self, writer: asyncio.StreamWriter, job_id: str, user: str | None,
                     admin: bool) -> None:
        """The job as one JSON line at every change until it ends (not a CIDX route: what
        its UI could follow instead of polling)."""
        if not user or await self.jobs.get_job_status(job_id, user, is_admin=admin) is None:
            self.head(writer, 404, 0)
            return
        self.head(writer, 200, None, "application/x-ndjson")
        async for job in self.jobs.follow_job(job_id, user, is_admin=admin):
            writer.write(json.dumps(job).encode() + b"\n")
            await writer.drain()

    @staticmethod
    def head(writer: asyncio.StreamWriter, status: int, length: int | None,
             kind: str = "application/json") -> None:
        size = "" if length is None else f"Content-Length: {length}\r\n"
        writer.write(f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\nContent-Type: {kind}\r\n"
                     f"{size}Connection: close\r\n\r\n".encode())


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, type=Path)
    parser.add_argument("--socket", help="jobd's socket (default: as jobctl finds it)")
    parser.add_argument("--listen", default="127.0.0.1:8090")
    args = parser.parse_args()
    host, port = args.listen.rsplit(":", 1)
    jobs = JobdJobManager(Layout(args.data_dir), socket=args.socket)
    server = await asyncio.start_server(CidxLike(jobs).serve, host, int(port))
    print(f"listening on http://{host}:{server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
