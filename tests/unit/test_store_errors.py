"""What a client hears of each store error: the manager's one mapping (jobd_error)."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobd import errors
from jobd.manager import jobd_error
from jobd.store import (Corrupt, DuplicateId, JobNotFound, ReadOnly, StateConflict,
                        StorageFull, StoreClosed, StoreError)

DB = Path("/var/lib/jobd/jobd.db")


@pytest.mark.parametrize("error,kind,message,data", [
    (JobNotFound("j1"), errors.NotFound, "no job j1", {"field": "job_id"}),
    (StateConflict("j1", "failed", "running"), errors.Conflict,
     "job j1 is failed; it cannot become running", {"detail": {"status": "failed"}}),
    (DuplicateId("j1"), errors.Conflict, "a job with id j1 already exists", {"field": "id"}),
    (StorageFull(f"storage full: {DB}: database or disk is full; free space, then retry"),
     errors.Unavailable, f"storage full: {DB}: database or disk is full; free space, then retry",
     {}),
    (ReadOnly(f"storage read-only: {DB}: attempt to write a readonly database"),
     errors.Unavailable, f"storage read-only: {DB}: attempt to write a readonly database", {}),
    (StoreClosed(), errors.Unavailable, "the store is closed (jobd is shutting down)", {}),
    (Corrupt(f"{DB}: not a usable jobd database"), errors.Unavailable,
     f"storage unusable: {DB}: not a usable jobd database", {}),
], ids=lambda v: type(v).__name__ if isinstance(v, StoreError) else None)
def test_each_store_error_is_answered_by_its_meaning(error: StoreError, kind: type,
                                                     message: str, data: dict) -> None:
    err = jobd_error(error)
    assert type(err) is kind and err.message == message
    wire = err.data()
    assert wire["http_status"] == kind.http_status
    assert {k: v for k, v in wire.items() if k != "http_status"} == data
