-- jobs.list by start or end time, newest first, jobs without that time last
CREATE INDEX jobs_by_started ON jobs (ifnull(started_at, -1), seq);
CREATE INDEX jobs_by_completed ON jobs (ifnull(completed_at, -1), seq);
