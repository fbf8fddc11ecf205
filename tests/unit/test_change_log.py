"""The change log of jobs.changes (``jobd.changes``): its order, its bound, its cursors,
and the waiters it wakes, on a clock the test passes."""

from __future__ import annotations

import asyncio
import base64
import threading
from typing import Any

import pytest

from jobd.changes import REWIND_US, ChangeLog, Position
from jobd.errors import InvalidParams
from jobd.models import Job, JobStatus

EVERYONE: dict[str, Any] = dict(statuses=[], types=[], user_id=None, project_id=None,
                                created_after=None, created_before=None, id_prefix=None)


def job(n: int, user: str = "alice", status: JobStatus = JobStatus.QUEUED) -> Job:
    return Job(id=f"{n:08x}-0000-4000-8000-000000000000", seq=n, type="noop", user_id=user,
               project_id=None, status=status, created_at=n, updated_at=n, version=n)


def test_each_job_comes_once_at_its_latest_change_in_order() -> None:
    log = ChangeLog(clock=iter(range(100, 200)).__next__)
    for n in (1, 2, 1, 3):
        log.record(job(n))
    latest, head, head_us = log.since(0, EVERYONE)  # type: ignore[misc]
    assert [(counter, c.seq) for counter, c in latest] == [(2, 2), (3, 1), (4, 3)]
    assert (head, head_us) == (4, 103)
    # a filter looks at the latest change only: job 1 is running now
    log.record(job(1, status=JobStatus.RUNNING))
    queued = dict(EVERYONE, statuses=["queued"])
    assert [c.seq for _, c in log.since(0, queued)[0]] == [2, 3]  # type: ignore[index]
    assert log.since(5, EVERYONE) == ([], 5, 104)


def test_a_cursor_older_than_the_log_or_of_another_start_reads_the_database_by_time() -> None:
    log = ChangeLog(keep=3, clock=iter(range(1000, 2000)).__next__)
    log.record(job(1))
    early = log.cursor(1, 1000)
    assert log.position(early) == Position(counter=1, at_us=1000)
    for n in range(2, 8):
        log.record(job(n))
    assert log.since(1, EVERYONE) is None  # trimmed to the last 3 once it held 6
    assert log.position(early) == Position(at_us=1000 - REWIND_US)
    restarted = ChangeLog()
    assert restarted.position(early) == Position(at_us=1000 - REWIND_US)
    assert log.position(log.database_cursor(1500, 9)) == Position(at_us=1500, seq=9)
    assert log.position(None) == Position(snapshot=True)


@pytest.mark.parametrize("cursor", [
    "", "!!", 5, base64.urlsafe_b64encode(b"c1.nothex.1.1").decode(),
    base64.urlsafe_b64encode(b"c1.0123456789abcdef.x.1").decode(),
    base64.urlsafe_b64encode(b"d1.1.2.3").decode(),
    base64.urlsafe_b64encode(b"d1." + b"9" * 30 + b".1").decode(),
])
def test_a_cursor_jobd_did_not_give_out_is_refused_naming_after(cursor: Any) -> None:
    with pytest.raises(InvalidParams) as e:
        ChangeLog().position(cursor)
    assert e.value.field == "after"


def test_a_change_wakes_the_waiters_of_its_user_and_the_unscoped_ones_only() -> None:
    async def main() -> tuple[bool, bool, bool]:
        log = ChangeLog()
        alice = log.subscribe(dict(EVERYONE, user_id="alice"))
        bob = log.subscribe(dict(EVERYONE, user_id="bob"))
        everyone = log.subscribe(EVERYONE)
        writer = threading.Thread(target=log.record, args=(job(1, "alice"),))
        writer.start()
        writer.join()
        await asyncio.sleep(0.01)
        return alice.future.done(), bob.future.done(), everyone.future.done()

    assert asyncio.run(main()) == (True, False, True)
