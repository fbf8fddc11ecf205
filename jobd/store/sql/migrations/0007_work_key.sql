-- Same-work dedupe (SPEC §4): a job of an exclusive type keeps its work key (type,
-- resolved repository path, options but full_reindex, as jobd.rules.Rules.work makes it),
-- so that a submit finds a queued or running job of the same work by one index probe.
-- Jobs stored before this migration have none: they are never folded into.
ALTER TABLE jobs ADD COLUMN work TEXT;
CREATE INDEX jobs_same_work ON jobs (user_id, work, seq)
WHERE work IS NOT NULL AND status IN ('queued', 'running');
-- what the dedupe before the work key looked jobs up by: no query reads it now
DROP INDEX jobs_queued_project;

-- The idempotency keys of submits folded into a job that already had one (SPEC §4: a
-- fold records the submit's key for the job), so that their resends find it too.
CREATE TABLE job_keys (
    user_id TEXT NOT NULL, key TEXT NOT NULL,
    job INTEGER NOT NULL REFERENCES jobs (seq) ON DELETE CASCADE,
    PRIMARY KEY (user_id, key)) WITHOUT ROWID;
CREATE INDEX job_keys_job ON job_keys (job);
