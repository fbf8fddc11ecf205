"""The state machine as data, and the wire shape of a job."""

from __future__ import annotations

import json
import os
import uuid

from jobd.models import TERMINAL, TRANSITIONS, Job, JobStatus, from_iso, iso, new_job_id, sources


def test_every_status_has_its_transitions() -> None:
    assert set(TRANSITIONS) == set(JobStatus)
    assert all(not TRANSITIONS[s] - {JobStatus.QUEUED} for s in TERMINAL)
    assert TRANSITIONS[JobStatus.COMPLETED] == frozenset()


def test_sources_is_the_inverse_of_transitions() -> None:
    for to in JobStatus:
        for frm in JobStatus:
            assert (frm in sources(to)) == (to in TRANSITIONS[frm])


def test_iso_has_microseconds_and_z_and_round_trips() -> None:
    assert iso(1_795_000_000_123_456) == "2026-11-18T11:06:40.123456Z"
    assert from_iso("2026-11-18T11:06:40.123456Z") == 1_795_000_000_123_456
    assert from_iso("2026-11-18T12:06:40.123456+01:00") == 1_795_000_000_123_456
    assert iso(None) is None


def test_job_wire_shape_is_json_and_has_every_spec_field() -> None:
    job = Job(id="0" * 8, type="sync", user_id="alice", project_id="p",
              status=JobStatus.QUEUED, created_at=1, updated_at=2, version=3, seq=9)
    out = job.to_dict()
    json.dumps(out)
    assert set(out) == {
        "id", "type", "user_id", "project_id", "status", "progress", "phase", "message",
        "priority", "options", "metadata", "result", "error", "attempts", "queue_position",
        "wait_reason", "cancel_requested", "version", "description", "timeout_s",
        "created_at", "started_at", "completed_at", "updated_at", "eta_s"}
    assert out["status"] == "queued" and "seq" not in out


def test_a_new_job_id_is_a_random_uuid_in_its_usual_text():
    ids = [new_job_id() for _ in range(3 * 256 + 5)]  # more than one read of randomness
    assert len(set(ids)) == len(ids)
    for job_id in ids:
        parsed = uuid.UUID(job_id)
        assert (parsed.version, parsed.variant) == (4, uuid.RFC_4122)
        assert str(parsed) == job_id
    # each of the 122 random bits takes both values somewhere in the sample
    bits = [int(uuid.UUID(i)) for i in ids]
    fixed = (0xF << 76) | (0x3 << 62)
    assert all(any(b >> n & 1 for b in bits) and not all(b >> n & 1 for b in bits)
               for n in range(128) if not fixed >> n & 1)


def test_a_forked_child_never_makes_the_ids_its_parent_makes_next():
    new_job_id()  # randomness read and mostly unused
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, to the parent
        os.close(read)
        os.write(write, "\n".join(new_job_id() for _ in range(8)).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        child = set(f.read().split())
    os.waitpid(pid, 0)
    assert len(child) == 8
    assert child.isdisjoint(new_job_id() for _ in range(8))
