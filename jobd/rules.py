"""The rules a submit and a retry must pass, in one place above the store.

SPEC §4's order for a submit: its idempotency key first (a resend gets its job, even in
maintenance), then the maintenance refusal, then same-work dedupe (a queued job of an
exclusive type with the same user, repository and type takes the submit in, keeping a
``full_reindex`` asked by either), then the queue limits. A retry passes the maintenance
refusal and the per-user limit.
The manager builds a ``Rules`` from the config in force; the store runs it inside the
writer's transaction, against a ``View`` of what is stored, so that no two writes can
pass a limit between them. Rules may raise ``JobdError``s: they speak to the client.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any, Iterable, Protocol

from jobd.config import Config
from jobd.errors import LimitExceeded, Unavailable
from jobd.models import Job

__all__ = ["Rules", "View"]


class View(Protocol):
    """What the rules may see and do inside the writer's transaction."""

    def by_idempotency_key(self, user_id: str, key: str) -> Job | None:
        """The job ``user_id`` first submitted with ``key``."""

    def queued_work(self, job: Job) -> Job | None:
        """The oldest queued job of ``job``'s user, repository and type."""

    def queued(self, user_id: str | None = None) -> int:
        """How many jobs ``user_id`` (None: everyone) has queued."""

    def fold(self, found: Job, options: dict[str, Any]) -> Job:
        """Store ``options`` as the queued job ``found``'s; the job as stored now."""


@dataclasses.dataclass(frozen=True)
class Rules:
    #: the job types whose same work is folded into a queued job (the exclusive handlers')
    exclusive: frozenset[str] = frozenset()
    max_queued_per_user: int | None = None
    max_queued_total: int | None = None
    #: while maintenance is on: what a new submit or a retry is refused with
    refusal: Unavailable | None = None

    @classmethod
    def of(cls, config: Config, *, exclusive: Iterable[str],
           refusal: Unavailable | None) -> Rules:
        ex = config.execution
        return cls(frozenset(exclusive), ex.max_queued_per_user, ex.max_queued_total, refusal)

    def admit(self, job: Job, view: View) -> Job | None:
        """The stored job a submit of ``job`` comes down to, or None: store it as new."""
        if job.idempotency_key is not None:
            found = view.by_idempotency_key(job.user_id, job.idempotency_key)
            if found is not None:
                return found
        if self.refusal is not None:
            raise self.refusal
        if job.type in self.exclusive and job.project_id is not None:
            found = view.queued_work(job)
            if found is not None:
                if job.options.get("full_reindex") and not found.options.get("full_reindex"):
                    found = view.fold(found, dict(found.options, full_reindex=True))
                return found
        per_user, total = self.max_queued_per_user, self.max_queued_total
        if per_user is not None and view.queued(job.user_id) >= per_user:
            raise LimitExceeded(f"user {job.user_id} already has {view.queued(job.user_id)} "
                                f"queued jobs (max_queued_per_user = {per_user})")
        if total is not None and view.queued() >= total:
            raise LimitExceeded(f"the queue is full ({total} jobs queued; max_queued_total)")
        return None

    def retry(self, jobs: Iterable[Job], view: View) -> None:
        """Refuse a retry of ``jobs`` while maintenance is on, or (LimitExceeded) one that
        would take a user past ``max_queued_per_user``: all of them go back to the queue,
        or none."""
        if self.refusal is not None:
            raise self.refusal
        per_user = self.max_queued_per_user
        if per_user is None:
            return
        for user_id, count in Counter(job.user_id for job in jobs).items():
            queued = view.queued(user_id)
            if queued + count > per_user:
                raise LimitExceeded(
                    f"user {user_id} already has {queued} queued jobs; retrying {count} more "
                    f"would pass max_queued_per_user ({per_user}); retry fewer, or later")
