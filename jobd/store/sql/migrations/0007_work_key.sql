-- Same-work dedupe (SPEC §4): a job of an exclusive type keeps its work key (type,
-- resolved repository path, options but full_reindex, as jobd.rules.work_key makes it),
-- so that a submit finds a queued or running job of the same work by one index probe.
-- Jobs stored before this migration have none: they are never folded into.
ALTER TABLE jobs ADD COLUMN work TEXT;
CREATE INDEX jobs_same_work ON jobs (user_id, work, seq)
WHERE work IS NOT NULL AND status IN ('queued', 'running');
