"""The rules a submit and a retry must pass, in one place above the store.

SPEC §4's order for a submit: its idempotency key first (a resend gets its job, even in
maintenance), then the maintenance refusal, then same-work dedupe (a queued job of an
exclusive type with the same user, type, resolved repository path and options but
``full_reindex`` takes the submit in, keeping a ``full_reindex`` asked by either and the
higher priority; with ``on_duplicate: "reject"`` a queued or running one refuses it),
then the queue limits. A retry passes the maintenance refusal, the same-work refusal (a
queued or running job of its work) and the per-user limit.
The manager builds a ``Rules`` from the config in force; the store runs it inside the
writer's transaction, against a ``View`` of what is stored, so that no two writes can
pass a limit between them. Rules may raise ``JobdError``s: they speak to the client.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any, Iterable, Protocol

from jobd import jsonenc
from jobd.config import Config
from jobd.errors import Conflict, LimitExceeded, Unavailable
from jobd.models import Job

__all__ = ["Rules", "View"]

#: a work key's text: compact, keys sorted, ASCII (one encoder made once: ``jobd.jsonenc``)
_work_text = jsonenc.encoder(separators=(",", ":"), sort_keys=True)


class View(Protocol):
    """What the rules may see and do inside the writer's transaction."""

    def by_idempotency_key(self, user_id: str, key: str) -> Job | None:
        """The job ``user_id`` first submitted with ``key``."""

    def same_work(self, job: Job, work: str, *, running: bool) -> Job | None:
        """The oldest queued (``running``: or running) job other than ``job`` of its user
        whose work key is ``work``."""

    def queued(self, user_id: str | None = None) -> int:
        """How many jobs ``user_id`` (None: everyone) has queued."""

    def fold(self, found: Job, job: Job) -> Job:
        """Fold the submit ``job`` into the queued ``found`` (``fold_options``, the higher
        priority, ``job``'s idempotency key); the job as stored now."""


def fold_options(found: Job, job: Job) -> dict[str, Any]:
    """``found``'s options once ``job`` is folded into it: a ``full_reindex`` asked by
    either is kept (the rest is equal: it is the same work)."""
    if "full_reindex" not in found.options:  # a [types] program's options have none
        return dict(found.options)
    return dict(found.options, full_reindex=bool(found.options["full_reindex"]
                                                 or job.options.get("full_reindex")))


@dataclasses.dataclass(frozen=True)
class Rules:
    #: the job types whose same work is folded into a queued job (the exclusive handlers')
    exclusive: frozenset[str] = frozenset()
    max_queued_per_user: int | None = None
    max_queued_total: int | None = None
    #: while maintenance is on: what a new submit or a retry is refused with
    refusal: Unavailable | None = None
    #: a submit's ``on_duplicate: "reject"``: same work queued or running refuses it
    reject_duplicates: bool = False

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
        work = self.work(job)
        if work is not None:
            found = view.same_work(job, work, running=self.reject_duplicates)
            if found is not None:
                if self.reject_duplicates:
                    raise _duplicate(found, "this submit is refused (on_duplicate \"reject\")")
                return view.fold(found, job)
        per_user, total = self.max_queued_per_user, self.max_queued_total
        if per_user is not None and view.queued(job.user_id) >= per_user:
            raise LimitExceeded(f"user {job.user_id} already has {view.queued(job.user_id)} "
                                f"queued jobs (max_queued_per_user = {per_user})")
        if total is not None and view.queued() >= total:
            raise LimitExceeded(f"the queue is full ({total} jobs queued; max_queued_total)")
        return None

    def retry(self, jobs: Iterable[Job], view: View, *, fold: bool = False) -> list[Job]:
        """The jobs of ``jobs`` to queue again; refused while maintenance is on, or
        (LimitExceeded) when they would take a user past ``max_queued_per_user`` or the
        queue past ``max_queued_total``: all of them go back to the queue, or none.

        A job whose work is already queued or running is a Conflict naming that job;
        with ``fold`` (a retry by filter) it is left out instead, and so is one of the
        work of a newer job of ``jobs``: of several matched jobs of one work the newest
        goes back, once (its own ``full_reindex`` and priority: the others' are not
        carried over, as a submit's fold would).
        """
        if self.refusal is not None:
            raise self.refusal
        jobs = list(jobs)
        retried: dict[tuple[str, str], Job] = {}
        folded: set[str] = set()
        for job in reversed(jobs) if fold else jobs:
            work = self.work(job)
            if work is None:
                continue
            found = retried.get((job.user_id, work)) or view.same_work(job, work, running=True)
            if found is not None:
                if not fold:
                    raise _duplicate(found, f"job {job.id} can't be retried")
                folded.add(job.id)
                continue
            retried[(job.user_id, work)] = job
        jobs = [job for job in jobs if job.id not in folded]
        per_user, total = self.max_queued_per_user, self.max_queued_total
        if per_user is not None:
            for user_id, count in Counter(job.user_id for job in jobs).items():
                queued = view.queued(user_id)
                if queued + count > per_user:
                    raise LimitExceeded(
                        f"user {user_id} already has {queued} queued jobs; retrying {count} "
                        f"more would pass max_queued_per_user ({per_user}); retry fewer, "
                        f"or later")
        if total is not None and jobs and view.queued() + len(jobs) > total:
            raise LimitExceeded(
                f"the queue is full ({view.queued()} jobs queued); retrying {len(jobs)} more "
                f"would pass max_queued_total ({total}); retry fewer, or later")
        return jobs

    def work(self, job: Job) -> str | None:
        """``job``'s work key, or None when its type folds nothing (not exclusive, or no
        repository): what two jobs of the same user are the same work by."""
        if job.type not in self.exclusive or "repo_path" not in job.options:
            return None
        # the type, the resolved path and the other options with the defaults ``validate``
        # filled in, as one text (ASCII: an option's lone surrogate is stored escaped)
        options = {k: v for k, v in job.options.items() if k != "full_reindex"}
        return _work_text([job.type, options])


def _duplicate(found: Job, refused: str) -> Conflict:
    """``found``, queued or running, is the same work as what ``refused`` says."""
    return Conflict(f"job {found.id} of the same work is already {found.status}: "
                    f"{refused}; wait for that job to end, or cancel it", job_id=found.id)
