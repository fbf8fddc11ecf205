-- Versions from one logged sequence (SPEC §11), so they never go down: not across nodes
-- whose clocks differ, not after a PostgreSQL crash. Each write transaction takes one
-- value when it begins (its floor); every change of a job stores the greatest of the
-- job's version + 1, that floor, and its live progress's version + 1 (a job's live
-- progress, in the unlogged job_progress, takes its own value of the sequence when its
-- node reports it). The sequence starts above every version given so far, which were
-- microseconds of the writer's clock, so a client's after_version stays valid across
-- this upgrade.
CREATE SEQUENCE job_versions AS bigint;

SELECT setval('job_versions', greatest(jobd_now_us(),
    (SELECT coalesce(max(version), 0) FROM jobs),
    (SELECT coalesce(max(version), 0) FROM job_progress)));

CREATE FUNCTION jobd_next_version(job bigint, version bigint, floor bigint)
RETURNS bigint LANGUAGE sql STABLE AS
$$ SELECT greatest(version + 1, floor,
                   (SELECT p.version + 1 FROM job_progress p WHERE p.job = jobd_next_version.job)) $$;
